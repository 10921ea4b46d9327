"""An attribute classifier for the procedural shapes dataset, and metrics for generated images.

The classifier is a small CNN trained on `tasks.shapes.data` images (rendered on the fly, deterministically
from (seed, example index)). It predicts the background, the number of objects and, for each of
the five position cells, whether an object is there and its shape, colour and size. Indexing the
object heads by position (rather than by object slot) removes the ordering ambiguity between two
objects: every attribute of a scene has exactly one place in the output.

Metrics:
  `adherence`: fraction of images whose predicted attributes all equal the prompt's scene.
  `frechet_distance`: Fréchet distance between Gaussians fitted to two sets of classifier features.
  `diversity`: mean pairwise feature distance among images of the same prompt, averaged over prompts.

Images are accepted as uint8 (n, H, W, 3) or float in [-1, 1], either NHWC or NCHW (the
Diffusers layout of `shapes_data.images_to_float`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import queue
import threading
import time
import warnings
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg

from tdm_jax.infra.errors import ConfigError, MissingFileError
from tdm_jax.infra.files import atomic_write_bytes
from tdm_jax.tasks.shapes import data as shapes_data
from tdm_jax.tasks.shapes.data import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Scene, ShapesConfig

NUM_POSITIONS = len(POSITIONS)
CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
NORM_AXES = ("norm",)
# Per-position heads: name -> number of classes.
POSITION_HEADS = (("presence", 2), ("shape", len(SHAPES)), ("colour", len(COLOURS)), ("size", len(SIZES)))
WEIGHTS_FILE = "classifier.safetensors"
META_FILE = "classifier.json"
PyTree = Any


def _annotated(init, axes):
  return nn.with_logical_partitioning(init, tuple(axes))


class AttributeClassifier(nn.Module):
  """CNN over NHWC images in [-1, 1] -> (logits dict, features (B, feature_dim)).

  Logits: "background" (B, len(BACKGROUNDS)); "num_objects" (B, max_objects), class k meaning
  k + 1 objects; "presence" (B, 5, 2), "shape" (B, 5, 3), "colour" (B, 5, 6), "size" (B, 5, 2),
  indexed by POSITIONS.
  """
  max_objects: int = 2
  widths: Tuple[int, ...] = (32, 64, 128)
  feature_dim: int = 128
  groups: int = 8
  pooled_side: int = 4

  @nn.compact
  def __call__(self, x):
    x = jnp.asarray(x, jnp.float32)
    for i, width in enumerate(self.widths):
      # A 4x4 stride-2 stem, then 3x3 stride-2 convs: every block halves the side.
      k = 4 if i == 0 else 3
      x = nn.Conv(width, (k, k), strides=(2, 2), padding=((1, 1), (1, 1)),
                  kernel_init=_annotated(nn.initializers.lecun_normal(), CONV_AXES),
                  bias_init=_annotated(nn.initializers.zeros, ("conv_out",)), name=f"conv_{i}")(x)
      x = nn.GroupNorm(num_groups=min(self.groups, width),
                       scale_init=_annotated(nn.initializers.ones, NORM_AXES),
                       bias_init=_annotated(nn.initializers.zeros, NORM_AXES), name=f"norm_{i}")(x)
      x = nn.relu(x)
    # Pool to a fixed pooled_side x pooled_side grid (keeps where things are, for the position heads).
    b, h, w, c = x.shape
    s = self.pooled_side
    if h % s or w % s:
      raise ValueError(f"feature map {h}x{w} is not divisible into a {s}x{s} grid; "
                       f"use an image side that is a multiple of {s * 2 ** len(self.widths)}")
    x = x.reshape(b, s, h // s, s, w // s, c).mean(axis=(2, 4)).reshape(b, s * s * c)
    features = nn.Dense(self.feature_dim, kernel_init=_annotated(nn.initializers.lecun_normal(), ("mlp_in", "mlp")),
                        bias_init=_annotated(nn.initializers.zeros, ("mlp",)), name="features")(x)
    features = nn.relu(features)

    def head(n, name):
      return nn.Dense(n, kernel_init=_annotated(nn.initializers.lecun_normal(), ("mlp", "classes")),
                      bias_init=_annotated(nn.initializers.zeros, ("classes",)), name=name)(features)

    logits = {"background": head(len(BACKGROUNDS), "background"),
              "num_objects": head(self.max_objects, "num_objects")}
    for name, n in POSITION_HEADS:
      logits[name] = head(NUM_POSITIONS * n, name).reshape(b, NUM_POSITIONS, n)
    return logits, features


# ----------------------------------------------------------------------------------------------
# Labels and images.


def labels_from_scenes(scenes: Sequence[Scene]) -> Dict[str, np.ndarray]:
  """Per-position targets. int32: "presence" (n, 5) in {0, 1}; "shape", "colour", "size" (n, 5),
  -1 where no object; "background" (n,); "num_objects" (n,) (the count itself, >= 1)."""
  n = len(scenes)
  out = {"presence": np.zeros((n, NUM_POSITIONS), np.int32)}
  for key in ("shape", "colour", "size"):
    out[key] = np.full((n, NUM_POSITIONS), -1, np.int32)
  out["background"] = np.zeros((n,), np.int32)
  out["num_objects"] = np.zeros((n,), np.int32)
  vocab = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}
  for i, scene in enumerate(scenes):
    out["background"][i] = BACKGROUNDS.index(scene.background)
    out["num_objects"][i] = len(scene.objects)
    for obj in scene.objects:
      p = POSITIONS.index(obj.position)
      out["presence"][i, p] = 1
      for key, names in vocab.items():
        out[key][i, p] = names.index(getattr(obj, key))
  return out


def to_model_input(images) -> np.ndarray:
  """uint8 NHWC, or float in [-1, 1] NHWC or NCHW -> float32 NHWC in [-1, 1]."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"expected a batch of images (n, H, W, 3) or (n, 3, H, W), got shape {images.shape}")
  if images.dtype == np.uint8:
    x = images.astype(np.float32) / 127.5 - 1.0
  else:
    x = images.astype(np.float32)
  if x.shape[-1] != 3 and x.shape[1] == 3:
    x = x.transpose(0, 2, 3, 1)
  if x.shape[-1] != 3:
    raise ValueError(f"images need 3 channels, got shape {images.shape}")
  return x


