"""Our Flax PixArtTransformer2DModel equals Diffusers' on the same (tiny, random) weights.

Three tiny configs shaped like the published ones: PixArt-alpha 512 (no size conditions, position
interpolation 1), alpha 1024-MS (resolution and aspect-ratio embeddings, interpolation 2) and
Sigma (no size conditions, interpolation 2).
"""

import functools
import inspect
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusers
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from safetensors.numpy import load_file

from tdm_jax.convert.errors import ConversionError
from tdm_jax.convert.pixart import (abstract_params, fold_step_embedding, pixart_params_from_state_dict,
                                    pixart_state_dict_from_params)
from tdm_jax.infra.errors import ConfigError
from tdm_jax.models.pixart import (DIFFUSERS_KEYS, PixArtConfig, PixArtTransformer2DModel, pixart_alpha_init,
                                   sincos_pos_embed)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTION = 12
BASE = dict(num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24, num_layers=2, in_channels=4,
            out_channels=8, caption_channels=CAPTION, sample_size=8, patch_size=2, norm_type="ada_norm_single",
            num_embeds_ada_norm=1000, norm_elementwise_affine=False, norm_eps=1e-6)
VARIANTS = {
    "alpha_512": dict(BASE, use_additional_conditions=False, interpolation_scale=1),
    "alpha_1024_ms": dict(BASE, use_additional_conditions=True, interpolation_scale=2),
    "sigma": dict(BASE, use_additional_conditions=False, interpolation_scale=2),
}
REAL = {"pixart-alpha-xl-2-512": 610_856_096, "pixart-alpha-xl-2-1024-ms": 611_349_152,
        "pixart-sigma-xl-2-1024-ms": 610_856_096}
TOL = 1e-5


def _diffusers_model(kwargs, tmp_path, seed=0):
  """A random Diffusers PixArt (every parameter redrawn: Diffusers zero-initialises some), saved and read
  back as a numpy state dict, with its config.json dict."""
  torch.manual_seed(seed)
  model = diffusers.PixArtTransformer2DModel(**kwargs).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.1)
  model.save_pretrained(tmp_path, safe_serialization=True)
  state = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
  return model, state, dict(model.config)


def _inputs(kwargs, height, width, float_t=False, seed=0):
  rng = np.random.default_rng(seed)
  batch, length = 2, 7
  sample = rng.standard_normal((batch, kwargs["in_channels"], height, width)).astype(np.float32)
  t = np.array([10.5, 999.25], np.float32) if float_t else np.array([10, 700], np.int64)
  caption = rng.standard_normal((batch, length, CAPTION)).astype(np.float32)
  mask = np.zeros((batch, length), bool)
  mask[0, :5] = True  # a different number of kept tokens per row
  mask[1, :2] = True
  res = np.array([[1024, 1024], [768, 1344]], np.float32)
  ratio = np.array([[1.0], [0.57]], np.float32)
  return sample, t, caption, mask, res, ratio


def _theirs(model, sample, t, caption, mask, res, ratio):
  added = {"resolution": torch.from_numpy(res), "aspect_ratio": torch.from_numpy(ratio)}
  with torch.no_grad():
    return model(torch.from_numpy(sample), encoder_hidden_states=torch.from_numpy(caption),
                 timestep=torch.from_numpy(t), added_cond_kwargs=added,
                 encoder_attention_mask=None if mask is None else torch.from_numpy(mask.astype(np.int64))
                 ).sample.numpy()


@functools.lru_cache(maxsize=None)
def _jitted_apply(config, dtype):
  """One jitted apply per (config, dtype), so that calls with equal shapes share a compile."""
  return jax.jit(PixArtTransformer2DModel(config, dtype=dtype).apply)


def _ours(config, params, sample, t, caption, mask, res, ratio, dtype=jnp.float32, num_steps=None):
  out = _jitted_apply(config, dtype)({"params": params}, sample, t, caption, mask, res, ratio, num_steps)
  return np.asarray(out, np.float32)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity(variant, tmp_path):
  kwargs = VARIANTS[variant]
  model, state, config_dict = _diffusers_model(kwargs, tmp_path)
  config = PixArtConfig.from_dict(config_dict)
  params = pixart_params_from_state_dict(state, config)
  # The second grid differs from sample_size (8): the position table is recomputed for 6 x 4 patches.
  float_case = _inputs(kwargs, 12, 8, float_t=True, seed=1)
  cases = {"int t, masked, 8x8": _inputs(kwargs, 8, 8),
           "float t, no mask, 12x8": float_case[:3] + (None,) + float_case[4:]}
  for name, args in cases.items():
    theirs = _theirs(model, *args)
    ours = _ours(config, params, *args)
    assert ours.shape == theirs.shape == (2, 8) + args[0].shape[2:]
    err = float(np.max(np.abs(ours - theirs)))
    print(f"{variant} / {name}: fp32 max|ours - theirs| = {err:.2e}, max|theirs| = {np.max(np.abs(theirs)):.2f}")
    assert err <= TOL, (name, err)

  # bf16 compute over bf16 weights stays near float32.
  args = cases["int t, masked, 8x8"]
  ref = _ours(config, params, *args)
  bf16_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  low = _jitted_apply(config, jnp.bfloat16)({"params": bf16_params}, *args)
  assert low.dtype == jnp.bfloat16
  low = np.asarray(low, np.float32)
  err = float(np.max(np.abs(low - ref)))
  scale = float(np.max(np.abs(ref)))
  print(f"{variant}: bf16 max|bf16 - fp32| = {err:.2e} (max|fp32| = {scale:.2f})")
  assert np.all(np.isfinite(low)) and err <= 0.05 * scale, (err, scale)


