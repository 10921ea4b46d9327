"""SDXL at scale on a tiny SDXL-style pipeline and 8 CPU devices: LoRA over one frozen base,
parameters sharded by logical axes, prompts encoded inside the step, the two-stage recipe.

The equality tests compare whole distillation runs on different meshes with the 1-device run
(float32); the sharding tests read placements without running anything; the SDXL rows read
the real architecture's shapes (`configs/diffusers`, no weights).
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import REPO  # noqa: F401 (puts the repo on sys.path)
import tiny_pipeline

from tdm_jax.core import lora, tdm, train
from tdm_jax.infra import sharding
from tdm_jax.infra.checkpoint import CheckpointError
from tdm_jax.tasks.diffusers import task as diffusers_task
from tdm_jax.tasks.diffusers.build import abstract_trees
from tdm_jax.tasks.diffusers.description import describe

MIN_SHARD = 256  # the tiny model's leaves are small: shard everything from 256 elements up


def _config(pipeline_dir, prompt_file, mesh=(1, 1, 1), rank=4):
  from configs import sdxl  # pylint: disable=g-import-not-at-top
  config = sdxl.get_config()
  config.teacher.pipeline = str(pipeline_dir)
  config.data.prompt_source = str(prompt_file)
  config.model.resolution = 16
  config.model.dtype = config.model.teacher_dtype = "float32"
  config.model.remat = False
  config.model.lora_rank, config.model.lora_alpha = rank, 2.0 * rank
  config.tdm.guidance_scale = 2.0
  config.optim.student_lr = config.optim.fake_lr = 1e-3
  config.optim.eps = 1e-4  # Adam's first steps are ~sign(g); a larger eps keeps them continuous in g
  config.train.batch_size = 8
  config.train.num_iterations = 2
  config.train.checkpoint_every = 0
  config.train.progress = config.train.evaluate_after = config.train.export_after = False
  config.mesh.shape = mesh
  config.mesh.min_shard_size = MIN_SHARD
  return config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("sdxl_scale")
  tiny_pipeline.make_tiny_sdxl_pipeline(root / "pipeline", transformer_depth=(1, 1))
  prompts = root / "prompts.txt"
  prompts.write_text("a red circle\na blue square on white background\ngreen\nair\nwhirred on\n")
  config = _config(root / "pipeline", prompts)
  converted = diffusers_task.ensure_converted(config, str(root / "converted_run"))
  return root, converted


def _run(tiny, name, mesh, devices=None, **overrides):
  root, converted = tiny
  config = _config(root / "pipeline", root / "prompts.txt", mesh)
  config.teacher.converted = converted
  for key, value in overrides.items():
    section, field = key.split("__")
    config[section][field] = value
  workdir = str(root / name)
  task = diffusers_task.build_task(config, workdir, devices=devices)
  return task, train.distill(task, config, workdir, devices=devices)


@pytest.fixture(scope="module")
def one_device(tiny):
  """The 1-device run (also stage 1 of the stage-2 test), counting how often the iteration is traced."""
  traces, original = [], tdm.tdm_iteration
  tdm.tdm_iteration = lambda *a, **k: (traces.append(1), original(*a, **k))[1]
  try:
    task, state = _run(tiny, "one", (1, 1, 1), devices=jax.devices()[:1])
  finally:
    tdm.tdm_iteration = original
  return task, state, len(traces)


def _host(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2)])  # data only; data, fsdp and tensor at once
def test_lora_distillation_on_meshes_equals_one_device(tiny, one_device, mesh):
  _, expected, _ = one_device
  task, state = _run(tiny, "mesh_" + "x".join(map(str, mesh)), mesh)
  for name in ("student_params", "fake_params"):
    got, want = _host(getattr(state, name)), _host(getattr(expected, name))
    assert len(got) == len(want)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-6 * max(1.0, float(np.max(np.abs(w)))))
  assert int(state.step) == 2


def test_only_adapters_train_and_the_base_is_untouched(tiny, one_device):
  task, state, traces = one_device
  assert int(state.step) == 2 and traces == 1  # two iterations, one trace: the step compiled once
  # The state is adapters and their optimiser states only; the base never enters it.
  adapters = lora.adapter_items(state.student_params)
  assert len(adapters) == len(lora.target_paths(jax.eval_shape(lambda t: t, task.teacher_params), task.lora))
  assert sum(x.size for x in jax.tree.leaves(state.student_params)) == lora.count(state.student_params)
  n_base = sum(x.size for x in jax.tree.leaves(task.teacher_params))
  assert sum(x.size for x in jax.tree.leaves(state)) < 0.5 * n_base
  # Both adapters moved ('b' starts at zero), the frozen base is what was loaded.
  assert all(np.any(np.asarray(b)) for _, b in adapters.values())
  assert all(np.any(np.asarray(b)) for _, b in lora.adapter_items(state.fake_params).values())
  root, converted = tiny
  from tdm_jax.convert import pipeline as pipeline_io  # pylint: disable=g-import-not-at-top
  loaded = pipeline_io.load_converted(converted)["unet"]
  for a, b in zip(_host(task.teacher_params), _host(loaded)):
    np.testing.assert_array_equal(a, b)


def _assert_split_over_fsdp(abstract, shardings, what):
  """Every leaf of MIN_SHARD+ elements holds a smaller shard than the whole, with fsdp in its spec."""
  checked = 0
  flat_a = jax.tree_util.tree_flatten_with_path(abstract)[0]
  flat_s = jax.tree.leaves(shardings)
  assert len(flat_a) == len(flat_s)
  for (path, leaf), s in zip(flat_a, flat_s):
    if leaf.size < MIN_SHARD:
      continue
    spec_axes = {a for e in s.spec if e is not None for a in (e if isinstance(e, tuple) else (e,))}
    assert "fsdp" in spec_axes, f"{what}{jax.tree_util.keystr(path)} {leaf.shape} is not split over fsdp: {s.spec}"
    assert np.prod(s.shard_shape(leaf.shape)) < leaf.size
    checked += 1
  assert checked > 0
  return checked


@pytest.mark.parametrize("rank", [4, 0])
def test_every_large_leaf_is_split_over_fsdp(tiny, rank):
  root, converted = tiny
  config = _config(root / "pipeline", root / "prompts.txt", (2, 4, 1), rank=rank)
  config.teacher.converted = converted
  config.train.ema_decay = 0.99 if rank else 0.0
  task = diffusers_task.build_task(config, str(root / f"placement_{rank}"))
  mesh = sharding.make_mesh(config.mesh.shape)
  p = train.plan(task, config, mesh)
  # The base as placed by the task (addressable shards really smaller), the conditioner, and the state.
  for leaf in jax.tree.leaves(task.teacher_params):
    if leaf.size >= MIN_SHARD:
      assert leaf.addressable_shards[0].data.size < leaf.size
  _assert_split_over_fsdp(task.teacher_params, p.teacher, "base")
  _assert_split_over_fsdp(task.conditioner, p.conditioner, "text encoders")
  n = _assert_split_over_fsdp(p.abstract_state, p.state, "state")
  assert n >= (6 if rank == 0 else 5) * len(lora.target_paths(task.teacher_params, lora.LoraConfig()))


def test_sdxl_reference_placement_on_eight_devices():
  """The real SDXL architecture (no weights): fsdp splits every weight of 64k+ elements of UNet,
  both text encoders, the adapters and Adam; the per-device share is an eighth of the whole."""
  from configs import sdxl  # pylint: disable=g-import-not-at-top
  config = sdxl.get_config()
  d = describe(diffusers_task.reference_folder(config))
  abstract, axes = abstract_trees(d)
  mesh = sharding.make_mesh(config.mesh.shape)
  bf16 = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), tree)
  task = train.Task(apply=None, teacher_params=bf16(abstract["unet"]), schedule=None, sample_shape=(4, 64, 64),
                    batch=None, lora=diffusers_task.lora_config(config, d), param_axes=axes["unet"],
                    conditioner={k: bf16(v) for k, v in abstract.items() if k != "unet"},
                    conditioner_axes={k: v for k, v in axes.items() if k != "unet"})
  p = train.plan(task, config, mesh)
  placed = lambda tree, s: sharding.with_shardings(tree, s)
  base, text, state = placed(task.teacher_params, p.teacher), placed(task.conditioner, p.conditioner), p.abstract_state
  for tree in (base, text, state):
    for leaf in jax.tree.leaves(tree):
      if leaf.size >= config.mesh.min_shard_size:
        assert "fsdp" in str(leaf.sharding.spec), (leaf.shape, leaf.sharding.spec)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(base))
  assert total == 2 * 2_567_463_684  # bf16
  assert sharding.shard_bytes(base) < 1.01 * total / 8
  conv = base["down_blocks_1"]["resnets_0"]["conv1"]["kernel"]
  assert conv.sharding.spec == P(None, None, None, "fsdp")
  ff = state.student_params["mid_block"]["attentions_0"]["transformer_blocks_0"]["ff"]["net_0"]["proj"]["kernel"]
  assert ff["a"].shape == (1280, 64) and ff["a"].sharding.spec == P("fsdp", None)


def test_stage_two_starts_from_stage_one(tiny, one_device):
  root, _ = tiny
  _, stage1, _ = one_device
  # Stage 2 at another resolution: its first state is stage 1's student with a fresh fake score.
  _, start = _run(tiny, "stage2_start", (1, 1, 1), devices=jax.devices()[:1], train__num_iterations=0,
                  train__init_from=str(root / "one"), model__resolution=32)
  for a, b in zip(_host(start.student_params), _host(stage1.student_params)):
    np.testing.assert_array_equal(a, b)
  assert not any(np.any(np.asarray(b)) for _, b in lora.adapter_items(start.fake_params).values())
  _, fresh = _run(tiny, "stage2_fresh", (1, 1, 1), devices=jax.devices()[:1], train__num_iterations=0,
                  model__resolution=32)
  assert not any(np.any(np.asarray(b)) for _, b in lora.adapter_items(fresh.student_params).values())
  assert any(np.any(a != b) for a, b in zip(_host(start.student_params), _host(fresh.student_params)))
  # A student of another LoRA rank does not fit: named, with the fix.
  with pytest.raises(CheckpointError, match=r"init_from=.*does not fit this run's student.*model.lora_"):
    _run(tiny, "stage2_rank", (1, 1, 1), devices=jax.devices()[:1], train__num_iterations=0,
         train__init_from=str(root / "one"), model__lora_rank=8)


def test_init_from_without_checkpoint_is_named(tiny, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"train.init_from=.*empty.*holds no checkpoint"):
    _run(tiny, "no_init", (1, 1, 1), devices=jax.devices()[:1], train__init_from=str(tmp_path / "empty"))


@pytest.mark.parametrize("field, value, message", [
    ("model__lora_rank", -2, r"model.lora_rank=-2 must be a positive integer"),
    ("model__lora_alpha", -1.0, r"model.lora_alpha=-1.0 must be >= 0"),
    ("model__lora_targets", (r"to_nothing/kernel$",), r"match none of the .* 2-D parameters"),
    ("model__resolution", 18, r"model.resolution=18 must be a positive multiple of 4"),
    ("mesh__shape", (3, -1, 1), r"mesh.shape=\(3, -1, 1\) does not divide the 8 devices"),
    ("mesh__shape", (2, 2, 1), r"mesh.shape=\(2, 2, 1\) needs 4 devices, 8 are present"),
])
def test_bad_input_is_named(tiny, field, value, message):
  with pytest.raises(ValueError, match=message):
    _run(tiny, "bad", (1, -1, 1), **{field: value})


def test_shape_only_pipeline_gets_random_weights_in_their_shards(tiny, tmp_path):
  """No weights anywhere: published-style configs only (no tokenizer, no safetensors)."""
  import shutil  # pylint: disable=g-import-not-at-top
  root, _ = tiny
  reference = tmp_path / "reference"
  shutil.copytree(root / "pipeline", reference,
                  ignore=lambda d, names: [n for n in names if n.endswith(".safetensors") or n.startswith("tokenizer")])
  config = _config("", "", (1, -1, 1))
  config.model.reference = str(reference)
  workdir = str(tmp_path / "work")
  assert diffusers_task.is_shape_only(config, workdir)
  task = diffusers_task.build_task(config, workdir)
  for leaf in jax.tree.leaves(task.teacher_params):
    assert np.all(np.isfinite(np.asarray(leaf)))
    if leaf.size >= MIN_SHARD:
      assert leaf.addressable_shards[0].data.size == leaf.size // 8  # made in its shards over fsdp 8
  kernel = np.asarray(task.teacher_params["conv_in"]["kernel"])
  assert 0.05 < kernel.std() < 0.5  # N(0, 1/fan_in), fan_in = 3 * 3 * 4
  inputs = task.batch(0, 8)
  assert inputs["prompt"][0]["ids"].shape == (8, tiny_pipeline.MAX_LENGTH)  # stand-in tokenizer ids, no prompt file
  cond, uncond = task.conditioning(task.conditioner, inputs)
  assert cond["encoder_hidden_states"].shape == (8, tiny_pipeline.MAX_LENGTH, 32 + 64)
  assert np.all(np.isfinite(np.asarray(cond["text_embeds"]))) and not np.any(np.asarray(uncond["text_embeds"]))
  with pytest.raises(ValueError, match="random weights"):
    diffusers_task.export(config, workdir, task.teacher_params)


def _collectives_over_the_batch(hlo: str, batch_sizes) -> list:
  """Collectives in an optimised HLO text whose result is an activation-like tensor (floating point,
  rank >= 3) with a leading axis of one of `batch_sizes`: the partitioner gathering or reducing the
  batch. (Small integer index tensors of gathers may travel; they are not activations.)"""
  import re  # pylint: disable=g-import-not-at-top
  found = []
  for m in re.finditer(r"= (?:f32|bf16|f16)\[([\d,]+)\]\S* (all-gather|all-reduce|all-to-all|reduce-scatter)\(", hlo):
    dims = [int(d) for d in m.group(1).split(",")]
    if len(dims) >= 3 and dims[0] in batch_sizes:
      found.append(m.group(0))
  return found


def test_fsdp_gathers_weights_never_the_batch(tiny):
  """With every weight split over fsdp the compiled step keeps activations split over the batch:
  XLA all-gathers the weights (their leading axes are kernel sizes or channels), never an activation
  at the global batch (16, or 32 for the teacher's guided pair). Without the models' batch
  constraints it gathered activations and all-reduced partial products of the whole batch: the SDXL
  step held 2-4x the temporaries of the 1-device step."""
  root, converted = tiny
  config = _config(root / "pipeline", root / "prompts.txt", (1, 8, 1))
  config.teacher.converted = converted
  config.model.remat = True  # as configs/sdxl.py: the blocks run in computations of their own on CPU
  config.train.batch_size = 16
  task = diffusers_task.build_task(config, str(root / "collectives"))
  mesh = sharding.make_mesh(config.mesh.shape)
  with jax.set_mesh(mesh):
    p = train.plan(task, config, mesh)
    rows = sharding.process_rows(mesh, config.train.batch_size)
    inputs = sharding.global_batch(task.inputs(0, config.train.batch_size, rows), mesh, config.train.batch_size, rows)
    compiled, _ = train.compile_step(train.make_train_step(task, config), p, p.abstract_state,
                                     task.teacher_params, task.conditioner, inputs)
  hlo = compiled.as_text()
  assert "all-gather" in hlo  # the weights are gathered
  assert _collectives_over_the_batch(hlo, (16, 32)) == []
