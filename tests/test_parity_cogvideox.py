"""Our Flax CogVideoXTransformer3DModel equals Diffusers' on the same (tiny, random) weights.

Two tiny configs shaped like the published ones (`tiny_cogvideox.VARIANTS`): CogVideoX-2B (3-D sin-cos
positions) and CogVideoX-5B (3-D rotary positions; Diffusers gets the pipeline's table, ours computes
its own). Latents of 3 frames (9 video frames) with a non-square 6x4 frame, unlike the sample size,
and of the sample size itself; float and int timesteps. Plus the converter (round trip, strictness),
config refusals, the step-table fold, bf16, remat, LoRA names and the published configs' sizes.
"""

import copy
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
from diffusers.models.embeddings import get_3d_rotary_pos_embed, get_3d_sincos_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

import tiny_cogvideox
from tdm_jax.convert import lora as lora_io
from tdm_jax.convert import names
from tdm_jax.convert.cogvideox import (LORA_LAYOUT, LORA_TARGETS, STEP_EMBEDDING, abstract_params,
                                       cogvideox_params_from_state_dict, cogvideox_state_dict_from_params,
                                       diffusers_name, expected_param_shapes, fold_step_embedding, our_path)
from tdm_jax.convert.errors import ConversionError
from tdm_jax.core import lora
from tdm_jax.infra.errors import ConfigError
from tdm_jax.models.cogvideox import DIFFUSERS_KEYS, CogVideoXConfig, CogVideoXTransformer3DModel
from tdm_jax.models.embeddings import resize_crop_region, rotary_3d, sincos_3d_pos_embed

VARIANTS = tiny_cogvideox.VARIANTS
TOL = 1e-5
# (frames, height, width) of the latents: odd frame count with a non-square frame unlike the sample size
# (tables recomputed; the rotary grid in a crop region of the base grid), and the sample size itself.
SHAPES = {"3 frames 6x4": (3, 6, 4), "sample size 3 frames 8x12": (3, 8, 12)}

# The published transformer configs (THUDM/CogVideoX-2b, -5b), numbers copied, and their parameter counts.
COGVIDEOX_2B = dict(activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=64, dropout=0.0,
                    flip_sin_to_cos=True, freq_shift=0, in_channels=16, max_text_seq_length=226,
                    norm_elementwise_affine=True, norm_eps=1e-05, num_attention_heads=30, num_layers=30,
                    ofs_embed_dim=None, out_channels=16, patch_bias=True, patch_size=2, patch_size_t=None,
                    sample_frames=49, sample_height=60, sample_width=90, spatial_interpolation_scale=1.875,
                    temporal_compression_ratio=4, temporal_interpolation_scale=1.0, text_embed_dim=4096,
                    time_embed_dim=512, timestep_activation_fn="silu", use_learned_positional_embeddings=False,
                    use_rotary_positional_embeddings=False)
COGVIDEOX_5B = dict(COGVIDEOX_2B, num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True)
PARAM_COUNTS = {"2b": (COGVIDEOX_2B, 1_693_783_872), "5b": (COGVIDEOX_5B, 5_570_283_072)}


@pytest.fixture(scope="module")
def models():
  """{variant: (Diffusers model, numpy state dict, config dict)}, built once."""
  out = {}
  for i, (name, kwargs) in enumerate(sorted(VARIANTS.items())):
    model = tiny_cogvideox.random_transformer(kwargs, seed=i)
    out[name] = (model, tiny_cogvideox.state_dict(model), dict(model.config))
  return out


@functools.lru_cache(maxsize=None)
def _jitted_apply(config, dtype=jnp.float32, remat=False):
  """One jitted apply per (config, dtype), so that calls with equal shapes share a compile."""
  return jax.jit(CogVideoXTransformer3DModel(config, dtype=dtype, remat=remat, attention_implementation="xla").apply)


def _ours(config, params, video, t, text, dtype=jnp.float32, num_steps=None):
  return np.asarray(_jitted_apply(config, dtype)({"params": params}, video, t, text, num_steps), np.float32)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity(variant, models):
  model, state, config_dict = models[variant]
  config = CogVideoXConfig.from_dict(config_dict)
  params = cogvideox_params_from_state_dict(state, config)
  runs = [(name, shape, (999.0, 321.5)) for name, shape in SHAPES.items()]
  runs.append(("3 frames 6x4, int timesteps", SHAPES["3 frames 6x4"], (999, 3)))
  for name, shape, timestep in runs:
    args = tiny_cogvideox.inputs(VARIANTS[variant], *shape, seed=shape[1], timestep=timestep)
    theirs = tiny_cogvideox.run_diffusers(model, *args)
    ours = _ours(config, params, *args)
    assert ours.shape == theirs.shape == (2, shape[0], config.out_channels) + shape[1:]
    err = float(np.max(np.abs(ours - theirs)))
    print(f"{variant} / {name}: fp32 max|ours - theirs| = {err:.2e}, max|theirs| = {np.max(np.abs(theirs)):.2f}")
    assert err <= TOL, (name, err)


