"""tdm_jax.convert.folders: reading/writing Diffusers folders strictly, with errors that name the path."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from tdm_jax.convert import folders
from tdm_jax.convert.folders import FolderError

import tiny_pipeline


def _tensors(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
      "conv.bias": rng.standard_normal((4,)).astype(np.float32),
      "proj.weight": rng.standard_normal((8, 4)).astype(np.float32),
  }


def _assert_same(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def _write_json(path, obj):
  with open(path, "w") as f:
    json.dump(obj, f)


# ----------------------------------------------------------------------------- hand-built folders


def test_model_index_component_and_config(tmp_path):
  pipe = tmp_path / "pipe"
  (pipe / "vae").mkdir(parents=True)
  (pipe / "scheduler").mkdir()
  _write_json(pipe / "model_index.json", {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]})
  _write_json(pipe / "vae" / "config.json", {"latent_channels": 4})
  _write_json(pipe / "scheduler" / "scheduler_config.json", {"num_train_timesteps": 1000})
  assert folders.read_model_index(str(pipe))["vae"] == ["diffusers", "AutoencoderKL"]
  assert folders.component_path(pipe, "vae") == os.path.join(str(pipe), "vae")
  assert folders.read_config(folders.component_path(pipe, "vae")) == {"latent_channels": 4}
  assert folders.read_config(pipe / "scheduler")["num_train_timesteps"] == 1000
  assert folders.read_config(pipe / "scheduler", "scheduler_config.json")["num_train_timesteps"] == 1000


def test_missing_model_index_names_path(tmp_path):
  with pytest.raises(FolderError, match=r"model_index\.json") as e:
    folders.read_model_index(tmp_path)
  assert str(tmp_path) in str(e.value)
  with pytest.raises(FolderError, match="does not exist"):
    folders.read_model_index(tmp_path / "nope")
  (tmp_path / "model_index.json").write_text("{not json")
  with pytest.raises(FolderError, match="not valid JSON"):
    folders.read_model_index(tmp_path)


def test_missing_subfolder_lists_present(tmp_path):
  (tmp_path / "unet").mkdir()
  (tmp_path / "vae").mkdir()
  with pytest.raises(FolderError) as e:
    folders.component_path(tmp_path, "text_encoder")
  msg = str(e.value)
  assert os.path.join(str(tmp_path), "text_encoder") in msg
  assert "'unet'" in msg and "'vae'" in msg


def test_missing_config_names_path(tmp_path):
  with pytest.raises(FolderError) as e:
    folders.read_config(tmp_path)
  assert os.path.join(str(tmp_path), "config.json") in str(e.value)
  assert "scheduler_config.json" in str(e.value)
  (tmp_path / "config.json").write_text("[1, 2]")
  with pytest.raises(FolderError, match="expected an object"):
    folders.read_config(tmp_path)


def test_single_file_keeps_dtypes_including_bf16(tmp_path):
  t = _tensors()
  t["half.weight"] = np.ones((2, 2), np.float16)
  t["bf.weight"] = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
  save_file(t, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  got = folders.load_state_dict(tmp_path)
  _assert_same(got, t)
  assert got["bf.weight"].dtype == ml_dtypes.bfloat16
  assert all(isinstance(v, np.ndarray) for v in got.values())


def test_transformers_model_safetensors(tmp_path):
  t = _tensors()
  save_file(t, str(tmp_path / "model.safetensors"))
  _assert_same(folders.load_state_dict(tmp_path), t)


def _write_sharded(folder, t, index_name="diffusion_pytorch_model.safetensors.index.json", stem="diffusion_pytorch_model"):
  names = sorted(t)
  shard_a, shard_b = f"{stem}-00001-of-00002.safetensors", f"{stem}-00002-of-00002.safetensors"
  save_file({k: t[k] for k in names[:1]}, str(folder / shard_a))
  save_file({k: t[k] for k in names[1:]}, str(folder / shard_b))
  weight_map = {k: (shard_a if i < 1 else shard_b) for i, k in enumerate(names)}
  _write_json(folder / index_name, {"metadata": {}, "weight_map": weight_map})
  return shard_a, shard_b


def test_sharded_index(tmp_path):
  t = _tensors()
  _write_sharded(tmp_path, t)
  _assert_same(folders.load_state_dict(tmp_path), t)


def test_missing_shard_is_named(tmp_path):
  t = _tensors()
  _, shard_b = _write_sharded(tmp_path, t)
  os.remove(tmp_path / shard_b)
  with pytest.raises(FolderError) as e:
    folders.load_state_dict(tmp_path)
  assert os.path.join(str(tmp_path), shard_b) in str(e.value)


def test_index_name_absent_from_shards(tmp_path):
  t = _tensors()
  _write_sharded(tmp_path, t)
  index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
  index["weight_map"]["ghost.weight"] = "diffusion_pytorch_model-00001-of-00002.safetensors"
  _write_json(tmp_path / "diffusion_pytorch_model.safetensors.index.json", index)
  with pytest.raises(FolderError, match="ghost.weight"):
    folders.load_state_dict(tmp_path)


def test_variant_files(tmp_path):
  t = _tensors()
  t16 = {k: v.astype(np.float16) for k, v in t.items()}
  save_file(t, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  save_file(t16, str(tmp_path / "diffusion_pytorch_model.fp16.safetensors"))
  _assert_same(folders.load_state_dict(tmp_path), t)
  _assert_same(folders.load_state_dict(tmp_path, variant="fp16"), t16)
  with pytest.raises(FolderError) as e:
    folders.load_state_dict(tmp_path, variant="bf16")
  msg = str(e.value)
  assert "'bf16'" in msg and "diffusion_pytorch_model.fp16.safetensors" in msg
  assert "diffusion_pytorch_model.safetensors" in msg


def test_sharded_variant_index_spellings(tmp_path):
  t16 = {k: v.astype(np.float16) for k, v in _tensors().items()}
  a = tmp_path / "a"
  b = tmp_path / "b"
  a.mkdir()
  b.mkdir()
  _write_sharded(a, t16, "diffusion_pytorch_model.safetensors.index.fp16.json", "diffusion_pytorch_model.fp16")
  _write_sharded(b, t16, "model.fp16.safetensors.index.json", "model.fp16")
  for d in (a, b):
    _assert_same(folders.load_state_dict(d, variant="fp16"), t16)
    with pytest.raises(FolderError, match="variant='fp16'"):
      folders.load_state_dict(d)


def test_only_variant_without_variant_names_it(tmp_path):
  save_file(_tensors(), str(tmp_path / "diffusion_pytorch_model.fp16.safetensors"))
  with pytest.raises(FolderError, match="pass variant='fp16'"):
    folders.load_state_dict(tmp_path)


def test_empty_component(tmp_path):
  with pytest.raises(FolderError, match="no weights found") as e:
    folders.load_state_dict(tmp_path)
  assert str(tmp_path) in str(e.value)


def test_corrupt_safetensors_named(tmp_path):
  (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage")
  with pytest.raises(FolderError, match="diffusion_pytorch_model.safetensors"):
    folders.load_state_dict(tmp_path)


def test_save_round_trip_single_and_sharded(tmp_path):
  t = _tensors()
  t["bf.weight"] = np.ones((3,), ml_dtypes.bfloat16)
  config = {"_class_name": "Thing", "channels": [8, 16]}
  folders.save_state_dict(tmp_path / "single", t, config)
  assert sorted(os.listdir(tmp_path / "single")) == ["config.json", "diffusion_pytorch_model.safetensors"]
  _assert_same(folders.load_state_dict(tmp_path / "single"), t)
  assert folders.read_config(tmp_path / "single") == config

  folders.save_state_dict(tmp_path / "sharded", t, config, max_shard_bytes=150)
  files = sorted(os.listdir(tmp_path / "sharded"))
  shards = [f for f in files if f.endswith("-of-00003.safetensors")]
  assert len(shards) == 3 and "diffusion_pytorch_model.safetensors.index.json" in files, files
  assert not [f for f in files if f.endswith(".tmp")]
  _assert_same(folders.load_state_dict(tmp_path / "sharded"), t)

  # Re-saving unsharded over a sharded folder leaves no stale shards or index behind.
  folders.save_state_dict(tmp_path / "sharded", t, config)
  assert sorted(os.listdir(tmp_path / "sharded")) == ["config.json", "diffusion_pytorch_model.safetensors"]
  folders.save_state_dict(tmp_path / "m", t, config, weights_name="model.safetensors", max_shard_bytes=10**9)
  assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
  _assert_same(folders.load_state_dict(tmp_path / "m"), t)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
  t = _tensors()
  folders.save_state_dict(tmp_path, t, {"a": 1})
  before = (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes()
  import safetensors.numpy as sn

  def crash(tensors, path, metadata=None):
    with open(path, "wb") as f:
      f.write(b"half a file")
    raise RuntimeError("disk full")

  monkeypatch.setattr(sn, "save_file", crash)
  with pytest.raises(RuntimeError, match="disk full"):
    folders.save_state_dict(tmp_path, _tensors(1), {"a": 2})
  assert (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes() == before
  assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
  assert folders.read_config(tmp_path) == {"a": 1}


def test_runtime_module_does_not_import_torch():
  import subprocess
  import sys
  code = ("import sys; import tdm_jax.convert.folders as f, safetensors.numpy; "
          "assert 'torch' not in sys.modules, 'torch imported'")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


# ----------------------------------------------------------------------------- folders written by Diffusers

TINY = tiny_pipeline.TINY_VAE


@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
  import torch
  import diffusers
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(**TINY).eval()
  root = tmp_path_factory.mktemp("diffusers_vae")
  vae.save_pretrained(root / "single")
  vae.save_pretrained(root / "sharded", max_shard_size="20KB")
  vae.save_pretrained(root / "bin", safe_serialization=False)
  vae.save_pretrained(root / "bin_sharded", safe_serialization=False, max_shard_size="20KB")
  reference = {k: v.detach().numpy().copy() for k, v in vae.state_dict().items()}
  vae.half().save_pretrained(root / "fp16", variant="fp16")
  vae.save_pretrained(root / "fp16_sharded", variant="fp16", max_shard_size="20KB")
  return diffusers, torch, root, reference


def test_diffusers_single_and_sharded(diffusers_vae):
  _, _, root, reference = diffusers_vae
  _assert_same(folders.load_state_dict(root / "single"), reference)
  assert any(f.endswith(".index.json") for f in os.listdir(root / "sharded"))
  _assert_same(folders.load_state_dict(root / "sharded"), reference)
  assert folders.read_config(root / "single")["_class_name"] == "AutoencoderKL"


def test_diffusers_fp16_variant(diffusers_vae):
  _, _, root, reference = diffusers_vae
  half = {k: v.astype(np.float16) for k, v in reference.items()}
  for name in ("fp16", "fp16_sharded"):
    _assert_same(folders.load_state_dict(root / name, variant="fp16"), half)
    with pytest.raises(FolderError, match="pass variant='fp16'"):
      folders.load_state_dict(root / name)
  with pytest.raises(FolderError) as e:
    folders.load_state_dict(root / "single", variant="fp16")
  assert "diffusion_pytorch_model.safetensors" in str(e.value) and "'fp16'" in str(e.value)


def test_diffusers_bin_refused_then_loaded_with_opt_in(diffusers_vae):
  _, _, root, reference = diffusers_vae
  with pytest.raises(FolderError) as e:
    folders.load_state_dict(root / "bin")
  msg = str(e.value)
  assert os.path.join(str(root / "bin"), "diffusion_pytorch_model.bin") in msg
  assert "allow_pickle=True" in msg and "--config.teacher.allow_pickle=True" in msg
  with pytest.raises(FolderError, match=r"diffusion_pytorch_model\.bin\.index\.json"):
    folders.load_state_dict(root / "bin_sharded")
  _assert_same(folders.load_state_dict(root / "bin", allow_pickle=True), reference)
  _assert_same(folders.load_state_dict(root / "bin_sharded", allow_pickle=True), reference)


def test_diffusers_loads_a_folder_we_wrote(diffusers_vae, tmp_path):
  diffusers, torch, root, reference = diffusers_vae
  config = folders.read_config(root / "single")
  state = folders.load_state_dict(root / "single")
  for name, max_shard_bytes in (("ours", None), ("ours_sharded", 30_000)):
    folders.save_state_dict(tmp_path / name, state, config, max_shard_bytes=max_shard_bytes)
    if max_shard_bytes:
      assert os.path.isfile(tmp_path / name / "diffusion_pytorch_model.safetensors.index.json")
    vae = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / name))
    got = {k: v.detach().numpy() for k, v in vae.state_dict().items()}
    _assert_same(got, reference)
