"""Reading (and writing) Diffusers pipeline folders, strictly and with clear errors.

A pipeline folder holds `model_index.json` and one subfolder per component (`unet/`, `vae/`,
`text_encoder/`, `scheduler/`, ...). A model component holds `config.json` and its weights as
safetensors, either one file or shards listed by an `*.index.json`; this module turns them into a
flat `{name: np.ndarray}` dict that the per-model mappers (`convert/clip.py`, `convert/vae.py`,
`convert/unet.py`) take.

Weight files are looked up in the order Diffusers/Transformers use them:

  1. `diffusion_pytorch_model[.{variant}].safetensors`, `model[.{variant}].safetensors`
  2. sharded safetensors: `diffusion_pytorch_model.safetensors.index[.{variant}].json` or
     `model.safetensors.index[.{variant}].json` (also `...[.{variant}].safetensors.index.json`)
  3. only when no safetensors exist: the pickled `.bin` equivalents, refused unless
     `allow_pickle=True` (unpickling can run arbitrary code).

Nothing here imports torch except the opt-in `.bin` path, lazily.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tdm_jax.infra.errors import ConfigError
from tdm_jax.infra.files import atomic_write

MODEL_INDEX = "model_index.json"
CONFIG_NAMES = ("config.json", "scheduler_config.json")
PICKLE_FLAG = "--config.teacher.allow_pickle=True"

_STEMS = ("diffusion_pytorch_model", "model")
_PICKLE_STEMS = ("diffusion_pytorch_model", "pytorch_model")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".ckpt", ".pt", ".pth", ".msgpack", ".h5")


class FolderError(ConfigError):
  """A pipeline folder or component is missing, malformed or unsupported; the message names the path and the fix."""


# ----------------------------------------------------------------------------- folders and configs


def _read_json(path: str, what: str) -> Any:
  if not os.path.isfile(path):
    raise FolderError(f"{what} not found: {path!r}")
  try:
    with open(path, "r", encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise FolderError(f"{what} {path!r} is not valid JSON ({e}); re-download or re-save it") from e
  except OSError as e:
    raise FolderError(f"cannot read {what} {path!r}: {e}") from e


def _require_dir(path: str, what: str) -> str:
  path = os.fspath(path)
  if not os.path.isdir(path):
    kind = "is not a directory" if os.path.exists(path) else "does not exist"
    raise FolderError(f"{what} {path!r} {kind}; pass the path of a Diffusers folder "
                      f"(as written by `save_pretrained`)")
  return path


def read_model_index(folder) -> dict:
  """`folder/model_index.json` as a dict."""
  folder = _require_dir(folder, "pipeline folder")
  path = os.path.join(folder, MODEL_INDEX)
  if not os.path.isfile(path):
    raise FolderError(f"{path!r} not found: {folder!r} is not a Diffusers pipeline folder "
                      f"(a pipeline saved with `DiffusionPipeline.save_pretrained` has one); pass the "
                      f"pipeline's root folder, not one of its components")
  index = _read_json(path, "model index")
  if not isinstance(index, dict):
    raise FolderError(f"model index {path!r} holds a JSON {type(index).__name__}, expected an object")
  return index


def _subdirs(folder: str) -> List[str]:
  try:
    return sorted(e for e in os.listdir(folder) if os.path.isdir(os.path.join(folder, e)))
  except OSError:
    return []


def component_path(folder, name) -> str:
  """`folder/name`, which must be a directory."""
  folder = _require_dir(folder, "pipeline folder")
  path = os.path.join(folder, name)
  if not os.path.isdir(path):
    present = _subdirs(folder)
    raise FolderError(f"component folder {path!r} not found; subfolders present in {folder!r}: "
                      f"{present or 'none'}. Check the component name or re-download the pipeline "
                      f"with its {name!r} component")
  return path


def read_config(component_dir, filename=None) -> dict:
  """The component's `config.json` (or `scheduler_config.json` for a scheduler), or `filename`."""
  component_dir = _require_dir(component_dir, "component folder")
  names = (filename,) if filename else CONFIG_NAMES
  for n in names:
    path = os.path.join(component_dir, n)
    if os.path.isfile(path):
      config = _read_json(path, "config")
      if not isinstance(config, dict):
        raise FolderError(f"config {path!r} holds a JSON {type(config).__name__}, expected an object")
      return config
  tried = " or ".join(repr(os.path.join(component_dir, n)) for n in names)
  raise FolderError(f"config not found: {tried}; the component folder must hold the config written "
                    f"by `save_pretrained`")