# ----------------------------------------------------------------------------------------------
# Training.


def _loss(logits, labels):
  """Sum of mean cross-entropies; object attributes only count where an object is."""
  def ce(lg, y):
    return optax.softmax_cross_entropy_with_integer_labels(lg, jnp.maximum(y, 0))

  total = ce(logits["background"], labels["background"]).mean()
  total += ce(logits["num_objects"], labels["num_objects"] - 1).mean()
  total += ce(logits["presence"], labels["presence"]).mean()
  mask = labels["presence"].astype(jnp.float32)
  denom = jnp.maximum(mask.sum(), 1.0)
  for key in ("shape", "colour", "size"):
    total += (ce(logits[key], labels[key]) * mask).sum() / denom
  return total


def _labels_np(scenes, max_objects):
  labels = labels_from_scenes(scenes)
  if labels["num_objects"].max(initial=1) > max_objects:
    raise ValueError(f"a scene has more than max_objects={max_objects} objects")
  return labels


def _batches(config: ShapesConfig, seed: int, index_start: int, batch_size: int, steps: int, max_objects: int):
  """Yields (images float NHWC, labels) for each step, rendered in a background thread."""
  q: "queue.Queue" = queue.Queue(maxsize=4)
  stop = threading.Event()

  def work():
    try:
      for step in range(steps):
        if stop.is_set():
          return
        images, _, scenes = shapes_data.batch(seed, index_start + step * batch_size, batch_size, config)
        q.put((to_model_input(images), _labels_np(scenes, max_objects)))
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


def init_params(config: ShapesConfig, seed: int = 0, **module_kwargs) -> PyTree:
  """Fresh classifier parameters (plain arrays, logical annotations removed)."""
  model = AttributeClassifier(max_objects=config.max_shapes, **module_kwargs)
  dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  variables = model.init(jax.random.PRNGKey(seed), dummy)
  return nn.meta.unbox(variables["params"])


