"""A video attribute classifier for the moving-shapes clips, and metrics for generated videos.

The classifier (`VideoClassifier`) runs a small CNN on every frame (shared weights) and then two
heads:
  per frame: background and, per position cell, presence, shape, colour and size, from that frame
    alone. Nothing temporal enters them, so `temporal_consistency` can ask whether a clip keeps its
    objects' attributes from frame to frame.
  per clip: 3-D convolutions over the frames' 4x4 feature grids (so displacement between frames is
    seen where it happens), a mean over time and a feature layer; from the features, background,
    object count and, per position cell, presence, shape, colour, size and motion. These features
    are the ones `frechet_distance` and `diversity` use.
Indexing objects by position cell (as the image evaluator does) gives every attribute of a scene
one place in the output; the motion model of `video_data` keeps an object in its cell throughout.

Metrics: `adherence` (every caption attribute of a clip, motion included, predicted right),
`temporal_consistency`, `frechet_distance` and `diversity` (the image evaluator's, on clip features).
Videos are uint8 (n, F, H, W, 3) or float in [-1, 1], (n, F, H, W, 3) or Diffusers' (n, 3, F, H, W).

`python -m tdm_jax.tasks.shapes.video_evaluator --out=DIR` trains one and saves it (`train_and_save`).
"""

from __future__ import annotations

import functools
import json
import os
import queue
import threading
import time
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tdm_jax.infra.errors import ConfigError, MissingFileError
from tdm_jax.infra.files import atomic_write_bytes
from tdm_jax.tasks.shapes import evaluator as image_evaluator
from tdm_jax.tasks.shapes import video_data
from tdm_jax.tasks.shapes.data import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES
from tdm_jax.tasks.shapes.evaluator import diversity, frechet_distance  # pylint: disable=unused-import
from tdm_jax.tasks.shapes.video_data import MOTIONS, VideoScene, VideoShapesConfig

NUM_POSITIONS = len(POSITIONS)
CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
NORM_AXES = ("norm",)
FRAME_HEADS = (("presence", 2), ("shape", len(SHAPES)), ("colour", len(COLOURS)), ("size", len(SIZES)))
CLIP_HEADS = FRAME_HEADS + (("motion", len(MOTIONS)),)
OBJECT_KEYS = ("shape", "colour", "size", "motion")
WEIGHTS_FILE = "video_classifier.safetensors"
META_FILE = "video_classifier.json"
PyTree = Any


def _annotated(init, axes):
  return nn.with_logical_partitioning(init, tuple(axes))


def _dense(n, name, axes=("mlp", "classes")):
  return nn.Dense(n, kernel_init=_annotated(nn.initializers.lecun_normal(), axes),
                  bias_init=_annotated(nn.initializers.zeros, axes[-1:]), name=name)


def _norm(width, groups, name):
  return nn.GroupNorm(num_groups=min(groups, width), scale_init=_annotated(nn.initializers.ones, NORM_AXES),
                      bias_init=_annotated(nn.initializers.zeros, NORM_AXES), name=name)


def _conv3x3x3(t, width: int, time_stride: int, name: str):
  """A 3x3x3 convolution over (B, F, h, w, C), zero-padded ("SAME"), written as a 3x3 convolution of the
  frames f-1, f, f+1 stacked on channels: XLA's CPU gradient of a 3-D convolution is ~8x slower."""
  b, f, h, w, c = t.shape
  zero = jnp.zeros_like(t[:, :1])
  stacked = jnp.concatenate([jnp.concatenate([zero, t[:, :-1]], 1), t, jnp.concatenate([t[:, 1:], zero], 1)], -1)
  stacked = stacked[:, ::time_stride]
  out = nn.Conv(width, (3, 3), padding="SAME", kernel_init=_annotated(nn.initializers.lecun_normal(), CONV_AXES),
                bias_init=_annotated(nn.initializers.zeros, ("conv_out",)), name=name)(
                    stacked.reshape(-1, h, w, 3 * c))
  return out.reshape(b, -1, h, w, width)


