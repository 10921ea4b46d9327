"""The kohya / SGM LoRA layout (ComfyUI, A1111, SDXL-Lightning, Hyper-SD), and both our LoRA files in a
Diffusers SDXL pipeline: names, the alpha / r scale, and the UNet output against ours."""

import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tdm_jax.convert.kohya import load_kohya_lora, save_kohya_lora, sgm_blocks, sgm_name
from tdm_jax.convert.lora import LoraConversionError, save_lora
from tdm_jax.convert.unet import LORA_LAYOUT, diffusers_name, expected_param_shapes
from tdm_jax.core import lora
from tdm_jax.models.unet import UNet2DConditionModel, UNetConfig

# The UNet of tests/tiny_pipeline.make_tiny_sdxl_pipeline.
TINY_SDXL = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), cross_attention_dim=96, norm_num_groups=8, use_linear_projection=True,
    transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8)
# The block structure of the real SDXL and SD 1.5 UNets, with tiny widths and depths.
SDXL_BLOCKS = dict(TINY_SDXL, block_out_channels=(32, 32, 64), layers_per_block=2, attention_head_dim=2,
                   down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                   up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), transformer_layers_per_block=1)
SD15_BLOCKS = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, attention_head_dim=2,
                   cross_attention_dim=32, norm_num_groups=8)
EVERY_LINEAR = lora.LoraConfig(rank=3, alpha=6.0, targets=(r"kernel$",))  # Every 2-D kernel: all Dense layers.


def _shapes(config):
  return flax.traverse_util.unflatten_dict(
      {p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in expected_param_shapes(config).items()})


def _adapters(base, cfg, seed=0):
  """Adapters for cfg's targets with init_adapters' `a` ~ N(0, 1/r^2) and a random, non-zero b.

  b ~ 0.1 N(0, 1) changes the tiny SDXL UNet's output by ~3 yet keeps it well conditioned; at 0.3
  even Diffusers' own merged and unmerged LoRA outputs differ by 1e-2 in float32. (Numpy, not
  init_adapters: hundreds of eager jax.random calls take seconds.)
  """
  rng = np.random.default_rng(seed)
  shapes = {p: v.shape for p, v in flax.traverse_util.flatten_dict(base).items()}
  return flax.traverse_util.unflatten_dict({
      p + (leaf,): (rng.standard_normal(shape) * std).astype(np.float32)
      for p in lora.target_paths(base, cfg)
      for leaf, shape, std in (("a", (shapes[p][0], cfg.rank), 1 / cfg.rank), ("b", (cfg.rank, shapes[p][1]), 0.1))})


def test_sgm_names_are_those_of_the_original_unets():
  sdxl = sgm_blocks(dict(SDXL_BLOCKS, transformer_layers_per_block=(1, 2, 10)))
  assert sdxl["down_blocks.1.attentions.0"] == "input_blocks.4.1"
  assert sdxl["down_blocks.2.attentions.1"] == "input_blocks.8.1"
  assert sdxl["down_blocks.0.downsamplers.0"] == "input_blocks.3.0"
  assert sdxl["up_blocks.0.attentions.2"] == "output_blocks.2.1"
  assert sdxl["up_blocks.0.upsamplers.0"] == "output_blocks.2.2"
  assert sdxl["up_blocks.1.attentions.0"] == "output_blocks.3.1"
  assert sdxl["up_blocks.2.resnets.2"] == "output_blocks.8.0"
  assert "down_blocks.2.downsamplers.0" not in sdxl and "up_blocks.2.upsamplers.0" not in sdxl
  sd15 = sgm_blocks(SD15_BLOCKS)
  assert sd15["down_blocks.3.resnets.1"] == "input_blocks.11.0"
  assert sd15["down_blocks.2.downsamplers.0"] == "input_blocks.9.0"
  assert sd15["up_blocks.0.upsamplers.0"] == "output_blocks.2.1"  # UpBlock2D: no attention, so .1.
  assert sd15["up_blocks.1.upsamplers.0"] == "output_blocks.5.2"
  assert sd15["up_blocks.3.attentions.2"] == "output_blocks.11.1"
  # Inner names: resnets and downsamplers are renamed, transformer blocks are not.
  assert sgm_name("down_blocks.1.resnets.0.time_emb_proj", sdxl) == "input_blocks.4.0.emb_layers.1"
  assert sgm_name("down_blocks.0.downsamplers.0.conv", sdxl) == "input_blocks.3.0.op"
  assert (sgm_name("mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0", sdxl)
          == "middle_block.1.transformer_blocks.9.attn2.to_out.0")
  assert sgm_name("add_embedding.linear_2", sdxl) == "label_emb.0.2"
  with pytest.raises(LoraConversionError, match=r"down_blocks.7.attentions.0.proj_in: no SGM name"):
    sgm_name("down_blocks.7.attentions.0.proj_in", sdxl)


