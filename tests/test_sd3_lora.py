"""SD3 LoRA students as Diffusers LoRA files: the MMDiT backbone's `write_lora` in a stock SD3 pipeline.

One tiny SD3.5-Medium-shaped pipeline (`tiny_sd3`: dual attention `attn2` in block 0, RMS QK norm, a
context-pre-only last block), our converted transformer, random rank-4 adapters with alpha 8 (the
alpha / r = 2 scale must travel in the file) over the backbone's own targets. Diffusers'
`load_lora_weights` of what `write_lora` writes must give the transformer output of our merged
params; `lora/` + `lora_4step/` as two adapters that of our unified student at K = 4.
"""

import os
import re
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("peft")  # Diffusers' LoRA loader needs it.
torch = pytest.importorskip("torch")

import tiny_mmdit  # pylint: disable=g-import-not-at-top,wrong-import-position
import tiny_sd3  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdm_jax.convert import lora as lora_io  # pylint: disable=wrong-import-position
from tdm_jax.convert import mmdit as mmdit_io  # pylint: disable=wrong-import-position
from tdm_jax.convert import unet as unet_io  # pylint: disable=wrong-import-position
from tdm_jax.convert.mmdit import (STEP_EMBEDDING, expected_param_shapes, fold_step_embedding,  # pylint: disable=wrong-import-position
                                   mmdit_params_from_state_dict)
from tdm_jax.core import lora  # pylint: disable=wrong-import-position
from tdm_jax.models.mmdit import MMDiTConfig, SD3Transformer2DModel  # pylint: disable=wrong-import-position
from tdm_jax.tasks.diffusers.backbones.mmdit import BACKBONE  # pylint: disable=wrong-import-position

CFG = lora.LoraConfig(rank=4, alpha=8.0, targets=BACKBONE.lora_targets)  # alpha != rank: the scale must travel
K, ROWS, STEP_COUNTS = 4, 5, (1, 2, 4)  # a unified student of tdm.step_choices (1, 2, 4): table rows 0..4
# Block 0: joint attn (to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out) + attn2 (to_q/k/v, to_out.0);
# block 1, the last, reads the text stream only: no to_add_out.
NUM_TARGETS = 8 + 4 + 7


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
  """The pipeline, our params, adapters, a step table, the files `write_lora` wrote, and both models."""
  root = tmp_path_factory.mktemp("sd3_lora")
  pipe = tiny_sd3.make_tiny_sd3_pipeline(root / "pipeline", with_t5=False, variant="sd35_medium")
  config_dict = dict(pipe.transformer.config)
  config = MMDiTConfig.from_dict(config_dict)
  base = mmdit_params_from_state_dict(tiny_mmdit.state_dict(pipe.transformer), config)
  adapters = lora.init_adapters(jax.random.PRNGKey(0), base, CFG)
  rng = np.random.default_rng(0)
  # b ~ 0.1 N(0, 1): the LoRA changes the output by O(1), well above float32 rounding.
  adapters = jax.tree_util.tree_map_with_path(
      lambda p, x: (rng.standard_normal(x.shape) * 0.1).astype(np.float32) if p[-1].key == "b" else np.asarray(x),
      adapters)
  table = np.zeros((ROWS, config.inner_dim), np.float32)
  table[1:] = rng.standard_normal((ROWS - 1, config.inner_dim)) * 0.5
  dest = str(root / "export")
  BACKBONE.write_lora(dest, adapters, {(STEP_EMBEDDING, "embedding"): table}, CFG, config_dict, STEP_COUNTS, True)

  kwargs = dict(in_channels=config.in_channels, joint_attention_dim=config.joint_attention_dim,
                pooled_projection_dim=config.pooled_projection_dim)
  inputs = tiny_mmdit.inputs(kwargs, 8, 8, seed=3)  # t = (999.0, 321.5)
  teacher_model = SD3Transformer2DModel(config)
  student_model = SD3Transformer2DModel(BACKBONE.with_step_embeds(config, ROWS))
  ours = jax.jit(lambda p: teacher_model.apply({"params": p}, *inputs))
  ours_unified = jax.jit(lambda p, k: student_model.apply({"params": p}, *inputs, num_steps=jnp.full((2,), k)))
  theirs = lambda: tiny_mmdit.run_diffusers(pipe.transformer, *inputs)
  return types.SimpleNamespace(pipe=pipe, config=config, config_dict=config_dict, base=base, adapters=adapters,
                               table=table, dest=dest, ours=ours, ours_unified=ours_unified, theirs=theirs,
                               theirs_base=theirs())