class VideoClassifier(nn.Module):
  """(B, F, H, W, 3) in [-1, 1] -> (logits dict, features (B, feature_dim)).

  Clip logits: "background" (B, 6); "num_objects" (B, max_objects), class k meaning k + 1 objects;
  "presence" (B, 5, 2), "shape" (B, 5, 3), "colour" (B, 5, 6), "size" (B, 5, 2), "motion" (B, 5, 5).
  Frame logits: "frame_background" (B, F, 6), "frame_presence" (B, F, 5, 2), "frame_shape",
  "frame_colour", "frame_size" (B, F, 5, k).
  """
  max_objects: int = 2
  widths: Tuple[int, ...] = (32, 64, 64)
  frame_dim: int = 64
  temporal_width: int = 48
  feature_dim: int = 128
  groups: int = 8
  pooled_side: int = 4

  @nn.compact
  def __call__(self, x):
    x = jnp.asarray(x, jnp.float32)
    b, f, h, w, c = x.shape
    x = x.reshape(b * f, h, w, c)
    for i, width in enumerate(self.widths):  # the image evaluator's stem: every block halves the side
      k = 4 if i == 0 else 3
      x = nn.Conv(width, (k, k), strides=(2, 2), padding=((1, 1), (1, 1)),
                  kernel_init=_annotated(nn.initializers.lecun_normal(), CONV_AXES),
                  bias_init=_annotated(nn.initializers.zeros, ("conv_out",)), name=f"conv_{i}")(x)
      x = nn.relu(_norm(width, self.groups, f"norm_{i}")(x))
    _, gh, gw, gc = x.shape
    s = self.pooled_side
    if gh % s or gw % s:
      raise ValueError(f"feature map {gh}x{gw} is not divisible into a {s}x{s} grid; "
                       f"use a frame side that is a multiple of {s * 2 ** len(self.widths)}")
    grid = x.reshape(b * f, s, gh // s, s, gw // s, gc).mean(axis=(2, 4))  # (B*F, s, s, C)

    logits = {}
    frame = nn.relu(_dense(self.frame_dim, "frame_features", ("mlp_in", "mlp"))(grid.reshape(b * f, -1)))
    logits["frame_background"] = _dense(len(BACKGROUNDS), "frame_background")(frame).reshape(b, f, -1)
    for name, n in FRAME_HEADS:
      logits[f"frame_{name}"] = _dense(NUM_POSITIONS * n, f"frame_{name}")(frame).reshape(b, f, NUM_POSITIONS, n)

    t = grid.reshape(b, f, s, s, gc)
    for i, stride in enumerate((1, 2)):
      t = _conv3x3x3(t, self.temporal_width, stride, f"temporal_{i}")
      t = nn.relu(_norm(self.temporal_width, self.groups, f"temporal_norm_{i}")(t))
    t = t.mean(axis=1).reshape(b, -1)
    features = nn.relu(_dense(self.feature_dim, "features", ("mlp_in", "mlp"))(t))
    logits["background"] = _dense(len(BACKGROUNDS), "background")(features)
    logits["num_objects"] = _dense(self.max_objects, "num_objects")(features)
    for name, n in CLIP_HEADS:
      logits[name] = _dense(NUM_POSITIONS * n, name)(features).reshape(b, NUM_POSITIONS, n)
    return logits, features


# ----------------------------------------------------------------------------------------------
# Labels and inputs.


def labels_from_scenes(scenes: Sequence[VideoScene]) -> Dict[str, np.ndarray]:
  """The image evaluator's per-position targets of the frames' scene (the same in every frame:
  "presence", "shape", "colour", "size" (n, 5), "background", "num_objects" (n,)) plus "motion"
  (n, 5) ids into MOTIONS; -1 where no object."""
  out = image_evaluator.labels_from_scenes([video_data.frame_scene(s) for s in scenes])
  out["motion"] = np.full((len(scenes), NUM_POSITIONS), -1, np.int32)
  for i, scene in enumerate(scenes):
    for obj in scene.objects:
      out["motion"][i, POSITIONS.index(obj.position)] = MOTIONS.index(obj.motion)
  return out


def to_model_input(videos, frames: Optional[int] = None, image_size: Optional[int] = None) -> np.ndarray:
  """uint8 (n, F, H, W, 3), or float in [-1, 1] as (n, F, H, W, 3) or (n, 3, F, H, W) -> float32
  (n, F, H, W, 3). `frames` / `image_size`, when given, are checked (ValueError, one line)."""
  videos = np.asarray(videos)
  if videos.ndim != 5 or 3 not in (videos.shape[-1], videos.shape[1]):
    raise ValueError(f"expected videos (n, F, H, W, 3) or (n, 3, F, H, W), got shape {videos.shape}")
  x = videos.astype(np.float32) / 127.5 - 1.0 if videos.dtype == np.uint8 else videos.astype(np.float32)
  if x.shape[-1] != 3:
    x = x.transpose(0, 2, 3, 4, 1)
  if frames is not None and x.shape[1] != frames:
    raise ValueError(f"expected {frames} frames per clip, got {x.shape[1]} (videos of shape {videos.shape})")
  if image_size is not None and x.shape[2:4] != (image_size, image_size):
    raise ValueError(f"expected {image_size}x{image_size} frames, got {x.shape[2]}x{x.shape[3]} "
                     f"(videos of shape {videos.shape})")
  return x


# ----------------------------------------------------------------------------------------------
# Training.


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(y, 0))