def test_position_tables_equal_diffusers():
  """Our 3-D sin-cos table is Diffusers' (as CogVideoXPatchEmbed makes it) and our rotary table the
  pipeline's, at the published sizes (60x90 latents, 13 frames), other aspect ratios and tiny ones."""
  for dim, frames, gh, gw in ((1920 // 10, 13, 30, 45), (48, 3, 3, 2), (16, 1, 4, 6)):
    theirs = get_3d_sincos_pos_embed(dim, (gw, gh), frames, 1.875, 1.0).flatten(0, 1).float().numpy()
    ours = sincos_3d_pos_embed(dim, frames, gh, gw, 1.875, 1.0)
    assert ours.shape == theirs.shape and float(np.max(np.abs(ours - theirs))) <= 1e-6, (dim, frames, gh, gw)
  worst = 0.0
  for head_dim, frames, gh, gw, base_h, base_w in ((64, 13, 30, 45, 30, 45), (64, 13, 30, 30, 30, 45),
                                                    (64, 7, 48, 85, 30, 45), (64, 13, 45, 30, 30, 45),
                                                    (16, 3, 3, 2, 4, 6), (16, 1, 4, 6, 4, 6)):
    region = get_resize_crop_region_for_grid((gh, gw), base_w, base_h)
    assert resize_crop_region(gh, gw, base_h, base_w) == region
    theirs = get_3d_rotary_pos_embed(embed_dim=head_dim, crops_coords=region, grid_size=(gh, gw),
                                     temporal_size=frames)
    for ours, their in zip(rotary_3d(head_dim, frames, gh, gw, base_h, base_w), theirs):
      assert ours.shape == tuple(their.shape) == (frames * gh * gw, head_dim)
      worst = max(worst, float(np.max(np.abs(ours - their.numpy()))))
  print(f"rotary tables: max|ours - pipeline's| = {worst:.2e}")
  assert worst <= 1e-6


def test_round_trip(models):
  """params -> Diffusers state dict -> params is the identity; the names are Diffusers' own."""
  for variant, (model, state, config_dict) in models.items():
    params = cogvideox_params_from_state_dict(state, config_dict)
    back = cogvideox_state_dict_from_params(params, config_dict)
    assert sorted(back) == sorted(model.state_dict()), variant
    for name, value in back.items():
      np.testing.assert_array_equal(value, state[name], err_msg=name)
    again = cogvideox_params_from_state_dict(back, config_dict)
    flat, flat_again = (flax.traverse_util.flatten_dict(p) for p in (params, again))
    assert flat.keys() == flat_again.keys()
    for path in flat:
      np.testing.assert_array_equal(flat[path], flat_again[path], err_msg="/".join(path))


def test_conversion_is_strict(models):
  _, state, config_dict = models["5b"]
  broken = dict(state)
  broken["extra.weight"] = np.zeros((1,), np.float32)
  broken["proj_out.weight"] = np.zeros((3, 32), np.float32)
  del broken["transformer_blocks.1.attn1.norm_k.bias"]
  with pytest.raises(ConversionError) as err:
    cogvideox_params_from_state_dict(broken, config_dict)
  for words in ("extra.weight", "proj_out.weight: expected (16, 32), got (3, 32)",
                "transformer_blocks.1.attn1.norm_k.bias"):
    assert words in str(err.value), words
  with pytest.raises(ConversionError, match="extra.weight"):
    cogvideox_params_from_state_dict(dict(state, **{"extra.weight": np.zeros(1)}), config_dict)
  with pytest.raises(ConversionError, match=r"patch_embed.proj.weight: expected \(32, 4, 2, 2\), got \(32, 4, 3, 3\)"):
    cogvideox_params_from_state_dict(dict(state, **{"patch_embed.proj.weight": np.zeros((32, 4, 3, 3))}),
                                     config_dict)
  # Export refuses a tree that is not the config's.
  params = cogvideox_params_from_state_dict(state, config_dict)
  del params["transformer_blocks_0"]["attn1"]["norm_q"]
  with pytest.raises(ConversionError, match="transformer_blocks_0/attn1/norm_q/scale"):
    cogvideox_state_dict_from_params(params, config_dict)


def test_known_keys_are_diffusers_signature():
  signature = inspect.signature(diffusers.CogVideoXTransformer3DModel.__init__).parameters
  assert set(DIFFUSERS_KEYS) == set(signature) - {"self"}


@pytest.mark.parametrize("key, value, words", [
    ("patch_size_t", 2, "patch_size_t=2"),
    ("ofs_embed_dim", 512, "ofs_embed_dim=512"),
    ("use_learned_positional_embeddings", True, "use_learned_positional_embeddings=True"),
    ("dropout", 0.1, "dropout=0.1"),
    ("activation_fn", "gelu", "activation_fn='gelu'"),
    ("timestep_activation_fn", "relu", "timestep_activation_fn='relu'"),
    ("attention_head_dim", 8, "attention_head_dim=8"),  # rotary needs multiples of 16
    ("num_step_embeds", 0, "num_step_embeds=0"),
    ("some_new_option", 1, "unknown key 'some_new_option'"),
])
def test_unsupported_config_is_refused(key, value, words):
  with pytest.raises(ConfigError) as err:
    CogVideoXConfig.from_dict(dict(VARIANTS["5b"], **{key: value}))
  assert words in str(err.value) and "\n" not in str(err.value)
  # What Diffusers writes beside the arguments is accepted.
  CogVideoXConfig.from_dict(dict(VARIANTS["5b"], _class_name="CogVideoXTransformer3DModel",
                                 _diffusers_version="0.42.1"))


def test_step_embedding_folds_into_linear_2(models):
  """A zero row is the Diffusers model; folding row K into linear_2's bias equals the table at K; the
  folded export loads into Diffusers strictly and gives our table model's output."""
  model, state, config_dict = models["2b"]
  params = cogvideox_params_from_state_dict(state, config_dict)
  unified = dict(config_dict, num_step_embeds=4)
  config = CogVideoXConfig.from_dict(unified)
  table = np.random.default_rng(3).standard_normal((4, config.time_embed_dim)).astype(np.float32)
  table[0] = 0.0
  with_table = dict(params, **{STEP_EMBEDDING: {"embedding": table}})
  args = tiny_cogvideox.inputs(VARIANTS["2b"])
  zero_row = _ours(config, with_table, *args, num_steps=np.array([0, 0]))
  assert float(np.max(np.abs(zero_row - tiny_cogvideox.run_diffusers(model, *args)))) <= TOL
  with_k = _ours(config, with_table, *args, num_steps=np.array([2, 2]))
  assert float(np.max(np.abs(with_k - zero_row))) > 1e-2  # the row matters
  folded, folded_dict = fold_step_embedding(with_table, unified, 2)
  assert "num_step_embeds" not in folded_dict and STEP_EMBEDDING not in folded
  folded_out = _ours(CogVideoXConfig.from_dict(folded_dict), folded, *args)
  print(f"fold: max|folded - table| = {np.max(np.abs(folded_out - with_k)):.2e}")
  assert float(np.max(np.abs(folded_out - with_k))) <= TOL
  with pytest.raises(ConversionError):
    cogvideox_state_dict_from_params(with_table, unified)
  fresh = diffusers.CogVideoXTransformer3DModel(**VARIANTS["2b"]).eval()
  fresh.load_state_dict({k: torch.from_numpy(np.array(v))
                         for k, v in cogvideox_state_dict_from_params(folded, folded_dict).items()}, strict=True)
  assert float(np.max(np.abs(tiny_cogvideox.run_diffusers(fresh, *args) - with_k))) <= TOL
  # The module's own init of the table is zeros: a fresh unified model is the teacher.
  init = jax.jit(lambda key: flax.linen.meta.unbox(CogVideoXTransformer3DModel(config).init(
      key, *args, num_steps=np.array([1, 1]))["params"][STEP_EMBEDDING]["embedding"]))  # the rest is pruned
  assert not np.any(np.asarray(init(jax.random.key(0))))


def test_bf16_stays_near_float32(models):
  _, state, config_dict = models["5b"]
  config = CogVideoXConfig.from_dict(config_dict)
  params = cogvideox_params_from_state_dict(state, config)
  args = tiny_cogvideox.inputs(VARIANTS["5b"])
  ref = _ours(config, params, *args)
  bf16_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  low = _jitted_apply(config, jnp.bfloat16)({"params": bf16_params}, *args)
  assert low.dtype == jnp.bfloat16
  low = np.asarray(low, np.float32)
  err, scale = float(np.max(np.abs(low - ref))), float(np.max(np.abs(ref)))
  print(f"5b: bf16 max|bf16 - fp32| = {err:.2e} (max|fp32| = {scale:.2f})")
  assert np.all(np.isfinite(low)) and err <= 0.05 * scale, (err, scale)


def test_remat_same_output_and_gradients(models):
  """The rotary variant's first block: same loss and gradients with remat, gradients reaching both streams."""
  _, state, config_dict = models["5b"]
  config = CogVideoXConfig.from_dict(dict(config_dict, num_layers=1))
  state = {k: v for k, v in state.items() if not k.startswith("transformer_blocks.1.")}
  params = jax.tree.map(jnp.asarray, cogvideox_params_from_state_dict(state, config))
  args = tiny_cogvideox.inputs(VARIANTS["5b"], 1, 4, 4)

  def run(remat):
    model = CogVideoXTransformer3DModel(config, remat=remat, attention_implementation="xla")
    loss = lambda p: jnp.mean(model.apply({"params": p}, *args) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  (plain_loss, plain_grads), (remat_loss, remat_grads) = run(False), run(True)
  assert abs(float(plain_loss) - float(remat_loss)) <= 1e-6 * abs(float(plain_loss))
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), plain_grads, remat_grads))
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(plain_grads))
  assert max(diffs) <= 1e-5 * scale, (max(diffs), scale)
  flat = flax.traverse_util.flatten_dict(remat_grads, sep="/")
  for path in ("transformer_blocks_0/attn1/norm_k/scale", "transformer_blocks_0/norm1/linear/kernel",
               "patch_embed/text_proj/kernel", "transformer_blocks_0/ff/net_2/kernel"):
    assert float(jnp.max(jnp.abs(flat[path]))) > 0, path


