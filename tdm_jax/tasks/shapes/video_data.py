"""Moving shapes: the video version of the procedural shapes dataset, for the embedded video teacher.

A clip is `frames` frames (9 by default: 1 + 4k, what a temporal-compression-4 VAE such as CogVideoX's
takes) of an image from `tasks.shapes.data` whose objects may move. Shape, colour, size, background
and position cell are the image data's, and they stay constant over the clip; each object also has a
motion: "still", "left", "right", "up" or "down".

Motion model (chosen to be unambiguous to a classifier and to keep every frame a valid image scene):
an object moves at constant velocity along its direction and crosses `config.travel` of the image
side over the clip (0.25: 8 px at 32 px, 1 px per frame with 9 frames), passing its cell's centre at
the middle of the clip: in frame f its centre is

    cell centre + (f / (frames - 1) - 1/2) * travel * side * direction.

So the object never leaves its cell (it stays nearer to its own cell centre than to any other),
never leaves the frame (travel / 2 + large_extent <= 0.25), and the middle frame of an odd-length
clip is exactly the image data's rendering of the scene. Every frame's attributes are therefore
those of `frame_scene(scene)`, the same for all frames. Two objects whose paths would bring their
boxes to overlap (a corner object moving towards the centre while the centre object moves towards
it along the other axis) are not sampled: their motions are drawn again.

Captions state every attribute of every object, motion included ("standing still" is stated too),
and the background: "a small red circle in the top left moving right on a white background".
`parse_caption` recovers the scene from any caption.

Determinism: clip `i` of stream `seed` is drawn from `np.random.default_rng([seed, i])`, whatever the
split. Held-out split: a scene (background and all objects with their motions) is "eval" when a hash
of its canonical form falls below EVAL_FRACTION, else "train"; a split's stream draws scenes from the
same generator until one of its split comes, so no eval caption (in any template) describes a train
scene, and the teacher never sees the scenes it is scored on.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from tdm_jax.tasks.shapes import data as shapes_data
from tdm_jax.tasks.shapes.data import (BACKGROUND_RGB, BACKGROUNDS, COLOUR_RGB, COLOURS, POSITIONS,
                                       SHAPES, SIZES, ShapeObject, ShapesConfig, _alternation, _article)

MOTIONS = ("still", "left", "right", "up", "down")
MOTION_PHRASES: Dict[str, str] = {"still": "standing still", "left": "moving left", "right": "moving right",
                                  "up": "moving up", "down": "moving down"}
# Unit direction (dx, dy) in image coordinates (y grows downwards).
MOTION_DIRECTIONS: Dict[str, Tuple[int, int]] = {"still": (0, 0), "left": (-1, 0), "right": (1, 0),
                                                 "up": (0, -1), "down": (0, 1)}
SPLITS = ("train", "eval", "all")
EVAL_FRACTION = 0.1
_MAX_DRAWS = 10_000


@dataclasses.dataclass(frozen=True)
class VideoShapesConfig(ShapesConfig):
  """The image settings (`ShapesConfig`, image_size etc.) plus:

  frames: frames per clip (>= 2; 1 + 4k suits a temporal-compression-4 VAE).
  travel: distance an object moves over the clip, as a fraction of the image side.
  """
  frames: int = 9
  travel: float = 0.25

  def __post_init__(self):
    super().__post_init__()
    if self.frames < 2:
      raise ValueError(f"frames must be at least 2 (motion needs two frames), got {self.frames}")
    if not (0 < self.travel and self.travel / 2 + self.large_extent <= 0.25):
      raise ValueError(f"need 0 < travel and travel / 2 + large_extent <= 0.25 (objects stay in their cell "
                       f"and in the frame), got travel={self.travel}, large_extent={self.large_extent}")


@dataclasses.dataclass(frozen=True)
class VideoObject:
  """An object of the image data plus its motion; `position` is the cell it stays in."""
  shape: str
  colour: str
  size: str
  position: str
  motion: str

  def still(self) -> ShapeObject:
    """The object as the image data has it (what every frame shows, up to the shift)."""
    return ShapeObject(self.shape, self.colour, self.size, self.position)


@dataclasses.dataclass(frozen=True)
class VideoScene:
  """A background and 1.. moving objects at distinct cells, in canonical order (by POSITIONS index)."""
  background: str
  objects: Tuple[VideoObject, ...]

  def __post_init__(self):
    for obj in self.objects:
      if obj.motion not in MOTIONS:
        raise ValueError(f"unknown motion {obj.motion!r} in {obj}")
    shapes_data.Scene(self.background, tuple(o.still() for o in self.objects))  # the image checks

  @staticmethod
  def make(background: str, objects: Sequence[VideoObject]) -> "VideoScene":
    """A scene with its objects put in canonical order."""
    return VideoScene(background, tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position))))

  def key(self) -> str:
    """Canonical text of the scene (the held-out split hashes it)."""
    return self.background + "|" + ";".join(
        f"{o.shape},{o.colour},{o.size},{o.position},{o.motion}" for o in self.objects)


def frame_scene(scene: VideoScene) -> shapes_data.Scene:
  """The image scene every frame of `scene` shows: the per-frame ground truth."""
  return shapes_data.Scene(scene.background, tuple(o.still() for o in scene.objects))


def split_of(scene: VideoScene) -> str:
  """"eval" for a fixed EVAL_FRACTION of all scenes (by a stable hash), else "train"."""
  digest = hashlib.sha256(scene.key().encode("utf-8")).digest()
  return "eval" if int.from_bytes(digest[:8], "big") < EVAL_FRACTION * 2.0 ** 64 else "train"


# ----------------------------------------------------------------------------------------------
# Geometry and sampling.


def object_center(obj: VideoObject, frame: int, config: VideoShapesConfig = VideoShapesConfig()
                  ) -> Tuple[float, float]:
  """(x, y) of the object's centre in frame `frame`, in continuous pixel coordinates."""
  cx, cy = shapes_data.object_center(obj.position, config)
  dx, dy = MOTION_DIRECTIONS[obj.motion]
  offset = (frame / (config.frames - 1) - 0.5) * config.travel * config.image_size
  return cx + offset * dx, cy + offset * dy