def _attached(pipe, name):
  from peft.tuners.lora import LoraLayer  # pylint: disable=g-import-not-at-top
  return {n for n, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A}


def _report(label, ours, theirs, base):
  err = float(np.max(np.abs(ours - theirs)))
  change = float(np.max(np.abs(theirs - base)))
  print(f"{label}: max|ours - diffusers| = {err:.3e}, max|diffusers| = {float(np.max(np.abs(theirs))):.3f}, "
        f"change from the teacher {change:.3f}")
  assert change > 100 * max(err, 1e-6)  # what is compared matters, so the comparison can fail
  assert err <= 1e-5 * max(1.0, float(np.max(np.abs(theirs)))), err
  return err


def test_files_written(sd3):
  assert sorted(os.listdir(sd3.dest)) == ["lora"] + [f"lora_{k}step" for k in STEP_COUNTS]
  tensors = lora_io.load_file(os.path.join(sd3.dest, "lora", lora_io.WEIGHT_NAME))
  items = lora.adapter_items(sd3.adapters)
  assert len(items) == NUM_TARGETS and len(tensors) == 2 * NUM_TARGETS
  for key, shape in [("transformer.transformer_blocks.0.attn2.to_out.0.lora_A.weight", (4, 16)),
                     ("transformer.transformer_blocks.0.attn.to_add_out.lora_B.weight", (16, 4)),
                     ("transformer.transformer_blocks.1.attn.add_k_proj.lora_A.weight", (4, 16))]:
    assert tensors[key].shape == shape, key
  step = lora_io.load_file(os.path.join(sd3.dest, f"lora_{K}step", lora_io.WEIGHT_NAME))
  module = "transformer.time_text_embed.timestep_embedder.linear_2"
  assert sorted(step) == [f"{module}.lora_A.weight", f"{module}.lora_B.bias", f"{module}.lora_B.weight"]
  np.testing.assert_array_equal(step[f"{module}.lora_B.bias"], sd3.table[K])
  # A one-K student: lora/ alone (no kohya file for SD3).
  one = os.path.join(os.path.dirname(sd3.dest), "one_k")
  BACKBONE.write_lora(one, sd3.adapters, {}, CFG, sd3.config_dict, (4,), False)
  assert os.listdir(one) == ["lora"]


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")  # PEFT on a second adapter
def test_pipeline_loads_lora_and_step_lora(sd3):
  """(a) lora/ alone = our merged params; (b) lora/ + lora_4step/ = our unified student at K = 4 and
  its folded export."""
  np.testing.assert_array_equal(sd3.theirs(), sd3.theirs_base)  # no LoRA left by another test
  merged = jax.device_get(lora.merge(sd3.base, sd3.adapters, CFG))
  pipe = sd3.pipe
  pipe.load_lora_weights(os.path.join(sd3.dest, "lora"), adapter_name="tdm")
  try:
    assert len(_attached(pipe, "tdm")) == NUM_TARGETS
    theirs = sd3.theirs()
    pipe.load_lora_weights(os.path.join(sd3.dest, f"lora_{K}step"), adapter_name=f"tdm_{K}step")
    assert _attached(pipe, f"tdm_{K}step") == {"time_text_embed.timestep_embedder.linear_2"}
    pipe.set_adapters(["tdm", f"tdm_{K}step"])
    theirs_k = sd3.theirs()
  finally:
    pipe.unload_lora_weights()
  np.testing.assert_array_equal(sd3.theirs(), sd3.theirs_base)
  ours_base = np.asarray(sd3.ours(sd3.base))
  print(f"teacher: max|ours - diffusers| = {float(np.max(np.abs(ours_base - sd3.theirs_base))):.3e}")
  _report("lora/", np.asarray(sd3.ours(merged)), theirs, sd3.theirs_base)

  unified = {**merged, STEP_EMBEDDING: {"embedding": sd3.table}}
  ours_k = np.asarray(sd3.ours_unified(unified, K))
  _report(f"lora/ + lora_{K}step/ vs unified K={K}", ours_k, theirs_k, theirs)
  folded, folded_config = fold_step_embedding(unified, sd3.config_dict, K)
  assert folded_config == sd3.config_dict
  err_fold = float(np.max(np.abs(np.asarray(sd3.ours(folded)) - theirs_k)))
  print(f"lora/ + lora_{K}step/ vs folded export: {err_fold:.3e}")
  assert err_fold <= 1e-5 * max(1.0, float(np.max(np.abs(theirs_k))))