# ----------------------------------------------------------------------------- weight file names


def _with_variant(name: str, variant: Optional[str]) -> str:
  """'a.safetensors' -> 'a.fp16.safetensors'; 'a.safetensors.index.json' -> 'a.safetensors.index.fp16.json'."""
  if not variant:
    return name
  head, ext = name.rsplit(".", 1)
  return f"{head}.{variant}.{ext}"


def _candidates(variant: Optional[str], stems: Sequence[str], ext: str) -> Tuple[List[str], List[str]]:
  """(single-file names, index names) in lookup order."""
  singles = [_with_variant(f"{s}.{ext}", variant) for s in stems]
  indexes = []
  for s in stems:
    indexes.append(_with_variant(f"{s}.{ext}.index.json", variant))  # Diffusers/Transformers naming
    if variant:
      indexes.append(f"{s}.{variant}.{ext}.index.json")
  return singles, indexes


_VARIANT_RES = [
    re.compile(r"^(?:diffusion_pytorch_model|pytorch_model|model)\.(?P<v>[^.\-]+)\.(?:safetensors|bin)$"),
    re.compile(r"^(?:diffusion_pytorch_model|pytorch_model|model)\.(?P<v>[^.\-]+)-\d+-of-\d+\.(?:safetensors|bin)$"),
    re.compile(r"^(?:diffusion_pytorch_model|pytorch_model|model)\.(?:safetensors|bin)\.index\.(?P<v>[^.]+)\.json$"),
    re.compile(r"^(?:diffusion_pytorch_model|pytorch_model|model)\.(?P<v>[^.\-]+)\.(?:safetensors|bin)\.index\.json$"),
]


def _weight_files(component_dir: str) -> List[str]:
  try:
    entries = os.listdir(component_dir)
  except OSError:
    return []
  return sorted(e for e in entries
                if e.endswith(_WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(component_dir, e)))


def _variants_present(files: Sequence[str]) -> List[str]:
  found = set()
  for f in files:
    for r in _VARIANT_RES:
      m = r.match(f)
      if m:
        found.add(m.group("v"))
  return sorted(found)


def _find_weights(component_dir: str, variant: Optional[str]) -> Tuple[str, str, bool]:
  """(path, format 'safetensors'|'bin', sharded) of the weights to load."""
  for ext, stems in (("safetensors", _STEMS), ("bin", _PICKLE_STEMS)):
    singles, indexes = _candidates(variant, stems, ext)
    for name in singles:
      if os.path.isfile(os.path.join(component_dir, name)):
        return os.path.join(component_dir, name), ext, False
    for name in indexes:
      if os.path.isfile(os.path.join(component_dir, name)):
        return os.path.join(component_dir, name), ext, True
  files = _weight_files(component_dir)
  variants = _variants_present(files)
  if variant:
    raise FolderError(f"no {variant!r} variant weights in {component_dir!r} (looked for "
                      f"{', '.join(_candidates(variant, _STEMS, 'safetensors')[0])} and their sharded "
                      f"index); weight files present: {files or 'none'}"
                      + (f"; variants present: {variants}" if variants else
                         "; pass variant=None to load the default weights" if files else ""))
  if variants:
    v = variants[0]
    raise FolderError(f"{component_dir!r} holds only variant weights {files} (variant "
                      f"{', '.join(repr(x) for x in variants)}), no default weights; pass "
                      f"variant={v!r} to load them")
  raise FolderError(f"no weights found in {component_dir!r}: expected diffusion_pytorch_model.safetensors "
                    f"or model.safetensors (or a sharded *.safetensors.index.json); weight files present: "
                    f"{files or 'none'}")