def overlaps(scene: VideoScene, config: VideoShapesConfig = VideoShapesConfig()) -> bool:
  """Whether the boxes of two objects overlap in some frame."""
  objects = scene.objects
  for f in range(config.frames):
    for i in range(len(objects)):
      for j in range(i + 1, len(objects)):
        (xi, yi), (xj, yj) = object_center(objects[i], f, config), object_center(objects[j], f, config)
        reach = (shapes_data._extent(objects[i].size, config) +  # pylint: disable=protected-access
                 shapes_data._extent(objects[j].size, config)) * config.image_size  # pylint: disable=protected-access
        if abs(xi - xj) < reach and abs(yi - yj) < reach:
          return True
  return False


def sample_scene(rng: np.random.Generator, config: VideoShapesConfig = VideoShapesConfig()) -> VideoScene:
  """An image scene (`shapes_data.sample_scene`), then a motion per object, redrawn while boxes overlap."""
  still = shapes_data.sample_scene(rng, config)
  for _ in range(_MAX_DRAWS):
    motions = rng.integers(len(MOTIONS), size=len(still.objects))
    scene = VideoScene(still.background, tuple(
        VideoObject(o.shape, o.colour, o.size, o.position, MOTIONS[int(m)]) for o, m in zip(still.objects, motions)))
    if not overlaps(scene, config):
      return scene
  raise RuntimeError("no non-overlapping motions found")  # unreachable: all-still never overlaps


# ----------------------------------------------------------------------------------------------
# Rendering.


def _coverage_at(shape: str, size: str, cx: float, cy: float, config: ShapesConfig) -> np.ndarray:
  """(H, W) float32 coverage of an object centred at (cx, cy): the geometry of `shapes_data._coverage`,
  at any centre (bit for bit the same at a cell centre)."""
  s, k = config.image_size, config.supersample
  coords = (np.arange(s * k, dtype=np.float64) + 0.5) / k
  x = coords[None, :]
  y = coords[:, None]
  h = shapes_data._extent(size, config) * s  # pylint: disable=protected-access
  if shape == "circle":
    inside = (x - cx) ** 2 + (y - cy) ** 2 <= h * h
  elif shape == "square":
    inside = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
  elif shape == "triangle":
    half_width = (y - (cy - h)) / 2.0
    inside = (y >= cy - h) & (y <= cy + h) & (np.abs(x - cx) <= half_width)
  else:
    raise ValueError(f"unknown shape {shape!r}")
  inside = np.broadcast_to(inside, (s * k, s * k)).astype(np.float32)
  return inside.reshape(s, k, s, k).mean(axis=(1, 3))


@functools.lru_cache(maxsize=512)
def _clip_coverage(shape: str, size: str, position: str, motion: str, config: VideoShapesConfig) -> np.ndarray:
  """(F, H, W, 1) float32 coverage of an object in every frame (read-only, cached)."""
  obj = VideoObject(shape, COLOURS[0], size, position, motion)
  cover = np.stack([_coverage_at(shape, size, *object_center(obj, f, config), config)
                    for f in range(config.frames)])[..., None]
  cover.setflags(write=False)
  return cover