def test_load_lora_gives_the_adapters_back(sd3):
  back, back_cfg = lora_io.load_lora(os.path.join(sd3.dest, "lora"), sd3.config_dict, layout=mmdit_io.LORA_LAYOUT)
  assert (back_cfg.rank, back_cfg.alpha) == (4, 4.0)  # the scale is folded into b
  items = lora.adapter_items(sd3.adapters)
  assert lora.target_paths(sd3.base, back_cfg) == sorted(items)
  for path, (a, b) in lora.adapter_items(back).items():
    np.testing.assert_array_equal(a, items[path][0])
    np.testing.assert_array_equal(b, CFG.scale * items[path][1])  # x 2: exact in float32
  # The step file is no adapter file: its lora_B.bias is named.
  with pytest.raises(lora_io.LoraConversionError, match=r"unrecognised keys: \['transformer\.time_text_embed"):
    lora_io.load_lora(os.path.join(sd3.dest, f"lora_{K}step"), sd3.config_dict, layout=mmdit_io.LORA_LAYOUT)
  # A UNet-layout reader refuses the file by its prefix.
  with pytest.raises(lora_io.LoraConversionError, match=r"prefix 'unet'"):
    lora_io.load_lora(os.path.join(sd3.dest, "lora"), sd3.config_dict, layout=unet_io.LORA_LAYOUT)


def test_unmatched_target_lists_mmdit_modules(sd3):
  """What build.py's `lora.target_paths(abstract[denoiser], lora_cfg)` says of a UNet-style target."""
  abstract = BACKBONE.abstract_params(sd3.config)
  unet_style = lora.LoraConfig(rank=4, targets=(r"(^|/)attn1/to_q/kernel$", r"^down_blocks_\d+/"))
  with pytest.raises(ValueError, match=r"match none of the \d+ 2-D parameters") as info:
    lora.target_paths(abstract, unet_style)
  message = str(info.value)
  listed = re.findall(r"^  (\S+/kernel)$", message, re.M)
  matrices = {"/".join(p) for p, s in expected_param_shapes(sd3.config).items() if len(s) == 2}
  assert len(listed) == 12 and set(listed) <= matrices, message
  assert f"... and {len(matrices) - 12} more" in message
  # Adapters on a module the transformer has not (a UNet's) are refused on writing, named.
  stray = {"down_blocks_0": {"attn1": {"to_q": {"kernel": {"a": np.zeros((16, 4), np.float32),
                                                            "b": np.zeros((4, 16), np.float32)}}}}}
  with pytest.raises(lora_io.LoraConversionError, match=r"down_blocks_0/attn1/to_q/kernel: no such parameter in "
                                                        r"the SD3 transformer"):
    lora_io.save_lora(os.path.join(os.path.dirname(sd3.dest), "stray"), stray, CFG, sd3.config_dict,
                      layout=mmdit_io.LORA_LAYOUT)