def test_lora_targets_and_file(models, tmp_path):
  """LORA_TARGETS picks exactly every block's to_q/to_k/to_v/to_out_0; a LoRA file written with
  LORA_LAYOUT loads into Diffusers' model (PEFT) and gives our merged model's output."""
  model, state, config_dict = models["5b"]
  paths = ["/".join(p) for p in expected_param_shapes(config_dict)]
  picked = {p for p in paths if any(re.search(t, p) for t in LORA_TARGETS)}
  want = {f"transformer_blocks_{i}/attn1/{m}/kernel" for i in range(2) for m in ("to_q", "to_k", "to_v", "to_out_0")}
  assert picked == want
  module = ("transformer_blocks_1", "attn1", "to_out_0")
  assert LORA_LAYOUT.key(module) == "transformer.transformer_blocks.1.attn1.to_out.0"
  assert LORA_LAYOUT.our_path("transformer_blocks.1.attn1.to_out.0") == module
  pytest.importorskip("peft")
  cfg = lora.LoraConfig(rank=2, alpha=4.0, targets=LORA_TARGETS)  # alpha != rank: the scale must travel
  params = cogvideox_params_from_state_dict(state, config_dict)
  adapters = lora.init_adapters(jax.random.PRNGKey(0), params, cfg)
  rng = np.random.default_rng(0)
  adapters = jax.tree_util.tree_map_with_path(
      lambda p, x: (rng.standard_normal(x.shape) * 0.1).astype(np.float32) if p[-1].key == "b" else np.asarray(x),
      adapters)
  path = lora_io.save_lora(str(tmp_path), adapters, cfg, config_dict, layout=LORA_LAYOUT)
  theirs_model = copy.deepcopy(model)
  theirs_model.load_lora_adapter(path, prefix="transformer")
  args = tiny_cogvideox.inputs(VARIANTS["5b"])
  theirs = tiny_cogvideox.run_diffusers(theirs_model, *args)
  merged = jax.tree.map(np.asarray, lora.merge(params, adapters, cfg))
  ours = _ours(CogVideoXConfig.from_dict(config_dict), merged, *args)
  change = float(np.max(np.abs(theirs - tiny_cogvideox.run_diffusers(model, *args))))
  err = float(np.max(np.abs(ours - theirs)))
  print(f"LoRA: max|ours - diffusers| = {err:.2e}, LoRA's change {change:.2f}")
  assert change > 1e-2 and err <= TOL


@pytest.mark.parametrize("variant", sorted(PARAM_COUNTS))
def test_published_sizes(variant):
  """The published configs' parameter trees (eval_shape only) have Diffusers' exact parameter counts,
  every weight in a logical-axis box, and names that map back and forth."""
  config_dict, count = PARAM_COUNTS[variant]
  abstract = abstract_params(config_dict)
  boxed = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, flax.linen.LogicallyPartitioned))
  assert all(isinstance(x, flax.linen.LogicallyPartitioned) for x in boxed)
  shapes = names.flat_shapes(abstract)
  assert all(our_path(diffusers_name(p)) == p for p in shapes)
  total = sum(int(np.prod(s)) for s in shapes.values())
  print(f"CogVideoX-{variant.upper()}: {total:,} parameters")
  assert total == count