def render_scene(scene: VideoScene, config: VideoShapesConfig = VideoShapesConfig()) -> np.ndarray:
  """(F, H, W, 3) uint8; blended as `shapes_data.render_scene` blends each image."""
  s = config.image_size
  video = np.empty((config.frames, s, s, 3), np.float32)
  video[...] = np.asarray(BACKGROUND_RGB[scene.background], np.float32)
  for obj in scene.objects:
    cover = _clip_coverage(obj.shape, obj.size, obj.position, obj.motion, config)
    video += cover * (np.asarray(COLOUR_RGB[obj.colour], np.float32) - video)
  return np.clip(np.rint(video), 0, 255).astype(np.uint8)


def render(scenes: Sequence[VideoScene], config: VideoShapesConfig = VideoShapesConfig()) -> np.ndarray:
  """(n, F, H, W, 3) uint8 clips of `scenes`."""
  s = config.image_size
  out = np.empty((len(scenes), config.frames, s, s, 3), np.uint8)
  for i, scene in enumerate(scenes):
    out[i] = render_scene(scene, config)
  return out


# ----------------------------------------------------------------------------------------------
# Captions: the image templates with the motion phrase after the position (or before it).

TEMPLATES: Tuple[Tuple[str, str], ...] = (
    ("{a_size} {colour} {shape} in the {position} {motion}", "{objects} on {a_bg} background"),
    ("{colour} {shape} {size} {position} {motion}", "{objects} {bg} background"),
    ("{a_size} {colour} {shape} {motion} in the {position}", "a video of {objects} with {a_bg} background"),
    ("{a_size} {colour} {shape} in the {position} {motion}", "{a_bg} background with {objects}"),
    ("{a_size} {colour} {shape} at the {position} {motion}", "a clip of {objects} on {a_bg} canvas"),
    ("{size} {colour} {shape} {position} {motion}", "{objects} on {bg}"),
)


def _object_text(template: int, obj: VideoObject) -> str:
  return TEMPLATES[template][0].format(a_size=_article(obj.size), size=obj.size, colour=obj.colour,
                                       shape=obj.shape, position=obj.position, motion=MOTION_PHRASES[obj.motion])


def caption(scene: VideoScene, rng: np.random.Generator, template: Optional[int] = None) -> str:
  """A caption stating every attribute of `scene`, from a random template (or `template`); objects in
  a random order. Draws from `rng` as `shapes_data.caption` does."""
  if template is None:
    template = int(rng.integers(len(TEMPLATES)))
  order = rng.permutation(len(scene.objects)) if len(scene.objects) > 1 else [0]
  objects = " and ".join(_object_text(template, scene.objects[int(i)]) for i in order)
  return TEMPLATES[template][1].format(objects=objects, bg=scene.background, a_bg=_article(scene.background))


def attributes_in_caption(template: int) -> Tuple[str, ...]:
  """The attributes a template states: all of them, for every template."""
  del template
  return ("shape", "colour", "size", "position", "motion", "background")


@functools.lru_cache(maxsize=None)
def _patterns():
  """Per template: (scene regex, object regex, object field names, scene field names)."""
  groups = {
      "a_size": "(?:a|an) " + _alternation(SIZES), "size": _alternation(SIZES),
      "colour": _alternation(COLOURS), "shape": _alternation(SHAPES), "position": _alternation(POSITIONS),
      "motion": _alternation(MOTION_PHRASES.values()),
      "a_bg": "(?:a|an) " + _alternation(BACKGROUNDS), "bg": _alternation(BACKGROUNDS),
  }

  def regex(phrase):
    out = re.escape(phrase)
    for name in re.findall(r"{(\w+)}", phrase):
      out = out.replace(re.escape("{" + name + "}"), "(.+?)" if name == "objects" else groups[name], 1)
    return re.compile(out + r"\Z")

  return [(regex(scene_phrase), regex(object_phrase),
           tuple(n.replace("a_", "") for n in re.findall(r"{(\w+)}", object_phrase)),
           tuple(re.findall(r"{(\w+)}", scene_phrase))) for object_phrase, scene_phrase in TEMPLATES]


_MOTION_OF_PHRASE = {v: k for k, v in MOTION_PHRASES.items()}


def _parse(text: str) -> Tuple[int, VideoScene]:
  text = " ".join(text.lower().split())
  for template, (scene_re, object_re, object_names, scene_names) in enumerate(_patterns()):
    match = scene_re.match(text)
    if not match:
      continue
    fields = dict(zip(scene_names, match.groups()))
    objects = []
    for piece in fields["objects"].split(" and "):
      obj_match = object_re.match(piece)
      if not obj_match:
        break
      v = dict(zip(object_names, obj_match.groups()))
      objects.append(VideoObject(v["shape"], v["colour"], v["size"], v["position"], _MOTION_OF_PHRASE[v["motion"]]))
    else:
      return template, VideoScene.make(fields.get("a_bg", fields.get("bg")), objects)
  raise ValueError(f"not a moving-shapes caption: {text!r}")


