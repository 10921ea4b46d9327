"""Our Flax SD3Transformer2DModel (MMDiT) equals Diffusers' on the same (tiny, random) weights.

Three tiny configs shaped like the published ones (`tiny_mmdit.VARIANTS`): SD3-Medium (no dual
attention, no QK norm), SD3.5-Medium (dual attention in the first half of the blocks, RMS QK norm)
and SD3.5-Large (RMS QK norm). Float timesteps (999.0, 321.5), a square and a non-square latent,
both smaller than the position table (the centre crop).
"""

import functools
import inspect
import re

import diffusers
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import PatchEmbed

import tiny_mmdit
from tdm_jax.core import lora
from tdm_jax.convert.errors import ConversionError
from tdm_jax.convert.mmdit import (LORA_TARGETS, POS_TABLE, abstract_params, diffusers_name, expected_param_shapes,
                                   fold_step_embedding, mmdit_params_from_state_dict, mmdit_state_dict_from_params,
                                   our_path)
from tdm_jax.infra.errors import ConfigError
from tdm_jax.models.mmdit import DIFFUSERS_KEYS, MMDiTConfig, SD3Transformer2DModel, cropped_pos_embed, pos_table

VARIANTS = tiny_mmdit.VARIANTS
TOL = 1e-5
SHAPES = {"square 8x8": (8, 8), "non-square 12x8": (12, 8)}  # 4x4 and 6x4 patches, tables of 12 / 16 a side

# SD3.5-Medium's published transformer config (stabilityai/stable-diffusion-3.5-medium): every feature at full size.
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=list(range(13)), qk_norm="rms_norm")


@pytest.fixture(scope="module")
def models():
  """{variant: (Diffusers model, numpy state dict, config dict)}, built once."""
  out = {}
  for i, (name, kwargs) in enumerate(sorted(VARIANTS.items())):
    model = tiny_mmdit.random_sd3_transformer(kwargs, seed=i)
    out[name] = (model, tiny_mmdit.state_dict(model), dict(model.config))
  return out


@functools.lru_cache(maxsize=None)
def _jitted_apply(config, dtype=jnp.float32, remat=False):
  """One jitted apply per (config, dtype), so that calls with equal shapes share a compile."""
  return jax.jit(SD3Transformer2DModel(config, dtype=dtype, remat=remat).apply)


def _ours(config, params, sample, t, context, pooled, dtype=jnp.float32, num_steps=None):
  out = _jitted_apply(config, dtype)({"params": params}, sample, t, context, pooled, num_steps)
  return np.asarray(out, np.float32)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity(variant, models):
  model, state, config_dict = models[variant]
  kwargs = VARIANTS[variant]
  config = MMDiTConfig.from_dict(config_dict)
  params = mmdit_params_from_state_dict(state, config)
  for name, (h, w) in SHAPES.items():
    args = tiny_mmdit.inputs(kwargs, h, w, seed=h)
    theirs = tiny_mmdit.run_diffusers(model, *args)
    ours = _ours(config, params, *args)
    assert ours.shape == theirs.shape == (2, config.out_channels, h, w)
    err = float(np.max(np.abs(ours - theirs)))
    print(f"{variant} / {name}: fp32 max|ours - theirs| = {err:.2e}, max|theirs| = {np.max(np.abs(theirs)):.2f}")
    assert err <= TOL, (name, err)


def test_bf16_stays_near_float32(models):
  _, state, config_dict = models["sd35_medium"]
  config = MMDiTConfig.from_dict(config_dict)
  params = mmdit_params_from_state_dict(state, config)
  args = tiny_mmdit.inputs(VARIANTS["sd35_medium"], 8, 8, seed=8)
  ref = _ours(config, params, *args)
  bf16_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  low = _jitted_apply(config, jnp.bfloat16)({"params": bf16_params}, *args)
  assert low.dtype == jnp.bfloat16
  low = np.asarray(low, np.float32)
  err, scale = float(np.max(np.abs(low - ref))), float(np.max(np.abs(ref)))
  print(f"sd35_medium: bf16 max|bf16 - fp32| = {err:.2e} (max|fp32| = {scale:.2f})")
  assert np.all(np.isfinite(low)) and err <= 0.05 * scale, (err, scale)