def train_classifier(config: ShapesConfig = ShapesConfig(), *, steps: int = 1500, batch_size: int = 128,
                     seed: int = 0, learning_rate: float = 2e-3, index_start: int = 0,
                     noise_std: float = 0.03, log_every: int = 0, stats: Optional[dict] = None,
                     **module_kwargs) -> PyTree:
  """Trains the attribute classifier on examples index_start.. of stream `seed`; returns params.

  Deterministic for fixed arguments. `noise_std`: std of Gaussian noise added to the [-1, 1]
  inputs during training (robustness to slightly imperfect generated images); 0 disables.
  If `stats` is a dict, it receives "seconds", "steps_per_second" and "final_loss".
  """
  model = AttributeClassifier(max_objects=config.max_shapes, **module_kwargs)
  params = init_params(config, seed, **module_kwargs)
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, max(1, steps // 10)), max(steps, 1),
                                                end_value=learning_rate * 0.05)
  tx = optax.adam(schedule)
  opt_state = tx.init(params)

  @jax.jit
  def step_fn(params, opt_state, images, labels, key):
    if noise_std > 0:
      images = images + noise_std * jax.random.uniform(key, (images.shape[0], 1, 1, 1)) * jax.random.normal(
          jax.random.fold_in(key, 1), images.shape)

    def loss_fn(p):
      logits, _ = model.apply({"params": p}, images)
      return _loss(logits, labels)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  key = jax.random.PRNGKey(seed + 1)
  start = time.perf_counter()
  loss = None
  for i, (images, labels) in enumerate(_batches(config, seed, index_start, batch_size, steps, config.max_shapes)):
    params, opt_state, loss = step_fn(params, opt_state, images, labels, jax.random.fold_in(key, i))
    if log_every and (i + 1) % log_every == 0:
      print(f"classifier step {i + 1}/{steps} loss {float(loss):.4f}", flush=True)
  params = jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  if stats is not None:
    stats.update(seconds=seconds, steps_per_second=steps / max(seconds, 1e-9),
                 final_loss=float(loss) if loss is not None else float("nan"))
  return jax.device_get(params)


# ----------------------------------------------------------------------------------------------
# Inference.


def _module_from_params(params: PyTree) -> AttributeClassifier:
  """The module whose hyper-parameters match `params` (read off the parameter shapes)."""
  widths = []
  while f"conv_{len(widths)}" in params:
    widths.append(int(params[f"conv_{len(widths)}"]["kernel"].shape[-1]))
  feature_dim = int(params["features"]["kernel"].shape[-1])
  pooled_side = int(round((params["features"]["kernel"].shape[0] / widths[-1]) ** 0.5))
  return AttributeClassifier(max_objects=int(params["num_objects"]["bias"].shape[0]), widths=tuple(widths),
                             feature_dim=feature_dim, pooled_side=pooled_side)


@functools.lru_cache(maxsize=16)
def _jitted_apply(model: AttributeClassifier):
  def apply(params, x):
    logits, features = model.apply({"params": params}, x)
    out = {"background": jnp.argmax(logits["background"], -1),
           "num_objects": jnp.argmax(logits["num_objects"], -1) + 1,
           "presence": jnp.argmax(logits["presence"], -1)}
    present = out["presence"] > 0
    for key in ("shape", "colour", "size"):
      out[key] = jnp.where(present, jnp.argmax(logits[key], -1), -1)
    out["features"] = features
    return out
  return jax.jit(apply)