def test_diffusers_round_trip(tmp_path):
  """Our tree back to a Diffusers state dict: a fresh Diffusers model loads it strictly and agrees."""
  kwargs = VARIANTS["alpha_1024_ms"]
  model, state, config_dict = _diffusers_model(kwargs, tmp_path)
  params = pixart_params_from_state_dict(state, config_dict)
  back = pixart_state_dict_from_params(params, config_dict)
  assert sorted(back) == sorted(state)
  fresh = diffusers.PixArtTransformer2DModel(**kwargs).eval()
  fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in back.items()}, strict=True)
  args = _inputs(kwargs, 8, 8)
  np.testing.assert_array_equal(_theirs(fresh, *args), _theirs(model, *args))


def test_conversion_is_strict(tmp_path):
  _, state, config_dict = _diffusers_model(VARIANTS["sigma"], tmp_path)
  broken = dict(state)
  broken["extra.weight"] = np.zeros((1,), np.float32)
  del broken["transformer_blocks.1.attn2.to_k.bias"]
  broken["proj_out.weight"] = np.zeros((3, 24), np.float32)
  with pytest.raises(ConversionError) as err:
    pixart_params_from_state_dict(broken, config_dict)
  for name in ("extra.weight", "transformer_blocks.1.attn2.to_k.bias", "proj_out.weight: expected (32, 24)"):
    assert name in str(err.value)


def test_position_table_equals_diffusers():
  for d, gh, gw, base, scale in ((24, 4, 4, 4, 1), (24, 6, 4, 4, 2), (1152, 64, 64, 64, 2), (1152, 48, 80, 32, 1)):
    theirs = get_2d_sincos_pos_embed(d, (gh, gw), base_size=base, interpolation_scale=scale).float().numpy()
    ours = sincos_pos_embed(d, gh, gw, base, scale)
    assert ours.shape == theirs.shape
    assert float(np.max(np.abs(ours - theirs))) <= 1e-6


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_config_parameter_counts(name):
  with open(os.path.join(REPO, "configs", "diffusers", name, "transformer", "config.json")) as f:
    config_dict = json.load(f)
  config = PixArtConfig.from_dict(config_dict)
  assert config.use_additional_conditions == (name == "pixart-alpha-xl-2-1024-ms")
  assert config.interpolation_scale == (1 if name == "pixart-alpha-xl-2-512" else 2)
  abstract = abstract_params(config)
  boxed = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, flax.linen.LogicallyPartitioned))
  assert all(isinstance(x, flax.linen.LogicallyPartitioned) for x in boxed)  # every weight has axis names
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(flax.core.meta.unbox(abstract)))
  assert count == REAL[name]


def test_known_keys_are_diffusers_signature():
  signature = inspect.signature(diffusers.PixArtTransformer2DModel.__init__).parameters
  assert set(DIFFUSERS_KEYS) == set(signature) - {"self"}


@pytest.mark.parametrize("key, value, words", [
    ("some_new_option", 1, "unknown key 'some_new_option'"),
    ("norm_type", "ada_norm_zero", "norm_type='ada_norm_zero'; supported: ['ada_norm_single']"),
    ("activation_fn", "geglu", "activation_fn='geglu'"),
    ("attention_type", "gated", "attention_type='gated'"),
    ("norm_elementwise_affine", True, "norm_elementwise_affine=True"),
    ("caption_channels", None, "caption_channels=None"),
    ("cross_attention_dim", 32, "cross_attention_dim=32"),
    ("num_embeds_ada_norm", None, "num_embeds_ada_norm=None"),
    ("dropout", 0.1, "dropout=0.1"),
])
def test_unsupported_config_is_refused(key, value, words):
  with pytest.raises(ConfigError) as err:
    PixArtConfig.from_dict(dict(VARIANTS["sigma"], **{key: value}))
  assert words in str(err.value) and "\n" not in str(err.value)
  # What Diffusers writes beside the arguments is accepted, and upcast_attention changes nothing here.
  PixArtConfig.from_dict(dict(VARIANTS["sigma"], _class_name="PixArtTransformer2DModel", upcast_attention=True))