def _loss(logits, labels):
  """Clip heads plus frame heads (mean over frames); object attributes count only where an object is."""
  mask = labels["presence"].astype(jnp.float32)
  denom = jnp.maximum(mask.sum(), 1.0)
  total = _ce(logits["background"], labels["background"]).mean()
  total += _ce(logits["num_objects"], labels["num_objects"] - 1).mean()
  total += _ce(logits["presence"], labels["presence"]).mean()
  for key in OBJECT_KEYS:
    total += (_ce(logits[key], labels[key]) * mask).sum() / denom
  frames = logits["frame_background"].shape[1]
  per_frame = lambda y: jnp.repeat(y[:, None], frames, axis=1)  # noqa: E731
  total += _ce(logits["frame_background"], per_frame(labels["background"])).mean()
  total += _ce(logits["frame_presence"], per_frame(labels["presence"])).mean()
  for key in ("shape", "colour", "size"):
    total += (_ce(logits[f"frame_{key}"], per_frame(labels[key])) * mask[:, None]).sum() / (denom * frames)
  return total


def _batches(config: VideoShapesConfig, seed: int, index_start: int, batch_size: int, steps: int, split: str):
  """Yields (videos float (B, F, H, W, 3), labels) per step, rendered in a background thread."""
  q: "queue.Queue" = queue.Queue(maxsize=4)
  stop = threading.Event()

  def work():
    try:
      for step in range(steps):
        if stop.is_set():
          return
        videos, _, scenes = video_data.batch(seed, index_start + step * batch_size, batch_size, config, split)
        q.put((to_model_input(videos), labels_from_scenes(scenes)))
    except BaseException as e:  # pylint: disable=broad-except
      q.put(e)

  thread = threading.Thread(target=work, daemon=True)
  thread.start()
  try:
    for _ in range(steps):
      item = q.get()
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    while thread.is_alive():
      try:
        q.get_nowait()
      except queue.Empty:
        thread.join(timeout=0.05)


def init_params(config: VideoShapesConfig, seed: int = 0, **module_kwargs) -> PyTree:
  """Fresh classifier parameters (plain arrays, logical annotations removed)."""
  model = VideoClassifier(max_objects=config.max_shapes, **module_kwargs)
  dummy = jnp.zeros((1, config.frames, config.image_size, config.image_size, 3), jnp.float32)
  return nn.meta.unbox(model.init(jax.random.PRNGKey(seed), dummy)["params"])


def train_classifier(config: VideoShapesConfig = VideoShapesConfig(), *, steps: int = 1500, batch_size: int = 32,
                     seed: int = 0, learning_rate: float = 2e-3, index_start: int = 0, noise_std: float = 0.03,
                     split: str = "train", log_every: int = 0, stats: Optional[dict] = None,
                     **module_kwargs) -> PyTree:
  """Trains on clips index_start.. of stream `seed` of `split`; returns params. Deterministic for
  fixed arguments. `noise_std`: std of Gaussian noise on the inputs during training (robustness to
  slightly imperfect generated clips); 0 disables. `stats` (a dict) receives "seconds",
  "steps_per_second" and "final_loss"."""
  model = VideoClassifier(max_objects=config.max_shapes, **module_kwargs)
  params = init_params(config, seed, **module_kwargs)
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, max(1, steps // 10)), max(steps, 1),
                                                end_value=learning_rate * 0.05)
  tx = optax.adam(schedule)
  opt_state = tx.init(params)

  @jax.jit
  def step_fn(params, opt_state, videos, labels, key):
    if noise_std > 0:
      scale = noise_std * jax.random.uniform(key, (videos.shape[0], 1, 1, 1, 1))
      videos = videos + scale * jax.random.normal(jax.random.fold_in(key, 1), videos.shape)
    loss, grads = jax.value_and_grad(lambda p: _loss(model.apply({"params": p}, videos)[0], labels))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  key = jax.random.PRNGKey(seed + 1)
  start = time.perf_counter()
  loss = None
  for i, (videos, labels) in enumerate(_batches(config, seed, index_start, batch_size, steps, split)):
    params, opt_state, loss = step_fn(params, opt_state, videos, labels, jax.random.fold_in(key, i))
    if log_every and (i + 1) % log_every == 0:
      print(f"video classifier step {i + 1}/{steps} loss {float(loss):.4f}", flush=True)
  params = jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  if stats is not None:
    stats.update(seconds=seconds, steps_per_second=steps / max(seconds, 1e-9),
                 final_loss=float(loss) if loss is not None else float("nan"))
  return jax.device_get(params)