@pytest.mark.parametrize("name, config, cfg", [
    ("sdxl", SDXL_BLOCKS, EVERY_LINEAR),
    # Default targets only: Diffusers' SGM remapping picks the keys of input/output_blocks 1 by
    # substring, so it also takes those of blocks 10 and 11 (SD 1.5's last resnets) and fails on them.
    ("sd15", SD15_BLOCKS, lora.LoraConfig(rank=3, alpha=6.0)),
])
def test_diffusers_reads_our_kohya_names_back(tmp_path, name, config, cfg):
  diffusers = pytest.importorskip("diffusers")
  from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft  # pylint: disable=g-import-not-at-top
  adapters = _adapters(_shapes(config), cfg)
  path = save_kohya_lora(tmp_path / f"{name}.safetensors", adapters, cfg, config)
  pipeline = diffusers.StableDiffusionXLPipeline if name == "sdxl" else diffusers.StableDiffusionPipeline
  # What load_lora_weights does first (SD 1.x pipelines need the unet_config passed explicitly).
  state, alphas = pipeline.lora_state_dict(path, unet_config=types.SimpleNamespace(**config))
  peft_state = convert_unet_state_dict_to_peft(state)
  items = lora.adapter_items(adapters)
  want = {f"unet.{diffusers_name(p[:-1])}.lora_{ab}.weight" for p in items for ab in "AB"}
  assert sorted(peft_state) == sorted(want)
  assert len(alphas) == len(items) and set(alphas.values()) == {cfg.alpha}
  kernel, (a, b) = next(iter(items.items()))
  np.testing.assert_array_equal(peft_state[f"unet.{diffusers_name(kernel[:-1])}.lora_A.weight"].numpy(), a.T)
  np.testing.assert_array_equal(peft_state[f"unet.{diffusers_name(kernel[:-1])}.lora_B.weight"].numpy(), b.T)