def predict(params: PyTree, images, batch_size: int = 256) -> Dict[str, np.ndarray]:
  """Predicted attributes, as numpy arrays in the layout of `labels_from_scenes`, plus "features".

  "background", "num_objects" (the count) (n,); "presence" (n, 5) in {0, 1}; "shape", "colour",
  "size" (n, 5), -1 where no object is predicted; "features" float32 (n, feature_dim).
  Runs in fixed-size batches (the last one padded) so that one compilation serves any n.
  """
  x = to_model_input(images)
  n = x.shape[0]
  apply = _jitted_apply(_module_from_params(params))
  bs = max(1, min(batch_size, n))
  chunks = []
  for start in range(0, n, bs):
    chunk = x[start:start + bs]
    m = chunk.shape[0]
    if m < bs:
      chunk = np.concatenate([chunk, np.zeros((bs - m,) + chunk.shape[1:], chunk.dtype)])
    out = jax.device_get(apply(params, chunk))
    chunks.append({k: np.asarray(v)[:m] for k, v in out.items()})
  if not chunks:
    raise ValueError("no images")
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def features(params: PyTree, images, batch_size: int = 256) -> np.ndarray:
  """Classifier features (n, feature_dim) float32, for `frechet_distance` and `diversity`."""
  return predict(params, images, batch_size)["features"]


# ----------------------------------------------------------------------------------------------
# Metrics.


def attribute_matches(predictions: Mapping[str, np.ndarray], scenes: Sequence[Scene]) -> Dict[str, np.ndarray]:
  """Per image booleans (n,): whether each attribute group matches the scene, and "all"."""
  labels = labels_from_scenes(scenes)
  n = len(scenes)
  if np.asarray(predictions["background"]).shape[0] != n:
    raise ValueError(f"{np.asarray(predictions['background']).shape[0]} predictions for {n} scenes")
  out = {"background": np.asarray(predictions["background"]) == labels["background"],
         "num_objects": np.asarray(predictions["num_objects"]) == labels["num_objects"],
         "presence": np.all(np.asarray(predictions["presence"]) == labels["presence"], axis=1)}
  present = labels["presence"] > 0
  for key in ("shape", "colour", "size"):
    out[key] = np.all((np.asarray(predictions[key]) == labels[key]) | ~present, axis=1)
  out["all"] = np.logical_and.reduce([out[k] for k in list(out)])
  return out


def adherence(predictions: Mapping[str, np.ndarray], scenes_from_prompts: Sequence[Scene]) -> float:
  """Fraction of images whose predicted background, object count and, for every position,
  presence, shape, colour and size all match the prompt's scene."""
  return float(np.mean(attribute_matches(predictions, scenes_from_prompts)["all"]))


def frechet_distance(feats_a, feats_b) -> float:
  """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64."""
  a = np.asarray(feats_a, np.float64)
  b = np.asarray(feats_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
    raise ValueError(f"need two (n >= 2, D) feature arrays of the same D, got {a.shape} and {b.shape}")
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a = np.atleast_2d(np.cov(a, rowvar=False))
  cov_b = np.atleast_2d(np.cov(b, rowvar=False))
  with warnings.catch_warnings():  # singular (e.g. dead-feature) covariances are expected
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.all(np.isfinite(covmean)):
      eps = 1e-6 * np.eye(a.shape[1])
      covmean = scipy.linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
  covmean = np.real(covmean)
  fd = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))
  return max(fd, 0.0) if fd > -1e-6 * max(1.0, float(np.trace(cov_a) + np.trace(cov_b))) else fd


def diversity(features, prompt_ids) -> float:
  """Mean over prompts (with >= 2 images) of the mean pairwise L2 feature distance among that
  prompt's images."""
  f = np.asarray(features, np.float64)
  ids = np.asarray(prompt_ids)
  if f.ndim != 2 or ids.shape != (f.shape[0],):
    raise ValueError(f"need features (n, D) and prompt_ids (n,), got {f.shape} and {ids.shape}")
  per_prompt = []
  for pid in np.unique(ids):
    g = f[ids == pid]
    if len(g) < 2:
      continue
    d = np.sqrt(np.maximum(((g[:, None, :] - g[None, :, :]) ** 2).sum(-1), 0.0))
    k = len(g)
    per_prompt.append(d[np.triu_indices(k, 1)].mean())
  if not per_prompt:
    raise ValueError("diversity needs at least one prompt with >= 2 images")
  return float(np.mean(per_prompt))


