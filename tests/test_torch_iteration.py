"""The PyTorch iteration of benchmarks/torch_iteration.py computes what our step computes (equal work).

From identical weights, token ids and random draws (our step's own, `tdm.iteration_draws`), a few
iterations on a tiny SDXL pipeline must give the same losses, gradient norms and updated weights on
both sides, so that benchmarks/iteration.py compares equal work. Two recipes: LoRA adapters with the
unified K table (configs/sdxl.py) and float32 full copies (configs/shapes.py).
"""

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax  # noqa: E402

import rows  # noqa: E402
import tiny_pipeline  # noqa: E402
import torch_iteration  # noqa: E402


def _flat(tree):
  return {"/".join(p): np.asarray(v) for p, v in flax.traverse_util.flatten_dict(tree).items()}


@pytest.mark.parametrize("lora_rank", [4, 0], ids=["lora_unified", "full_copies_unified"])
def test_torch_iteration_computes_ours(tmp_path, lora_rank):
  folder = tmp_path / "pipeline"
  tiny_pipeline.make_tiny_sdxl_pipeline(folder, transformer_depth=(1, 1))
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("\n".join(tiny_pipeline.PROMPTS) + "\n")
  config = tiny_pipeline.tiny_sdxl_config(folder, prompts)
  config.model.lora_rank, config.model.lora_alpha = lora_rank, float(lora_rank)
  config.train.batch_size = 2
  config.tdm.guidance_scale = 4.0
  config.optim.student_lr = config.optim.fake_lr = 1e-3
  config.optim.eps = 1e-4  # Adam divides by |g| + eps: keep near-zero gradients' steps continuous in g
  torch.manual_seed(0)
  ours = rows.Ours(config, str(tmp_path / "work"))
  frozen = torch_iteration.load_frozen(str(folder), torch.float32)
  theirs = torch_iteration.TorchTDM(config, frozen, ours.task.schedule, resolution=16)
  theirs.load_trainable("student", ours.state.student_params)
  theirs.load_trainable("fake", ours.state.fake_params)
  before = {role: theirs.trainable_tree(role) for role in ("student", "fake")}

  seen_k = set()
  for step in range(3):
    draws = torch_iteration.jax_draws(ours.cfg, config.seed, step, 2, ours.task.sample_shape)
    seen_k.add(draws.num_steps)
    assert draws.num_steps == ours.num_steps(step)
    got = theirs.iterate(ours.inputs(step), draws)
    want = ours.run(step)
    for name in ("fake_loss", "generator_loss", "fake_grad_norm", "student_grad_norm", "num_steps"):
      np.testing.assert_allclose(got[name], want[name], rtol=2e-3, err_msg=f"{name} at iteration {step}")
  assert len(seen_k) > 1, "the three iterations should draw more than one K"

  lr = config.optim.fake_lr
  for role, tree in (("student", ours.state.student_params), ("fake", ours.state.fake_params)):
    mine, theirs_now = _flat(tree), theirs.trainable_tree(role)
    assert set(mine) == set(theirs_now)
    moved = 0
    for path, value in mine.items():
      # within 2% of one step's size (Adam moves each entry by about lr per iteration; the K table's lr is 100x)
      step = lr * (100.0 if path.startswith("class_embedding/") else 1.0)
      np.testing.assert_allclose(theirs_now[path], value, atol=0.02 * step, rtol=0, err_msg=f"{role}: {path}")
      moved += np.abs(value - before[role][path]).max() > 0.5 * step
    assert moved > 0.5 * len(mine), f"{role}: most tensors should have moved"