def test_kohya_round_trip(tmp_path):
  base = _shapes(TINY_SDXL)
  adapters = _adapters(base, EVERY_LINEAR)
  path = save_kohya_lora(tmp_path / "lora", adapters, EVERY_LINEAR, TINY_SDXL)
  assert path.endswith("lora/pytorch_lora_weights.safetensors")
  tensors = load_file(path)
  module = "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k"  # down_blocks.1.attentions.0
  assert tensors[module + ".lora_down.weight"].shape == (3, 96)
  assert tensors[module + ".lora_up.weight"].shape == (64, 3)
  assert tensors[module + ".alpha"].shape == () and float(tensors[module + ".alpha"]) == 6.0
  for name in ("output_blocks_1_0_emb_layers_1", "middle_block_1_proj_in", "label_emb_0_2", "time_embed_0",
               "output_blocks_1_1_transformer_blocks_0_ff_net_0_proj"):
    assert f"lora_unet_{name}.lora_up.weight" in tensors, name
  items = lora.adapter_items(adapters)
  assert len(tensors) == 3 * len(items)

  back, cfg = load_kohya_lora(path, TINY_SDXL)
  assert (cfg.rank, cfg.alpha) == (3, 6.0)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, adapters)
  real = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, np.float32), base)
  merged = lora.merge(real, adapters, EVERY_LINEAR)
  jax.tree_util.tree_map(np.testing.assert_array_equal, lora.merge(real, back, cfg), merged)
  assert lora.target_paths(real, cfg) == sorted(items)

  # kohya's SD 1.x spelling (Diffusers block names), a missing alpha (= r) and mixed alphas (folded into b).
  renamed = {}
  for p in items:
    sgm = "lora_unet_" + sgm_name(diffusers_name(p[:-1]), sgm_blocks(TINY_SDXL)).replace(".", "_")
    for leaf in ("lora_down.weight", "lora_up.weight", "alpha"):
      renamed["lora_unet_" + diffusers_name(p[:-1]).replace(".", "_") + "." + leaf] = tensors[f"{sgm}.{leaf}"]
  renamed["lora_unet_mid_block_attentions_0_proj_out.alpha"] = np.asarray(1.5, np.float32)
  del renamed["lora_unet_time_embedding_linear_1.alpha"]
  save_file(renamed, str(tmp_path / "diffusers_names.safetensors"))
  back, cfg = load_kohya_lora(tmp_path / "diffusers_names.safetensors", TINY_SDXL)
  assert (cfg.rank, cfg.alpha) == (3, 3.0)
  changed = {("mid_block", "attentions_0", "proj_out", "kernel"): 0.5, ("time_embedding", "linear_1", "kernel"): 1.0}
  expected = {p: v * (changed.get(p[:-1], 2.0) if p[-1] == "b" else 1.0)
              for p, v in flax.traverse_util.flatten_dict(adapters).items()}
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6),
                         back, flax.traverse_util.unflatten_dict(expected))


def test_kohya_file_errors_are_named(tmp_path):
  adapters = _adapters(_shapes(TINY_SDXL), EVERY_LINEAR)
  tensors = load_file(save_kohya_lora(tmp_path / "ok.safetensors", adapters, EVERY_LINEAR, TINY_SDXL))
  down = tensors["lora_unet_input_blocks_3_1_proj_in.lora_down.weight"]
  up = tensors["lora_unet_input_blocks_3_1_proj_in.lora_up.weight"]

  def fails(extra, match, drop=()):
    bad = {k: v for k, v in tensors.items() if k not in drop}
    bad.update(extra)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraConversionError, match=match):
      load_kohya_lora(tmp_path / "bad.safetensors", TINY_SDXL)

  # An SDXL-sized file: input_blocks.7 does not exist in this two-level UNet.
  fails({"lora_unet_input_blocks_7_1_proj_in.lora_down.weight": down,
         "lora_unet_input_blocks_7_1_proj_in.lora_up.weight": up},
        r"not a kohya LoRA of this UNet[\s\S]*lora_unet_input_blocks_7_1_proj_in: no such layer")
  fails({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down,
         "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": up}, r"lora_te1_.*: not a UNet module")
  fails({"lora_unet_input_blocks_3_0_in_layers_2.lora_down.weight": np.zeros((3, 64, 3, 3), np.float32),
         "lora_unet_input_blocks_3_0_in_layers_2.lora_up.weight": np.zeros((64, 3, 1, 1), np.float32)},
        r"input_blocks_3_0_in_layers_2: a conv LoRA")
  fails({"lora_unet_input_blocks_3_1_proj_in.dora_scale": np.ones((1, 64), np.float32)},
        r"lora_unet_input_blocks_3_1_proj_in.dora_scale: not a LoRA tensor")
  fails({}, r"input_blocks_3_1_proj_in: needs both", drop=("lora_unet_input_blocks_3_1_proj_in.lora_up.weight",))
  fails({"lora_unet_input_blocks_3_1_proj_in.lora_down.weight": down[:2],
         "lora_unet_input_blocks_3_1_proj_in.lora_up.weight": up[:, :2]},
        r"mixed ranks .*rank 2 at down_blocks_1/attentions_0/proj_in/kernel, rank 3 at ")
  fails({"lora_unet_input_blocks_3_1_proj_in.lora_up.weight": np.zeros((32, 3), np.float32)},
        r"down_blocks_1/attentions_0/proj_in/kernel: a @ b has shape \(64, 32\), the kernel \(64, 64\)")
  # Saving refuses adapters whose rank is not the config's (the file's alpha / r would rescale them).
  with pytest.raises(LoraConversionError, match=r"rank 3 but lora_cfg.rank is 4"):
    save_kohya_lora(tmp_path / "x.safetensors", adapters, lora.LoraConfig(rank=4, alpha=6.0), TINY_SDXL)