# ----------------------------------------------------------------------------------------------
# Inference.


def _module_from_params(params: PyTree) -> VideoClassifier:
  """The module whose hyper-parameters match `params` (read off the parameter shapes)."""
  widths = []
  while f"conv_{len(widths)}" in params:
    widths.append(int(params[f"conv_{len(widths)}"]["kernel"].shape[-1]))
  temporal_width = int(params["temporal_0"]["kernel"].shape[-1])
  pooled_side = int(round((params["features"]["kernel"].shape[0] / temporal_width) ** 0.5))
  return VideoClassifier(max_objects=int(params["num_objects"]["bias"].shape[0]), widths=tuple(widths),
                         frame_dim=int(params["frame_features"]["kernel"].shape[-1]), temporal_width=temporal_width,
                         feature_dim=int(params["features"]["kernel"].shape[-1]), pooled_side=pooled_side)


@functools.lru_cache(maxsize=16)
def _jitted_apply(model: VideoClassifier):
  def apply(params, x):
    logits, features = model.apply({"params": params}, x)
    out = {"features": features}
    for prefix in ("", "frame_"):
      out[prefix + "background"] = jnp.argmax(logits[prefix + "background"], -1)
      out[prefix + "presence"] = jnp.argmax(logits[prefix + "presence"], -1)
      present = out[prefix + "presence"] > 0
      for key in OBJECT_KEYS if not prefix else OBJECT_KEYS[:3]:
        out[prefix + key] = jnp.where(present, jnp.argmax(logits[prefix + key], -1), -1)
    out["num_objects"] = jnp.argmax(logits["num_objects"], -1) + 1
    return out
  return jax.jit(apply)


def predict(params: PyTree, videos, config: Optional[VideoShapesConfig] = None,
            batch_size: int = 64) -> Dict[str, np.ndarray]:
  """Predicted attributes as numpy arrays, plus "features" float32 (n, feature_dim).

  Clip: "background", "num_objects" (n,); "presence" (n, 5) in {0, 1}; "shape", "colour", "size",
  "motion" (n, 5), -1 where no object is predicted. Frame: "frame_background" (n, F);
  "frame_presence", "frame_shape", "frame_colour", "frame_size" (n, F, 5). With `config`, the frame
  count and side are checked. Fixed-size batches (the last one padded): one compilation for any n.
  """
  x = to_model_input(videos, config.frames if config else None, config.image_size if config else None)
  n = x.shape[0]
  if not n:
    raise ValueError("no videos")
  apply = _jitted_apply(_module_from_params(params))
  bs = max(1, min(batch_size, n))
  chunks = []
  for start in range(0, n, bs):
    chunk = x[start:start + bs]
    m = chunk.shape[0]
    if m < bs:
      chunk = np.concatenate([chunk, np.zeros((bs - m,) + chunk.shape[1:], chunk.dtype)])
    chunks.append({k: np.asarray(v)[:m] for k, v in jax.device_get(apply(params, chunk)).items()})
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def features(params: PyTree, videos, config: Optional[VideoShapesConfig] = None, batch_size: int = 64) -> np.ndarray:
  """Clip features (n, feature_dim) float32, for `frechet_distance` and `diversity`."""
  return predict(params, videos, config, batch_size)["features"]


# ----------------------------------------------------------------------------------------------
# Metrics.


