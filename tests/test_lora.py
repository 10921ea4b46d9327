"""LoRA adapters over a frozen base tree, and their export as a LoRA file that Diffusers loads."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdm_jax.core import lora
from tdm_jax.models.unet import UNet2DConditionModel, UNetConfig

# An SD1.5-style UNet with one resolution level (down, mid, up; 4 transformer blocks): the same module
# names as the real one, and half the compile time of two levels.
SD15 = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32,), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
    attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8)


def _inputs(batch=2, size=16):
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((batch, 4, size, size)).astype(np.float32)
  timesteps = np.array([10, 700][:batch], np.int64)
  context = rng.standard_normal((batch, 7, SD15["cross_attention_dim"])).astype(np.float32)
  return sample, timesteps, context


def _random_base(config, sample, timesteps, context):
  """Random params from eval_shape of init (compiling init is slow on CPU)."""
  shapes = jax.eval_shape(UNet2DConditionModel(config).init, jax.random.PRNGKey(0), sample, timesteps, context)
  rng = np.random.default_rng(1)
  return jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.1, jnp.float32),
                                flax.core.meta.unbox(shapes["params"]))


def _randomise_b(adapters, seed=2, std=0.3):
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(adapters)
  flat = {p: (jnp.asarray(rng.standard_normal(v.shape) * std, jnp.float32) if p[-1] == "b" else v)
          for p, v in flat.items()}
  return flax.traverse_util.unflatten_dict(flat)


def test_init_merge_is_base_and_gradients_reach_only_adapters():
  config = UNetConfig.from_dict(SD15)
  sample, timesteps, context = _inputs(batch=1, size=8)
  base = _random_base(config, sample, timesteps, context)
  cfg = lora.LoraConfig(rank=4, alpha=8.0)
  adapters = lora.init_adapters(jax.random.PRNGKey(3), base, cfg)

  targets = ["/".join(p) for p in lora.target_paths(base, cfg)]
  assert len(targets) == 4 * (2 * 4 + 2)  # 4 transformer blocks x (2 attns x 4 projections + 2 ff)
  assert "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel" in targets
  assert "up_blocks_0/attentions_1/transformer_blocks_0/ff/net_0/proj/kernel" in targets
  assert not any("time_emb" in t or "time_embedding" in t for t in targets)
  a = adapters["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"]
  assert a["a"].shape == (32, 4) and a["b"].shape == (4, 32)
  flat_base = flax.traverse_util.flatten_dict(base)
  assert lora.count(adapters) == sum(4 * sum(flat_base[p].shape) for p in lora.target_paths(base, cfg))
  # Same key, same adapters; a is random, b is zero.
  again = lora.init_adapters(jax.random.PRNGKey(3), base, cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, adapters, again)
  assert float(jnp.std(a["a"])) > 0.1 and not np.any(np.asarray(a["b"]))

  merged = lora.merge(base, adapters, cfg)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
  jax.tree_util.tree_map(np.testing.assert_array_equal, merged, base)  # Exactly the base at init.

  model = UNet2DConditionModel(config)

  @jax.jit
  def output_and_grads(adapters):
    def loss(ad):
      out = model.apply({"params": lora.merge(base, ad, cfg)}, sample, timesteps, context)
      return jnp.mean(out ** 2), out
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(adapters)
    return out, grads

  out0, grads = output_and_grads(adapters)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapters)
  items = lora.adapter_items(grads)
  assert len(items) == len(targets)
  # At init (b = 0) the gradient reaches b only: dL/da = scale * dL/dW @ b.T = 0.
  assert all(not np.any(np.asarray(ga)) for ga, _ in items.values())
  assert all(np.any(np.asarray(gb)) for _, gb in items.values())

  # With b non-zero the merged model moves, and both gradients are non-zero.
  out1, grads = output_and_grads(_randomise_b(adapters))
  assert float(jnp.max(jnp.abs(out1 - out0))) > 1e-3
  assert all(np.any(np.asarray(ga)) and np.any(np.asarray(gb)) for ga, gb in lora.adapter_items(grads).values())

def test_merge_keeps_dtype_and_boxes():
  w = flax.core.meta.Partitioned(jnp.ones((3, 5), jnp.bfloat16), names=("embed", "mlp"))
  base = {"blk": {"attn1": {"to_q": {"kernel": w, "bias": jnp.zeros((5,))}}}, "other": {"kernel": jnp.ones((3, 5))}}
  cfg = lora.LoraConfig(rank=2, alpha=1.0)
  adapters = {"blk": {"attn1": {"to_q": {"kernel": {"a": jnp.ones((3, 2)), "b": jnp.full((2, 5), 2.0)}}}}}
  merged = jax.jit(lambda b, ad: lora.merge(b, ad, cfg))(base, adapters)
  kernel = merged["blk"]["attn1"]["to_q"]["kernel"]
  assert isinstance(kernel, flax.core.meta.Partitioned) and kernel.names == ("embed", "mlp")
  assert kernel.value.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(kernel.value, np.float32), 1.0 + 0.5 * 2 * 2.0)
  np.testing.assert_array_equal(merged["other"]["kernel"], base["other"]["kernel"])
  # Shapes-only bases work (abstract init for sharding plans).
  abstract = jax.eval_shape(lambda: lora.init_adapters(jax.random.PRNGKey(0), jax.eval_shape(lambda: base), cfg))
  assert abstract["blk"]["attn1"]["to_q"]["kernel"]["a"].shape == (3, 2)
  assert lora.count(abstract) == 3 * 2 + 2 * 5


def test_parameters_trained_in_full_beside_the_adapters():
  """A leaf named "full" replaces its parameter (or adds one the base lacks) in merge and with_full, takes
  its parameter's axis names, and is no adapter pair."""
  base = {"blk": {"to_q": {"kernel": jnp.ones((3, 5))}}, "norm": {"scale": jnp.ones((5,))}}
  cfg = lora.LoraConfig(rank=2, alpha=2.0, targets=("to_q/kernel$",))
  table = jnp.arange(8.0).reshape(2, 4)
  adapters = {**lora.init_adapters(jax.random.key(0), base, cfg),
              **lora.in_full({"table": {"embedding": table}, "norm": {"scale": jnp.full((5,), 3.0)}})}
  assert list(lora.adapter_items(adapters)) == [("blk", "to_q", "kernel")]
  pairs, full = lora.split_full(adapters)
  assert set(full) == {("table", "embedding"), ("norm", "scale")} and "table" not in pairs
  for tree in (lora.with_full(base, adapters), lora.merge(base, adapters, cfg)):
    np.testing.assert_array_equal(tree["table"]["embedding"], table)
    np.testing.assert_array_equal(tree["norm"]["scale"], 3.0)
    np.testing.assert_array_equal(tree["blk"]["to_q"]["kernel"], 1.0)  # b = 0
  assert "table" not in base and float(base["norm"]["scale"][0]) == 1.0  # the base itself is untouched
  axes = lora.adapter_axes({"blk": {"to_q": {"kernel": ("embed", "mlp")}}, "norm": {"scale": ("embed",)},
                            "table": {"embedding": ("classes", "embed")}}, adapters)
  assert axes["table"]["embedding"][lora.FULL] == ("classes", "embed")
  assert axes["blk"]["to_q"]["kernel"] == {"a": ("embed", None), "b": (None, "mlp")}
  from tdm_jax.convert.lora import LoraConversionError, save_lora  # pylint: disable=g-import-not-at-top
  from tdm_jax.convert.unet import LORA_LAYOUT  # pylint: disable=g-import-not-at-top
  with pytest.raises(LoraConversionError, match=r"trained in full \(\['norm/scale', 'table/embedding'\]\)"):
    # refused before anything is written
    save_lora("/nonexistent/never_written", adapters, cfg, SD15, layout=LORA_LAYOUT)


