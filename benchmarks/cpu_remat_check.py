"""Does XLA:CPU's compiled memory analysis reflect rematerialisation? A plain check, no SDXL.

  python benchmarks/cpu_remat_check.py

An MLP of 8 blocks x 4 Dense(1024)+tanh layers on a (4096, 1024) batch, its gradient compiled with
and without `nn.remat` on the blocks; prints XLA's temporaries for both. Without remat the
backward keeps 32 activations of 16 MiB; with it, 8 block inputs and one block's internals.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class Block(nn.Module):

  @nn.compact
  def __call__(self, x):
    for i in range(4):
      x = jnp.tanh(nn.Dense(1024, name=f"dense_{i}")(x))
    return x


class Net(nn.Module):
  remat: bool

  @nn.compact
  def __call__(self, x):
    block = nn.remat(Block) if self.remat else Block
    for i in range(8):
      x = block(name=f"block_{i}")(x)
    return x


def main():
  x = jnp.ones((4096, 1024))
  print(f"backend: {jax.devices()[0].platform}")
  for remat in (False, True):
    model = Net(remat)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    loss = lambda p, x, model=model: jnp.mean(model.apply(p, x) ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
    print(f"remat={remat}: temporaries {compiled.memory_analysis().temp_size_in_bytes / 2**20:.0f} MiB")


if __name__ == "__main__":
  main()