def attribute_matches(predictions: Mapping[str, np.ndarray], scenes: Sequence[VideoScene]) -> Dict[str, np.ndarray]:
  """Per clip booleans (n,): whether each clip head matches the scene, and "all"."""
  labels = labels_from_scenes(scenes)
  if np.asarray(predictions["background"]).shape[0] != len(scenes):
    raise ValueError(f"{np.asarray(predictions['background']).shape[0]} predictions for {len(scenes)} scenes")
  out = {k: np.asarray(predictions[k]) == labels[k] for k in ("background", "num_objects")}
  out["presence"] = np.all(np.asarray(predictions["presence"]) == labels["presence"], axis=1)
  present = labels["presence"] > 0
  for key in OBJECT_KEYS:
    out[key] = np.all((np.asarray(predictions[key]) == labels[key]) | ~present, axis=1)
  out["all"] = np.logical_and.reduce([out[k] for k in list(out)])
  return out


def adherence(predictions: Mapping[str, np.ndarray], scenes_from_prompts: Sequence[VideoScene]) -> float:
  """Fraction of clips whose predicted background, object count and, per position cell, presence,
  shape, colour, size and motion all match the prompt's scene."""
  return float(np.mean(attribute_matches(predictions, scenes_from_prompts)["all"]))


def frame_accuracy(predictions: Mapping[str, np.ndarray], scenes: Sequence[VideoScene]) -> Dict[str, float]:
  """Fraction of (clip, frame) pairs whose frame head matches the frames' scene, per head and "all"."""
  labels = labels_from_scenes(scenes)
  present = labels["presence"][:, None] > 0
  out = {"background": np.asarray(predictions["frame_background"]) == labels["background"][:, None],
         "presence": np.all(np.asarray(predictions["frame_presence"]) == labels["presence"][:, None], axis=-1)}
  for key in ("shape", "colour", "size"):
    out[key] = np.all((np.asarray(predictions[f"frame_{key}"]) == labels[key][:, None]) | ~present, axis=-1)
  out["all"] = np.logical_and.reduce(list(out.values()))
  return {k: float(v.mean()) for k, v in out.items()}


def temporal_consistency(predictions: Mapping[str, np.ndarray], keys: Sequence[str] = ("shape", "colour", "size")
                         ) -> float:
  """Fraction of clips whose per-frame predictions of `keys`, in every position cell, are the same
  in every frame. Predictions are -1 where a frame shows no object, so an object that appears,
  vanishes or changes cell also counts as inconsistent."""
  same = [np.all(np.asarray(predictions[f"frame_{k}"]) == np.asarray(predictions[f"frame_{k}"])[:, :1],
                 axis=tuple(range(1, np.ndim(predictions[f"frame_{k}"])))) for k in keys]
  return float(np.mean(np.logical_and.reduce(same)))


class VideoPromptScorer:
  """Scores generated clips against the moving-shapes captions they were made from: adherence,
  temporal consistency, Frechet distance to the captions' real clips on the classifier's features,
  and per-prompt diversity (NaN when no prompt has two clips). `prompts`: one per clip."""

  def __init__(self, classifier_dir: str, prompts: Sequence[str]):
    if not os.path.isfile(os.path.join(classifier_dir, WEIGHTS_FILE)):
      raise MissingFileError(f"no video classifier in {classifier_dir} ({WEIGHTS_FILE} missing)")
    self.params, meta = load_classifier(classifier_dir)
    self.config = meta.get("config") or VideoShapesConfig()
    scenes = []
    for prompt in prompts:
      try:
        scenes.append(video_data.parse_caption(prompt))
      except ValueError as err:
        raise ConfigError(f"eval prompt {prompt!r} is not a moving-shapes caption; the video classifier "
                          f"scores only those") from err
    self.scenes = scenes
    unique = sorted(set(prompts))
    self.prompt_ids = np.asarray([unique.index(p) for p in prompts])
    self.real = video_data.render(scenes, self.config)  # the captions' real clips, (n, F, H, W, 3) uint8
    self.real_features = features(self.params, self.real, self.config)

  def __call__(self, videos) -> Dict[str, float]:
    out = predict(self.params, videos, self.config)
    has_pairs = np.bincount(self.prompt_ids).max() >= 2
    return {"fd": frechet_distance(out["features"], self.real_features),
            "adherence": adherence(out, self.scenes), "temporal_consistency": temporal_consistency(out),
            "diversity": diversity(out["features"], self.prompt_ids) if has_pairs else float("nan")}