# ----------------------------------------------------------------------------- loading


def _load_safetensors(path: str) -> Dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return dict(load_file(path))  # bfloat16 comes back as ml_dtypes.bfloat16
  except FileNotFoundError as e:
    raise FolderError(f"weight file not found: {path!r}") from e
  except Exception as e:  # SafetensorError, header/length errors
    raise FolderError(f"cannot read safetensors file {path!r} ({type(e).__name__}: {e}); the file is "
                      f"corrupt or truncated, re-download it") from e


def _torch_to_numpy(name: str, value: Any, path: str) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  if not isinstance(value, torch.Tensor):
    raise FolderError(f"{path!r}: entry {name!r} is a {type(value).__name__}, not a tensor; expected a "
                      f"flat state dict")
  t = value.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
  return t.numpy().copy()


def _load_pickle(path: str) -> Dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise FolderError(f"loading pickled weights {path!r} needs torch, which is not installed; "
                      f"`pip install torch` (CPU is enough) or convert the folder to safetensors") from e
  if not os.path.isfile(path):
    raise FolderError(f"weight file not found: {path!r}")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise FolderError(f"cannot load pickled weights {path!r} with torch.load(weights_only=True) "
                      f"({type(e).__name__}: {e})") from e
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise FolderError(f"{path!r} holds a {type(obj).__name__}, expected a state dict")
  return {str(k): _torch_to_numpy(str(k), v, path) for k, v in obj.items()}


def _refuse_pickle(path: str) -> FolderError:
  return FolderError(
      f"refusing to load pickled weights {path!r}: .bin files are unpickled, which can run arbitrary "
      f"code. Convert the component to safetensors, or, if you trust its source, opt in with "
      f"allow_pickle=True ({PICKLE_FLAG})")


def _load_sharded(index_path: str, fmt: str) -> Dict[str, np.ndarray]:
  index = _read_json(index_path, "shard index")
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not weight_map:
    raise FolderError(f"shard index {index_path!r} has no \"weight_map\" object (name -> shard file); "
                      f"re-download or re-save it")
  folder = os.path.dirname(index_path)
  shards = []
  for shard in weight_map.values():
    if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
      raise FolderError(f"shard index {index_path!r} names shard {shard!r}, which is not a file name in "
                        f"{folder!r}")
    if shard not in shards:
      shards.append(shard)
  missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
  if missing:
    raise FolderError(f"shard file{'s' if len(missing) > 1 else ''} "
                      f"{', '.join(repr(os.path.join(folder, s)) for s in missing)} listed in "
                      f"{index_path!r} not found; re-download the missing shard(s)")
  out: Dict[str, np.ndarray] = {}
  origin: Dict[str, str] = {}
  for shard in shards:
    path = os.path.join(folder, shard)
    part = _load_safetensors(path) if fmt == "safetensors" else _load_pickle(path)
    for k, v in part.items():
      if k in out:
        raise FolderError(f"tensor {k!r} appears in two shards, {origin[k]!r} and {shard!r} "
                          f"(index {index_path!r})")
      out[k] = v
      origin[k] = shard
  absent = [k for k in weight_map if k not in out]
  if absent:
    shown = ", ".join(f"{k!r} (in {weight_map[k]!r})" for k in absent[:10])
    more = f" and {len(absent) - 10} more" if len(absent) > 10 else ""
    raise FolderError(f"{len(absent)} tensor(s) listed in {index_path!r} are in none of its shards: "
                      f"{shown}{more}; the shards do not match the index, re-download them")
  return out