def test_diffusers_round_trip(models):
  """Our tree back to a Diffusers state dict (with the position buffer): a fresh Diffusers model loads
  it strictly and agrees."""
  model, state, config_dict = models["sd35_medium"]
  params = mmdit_params_from_state_dict(state, config_dict)
  back = mmdit_state_dict_from_params(params, config_dict)
  assert sorted(back) == sorted(state)
  for name, value in back.items():
    assert value.shape == state[name].shape, name
  np.testing.assert_allclose(back[POS_TABLE], state[POS_TABLE], rtol=0, atol=1e-6)
  fresh = diffusers.SD3Transformer2DModel(**VARIANTS["sd35_medium"]).eval()
  fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in back.items()}, strict=True)
  args = tiny_mmdit.inputs(VARIANTS["sd35_medium"], 12, 8)
  err = float(np.max(np.abs(tiny_mmdit.run_diffusers(fresh, *args) - tiny_mmdit.run_diffusers(model, *args))))
  assert err <= 1e-6, err


def test_conversion_is_strict(models):
  _, state, config_dict = models["sd35_medium"]
  broken = dict(state)
  broken["extra.weight"] = np.zeros((1,), np.float32)
  del broken["transformer_blocks.1.attn2.to_k.bias"]
  del broken["transformer_blocks.0.attn.norm_added_q.weight"]
  broken["proj_out.weight"] = np.zeros((3, 24), np.float32)
  with pytest.raises(ConversionError) as err:
    mmdit_params_from_state_dict(broken, config_dict)
  for words in ("extra.weight", "transformer_blocks.1.attn2.to_k.bias", "transformer_blocks.0.attn.norm_added_q.weight",
                "proj_out.weight: expected (16, 24), got (3, 24)"):
    assert words in str(err.value), words
  # A block of the wrong kind: SD3-Medium's tensors for an SD3.5-Large config (no QK norms) are named.
  _, sd3_state, sd3_dict = models["sd3_medium"]
  with pytest.raises(ConversionError) as err:
    mmdit_params_from_state_dict(sd3_state, dict(sd3_dict, qk_norm="rms_norm"))
  assert "transformer_blocks.2.attn.norm_added_k.weight" in str(err.value)
  # The position buffer: a half-precision copy of our table is accepted, another table is named, none is fine.
  half = dict(state, **{POS_TABLE: state[POS_TABLE].astype(np.float16)})
  mmdit_params_from_state_dict(half, config_dict)
  mmdit_params_from_state_dict({k: v for k, v in state.items() if k != POS_TABLE}, config_dict)
  shifted = dict(state, **{POS_TABLE: state[POS_TABLE] + 0.01})
  with pytest.raises(ConversionError) as err:
    mmdit_params_from_state_dict(shifted, config_dict)
  assert f"{POS_TABLE}: differs from the sin-cos table" in str(err.value)
  # Export refuses a tree that is not the config's.
  params = mmdit_params_from_state_dict(state, config_dict)
  del params["transformer_blocks_0"]["attn2"]
  with pytest.raises(ConversionError, match="transformer_blocks_0/attn2/to_q/kernel"):
    mmdit_state_dict_from_params(params, config_dict)


