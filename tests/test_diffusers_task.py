"""A Diffusers SDXL pipeline end to end: convert, distil, evaluate, export, and load back in Diffusers."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SDXL_PROMPTS
import tiny_pipeline

from tdm_jax import main as tdm_main
from tdm_jax.convert import folders


def _config(pipeline_dir, prompt_file):
  return tiny_pipeline.tiny_sdxl_config(pipeline_dir, prompt_file)


def test_convert_writes_trees_and_pipeline_files(distilled_sdxl):
  workdir = distilled_sdxl[2]
  files = os.path.join(workdir, "converted", "pipeline")
  assert sorted(os.listdir(files)) == ["model_index.json", "scheduler", "text_encoder", "text_encoder_2",
                                       "tokenizer", "tokenizer_2", "unet", "vae"]
  assert not any(name.endswith(".safetensors") for _, _, names in os.walk(files) for name in names)


def test_training_export_and_evaluation_outputs(distilled_sdxl):
  """One run writes the checkpoint, the export and the evaluation, whose stock Diffusers rows (the
  exported pipelines called with prompts, step count and latents) are our sampler's images."""
  _, config, workdir, _, state = distilled_sdxl
  assert int(state.step) == 3
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
  assert sorted(os.listdir(os.path.join(workdir, "export"))) == [
      "lora", "lora_1step", "lora_2step", "lora_4step", "pipeline_1step", "pipeline_2step", "pipeline_4step",
      "unet_1step", "unet_2step", "unet_4step"]  # no kohya file: it cannot carry the K table
  with open(os.path.join(workdir, "eval", "table.json")) as f:
    rows = json.load(f)
  assert [r["sampler"] for r in rows] == [f"teacher, 2 DDIM steps, CFG {config.tdm.guidance_scale}",
                                          "TDM student, 1 steps", "TDM student, 2 steps",
                                          "exported pipeline in stock Diffusers, 1 steps",
                                          "exported pipeline in stock Diffusers, 2 steps"]
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for k in (1, 2):
    ours, theirs = (np.asarray(Image.open(os.path.join(workdir, "eval", f"{role}_{k}nfe.png")), np.int16)
                    for role in ("student", "diffusers"))
    assert np.abs(ours - theirs).max() <= 1  # the same images, up to rounding to 8 bits


def _teacher_pipeline(config):
  from diffusers import StableDiffusionXLPipeline  # pylint: disable=g-import-not-at-top
  pipe = StableDiffusionXLPipeline.from_pretrained(config.teacher.pipeline, add_watermarker=False)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def _merged_images(folder, k, latents):
  from diffusers import StableDiffusionXLPipeline  # pylint: disable=g-import-not-at-top
  merged = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
  merged.set_progress_bar_config(disable=True)
  return merged(list(SDXL_PROMPTS), num_inference_steps=k, latents=latents, output_type="np").images


