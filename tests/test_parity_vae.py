"""Our Flax AutoencoderKL equals diffusers.AutoencoderKL on the same (tiny, random) weights."""

import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusers
import safetensors.numpy as safetensors_numpy
import torch

from tdm_jax.convert.errors import ConversionError  # noqa: E402
from tdm_jax.convert.vae import vae_params_from_state_dict, vae_state_dict_from_params  # noqa: E402
from tdm_jax.models.vae import AutoencoderKL, VAEConfig  # noqa: E402

import tiny_pipeline

TINY = tiny_pipeline.TINY_VAE
# SD3 / SD3.5's VAE in small: 16 latent channels, no quant convs, its shift and scaling factors
# (stabilityai/stable-diffusion-3-medium-diffusers/vae).
SD3 = dict(TINY, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
           scaling_factor=1.5305)


def _close(ours, theirs, name):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
  err = float(np.max(np.abs(ours - theirs)))
  tol = 1e-4 * max(1.0, float(np.max(np.abs(theirs))))
  print(f"{name}: max|ours - theirs| = {err:.3e} (tol {tol:.1e})")
  assert err <= tol, (name, err, tol)


def _saved_vae(folder, seed, **config):
  """(torch vae, its saved config.json, its safetensors as numpy): a random AutoencoderKL of `config`."""
  torch.manual_seed(seed)
  vae = diffusers.AutoencoderKL(**config).eval()
  # Non-trivial norms and biases so a swapped weight/bias or scale would show.
  with torch.no_grad():
    for name, p in vae.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  vae.save_pretrained(folder, safe_serialization=True)
  with open(os.path.join(folder, "config.json")) as f:
    saved = json.load(f)
  state = safetensors_numpy.load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  return vae, saved, state


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
  return _saved_vae(tmp_path_factory.mktemp("vae"), 0, **TINY)


@pytest.fixture(scope="module")
def sd3_vae(tmp_path_factory):
  return _saved_vae(tmp_path_factory.mktemp("sd3_vae"), 2, **SD3)


def test_encode_decode_parity(tiny_vae):
  vae, config, state = tiny_vae
  cfg = VAEConfig.from_dict(config)
  params = vae_params_from_state_dict(state, cfg)
  model = AutoencoderKL(cfg)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
  z = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  with torch.no_grad():
    dist = vae.encode(torch.from_numpy(x)).latent_dist
    t_mean, t_logvar = dist.mean.numpy(), dist.logvar.numpy()
    t_dec = vae.decode(torch.from_numpy(z)).sample.numpy()
  mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(params, x)
  dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(params, z)
  _close(mean, t_mean, "encoder mean")
  _close(logvar, t_logvar, "encoder logvar")
  _close(dec, t_dec, "decoder output")

  # Pipeline helpers: scaled mean latents, and their inverse through the decoder.
  lat = model.latents_from_images(params, jnp.asarray(x))
  np.testing.assert_allclose(lat, np.asarray(mean) * cfg.scaling_factor, rtol=1e-5, atol=1e-6)
  img = model.images_from_latents(params, jnp.asarray(z) * cfg.scaling_factor)
  _close(img, t_dec, "images_from_latents")
  sample = model.latents_from_images(params, jnp.asarray(x), key=jax.random.PRNGKey(0))
  assert sample.shape == lat.shape and not np.allclose(sample, lat)

  # Round trip back to Diffusers names and layouts.
  back = vae_state_dict_from_params(params, cfg)
  assert set(back) == set(state)
  for k in state:
    np.testing.assert_array_equal(back[k], state[k], err_msg=k)
  # A tree that is not the config's is refused before export, every difference named.
  flat = flax.traverse_util.flatten_dict(params)
  first, second = sorted(flat)[:2]
  bad = {**flat, first: np.zeros((3,), np.float32), ("extra", "kernel"): np.zeros((1,), np.float32)}
  del bad[second]
  with pytest.raises(ConversionError, match=r"VAE params do not match the config:\n  missing: \['"
                     + "/".join(second) + r"'\]\n  extra: \['extra/kernel'\]\n  wrong shape: \['"
                     + "/".join(first) + r": expected \(\d"):
    vae_state_dict_from_params(flax.traverse_util.unflatten_dict(bad), cfg)