class PromptScorer:
  """Scores generated images against the shapes captions they were made from.

  `prompts` (one per image, repeats allowed: the same prompt with other noise) must be shapes
  captions; the real images are the scenes the captions describe, rendered. Each call returns
  adherence, Frechet distance to the real images on the classifier's features, and per-prompt
  diversity (NaN when no prompt has two images).
  """

  def __init__(self, classifier_dir: str, prompts: Sequence[str]):
    if not os.path.isfile(os.path.join(classifier_dir, WEIGHTS_FILE)):
      raise MissingFileError(f"no attribute classifier in {classifier_dir} ({WEIGHTS_FILE} missing); set "
                             f"config.eval.classifier to the evaluator folder of the shapes pipeline, or to '' "
                             f"for no image metrics")
    self.params, meta = load_classifier(classifier_dir)
    data_config = meta.get("config") or ShapesConfig()
    scenes = []
    for prompt in prompts:
      try:
        scenes.append(shapes_data.parse_caption(prompt))
      except ValueError as err:
        raise ConfigError(f"eval prompt {prompt!r} is not a shapes caption; config.eval.classifier scores only "
                          f"shapes captions (set it to '' for other prompts)") from err
    self.scenes = scenes
    unique = sorted(set(prompts))
    self.prompt_ids = np.asarray([unique.index(p) for p in prompts])
    self.real = shapes_data.render(scenes, data_config)
    self.real_features = features(self.params, self.real)

  def __call__(self, images) -> Dict[str, float]:
    out = predict(self.params, images)
    has_pairs = np.bincount(self.prompt_ids).max() >= 2
    return {"fd": frechet_distance(out["features"], self.real_features),
            "adherence": adherence(out, self.scenes),
            "diversity": diversity(out["features"], self.prompt_ids) if has_pairs else float("nan")}


# ----------------------------------------------------------------------------------------------
# Persistence.


def _flatten(tree: Mapping, prefix: str = "") -> Dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if "/" in str(k):
      raise ValueError(f"parameter name {k!r} contains '/'")
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, key + "/"))
    else:
      out[key] = np.ascontiguousarray(np.asarray(v))
  return out


def _unflatten(flat: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  tree: Dict[str, Any] = {}
  for key, value in flat.items():
    node = tree
    parts = key.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = value
  return tree


def _jsonable(meta: Any) -> Any:
  if dataclasses.is_dataclass(meta) and not isinstance(meta, type):
    return {"__dataclass__": type(meta).__name__, **{k: _jsonable(v) for k, v in dataclasses.asdict(meta).items()}}
  if isinstance(meta, Mapping):
    return {str(k): _jsonable(v) for k, v in meta.items()}
  if isinstance(meta, (list, tuple)):
    return [_jsonable(v) for v in meta]
  if isinstance(meta, np.generic):
    return meta.item()
  return meta


def _from_json(meta: Any) -> Any:
  if isinstance(meta, dict):
    if meta.get("__dataclass__") == "ShapesConfig":
      return ShapesConfig(**{k: v for k, v in meta.items() if k != "__dataclass__"})
    return {k: _from_json(v) for k, v in meta.items()}
  if isinstance(meta, list):
    return [_from_json(v) for v in meta]
  return meta


def save_classifier(path: str, params: PyTree, meta: Optional[Mapping[str, Any]] = None) -> None:
  """Writes `path`/classifier.safetensors (params, "/"-joined keys) and `path`/classifier.json
  (`meta`: e.g. {"config": ShapesConfig, ...}; dataclasses become tagged dicts). Atomic per file."""
  from safetensors.numpy import save as st_save  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  flat = _flatten(jax.device_get(params))
  atomic_write_bytes(os.path.join(path, WEIGHTS_FILE), st_save(flat))
  text = json.dumps(_jsonable(dict(meta or {})), indent=2, sort_keys=True)
  atomic_write_bytes(os.path.join(path, META_FILE), text.encode("utf-8"))


def load_classifier(path: str) -> Tuple[PyTree, Dict[str, Any]]:
  """(params, meta) written by `save_classifier`; a ShapesConfig in meta comes back as one."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  params = _unflatten(load_file(os.path.join(path, WEIGHTS_FILE)))
  meta_path = os.path.join(path, META_FILE)
  meta = {}
  if os.path.exists(meta_path):
    with open(meta_path, "r", encoding="utf-8") as f:
      meta = _from_json(json.load(f))
  return params, meta