def test_position_table_equals_diffusers():
  """Our crop of the table (computed for the crop alone) is Diffusers' PatchEmbed.cropped_pos_embed, for
  the published table sizes and square, non-square and edge crops; without pos_embed_max_size, the grid's own."""
  for dim, size, base, grids in ((64, 192, 64, ((128, 128), (96, 160), (3, 5), (192, 192))),
                                 (32, 384, 64, ((128, 128), (80, 192))), (24, 12, 4, ((4, 4), (6, 4), (11, 12)))):
    embed = PatchEmbed(height=2 * base, width=2 * base, patch_size=2, in_channels=1, embed_dim=dim,
                       pos_embed_max_size=size)
    for gh, gw in grids:
      theirs = embed.cropped_pos_embed(2 * gh, 2 * gw)[0].numpy()
      ours = cropped_pos_embed(dim, size, base, gh, gw)
      assert ours.shape == theirs.shape == (gh * gw, dim)
      assert float(np.max(np.abs(ours - theirs))) <= 1e-6, (dim, size, gh, gw)
  with pytest.raises(ValueError, match="larger than the position table"):
    cropped_pos_embed(24, 12, 4, 13, 4)
  config = MMDiTConfig.from_dict(dict(VARIANTS["sd3_medium"], pos_embed_max_size=None))
  embed = PatchEmbed(height=8, width=8, patch_size=2, in_channels=1, embed_dim=16)
  with torch.no_grad():
    # a zero conv leaves the positions
    for p in embed.parameters():
      p.zero_()
    for h, w in ((8, 8), (12, 8)):
      theirs = embed(torch.zeros(1, 1, h, w))[0].numpy()
      assert float(np.max(np.abs(pos_table(config, h // 2, w // 2) - theirs))) <= 1e-6


def test_larger_latent_than_table_is_refused(models):
  _, state, config_dict = models["sd3_medium"]
  config = MMDiTConfig.from_dict(config_dict)
  params = mmdit_params_from_state_dict(state, config)
  args = tiny_mmdit.inputs(VARIANTS["sd3_medium"], 26, 8)  # 13 patches > pos_embed_max_size=12
  with pytest.raises(ValueError, match="larger than the position table"):
    SD3Transformer2DModel(config).apply({"params": params}, *args)


def test_published_shapes_are_diffusers():
  """For SD3.5-Medium's published config (dual attention, QK norm, 24 blocks), our parameter tree is
  Diffusers' parameters by name and layout, and every weight carries logical axis names."""
  with torch.device("meta"):
    model = diffusers.SD3Transformer2DModel(**SD35_MEDIUM)
  theirs = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != POS_TABLE}
  abstract = abstract_params(SD35_MEDIUM)
  boxed = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, flax.linen.LogicallyPartitioned))
  assert all(isinstance(x, flax.linen.LogicallyPartitioned) for x in boxed)
  ours = {}
  for path, shape in expected_param_shapes(SD35_MEDIUM).items():
    name = diffusers_name(path)
    assert our_path(name) == path
    ours[name] = tuple(reversed(shape)) if path[-1] == "kernel" and len(shape) == 2 else shape
  ours["pos_embed.proj.weight"] = tuple(np.array(ours["pos_embed.proj.weight"])[[3, 2, 0, 1]])
  assert ours == theirs
  print(f"SD3.5-Medium: {sum(int(np.prod(s)) for s in ours.values()):,} parameters")


def test_lora_targets(models):
  """LORA_TARGETS picks exactly the attention projections of attn and attn2 (both streams)."""
  paths = ["/".join(p) for p in expected_param_shapes(models["sd35_medium"][2])]
  picked = {p for p in paths if any(re.search(t, p) for t in LORA_TARGETS)}
  projections = ("to_q", "to_k", "to_v", "to_out_0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
  want = {p for p in paths if p.endswith("/kernel") and p.split("/")[-2] in projections}
  assert picked == want
  assert "transformer_blocks_0/attn2/to_q/kernel" in picked and "transformer_blocks_1/attn/to_add_out/kernel" in picked
  assert "transformer_blocks_3/attn/add_k_proj/kernel" in picked
  assert len(picked) == 3 * 8 + 7 + 2 * 4  # 4 blocks' attn (the last without to_add_out), 2 blocks' attn2
  lora.LoraConfig(targets=LORA_TARGETS)  # valid as our LoRA config's targets


def test_known_keys_are_diffusers_signature():
  signature = inspect.signature(diffusers.SD3Transformer2DModel.__init__).parameters
  assert set(DIFFUSERS_KEYS) == set(signature) - {"self"}


@pytest.mark.parametrize("key, value, words", [
    ("some_new_option", 1, "unknown key 'some_new_option'"),
    ("qk_norm", "layer_norm", "qk_norm='layer_norm'; supported: [None, 'rms_norm']"),
    ("qk_norm", "rms_norm_across_heads", "qk_norm='rms_norm_across_heads'"),
    ("caption_projection_dim", 32, "caption_projection_dim=32"),
    ("dual_attention_layers", (0, 7), "dual_attention_layers=[0, 7]"),
    ("num_step_embeds", 0, "num_step_embeds=0"),
])
def test_unsupported_config_is_refused(key, value, words):
  with pytest.raises(ConfigError) as err:
    MMDiTConfig.from_dict(dict(VARIANTS["sd35_medium"], **{key: value}))
  assert words in str(err.value) and "\n" not in str(err.value)
  # What Diffusers writes beside the arguments is accepted; a JSON list of dual layers becomes a tuple.
  config = MMDiTConfig.from_dict(dict(VARIANTS["sd35_medium"], _class_name="SD3Transformer2DModel",
                                      _diffusers_version="0.42.1", dual_attention_layers=[0, 1]))
  assert config.dual_attention_layers == (0, 1)


def test_step_embedding_folds_into_linear_2(models):
  """A zero row is the Diffusers model; folding a row into linear_2's bias equals the table; the folded
  export loads into Diffusers strictly and gives our table model's output."""
  model, state, config_dict = models["sd35_large"]
  kwargs = VARIANTS["sd35_large"]
  params = mmdit_params_from_state_dict(state, config_dict)
  unified = dict(config_dict, num_step_embeds=4)
  config = MMDiTConfig.from_dict(unified)
  table = np.random.default_rng(3).standard_normal((4, config.inner_dim)).astype(np.float32)
  table[0] = 0.0
  with_table = dict(params, step_embedding={"embedding": table})
  args = tiny_mmdit.inputs(kwargs, 12, 8)
  zero_row = _ours(config, with_table, *args, num_steps=np.array([0, 0]))
  assert float(np.max(np.abs(zero_row - tiny_mmdit.run_diffusers(model, *args)))) <= TOL
  with_k = _ours(config, with_table, *args, num_steps=np.array([2, 2]))
  assert float(np.max(np.abs(with_k - zero_row))) > 1e-2  # the row matters
  folded, folded_dict = fold_step_embedding(with_table, unified, 2)
  assert "num_step_embeds" not in folded_dict and "step_embedding" not in folded
  folded_out = _ours(MMDiTConfig.from_dict(folded_dict), folded, *args)
  print(f"fold: max|folded - table| = {np.max(np.abs(folded_out - with_k)):.2e}")
  assert float(np.max(np.abs(folded_out - with_k))) <= TOL
  with pytest.raises(ConversionError):
    mmdit_state_dict_from_params(with_table, unified)
  fresh = diffusers.SD3Transformer2DModel(**kwargs).eval()
  fresh.load_state_dict({k: torch.from_numpy(np.array(v))
                         for k, v in mmdit_state_dict_from_params(folded, folded_dict).items()}, strict=True)
  assert float(np.max(np.abs(tiny_mmdit.run_diffusers(fresh, *args) - with_k))) <= TOL
  # The module's own init of the table is zeros: a fresh unified model is the teacher.
  init = jax.jit(SD3Transformer2DModel(config).init)(jax.random.key(0), *args, num_steps=np.array([1, 1]))
  assert not np.any(np.asarray(flax.linen.meta.unbox(init["params"])["step_embedding"]["embedding"]))


def test_remat_same_output_and_gradients():
  """Two blocks (a dual-attention one, then the context-pre-only one): same loss and gradients with remat."""
  kwargs = dict(VARIANTS["sd35_medium"], num_layers=2, dual_attention_layers=(0,))
  model = tiny_mmdit.random_sd3_transformer(kwargs)
  config = MMDiTConfig.from_dict(dict(model.config))
  params = jax.tree.map(jnp.asarray, mmdit_params_from_state_dict(tiny_mmdit.state_dict(model), config))
  args = tiny_mmdit.inputs(kwargs, 8, 8)

  def run(remat):
    model = SD3Transformer2DModel(config, remat=remat)
    loss = lambda p: jnp.mean(model.apply({"params": p}, *args) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  (plain_loss, plain_grads), (remat_loss, remat_grads) = run(False), run(True)
  assert abs(float(plain_loss) - float(remat_loss)) <= 1e-6 * abs(float(plain_loss))
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), plain_grads, remat_grads))
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(plain_grads))
  assert max(diffs) <= 1e-5 * scale, (max(diffs), scale)
  # Gradients reach both streams of every block, the dual attention and the last block's context side.
  flat = flax.traverse_util.flatten_dict(remat_grads, sep="/")
  for path in ("transformer_blocks_0/attn2/to_q/kernel", "transformer_blocks_0/ff_context/net_2/kernel",
               "transformer_blocks_1/attn/add_k_proj/kernel", "transformer_blocks_1/norm1_context/linear/kernel"):
    assert float(jnp.max(jnp.abs(flat[path]))) > 0, path
