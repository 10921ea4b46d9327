"""Our Flax UNet2DConditionModel equals Diffusers' on the same (tiny, random) weights."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusers
import torch
from safetensors.numpy import load_file

from tdm_jax.convert.errors import ConversionError
from tdm_jax.convert.unet import (unet_params_from_state_dict,
                                  unet_state_dict_from_params)
from tdm_jax.core import lora
from tdm_jax.models.unet import UNet2DConditionModel, UNetConfig

SD15 = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8)

TEXT_DIM = 24
SDXL = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), cross_attention_dim=40, norm_num_groups=16, use_linear_projection=True,
    transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=TEXT_DIM + 6 * 8)


def _diffusers_unet(kwargs, tmp_path):
  """A random Diffusers UNet, saved and read back as a numpy state dict and its config.json dict."""
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**kwargs).eval()
  # Diffusers zero-initialises some layers (e.g. proj_out); randomise everything for a real test.
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_norm_scale = p.ndim == 1 and name.endswith("weight")
      p.copy_(torch.randn_like(p) * 0.1 + (1.0 if is_norm_scale else 0.0))
  model.save_pretrained(tmp_path, safe_serialization=True)
  state = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
  return model, state, dict(model.config)


def _inputs(kwargs, batch=2):
  rng = np.random.default_rng(0)
  size = kwargs["sample_size"]
  sample = rng.standard_normal((batch, kwargs["in_channels"], size, size)).astype(np.float32)
  timesteps = np.array([10, 700][:batch], np.int64)
  context = rng.standard_normal((batch, 7, kwargs["cross_attention_dim"])).astype(np.float32)
  added = None
  if kwargs.get("addition_embed_type") == "text_time":
    added = {"text_embeds": rng.standard_normal((batch, TEXT_DIM)).astype(np.float32),
             "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 512, 16, 32, 1024, 1024]][:batch],
                                  np.float32)}
  return sample, timesteps, context, added


def _check_parity(kwargs, tmp_path):
  model, state, config_dict = _diffusers_unet(kwargs, tmp_path)
  config = UNetConfig.from_dict(config_dict)
  params = unet_params_from_state_dict(state, config)
  sample, timesteps, context, added = _inputs(kwargs)
  with torch.no_grad():
    theirs = model(torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context),
                   added_cond_kwargs=None if added is None else {k: torch.from_numpy(v) for k, v in added.items()}
                   ).sample.numpy()
  ours = jax.jit(UNet2DConditionModel(config).apply)({"params": params}, sample, timesteps, context, added)
  ours = np.asarray(ours)
  assert ours.shape == theirs.shape
  err = float(np.max(np.abs(ours - theirs)))
  scale = max(1.0, float(np.max(np.abs(theirs))))
  print(f"max|ours - theirs| = {err:.3e}, max|theirs| = {float(np.max(np.abs(theirs))):.3f}")
  assert err <= 1e-4 * scale, (err, scale)
  return state, config


def test_sd15_style_parity(tmp_path):
  _check_parity(SD15, tmp_path)


def test_sdxl_style_parity_and_round_trip(tmp_path):
  state, config = _check_parity(SDXL, tmp_path)
  back = unet_state_dict_from_params(unet_params_from_state_dict(state, config), config)
  assert sorted(back) == sorted(state)
  for name, value in state.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_class_embeddings_and_time_cond_projection_parity(tmp_path):
  """`num_class_embeds` (class_embed_type None: added to the time embedding) and LCM's
  `time_cond_proj_dim`, on an SDXL-style UNet, against Diffusers with class labels and a condition."""
  kwargs = dict(SDXL, num_class_embeds=5, time_cond_proj_dim=12)
  model, state, config_dict = _diffusers_unet(kwargs, tmp_path)
  assert "class_embedding.weight" in state and "time_embedding.cond_proj.weight" in state
  config = UNetConfig.from_dict(config_dict)
  params = unet_params_from_state_dict(state, config)
  sample, timesteps, context, added = _inputs(kwargs)
  labels = np.array([4, 1], np.int64)
  condition = np.random.default_rng(1).standard_normal((2, 12)).astype(np.float32)
  with torch.no_grad():
    theirs = model(torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context),
                   class_labels=torch.from_numpy(labels), timestep_cond=torch.from_numpy(condition),
                   added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}).sample.numpy()
    without = model(torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context),
                    class_labels=torch.from_numpy(labels),
                    added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}).sample.numpy()
  apply = jax.jit(UNet2DConditionModel(config).apply)
  ours = np.asarray(apply({"params": params}, sample, timesteps, context, added, labels, condition))
  ours_without = np.asarray(apply({"params": params}, sample, timesteps, context, added, labels))
  np.testing.assert_allclose(ours, theirs, atol=1e-4 * max(1.0, float(np.abs(theirs).max())))
  np.testing.assert_allclose(ours_without, without, atol=1e-4 * max(1.0, float(np.abs(without).max())))
  assert np.abs(theirs - without).max() > 1e-2  # the condition matters, so the test can fail
  back = unet_state_dict_from_params(params, config)
  for name, value in state.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)
  with pytest.raises(ValueError, match="class_labels"):
    UNet2DConditionModel(config).apply({"params": params}, sample, timesteps, context, added)


def test_logical_axes_on_every_param():
  config = UNetConfig.from_dict(SD15)
  sample, timesteps, context, _ = _inputs(SD15, batch=1)
  variables = jax.eval_shape(lambda: UNet2DConditionModel(config).init(
      jax.random.PRNGKey(0), sample[:, :, :4, :4], timesteps, context))
  leaves = jax.tree_util.tree_leaves(variables["params"], is_leaf=lambda x: hasattr(x, "names"))
  assert leaves and all(hasattr(x, "names") and len(x.names) == len(x.value.shape) for x in leaves)


def _random_variables(config, sample, timesteps, context):
  shapes = jax.eval_shape(UNet2DConditionModel(config).init, jax.random.PRNGKey(0), sample, timesteps, context)
  rng = np.random.default_rng(0)  # Random values without compiling init (slow on CPU).
  return jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.1, jnp.float32),
                                flax.core.meta.unbox(shapes))


def _remat_programs(remat):
  """(model, forward, gradient of sum(output**2) in every variable) of the SD 1.5-style UNet with or without
  remat, jitted, the inputs arguments (not constants): one program of each, reused by every check below."""
  model = UNet2DConditionModel(UNetConfig.from_dict(SD15), remat=remat)
  loss = lambda v, *inputs: jnp.sum(model.apply(v, *inputs) ** 2)
  return model, jax.jit(model.apply), jax.jit(jax.grad(loss))


def test_remat_gives_the_same_outputs_and_gradients_for_weights_and_adapters():
  config = UNetConfig.from_dict(SD15)
  sample, timesteps, context, _ = _inputs(SD15, batch=1)
  inputs = (sample[:, :, :8, :8], timesteps, context)
  variables = _random_variables(config, *inputs)
  programs = [_remat_programs(remat) for remat in (False, True)]
  models = [model for model, _, _ in programs]
  outputs = [forward(variables, *inputs) for _, forward, _ in programs]
  np.testing.assert_allclose(np.asarray(outputs[0]), np.asarray(outputs[1]), rtol=1e-5, atol=1e-5)
  for a, b in zip(*(jax.tree_util.tree_leaves(grad(variables, *inputs)) for _, _, grad in programs)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)

  # Adapters travel as the "lora" collection through the rematerialised blocks; a nonzero `b`
  # makes both halves' gradients nontrivial. Gradients equal those of the merged weights.
  cfg = lora.LoraConfig(rank=2, alpha=4.0)
  adapters = lora.init_adapters(jax.random.PRNGKey(1), variables["params"], cfg)
  adapters = jax.tree_util.tree_map(lambda x: x + 0.05, adapters)

  def adapter_grads(model):
    def loss(adapters):
      with lora.adapters_applied(adapters, cfg):
        out = model.apply({"params": variables["params"], "lora": adapters}, *inputs)
      return jnp.sum(out ** 2)
    return jax.jit(jax.grad(loss))(adapters)

  def adapted_output(model):  # no gradient: the blocks' own computations still find the adapters
    with lora.adapters_applied(adapters, cfg):
      return jax.jit(model.apply)({"params": variables["params"], "lora": adapters}, *inputs)

  # The merged weights' output and gradients, by the programs above (the plain model's forward and its
  # gradient in every weight, at the merged weights), the latter carried to the adapters by the chain rule
  # through lora.merge: the gradient of the merged model's loss in the adapters.
  forward, grad = programs[0][1:]
  merge = jax.jit(lambda adapters: {"params": lora.merge(variables["params"], adapters, cfg)})
  merged_variables, merge_vjp = jax.vjp(merge, adapters)
  merged = forward(merged_variables, *inputs)
  for model in models:
    np.testing.assert_allclose(np.asarray(adapted_output(model)), np.asarray(merged), rtol=1e-5, atol=1e-5)
  reference = jax.tree_util.tree_leaves(merge_vjp(grad(merged_variables, *inputs))[0])
  assert len(reference) == len(jax.tree_util.tree_leaves(adapters)) and any(np.abs(r).max() > 0 for r in reference)
  for model in models:
    for a, b in zip(jax.tree_util.tree_leaves(adapter_grads(model)), reference):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_remat_lowers_the_compiled_memory_of_the_backward_pass():
  """XLA:CPU keeps an unrolled jax.checkpoint's activations; our blocks' remat must not."""
  config = UNetConfig.from_dict(SD15)
  sample, timesteps, context, _ = _inputs(SD15, batch=2)
  sample = np.repeat(np.repeat(sample, 2, axis=2), 2, axis=3)  # 32 x 32: activations dominate
  variables = _random_variables(config, sample, timesteps, context)

  def temporaries(remat):
    model = UNet2DConditionModel(config, remat=remat)
    loss = lambda v: jnp.sum(model.apply(v, sample, timesteps, context) ** 2)
    return jax.jit(jax.grad(loss)).lower(variables).compile().memory_analysis().temp_size_in_bytes

  without, with_remat = temporaries(False), temporaries(True)
  assert with_remat < 0.6 * without, (with_remat, without)


def _small_state(tmp_path):
  _, state, config_dict = _diffusers_unet(SD15, tmp_path)
  return state, UNetConfig.from_dict(config_dict)


def test_bad_checkpoints_named(tmp_path):
  state, config = _small_state(tmp_path)
  missing = dict(state)
  del missing["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
  with pytest.raises(ConversionError, match=r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q\.weight"):
    unet_params_from_state_dict(missing, config)

  extra = dict(state, **{"mid_block.resnets.9.conv1.weight": np.zeros((1,), np.float32)})
  with pytest.raises(ConversionError, match=r"unused:\n    mid_block\.resnets\.9\.conv1\.weight"):
    unet_params_from_state_dict(extra, config)

  wrong = dict(state, **{"conv_in.weight": np.zeros((32, 4, 1, 1), np.float32)})
  with pytest.raises(ConversionError, match=r"conv_in\.weight: expected \(32, 4, 3, 3\), got \(32, 4, 1, 1\)"):
    unet_params_from_state_dict(wrong, config)


def test_unsupported_config_named():
  with pytest.raises(ValueError, match=r"down_block_types.*SimpleCrossAttnDownBlock2D.*CrossAttnDownBlock2D"):
    UNetConfig.from_dict(dict(SD15, down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")))
  with pytest.raises(ValueError, match=r"resnet_time_scale_shift.*scale_shift.*default"):
    UNetConfig.from_dict(dict(SD15, resnet_time_scale_shift="scale_shift"))
  # Unrelated keys are ignored.
  assert UNetConfig.from_dict(dict(SD15, _class_name="UNet2DConditionModel", dropout=0.0)).sample_size == 16
