"""A Diffusers SDXL pipeline end to end: convert, distil, evaluate, export, and load back in Diffusers."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO  # noqa: F401 (puts the repo on sys.path)
import tiny_pipeline

from tdm_jax import main as tdm_main
from tdm_jax import train
from tdm_jax.convert import folders


def _config(pipeline_dir, prompt_file):
  config = tiny_pipeline.tiny_sdxl_config(pipeline_dir, prompt_file)
  config.model.attention = "auto"
  config.tdm.guidance_scale = 2.0
  config.optim.student_lr = 1e-2  # large, so that two iterations move the adapters visibly
  config.train.num_iterations = 2
  config.train.checkpoint_every = 2
  config.eval.num_samples = 2
  config.eval.teacher_steps = (2,)
  config.eval.student_steps = (1,)
  return config


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
  root = tmp_path_factory.mktemp("sdxl")
  pipe = tiny_pipeline.make_tiny_sdxl_pipeline(root / "pipeline")
  prompt_file = root / "prompts.txt"
  prompt_file.write_text("a red circle\n\na blue square on white background\n")
  config = _config(root / "pipeline", prompt_file)
  workdir = str(root / "work")
  assert tdm_main.run(config, workdir, "convert") == os.path.join(workdir, "converted")
  state = tdm_main.run(config, workdir, "train")
  return pipe, config, workdir, state


def test_convert_writes_trees_and_pipeline_files(distilled):
  _, _, workdir, _ = distilled
  files = os.path.join(workdir, "converted", "pipeline")
  assert sorted(os.listdir(files)) == ["model_index.json", "scheduler", "text_encoder", "text_encoder_2",
                                       "tokenizer", "tokenizer_2", "unet", "vae"]
  assert not any(name.endswith(".safetensors") for _, _, names in os.walk(files) for name in names)


def test_training_and_evaluation_outputs(distilled):
  _, _, workdir, state = distilled
  assert int(state.step) == 2
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  grids = sorted(os.listdir(os.path.join(workdir, "eval")))
  assert "table.md" in grids and any(name.endswith(".png") for name in grids)


def test_exported_student_loads_in_diffusers_and_matches(distilled):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  _, config, workdir, state = distilled
  export = tdm_main.run(config, workdir, "export")
  unet = UNet2DConditionModel.from_pretrained(os.path.join(export, "unet")).eval()
  task = tdm_main.task_module(config).build_task(config, workdir)
  cond, _ = task.conditioning(task.conditioner, task.batch(0, 2))  # token ids -> encoder states
  x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
  t = np.array([999, 300])
  student = train.sampling_params(task, train.student_params(state))  # the base merged with its adapters
  ours = np.asarray(task.apply(student, jnp.asarray(x), jnp.asarray(t), cond))
  with torch.no_grad():
    theirs = unet(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(
        np.asarray(cond["encoder_hidden_states"])), added_cond_kwargs={
            "text_embeds": torch.from_numpy(np.asarray(cond["text_embeds"])),
            "time_ids": torch.from_numpy(np.asarray(cond["time_ids"]))}).sample.numpy()
  assert np.max(np.abs(ours - theirs)) <= 1e-4 * max(1.0, np.max(np.abs(theirs)))
  # The student moved away from the teacher, and the whole exported pipeline loads.
  teacher = np.asarray(task.apply(task.teacher_params, jnp.asarray(x), jnp.asarray(t), cond))
  assert np.max(np.abs(teacher - ours)) > 0
  pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(export, "pipeline"), add_watermarker=False)
  assert pipe.unet.config.sample_size == 8


def test_lora_files_in_the_teacher_pipeline_sample_like_the_exported_student(distilled):
  """Both LoRA files, loaded into the teacher's own pipeline with `load_lora_weights`, make the images of
  the exported (merged) pipeline, given the call README.md shows: the student's scheduler, no guidance."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import DDIMScheduler, StableDiffusionXLPipeline  # pylint: disable=g-import-not-at-top
  _, config, workdir, _ = distilled
  export = os.path.join(workdir, "export")
  prompts = ["a red circle", "a blue square on white background"]
  latents = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32))
  k = config.tdm.num_student_steps
  merged = StableDiffusionXLPipeline.from_pretrained(os.path.join(export, "pipeline"), add_watermarker=False)
  merged.set_progress_bar_config(disable=True)
  want = merged(prompts, num_inference_steps=k, latents=latents, output_type="np").images
  teacher = StableDiffusionXLPipeline.from_pretrained(config.teacher.pipeline, add_watermarker=False)
  teacher.set_progress_bar_config(disable=True)
  teacher.scheduler = DDIMScheduler.from_pretrained(os.path.join(export, "pipeline"), subfolder="scheduler")
  plain = teacher(prompts, num_inference_steps=k, guidance_scale=1.0, latents=latents, output_type="np").images
  assert np.abs(plain - want).max() > 1e-3  # the adapters matter, so the comparison below can fail
  for source, name in ((os.path.join(export, "lora"), None), (export, "lora_kohya.safetensors")):
    teacher.load_lora_weights(source, weight_name=name)
    got = teacher(prompts, num_inference_steps=k, guidance_scale=1.0, latents=latents, output_type="np").images
    teacher.unload_lora_weights()
    np.testing.assert_allclose(got, want, atol=2e-4, err_msg=name or "diffusers format")


def test_missing_prompt_file_is_named(distilled, tmp_path):
  _, config, workdir, _ = distilled
  config.data.prompt_file = str(tmp_path / "none.txt")
  with pytest.raises(FileNotFoundError, match="none.txt"):
    tdm_main.task_module(config).build_task(config, workdir)


def test_missing_pipeline_folder_is_named(tmp_path):
  config = _config(tmp_path / "nowhere", tmp_path / "p.txt")
  with pytest.raises(folders.FolderError, match="nowhere"):
    tdm_main.run(config, str(tmp_path / "w"), "convert")


def test_converted_trees_restore_sharded(distilled):
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from tdm_jax import sharding  # pylint: disable=g-import-not-at-top
  from tdm_jax.convert import pipeline as pipeline_io  # pylint: disable=g-import-not-at-top
  _, _, workdir, _ = distilled
  mesh = sharding.make_mesh((-1, 1, 1))
  n = mesh.shape["data"]
  split = lambda path, shape: NamedSharding(mesh, P("data") if shape and shape[0] % n == 0 else P())
  trees = pipeline_io.load_converted(os.path.join(workdir, "converted"), split)
  plain = pipeline_io.load_converted(os.path.join(workdir, "converted"))
  leaves = jax.tree.leaves(trees)
  assert any(leaf.sharding.spec == P("data") for leaf in leaves if leaf.ndim)
  assert all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(plain)))
  # Read in the teacher's dtype directly (orbax casts while reading): bf16 floats, the same values rounded.
  low = pipeline_io.load_converted(os.path.join(workdir, "converted"), split, dtype=jnp.bfloat16)
  for a, b in zip(jax.tree.leaves(low), jax.tree.leaves(plain)):
    assert a.dtype == (jnp.bfloat16 if jnp.issubdtype(b.dtype, jnp.floating) else b.dtype)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(jnp.asarray(b).astype(a.dtype)))