def test_step_embedding_folds_into_linear_2(tmp_path):
  """A zero row is the Diffusers model; folding a row into linear_2's bias equals the table; the folded
  export loads into Diffusers strictly and gives our table model's output."""
  kwargs = VARIANTS["alpha_1024_ms"]
  model, state, config_dict = _diffusers_model(kwargs, tmp_path)
  params = pixart_params_from_state_dict(state, config_dict)
  unified = dict(config_dict, num_step_embeds=4)
  table = np.random.default_rng(3).standard_normal((4, 24)).astype(np.float32)
  table[0] = 0.0
  with_table = dict(params, step_embedding={"embedding": table})
  args = _inputs(kwargs, 8, 8)
  config = PixArtConfig.from_dict(unified)
  zero_row = _ours(config, with_table, *args, num_steps=np.array([0, 0]))
  assert float(np.max(np.abs(zero_row - _theirs(model, *args)))) <= TOL
  with_k = _ours(config, with_table, *args, num_steps=np.array([2, 2]))
  assert float(np.max(np.abs(with_k - zero_row))) > 1e-2  # the row matters
  folded, folded_dict = fold_step_embedding(with_table, unified, 2)
  assert "num_step_embeds" not in folded_dict and "step_embedding" not in folded
  folded_out = _ours(PixArtConfig.from_dict(folded_dict), folded, *args)
  print(f"fold: max|folded - table| = {np.max(np.abs(folded_out - with_k)):.2e}")
  assert float(np.max(np.abs(folded_out - with_k))) <= TOL
  with pytest.raises(ConversionError):
    pixart_state_dict_from_params(with_table, unified)
  fresh = diffusers.PixArtTransformer2DModel(**kwargs).eval()
  fresh.load_state_dict({k: torch.from_numpy(np.array(v))
                         for k, v in pixart_state_dict_from_params(folded, folded_dict).items()}, strict=True)
  assert float(np.max(np.abs(_theirs(fresh, *args) - with_k))) <= TOL


def test_remat_same_output_and_gradients(tmp_path):
  kwargs = VARIANTS["alpha_1024_ms"]
  _, state, config_dict = _diffusers_model(kwargs, tmp_path)
  config = PixArtConfig.from_dict(config_dict)
  params = jax.tree.map(jnp.asarray, pixart_params_from_state_dict(state, config))
  sample, t, caption, mask, res, ratio = _inputs(kwargs, 8, 8)

  def run(remat):
    model = PixArtTransformer2DModel(config, remat=remat)
    loss = lambda p: jnp.mean(model.apply({"params": p}, sample, t, caption, mask, res, ratio) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  (plain_loss, plain_grads), (remat_loss, remat_grads) = run(False), run(True)
  assert abs(float(plain_loss) - float(remat_loss)) <= 1e-6 * abs(float(plain_loss))
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), plain_grads, remat_grads))
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(plain_grads))
  assert max(diffs) <= 1e-5 * scale, (max(diffs), scale)
  # Gradients reach every block's parameters, including the cross-attention under the mask.
  assert float(jnp.max(jnp.abs(remat_grads["transformer_blocks_1"]["attn2"]["to_k"]["kernel"]))) > 0


def test_pixart_alpha_init():
  """Trained from nothing (the embedded teacher), the transformer starts as PixArt-alpha's training code
  starts it: cross-attention outputs and the final projection at zero (the model outputs zeros), the
  timestep / size embedders, adaLN-single and caption projections at N(0, 0.02), other kernels
  xavier-uniform, every bias zero; the modulation tables keep their draws."""
  config = PixArtConfig(**VARIANTS["alpha_1024_ms"])
  sample, t, caption, mask, res, ratio = _inputs(VARIANTS["alpha_1024_ms"], 8, 8)
  params = flax.linen.meta.unbox(PixArtTransformer2DModel(config).init(
      jax.random.key(0), sample, t, caption, mask, res, ratio)["params"])
  fresh = flax.traverse_util.flatten_dict(pixart_alpha_init(params, jax.random.key(1)), sep="/")
  before = flax.traverse_util.flatten_dict(params, sep="/")
  assert fresh.keys() == before.keys()
  assert np.all(_ours(config, pixart_alpha_init(params, jax.random.key(1)), sample, t, caption, mask, res,
                      ratio) == 0)
  small = [p for p in fresh if p.endswith("kernel") and p.startswith(("adaln_single/", "caption_projection/"))]
  assert "adaln_single/emb/resolution_embedder/linear_1/kernel" in small and len(small) == 9, small
  for path, value in fresh.items():
    value = np.asarray(value)
    if "scale_shift_table" in path:
      np.testing.assert_array_equal(value, before[path])
    elif path.endswith("bias") or "/attn2/to_out_0/" in path or path.startswith("proj_out/"):
      assert np.all(value == 0), path
    elif path in small:
      assert abs(value.std() - 0.02) < 0.006, (path, value.std())
    else:
      bound = (6.0 / (value.size // value.shape[-1] + value.shape[-1])) ** 0.5
      assert np.abs(value).max() <= bound and np.abs(value).max() > 0.8 * bound, path