def test_lora_files_of_a_unified_student_in_the_teacher_pipeline(distilled_sdxl):
  """`lora/` and each `lora_{K}step/`, loaded into the teacher's own pipeline with `load_lora_weights`
  and switched with `set_adapters`, make the images of the merged `pipeline_{K}step`, given the call
  README.md shows: the student's scheduler, no guidance."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import DDIMScheduler  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from tdm_jax.core import lora  # pylint: disable=g-import-not-at-top
  _, config, workdir, _, state = distilled_sdxl
  export = os.path.join(workdir, "export")
  table = np.asarray(state.student_params["class_embedding"]["embedding"][lora.FULL])
  for k in (1, 2, 4):  # each file carries its row, exactly (a K not drawn in 3 iterations has a zero row)
    tensors = load_file(os.path.join(export, f"lora_{k}step", "pytorch_lora_weights.safetensors"))
    np.testing.assert_array_equal(tensors["unet.time_embedding.linear_2.lora_B.bias"], table[k])
  assert np.any(table[1])
  latents = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32))
  teacher = _teacher_pipeline(config)
  teacher.load_lora_weights(os.path.join(export, "lora"), adapter_name="tdm")
  for k in (1, 2, 4):
    teacher.load_lora_weights(os.path.join(export, f"lora_{k}step"), adapter_name=f"tdm_{k}step")
  for k in (1, 2, 4):
    folder = os.path.join(export, f"pipeline_{k}step")
    want = _merged_images(folder, k, latents)
    teacher.scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    call = lambda: teacher(list(SDXL_PROMPTS), num_inference_steps=k, guidance_scale=1.0, latents=latents,
                           output_type="np").images
    teacher.set_adapters(["tdm", f"tdm_{k}step"])
    np.testing.assert_allclose(call(), want, atol=2e-4, err_msg=f"K={k}")
    if k == 1:  # K's row matters, so the comparison above can fail
      teacher.set_adapters(["tdm"])
      assert np.abs(call() - want).max() > 1e-3


def test_lora_files_of_a_fixed_k_student_in_the_teacher_pipeline(distilled_sdxl, tmp_path):
  """A K = 4 LoRA student (no step table): both its files, the Diffusers one and the kohya one, loaded
  into the teacher's pipeline make the exported pipeline's images."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import DDIMScheduler  # pylint: disable=g-import-not-at-top
  from tdm_jax.core import lora  # pylint: disable=g-import-not-at-top
  from tdm_jax.tasks.diffusers import task as diffusers_task  # pylint: disable=g-import-not-at-top
  _, config, workdir, task, _ = distilled_sdxl
  config = copy.deepcopy(config)
  config.tdm.step_choices = ()
  config.teacher.converted = os.path.join(workdir, "converted")
  cfg = diffusers_task.lora_config(config)
  adapters = lora.init_adapters(jax.random.key(0), task.teacher_params, cfg)
  adapters = jax.tree_util.tree_map_with_path(  # b random (not zero), so that the adapters matter
      lambda path, x: 0.05 * jax.random.normal(jax.random.key(1), x.shape) if path[-1].key == "b" else x, adapters)
  export = diffusers_task.export(config, str(tmp_path), adapters)
  assert not os.path.exists(os.path.join(export, "lora_4step"))
  latents = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32))
  want = _merged_images(os.path.join(export, "pipeline"), 4, latents)
  teacher = _teacher_pipeline(config)
  teacher.scheduler = DDIMScheduler.from_pretrained(os.path.join(export, "pipeline"), subfolder="scheduler")
  call = lambda: teacher(list(SDXL_PROMPTS), num_inference_steps=4, guidance_scale=1.0, latents=latents,
                         output_type="np").images
  assert np.abs(call() - want).max() > 1e-3  # the adapters matter, so the comparisons below can fail
  for source, name in ((os.path.join(export, "lora"), None), (export, "lora_kohya.safetensors")):
    teacher.load_lora_weights(source, weight_name=name)
    got = call()
    teacher.unload_lora_weights()
    np.testing.assert_allclose(got, want, atol=2e-4, err_msg=name or "diffusers format")


def test_missing_prompt_file_is_named(distilled_sdxl, tmp_path):
  _, config, workdir, _, _ = distilled_sdxl
  config = copy.deepcopy(config)
  config.data.prompt_source = str(tmp_path / "none.txt")
  with pytest.raises(FileNotFoundError, match="none.txt"):
    tdm_main.task_module(config).build_task(config, workdir)


def test_missing_pipeline_folder_is_named(tmp_path):
  config = _config(tmp_path / "nowhere", tmp_path / "p.txt")
  with pytest.raises(folders.FolderError, match="nowhere"):
    tdm_main.run(config, str(tmp_path / "w"), "convert")


def test_converted_trees_restore_sharded(distilled_sdxl):
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from tdm_jax.convert import pipeline as pipeline_io  # pylint: disable=g-import-not-at-top
  from tdm_jax.infra import sharding  # pylint: disable=g-import-not-at-top
  workdir = distilled_sdxl[2]
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


def test_resumed_run_continues_at_the_saved_dataset_position(distilled_sdxl, tmp_path):
  """The fixture distilled from a TFDS dataset; its checkpoint holds the position reached, and a run
  resumed from it with twice the batch continues there (not where 4 x 16 rows would put it)."""
  import shutil  # pylint: disable=g-import-not-at-top
  from tdm_jax.infra.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  _, config, workdir, _, _ = distilled_sdxl
  config = copy.deepcopy(config)
  saved = Checkpointer(os.path.join(workdir, "checkpoints"))
  assert saved.metadata(3)["data"] == {"source": "tfds:sdxl_prompts", "split": "train", "process_count": 1,
                                       "position": 3 * config.train.batch_size}
  saved.close()
  resumed = tmp_path / "resumed"
  shutil.copytree(os.path.join(workdir, "checkpoints"), resumed / "checkpoints")
  config.teacher.converted = os.path.join(workdir, "converted")
  config.train.num_iterations = 4
  config.train.batch_size *= 2
  config.train.export_after = config.train.evaluate_after = False
  tdm_main.run(config, str(resumed), "train")
  after = Checkpointer(str(resumed / "checkpoints"))
  assert after.metadata(4)["data"]["position"] == 3 * 8 + 16
  after.close()
