"""Does XLA:CPU's compiled memory analysis reflect rematerialisation? A plain check, no SDXL.

  python benchmarks/cpu_remat_check.py

An MLP of 8 blocks x 4 Dense(1024)+tanh layers on a (4096, 1024) batch, its gradient compiled
without remat, with `nn.remat` on the blocks, and with `tdm_jax.models.remat.rematerialised`
(the UNet's); prints XLA's temporaries for each. Without remat the backward keeps 32 activations
of 16 MiB; with it, 8 block inputs and one block's internals should be enough.
"""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tdm_jax.models.remat import rematerialised  # pylint: disable=g-import-not-at-top,wrong-import-position


class Block(nn.Module):

  @nn.compact
  def __call__(self, x):
    for i in range(4):
      x = jnp.tanh(nn.Dense(1024, name=f"dense_{i}")(x))
    return x


class Net(nn.Module):
  remat: str  # "none", "nn.remat" or "rematerialised"

  @nn.compact
  def __call__(self, x):
    for i in range(8):
      if self.remat == "rematerialised":
        x = rematerialised(Block(name=f"block_{i}"), x)
      else:
        x = (nn.remat(Block) if self.remat == "nn.remat" else Block)(name=f"block_{i}")(x)
    return x


def main():
  x = jnp.ones((4096, 1024))
  print(f"backend: {jax.devices()[0].platform}")
  for remat in ("none", "nn.remat", "rematerialised"):
    model = Net(remat)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    loss = lambda p, x, model=model: jnp.mean(model.apply(p, x) ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
    print(f"{remat}: temporaries {compiled.memory_analysis().temp_size_in_bytes / 2**20:.0f} MiB")


if __name__ == "__main__":
  main()