# --- Both our files in a Diffusers SDXL pipeline: same UNet output as ours on the merged params. -------

@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
  torch = pytest.importorskip("torch")
  pytest.importorskip("peft")  # Diffusers' LoRA loader needs it.
  import tiny_pipeline  # pylint: disable=g-import-not-at-top
  from tdm_jax.convert.unet import unet_params_from_state_dict  # pylint: disable=g-import-not-at-top
  pipe = tiny_pipeline.make_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipeline")
  config = UNetConfig.from_dict(dict(pipe.unet.config))
  base = unet_params_from_state_dict({k: v.detach().numpy() for k, v in pipe.unet.state_dict().items()}, config)
  rng = np.random.default_rng(0)
  inputs = (rng.standard_normal((2, 4, 8, 8)).astype(np.float32), np.array([10, 700], np.int64),
            rng.standard_normal((2, 7, 96)).astype(np.float32),
            {"text_embeds": rng.standard_normal((2, 32)).astype(np.float32),
             "time_ids": np.array([[64, 64, 0, 0, 64, 64], [48, 32, 4, 8, 64, 64]], np.float32)})
  model = UNet2DConditionModel(config)
  ours = jax.jit(lambda p: model.apply({"params": p}, *inputs))

  def theirs():
    sample, t, context, added = (torch.from_numpy(x) if isinstance(x, np.ndarray) else
                                 {k: torch.from_numpy(v) for k, v in x.items()} for x in inputs)
    with torch.no_grad():
      return pipe.unet(sample, t, context, added_cond_kwargs=added).sample.numpy()

  return types.SimpleNamespace(pipe=pipe, config=config, base=base, ours=ours, theirs=theirs,
                               theirs_base=theirs())


def save_peft_lora(path, adapters, lora_cfg, config):
  """save_lora in the UNet's layout, called as save_kohya_lora is."""
  return save_lora(path, adapters, lora_cfg, config, layout=LORA_LAYOUT)


@pytest.mark.parametrize("save", [save_kohya_lora, save_peft_lora], ids=["kohya", "peft"])
def test_sdxl_pipeline_loads_our_lora_file(sdxl, tmp_path, save):
  from peft.tuners.lora import LoraLayer  # pylint: disable=g-import-not-at-top
  cfg = lora.LoraConfig(rank=4, alpha=8.0)  # alpha != rank: the file must carry the scale.
  adapters = _adapters(sdxl.base, cfg, seed=1)
  path = save(tmp_path / "lora.safetensors", adapters, cfg, sdxl.config)
  np.testing.assert_array_equal(sdxl.theirs(), sdxl.theirs_base)  # No LoRA left by another test.
  sdxl.pipe.load_lora_weights(path, adapter_name="ours")
  try:
    attached = [m for m in sdxl.pipe.unet.modules() if isinstance(m, LoraLayer) and "ours" in m.lora_A]
    theirs = sdxl.theirs()
  finally:
    sdxl.pipe.unload_lora_weights()
  # 8 transformer blocks (down 1 x 2, mid 2, up 2 x 2), each with 2 x 4 attention and 2 ff projections.
  assert len(attached) == len(lora.adapter_items(adapters)) == 8 * (2 * 4 + 2)
  ours = np.asarray(sdxl.ours(lora.merge(sdxl.base, adapters, cfg)))
  err = float(np.max(np.abs(ours - theirs)))
  scale = float(np.max(np.abs(theirs)))
  change = float(np.max(np.abs(theirs - sdxl.theirs_base)))
  print(f"{save.__name__}: max|ours - diffusers| = {err:.3e}, max|diffusers| = {scale:.3f}, LoRA change {change:.3f}")
  assert change > 100 * max(err, 1e-6)  # The adapters matter, so the comparison can fail.
  assert err <= 1e-4 * max(1.0, scale), (err, scale)