def parse_caption(text: str) -> VideoScene:
  """The scene a caption describes (objects in canonical order). Raises ValueError on other text."""
  return _parse(text)[1]


def caption_template(text: str) -> int:
  """Index into TEMPLATES of the template that produced `text`."""
  return _parse(text)[0]


@functools.lru_cache(maxsize=None)
def _vocabulary() -> Tuple[str, ...]:
  words = {"and"}
  for template in range(len(TEMPLATES)):
    for background in BACKGROUNDS:
      for shape in SHAPES:
        for colour in COLOURS:
          for size in SIZES:
            for position in POSITIONS:
              for motion in MOTIONS:
                text = TEMPLATES[template][1].format(
                    objects=_object_text(template, VideoObject(shape, colour, size, position, motion)),
                    bg=background, a_bg=_article(background))
                words.update(text.split())
  return tuple(sorted(words))


def vocabulary() -> List[str]:
  """Sorted list of every word any caption can contain (for a word tokenizer)."""
  return list(_vocabulary())


# ----------------------------------------------------------------------------------------------
# The stream.


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def example(seed: int, index: int, config: VideoShapesConfig = VideoShapesConfig(),
            split: str = "train") -> Tuple[VideoScene, str]:
  """Scene and caption of clip `index` of the stream `seed` of `split` ("all": no split)."""
  _check_split(split)
  rng = np.random.default_rng([seed, index])
  for _ in range(_MAX_DRAWS):
    scene = sample_scene(rng, config)
    if split == "all" or split_of(scene) == split:
      return scene, caption(scene, rng)
  raise RuntimeError(f"no {split} scene in {_MAX_DRAWS} draws")


def examples(seed: int, index_start: int, n: int, config: VideoShapesConfig = VideoShapesConfig(),
             split: str = "train") -> Tuple[List[str], List[VideoScene]]:
  """Captions and scenes of clips index_start .. index_start + n - 1, not rendered (prompt files)."""
  if seed < 0 or index_start < 0:
    raise ValueError(f"seed and index_start must be non-negative, got {seed}, {index_start}")
  pairs = [example(seed, i, config, split) for i in range(index_start, index_start + n)]
  return [c for _, c in pairs], [s for s, _ in pairs]


def batch(seed: int, index_start: int, n: int, config: VideoShapesConfig = VideoShapesConfig(),
          split: str = "train") -> Tuple[np.ndarray, List[str], List[VideoScene]]:
  """Clips index_start .. index_start + n - 1: (videos uint8 (n, F, H, W, 3), captions, scenes)."""
  captions, scenes = examples(seed, index_start, n, config, split)
  return render(scenes, config), captions, scenes


def _check_video(videos: np.ndarray, what: str, frames: Optional[int], channel_axis: int) -> None:
  if videos.ndim != 5 or videos.shape[channel_axis] != 3:
    layout = "(n, F, H, W, 3)" if channel_axis == -1 else "(n, 3, F, H, W)"
    raise ValueError(f"{what} must be a batch of RGB videos {layout}, got shape {videos.shape}")
  got = videos.shape[1] if channel_axis == -1 else videos.shape[2]
  if frames is not None and got != frames:
    raise ValueError(f"{what} must have {frames} frames per clip, got {got} (shape {videos.shape})")


def videos_to_float(videos: np.ndarray, frames: Optional[int] = None) -> np.ndarray:
  """uint8 (n, F, H, W, 3) -> float32 (n, 3, F, H, W) in [-1, 1]: Diffusers' video layout, what
  CogVideoX's VAE encodes. `frames`, when given, is checked."""
  videos = np.asarray(videos)
  _check_video(videos, "videos", frames, -1)
  return (videos.astype(np.float32) / 127.5 - 1.0).transpose(0, 4, 1, 2, 3)


def float_to_videos(x: np.ndarray, frames: Optional[int] = None) -> np.ndarray:
  """float (n, 3, F, H, W) in [-1, 1] -> uint8 (n, F, H, W, 3); inverse of `videos_to_float`."""
  x = np.asarray(x, np.float32)
  _check_video(x, "x", frames, 1)
  return np.clip(np.rint((x.transpose(0, 2, 3, 4, 1) + 1.0) * 127.5), 0, 255).astype(np.uint8)