def test_bad_targets_named():
  base = {"dense": {"kernel": jnp.zeros((4, 4))}, "conv": {"kernel": jnp.zeros((3, 3, 4, 4))}}
  with pytest.raises(ValueError, match=r"match none of the 1 2-D parameters[\s\S]*dense/kernel"):
    lora.init_adapters(jax.random.PRNGKey(0), base, lora.LoraConfig(targets=(r"attn/to_q/kernel$",)))
  with pytest.raises(ValueError, match=r"match none"):  # Only 2-D kernels are targets; convs are not.
    lora.init_adapters(jax.random.PRNGKey(0), base, lora.LoraConfig(targets=(r"conv/kernel$",)))
  with pytest.raises(ValueError, match=r"not a valid regex"):
    lora.LoraConfig(targets=("attn(",))
  with pytest.raises(ValueError, match=r"sequence of regexes"):
    lora.LoraConfig(targets="to_q")
  with pytest.raises(ValueError, match=r"does not fit"):
    lora.merge(base, {"dense": {"kernel": {"a": jnp.zeros((5, 2)), "b": jnp.zeros((2, 4))}}}, lora.LoraConfig(rank=2))


# --- Export: Diffusers loads our file and computes what we compute. --------------------------------

def _tiny_sd_pipeline(torch, diffusers, transformers):
  torch.manual_seed(0)
  vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
  for c in "abcdefghijklmnopqrstuvwxyz":
    vocab[c] = len(vocab)
    vocab[c + "</w>"] = len(vocab)
  tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(vocab), hidden_size=SD15["cross_attention_dim"], intermediate_size=37, num_attention_heads=4,
      num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
  vae = diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                                sample_size=16).eval()
  unet = diffusers.UNet2DConditionModel(**SD15).eval()
  # Diffusers zero-initialises some layers (e.g. proj_out); randomise everything for a real test.
  with torch.no_grad():
    for name, p in unet.named_parameters():
      is_norm_scale = p.ndim == 1 and name.endswith("weight")
      p.copy_(torch.randn_like(p) * 0.1 + (1.0 if is_norm_scale else 0.0))
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
      scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=1),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def test_lora_file_loads_in_diffusers_pipeline(tmp_path):
  import torch
  import diffusers
  import transformers
  import peft  # noqa: F401 (the LoRA loader of Diffusers needs it)
  from tdm_jax.convert.lora import (load_lora, lora_state_dict_from_adapters,  # pylint: disable=g-import-not-at-top
                                    save_lora)
  from tdm_jax.convert.unet import LORA_LAYOUT, unet_params_from_state_dict  # pylint: disable=g-import-not-at-top

  pipe = _tiny_sd_pipeline(torch, diffusers, transformers)
  config = UNetConfig.from_dict(dict(pipe.unet.config))
  base = unet_params_from_state_dict({k: v.detach().numpy() for k, v in pipe.unet.state_dict().items()}, config)
  cfg = lora.LoraConfig(rank=4, alpha=8.0)  # alpha != rank: the file must carry the scale.
  adapters = _randomise_b(lora.init_adapters(jax.random.PRNGKey(0), base, cfg))

  state = lora_state_dict_from_adapters(adapters, cfg, config, layout=LORA_LAYOUT)
  key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
  assert state[key + ".lora_A.weight"].shape == (4, 32) and state[key + ".lora_B.weight"].shape == (32, 4)
  assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v.lora_A.weight" in state
  assert "unet.up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.lora_B.weight" in state
  path = save_lora(tmp_path / "lora", adapters, cfg, config, layout=LORA_LAYOUT)
  assert path.endswith("lora/pytorch_lora_weights.safetensors")
  assert [p.name for p in (tmp_path / "lora").iterdir()] == ["pytorch_lora_weights.safetensors"]

  sample, timesteps, context = _inputs()
  run_theirs = lambda: pipe.unet(torch.from_numpy(sample), torch.from_numpy(timesteps),
                                 torch.from_numpy(context)).sample.numpy()
  run_image = lambda: pipe("abc", num_inference_steps=2, height=16, width=16, output_type="np",
                           generator=torch.Generator().manual_seed(0)).images
  model = UNet2DConditionModel(config)
  apply = jax.jit(lambda p: model.apply({"params": p}, sample, timesteps, context))
  with torch.no_grad():
    theirs_base, image_base = run_theirs(), run_image()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    theirs, image = run_theirs(), run_image()
  ours_base = np.asarray(apply(base))
  ours = np.asarray(apply(lora.merge(base, adapters, cfg)))

  scale = float(np.max(np.abs(theirs)))
  err = float(np.max(np.abs(ours - theirs)))
  err_base = float(np.max(np.abs(ours_base - theirs_base)))
  change = float(np.max(np.abs(theirs - theirs_base)))
  print(f"LoRA: max|ours - diffusers| = {err:.3e} (no LoRA: {err_base:.3e}), max|diffusers| = {scale:.3f}, "
        f"LoRA changes diffusers' output by {change:.3f} and ours by {float(np.max(np.abs(ours - ours_base))):.3f}, "
        f"the pipeline's image by {float(np.max(np.abs(image - image_base))):.3f}")
  assert change > 100 * max(err, 1e-6)  # The test can fail: the adapters matter.
  assert err <= 1e-4 * max(1.0, scale), (err, scale)
  assert float(np.max(np.abs(image - image_base))) > 1e-3

  # Reading the file back gives the same merged model (scale folded into b, alpha == rank).
  back, back_cfg = load_lora(path, config, layout=LORA_LAYOUT)
  assert back_cfg.rank == 4 and back_cfg.alpha == 4.0
  assert lora.target_paths(base, back_cfg) == sorted(lora.adapter_items(adapters))
  np.testing.assert_allclose(np.asarray(apply(lora.merge(base, back, back_cfg))), ours, rtol=1e-5, atol=1e-5)


def test_export_rejects_adapters_that_do_not_fit(tmp_path):
  from tdm_jax.convert.lora import LoraConversionError, save_lora  # pylint: disable=g-import-not-at-top
  from tdm_jax.convert.unet import LORA_LAYOUT  # pylint: disable=g-import-not-at-top
  cfg = lora.LoraConfig(rank=2)
  ok = {"a": np.zeros((32, 2), np.float32), "b": np.zeros((2, 32), np.float32)}
  wrong = {"down_blocks_0": {"attentions_0": {"transformer_blocks_0": {"attn1": {"to_q": {"kernel": {
      "a": np.zeros((32, 2), np.float32), "b": np.zeros((2, 16), np.float32)}}}}}}, "nope": {"kernel": ok}}
  expected = r"(?s)attn1/to_q/kernel: a @ b has shape \(32, 16\).*nope/kernel: no such"
  with pytest.raises(LoraConversionError, match=expected):
    save_lora(tmp_path / "x.safetensors", wrong, cfg, SD15, layout=LORA_LAYOUT)
  assert not list(tmp_path.iterdir())  # Nothing written, not even a temporary file.