def load_state_dict(component_dir, *, variant=None, allow_pickle=False) -> Dict[str, np.ndarray]:
  """A component's weights as a flat `{diffusers_name: np.ndarray}`, dtypes kept (bf16 as ml_dtypes)."""
  component_dir = _require_dir(component_dir, "component folder")
  path, fmt, sharded = _find_weights(component_dir, variant)
  if fmt == "bin" and not allow_pickle:
    raise _refuse_pickle(path)
  if sharded:
    return _load_sharded(path, fmt)
  return _load_safetensors(path) if fmt == "safetensors" else _load_pickle(path)


# ----------------------------------------------------------------------------- saving


def write_json(path: str, obj: Any) -> None:
  """`obj` as indented, key-sorted JSON at `path` (atomically; parent folders made as needed)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
      f.write("\n")
  atomic_write(path, write)


def _as_arrays(state_dict: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  out = {}
  for k, v in state_dict.items():
    if not isinstance(k, str):
      raise FolderError(f"state dict key {k!r} is not a string")
    a = np.ascontiguousarray(np.asarray(v))
    if a.dtype == object:
      raise FolderError(f"state dict entry {k!r} is not an array ({type(v).__name__})")
    out[k] = a
  return out


def _shard(arrays: Dict[str, np.ndarray], max_bytes: int) -> List[Dict[str, np.ndarray]]:
  shards: List[Dict[str, np.ndarray]] = [{}]
  size = 0
  for k in sorted(arrays):
    n = arrays[k].nbytes
    if shards[-1] and size + n > max_bytes:
      shards.append({})
      size = 0
    shards[-1][k] = arrays[k]
    size += n
  return shards


def save_state_dict(component_dir, state_dict, config: dict, *,
                    weights_name="diffusion_pytorch_model.safetensors", max_shard_bytes=None) -> None:
  """Writes `config.json` and the weights as safetensors (sharded with an index when over `max_shard_bytes`).

  Every file is written to a temporary name in `component_dir` and renamed into place, so a crash
  never leaves a partial file under a final name. Shards are written before the index, the index
  before `config.json`; files of an earlier save under the same `weights_name` that this save did not
  write (old shards, a stale single file or index) are removed afterwards.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if not weights_name.endswith(".safetensors") or os.path.basename(weights_name) != weights_name:
    raise FolderError(f"weights_name {weights_name!r} must be a file name ending in .safetensors")
  if not isinstance(config, Mapping):
    raise FolderError(f"config must be a dict, got {type(config).__name__}")
  component_dir = os.fspath(component_dir)
  os.makedirs(component_dir, exist_ok=True)
  arrays = _as_arrays(state_dict)
  metadata = {"format": "pt"}  # Transformers refuses safetensors files without it.
  stem = weights_name[: -len(".safetensors")]
  index_name = f"{weights_name}.index.json"
  total = sum(a.nbytes for a in arrays.values())

  written = []
  if max_shard_bytes is None or total <= max_shard_bytes:
    atomic_write(os.path.join(component_dir, weights_name),
                  lambda tmp: save_file(arrays, tmp, metadata=metadata))
    written.append(weights_name)
  else:
    if max_shard_bytes <= 0:
      raise FolderError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards = _shard(arrays, int(max_shard_bytes))
    weight_map = {}
    for i, shard in enumerate(shards):
      name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      atomic_write(os.path.join(component_dir, name),
                    lambda tmp, shard=shard: save_file(shard, tmp, metadata=metadata))
      written.append(name)
      weight_map.update({k: name for k in shard})
    write_json(os.path.join(component_dir, index_name),
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    written.append(index_name)
  write_json(os.path.join(component_dir, "config.json"), dict(config))

  stale = re.compile(rf"^{re.escape(stem)}(?:-\d+-of-\d+)?\.safetensors(?:\.index\.json)?$")
  for f in os.listdir(component_dir):
    if stale.match(f) and f not in written:
      os.remove(os.path.join(component_dir, f))