# ----------------------------------------------------------------------------------------------
# Persistence, and training one to ship.


def save_classifier(path: str, params: PyTree, meta: Optional[Mapping[str, Any]] = None) -> None:
  """`path`/video_classifier.safetensors and `path`/video_classifier.json (`meta`, e.g. {"config":
  VideoShapesConfig, ...}), each written atomically."""
  from safetensors.numpy import save as st_save  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  # pylint: disable=protected-access
  flat = image_evaluator._flatten(jax.device_get(params))
  atomic_write_bytes(os.path.join(path, WEIGHTS_FILE), st_save(flat))
  text = json.dumps(image_evaluator._jsonable(dict(meta or {})), indent=2, sort_keys=True)
  atomic_write_bytes(os.path.join(path, META_FILE), text.encode("utf-8"))


def _from_json(meta: Any) -> Any:
  if isinstance(meta, dict):
    if meta.get("__dataclass__") == "VideoShapesConfig":
      return VideoShapesConfig(**{k: v for k, v in meta.items() if k != "__dataclass__"})
    return {k: _from_json(v) for k, v in meta.items()}
  if isinstance(meta, list):
    return [_from_json(v) for v in meta]
  return meta


def load_classifier(path: str) -> Tuple[PyTree, Dict[str, Any]]:
  """(params, meta) written by `save_classifier`; a VideoShapesConfig in meta comes back as one."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  weights = os.path.join(path, WEIGHTS_FILE)
  if not os.path.isfile(weights):
    raise MissingFileError(f"no video classifier in {path} ({WEIGHTS_FILE} missing)")
  params = image_evaluator._unflatten(load_file(weights))  # pylint: disable=protected-access
  meta = {}
  if os.path.exists(os.path.join(path, META_FILE)):
    with open(os.path.join(path, META_FILE), "r", encoding="utf-8") as f:
      meta = _from_json(json.load(f))
  return params, meta


HELD_OUT_INDEX = 10_000_000  # far past any training index


def held_out_report(params: PyTree, config: VideoShapesConfig, seed: int = 0, n: int = 512) -> Dict[str, Any]:
  """Accuracies on `n` real clips of the eval split (stream seed + 1, from HELD_OUT_INDEX): per clip
  head, adherence, per-frame heads and temporal consistency."""
  videos, _, scenes = video_data.batch(seed + 1, HELD_OUT_INDEX, n, config, split="eval")
  preds = predict(params, videos, config)
  return {"clip": {k: float(v.mean()) for k, v in attribute_matches(preds, scenes).items()},
          "adherence": adherence(preds, scenes), "frame": frame_accuracy(preds, scenes),
          "temporal_consistency": temporal_consistency(preds), "clips": n}


def train_and_save(out: str, config: VideoShapesConfig = VideoShapesConfig(), *, steps: int = 1500,
                   batch_size: int = 32, seed: int = 0, held_out: int = 512, log_every: int = 0) -> Dict[str, Any]:
  """Trains the classifier on the train split, scores it on held-out eval-split clips, saves both to
  `out`; returns the meta written."""
  stats = {}
  params = train_classifier(config, steps=steps, batch_size=batch_size, seed=seed, log_every=log_every, stats=stats)
  meta = {"config": config, "train_steps": steps, "batch_size": batch_size, "seed": seed,
          "train_seconds": stats["seconds"], "final_loss": stats["final_loss"],
          "held_out": held_out_report(params, config, seed, held_out)}
  save_classifier(out, params, meta)
  return meta


def main(argv=None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m tdm_jax.tasks.shapes.video_evaluator",
                                   description="Train the moving-shapes video classifier and save it.")
  parser.add_argument("--out", required=True, help="folder to write video_classifier.{safetensors,json} to")
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--frames", type=int, default=9)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--held_out", type=int, default=512)
  parser.add_argument("--log_every", type=int, default=100)
  args = parser.parse_args(argv)
  config = VideoShapesConfig(image_size=args.image_size, frames=args.frames)
  meta = train_and_save(args.out, config, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                        held_out=args.held_out, log_every=args.log_every)
  print(json.dumps(image_evaluator._jsonable(meta), indent=2, sort_keys=True))  # pylint: disable=protected-access


if __name__ == "__main__":
  main()