def test_logical_axes_on_every_param(tiny_vae):
  _, config, _ = tiny_vae
  abstract = AutoencoderKL(VAEConfig.from_dict(config)).abstract_variables()["params"]
  leaves = jax.tree_util.tree_leaves(abstract, is_leaf=lambda l: hasattr(l, "names"))
  assert leaves and all(hasattr(l, "names") and len(l.names) == l.value.ndim for l in leaves)


def test_missing_extra_and_misshaped_tensors_are_named(tiny_vae):
  _, config, state = tiny_vae
  bad = dict(state)
  del bad["encoder.mid_block.attentions.0.to_q.weight"]
  bad["decoder.extra_thing.weight"] = np.zeros((3,), np.float32)
  bad["decoder.conv_in.weight"] = np.zeros((16, 4, 1, 1), np.float32)
  with pytest.raises(ValueError) as err:
    vae_params_from_state_dict(bad, config)
  msg = str(err.value)
  assert "encoder.mid_block.attentions.0.to_q.weight" in msg
  assert "decoder.extra_thing.weight" in msg
  assert "decoder.conv_in.weight" in msg and "(16, 4, 3, 3)" in msg and "(16, 4, 1, 1)" in msg


def test_unsupported_block_type_is_named(tiny_vae):
  _, config, _ = tiny_vae
  bad = dict(config, down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"])
  with pytest.raises(ValueError, match="AttnDownEncoderBlock2D") as err:
    VAEConfig.from_dict(bad)
  assert "DownEncoderBlock2D" in str(err.value)
  with pytest.raises(ValueError, match="FancyUpBlock"):
    VAEConfig.from_dict(dict(config, up_block_types=["UpDecoderBlock2D", "FancyUpBlock"]))


def test_variant_without_quant_convs_or_attention_with_shift():
  torch.manual_seed(1)
  kwargs = dict(TINY, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
                shift_factor=0.1, scaling_factor=0.5)
  vae = diffusers.AutoencoderKL(**kwargs).eval()
  state = {k: v.numpy() for k, v in vae.state_dict().items()}
  cfg = VAEConfig.from_dict(dict(vae.config))
  assert cfg.shift_factor == 0.1 and not cfg.use_quant_conv and not cfg.mid_block_add_attention
  params = vae_params_from_state_dict(state, cfg)
  model = AutoencoderKL(cfg)
  x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    t_mean = vae.encode(torch.from_numpy(x)).latent_dist.mean
    t_img = vae.decode(t_mean).sample.numpy()
  lat = model.latents_from_images(params, jnp.asarray(x))
  _close(lat, (t_mean.numpy() - 0.1) * 0.5, "variant scaled latents")
  _close(model.images_from_latents(params, lat), t_img, "variant decode")


def test_sd3_sixteen_channel_vae_parity(sd3_vae):
  """SD3's VAE: 16 latent channels, no quant convs, latents (mean - shift) * scale as SD3 pipelines make
  them, and decoded from z / scale + shift as `StableDiffusion3Pipeline` decodes them."""
  vae, config, state = sd3_vae
  cfg = VAEConfig.from_dict(config)
  assert cfg.latent_channels == 16 and not cfg.use_quant_conv and not cfg.use_post_quant_conv
  assert cfg.shift_factor == SD3["shift_factor"] and cfg.scaling_factor == SD3["scaling_factor"]
  assert not any("quant_conv" in k for k in state)
  params = vae_params_from_state_dict(state, cfg)
  model = AutoencoderKL(cfg)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
  z = rng.standard_normal((2, 16, 8, 8)).astype(np.float32)  # scaled latents, as the transformer sees them
  shift, scale = SD3["shift_factor"], SD3["scaling_factor"]
  with torch.no_grad():
    dist = vae.encode(torch.from_numpy(x)).latent_dist
    t_mean, t_logvar = dist.mean.numpy(), dist.logvar.numpy()
    t_img = vae.decode(torch.from_numpy(z) / scale + shift).sample.numpy()
  mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(params, x)
  assert mean.shape == (2, 16, 8, 8)
  _close(mean, t_mean, "sd3 encoder mean")
  _close(logvar, t_logvar, "sd3 encoder logvar")
  _close(jax.jit(model.latents_from_images)(params, x), (t_mean - shift) * scale, "sd3 scaled latents")
  _close(jax.jit(model.images_from_latents)(params, z), t_img, "sd3 images_from_latents")
  back = vae_state_dict_from_params(params, cfg)
  assert set(back) == set(state)
  for k in state:
    np.testing.assert_array_equal(back[k], state[k], err_msg=k)
