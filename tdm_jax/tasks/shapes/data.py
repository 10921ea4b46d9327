"""A procedural captioned image dataset of coloured shapes, for the project's own small teacher.

Every image is a plain background with 1..`max_shapes` objects; an object is a shape (circle,
square, upright triangle) of a colour, a size class and a position cell. The attributes of each
image are known exactly (`Scene`), every caption states all of them (shape, colour, size and
position of each object, and the background), and `parse_caption` recovers the scene from any
caption, so prompt adherence can be judged against the prompt alone.

The stream is a pure function of (seed, absolute example index): example `i` is drawn from
`np.random.default_rng([seed, i])`, so any slice can be regenerated without the rest (resumable
training, per-host sharding).

Geometry (fractions of the image side): the corner positions are centred on the quadrant
centres (0.25 / 0.75), "center" on the middle; an object of size class s fills the box of
half-extent `config.large_extent` or `config.small_extent` around its position (circle inscribed,
square filling it, upright triangle with its apex at the top middle and its base on the bottom).
Half-extents up to 0.125 keep objects in different positions from overlapping, so every object
is drawn whole. Rendering supersamples each pixel `config.supersample`² times (box filter).

Captions are lowercase words separated by single spaces, no punctuation: `caption.split()` is a
subset of `vocabulary()`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")

# Object colours: saturated and far apart in RGB.
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
COLOUR_RGB: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 220, 30),
    "purple": (150, 50, 200),
    "orange": (250, 120, 0),
}

# Backgrounds: neutrals and light tints. Never an object colour.
BACKGROUNDS = ("white", "black", "gray", "light blue", "light green", "light pink")
BACKGROUND_RGB: Dict[str, Tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "light blue": (185, 215, 245),
    "light green": (195, 235, 195),
    "light pink": (250, 210, 225),
}

# Cell centres (x, y) as fractions of the image side.
POSITION_CENTRES: Dict[str, Tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}


def _allowed_colours(background: str) -> Tuple[str, ...]:
  """Object colours that may sit on `background`: not named in it ("blue" is not on "light blue")."""
  return tuple(c for c in COLOURS if c not in background.split())


ALLOWED_COLOURS: Dict[str, Tuple[str, ...]] = {b: _allowed_colours(b) for b in BACKGROUNDS}


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
  """Dataset settings.

  image_size: side in pixels (32 and 64 are the intended sizes; any multiple of 4 from 16 works).
  min_shapes, max_shapes: the number of objects is uniform in [min_shapes, max_shapes]
    (1 or 2 in practice; at most len(POSITIONS), since objects take distinct positions).
  seed: the default seed of the stream (`batch` takes it explicitly).
  supersample: samples per pixel side for anti-aliasing.
  large_extent, small_extent: half-extent of an object's box, as a fraction of the image side.
  """
  image_size: int = 32
  min_shapes: int = 1
  max_shapes: int = 2
  seed: int = 0
  supersample: int = 4
  large_extent: float = 0.12
  small_extent: float = 0.07

  def __post_init__(self):
    if self.image_size < 8:
      raise ValueError(f"image_size must be at least 8, got {self.image_size}")
    if not 1 <= self.min_shapes <= self.max_shapes <= len(POSITIONS):
      raise ValueError(f"need 1 <= min_shapes <= max_shapes <= {len(POSITIONS)}, "
                       f"got {self.min_shapes}, {self.max_shapes}")
    if self.supersample < 1:
      raise ValueError(f"supersample must be >= 1, got {self.supersample}")
    if not 0 < self.small_extent < self.large_extent <= 0.125:
      raise ValueError("need 0 < small_extent < large_extent <= 0.125 (objects must not overlap), "
                       f"got {self.small_extent}, {self.large_extent}")


@dataclasses.dataclass(frozen=True)
class ShapeObject:
  shape: str
  colour: str
  size: str
  position: str


@dataclasses.dataclass(frozen=True)
class Scene:
  """A background and 1.. objects at distinct positions, in canonical order (by POSITIONS index)."""
  background: str
  objects: Tuple[ShapeObject, ...]

  def __post_init__(self):
    if self.background not in BACKGROUNDS:
      raise ValueError(f"unknown background {self.background!r}")
    if not self.objects:
      raise ValueError("a scene needs at least one object")
    for obj in self.objects:
      if (obj.shape not in SHAPES or obj.colour not in COLOURS or obj.size not in SIZES
          or obj.position not in POSITIONS):
        raise ValueError(f"unknown attribute in {obj}")
      if obj.colour not in ALLOWED_COLOURS[self.background]:
        raise ValueError(f"{obj.colour} object on a {self.background} background")
    positions = [obj.position for obj in self.objects]
    if len(set(positions)) != len(positions):
      raise ValueError(f"objects share a position: {positions}")

  @staticmethod
  def make(background: str, objects: Sequence[ShapeObject]) -> "Scene":
    """A scene with its objects put in canonical order."""
    return Scene(background, tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position))))


# ----------------------------------------------------------------------------------------------
# Sampling.


def sample_scene(rng: np.random.Generator, config: ShapesConfig = ShapesConfig()) -> Scene:
  num = int(rng.integers(config.min_shapes, config.max_shapes + 1))
  background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
  colours = ALLOWED_COLOURS[background]
  positions = sorted(int(p) for p in rng.choice(len(POSITIONS), size=num, replace=False))
  objects = []
  for p in positions:
    objects.append(ShapeObject(shape=SHAPES[int(rng.integers(len(SHAPES)))],
                               colour=colours[int(rng.integers(len(colours)))],
                               size=SIZES[int(rng.integers(len(SIZES)))],
                               position=POSITIONS[p]))
  return Scene(background, tuple(objects))


def sample_attributes(rng: np.random.Generator, n: int, config: ShapesConfig = ShapesConfig()) -> List[Scene]:
  """`n` scenes drawn one after another from `rng`."""
  return [sample_scene(rng, config) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# Rendering.


def object_center(position: str, config: ShapesConfig = ShapesConfig()) -> Tuple[float, float]:
  """(x, y) of a position cell's centre in continuous pixel coordinates (pixel j spans [j, j+1))."""
  fx, fy = POSITION_CENTRES[position]
  return fx * config.image_size, fy * config.image_size


def object_box(obj: ShapeObject, config: ShapesConfig = ShapesConfig()) -> Tuple[float, float, float, float]:
  """(x0, y0, x1, y1) of the box the object fills, in continuous pixel coordinates."""
  cx, cy = object_center(obj.position, config)
  h = _extent(obj.size, config) * config.image_size
  return cx - h, cy - h, cx + h, cy + h


def _extent(size: str, config: ShapesConfig) -> float:
  return config.large_extent if size == "large" else config.small_extent


@functools.lru_cache(maxsize=64)
def _coverage(shape: str, size: str, position: str, config: ShapesConfig) -> np.ndarray:
  """(H, W, 1) float32 fraction of each pixel that the object covers (box-filtered supersampling)."""
  s, k = config.image_size, config.supersample
  coords = (np.arange(s * k, dtype=np.float64) + 0.5) / k  # sample points in pixel coordinates
  x = coords[None, :]
  y = coords[:, None]
  cx, cy = object_center(position, config)
  h = _extent(size, config) * s
  if shape == "circle":
    inside = (x - cx) ** 2 + (y - cy) ** 2 <= h * h
  elif shape == "square":
    inside = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
  elif shape == "triangle":  # upright: apex (cx, cy - h), base from (cx - h, cy + h) to (cx + h, cy + h)
    half_width = (y - (cy - h)) / 2.0
    inside = (y >= cy - h) & (y <= cy + h) & (np.abs(x - cx) <= half_width)
  else:
    raise ValueError(f"unknown shape {shape!r}")
  inside = np.broadcast_to(inside, (s * k, s * k)).astype(np.float32)
  cover = inside.reshape(s, k, s, k).mean(axis=(1, 3))
  cover.setflags(write=False)
  return cover[:, :, None]


def render_scene(scene: Scene, config: ShapesConfig = ShapesConfig()) -> np.ndarray:
  """(H, W, 3) uint8."""
  s = config.image_size
  image = np.empty((s, s, 3), np.float32)
  image[...] = np.asarray(BACKGROUND_RGB[scene.background], np.float32)
  for obj in scene.objects:
    cover = _coverage(obj.shape, obj.size, obj.position, config)
    colour = np.asarray(COLOUR_RGB[obj.colour], np.float32)
    image += cover * (colour - image)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render(scenes: Sequence[Scene], config: ShapesConfig = ShapesConfig()) -> np.ndarray:
  """(n, H, W, 3) uint8 images of `scenes`."""
  s = config.image_size
  out = np.empty((len(scenes), s, s, 3), np.uint8)
  for i, scene in enumerate(scenes):
    out[i] = render_scene(scene, config)
  return out


# ----------------------------------------------------------------------------------------------
# Captions. A template is (object phrase, scene phrase); the scene phrase holds {objects}, the
# object phrases joined by " and ". {a_size} / {a_bg} are the word with its article ("a small").

TEMPLATES: Tuple[Tuple[str, str], ...] = (
    ("{a_size} {colour} {shape} in the {position}", "{objects} on {a_bg} background"),
    ("{colour} {shape} {size} {position}", "{objects} {bg} background"),
    ("{a_size} {colour} {shape} in the {position}", "a picture of {objects} with {a_bg} background"),
    ("{a_size} {colour} {shape} in the {position}", "{a_bg} background with {objects}"),
    ("{a_size} {colour} {shape} at the {position}", "an image of {objects} on {a_bg} canvas"),
    ("{size} {colour} {shape} {position}", "{objects} on {bg}"),
)


def _article(phrase: str) -> str:
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _object_text(template: int, obj: ShapeObject) -> str:
  return TEMPLATES[template][0].format(a_size=_article(obj.size), size=obj.size, colour=obj.colour,
                                       shape=obj.shape, position=obj.position)


def caption(scene: Scene, rng: np.random.Generator, template: Optional[int] = None) -> str:
  """A caption stating every attribute of `scene`, from a random template (or `template`).

  Objects are mentioned in a random order. Draws from `rng` (template unless given, then the order).
  """
  if template is None:
    template = int(rng.integers(len(TEMPLATES)))
  order = rng.permutation(len(scene.objects)) if len(scene.objects) > 1 else [0]
  objects = " and ".join(_object_text(template, scene.objects[int(i)]) for i in order)
  return TEMPLATES[template][1].format(objects=objects, bg=scene.background, a_bg=_article(scene.background))


def attributes_in_caption(template: int) -> Tuple[str, ...]:
  """The attributes a template states: all of them, for every template."""
  del template
  return ("shape", "colour", "size", "position", "background")


def _alternation(words: Sequence[str]) -> str:
  return "(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


@functools.lru_cache(maxsize=None)
def _patterns():
  """Per template: (compiled scene regex, compiled object regex, object group names in order)."""
  groups = {
      "a_size": "(?:a|an) " + _alternation(SIZES), "size": _alternation(SIZES),
      "colour": _alternation(COLOURS), "shape": _alternation(SHAPES), "position": _alternation(POSITIONS),
      "a_bg": "(?:a|an) " + _alternation(BACKGROUNDS), "bg": _alternation(BACKGROUNDS),
  }
  out = []
  for object_phrase, scene_phrase in TEMPLATES:
    names = re.findall(r"{(\w+)}", object_phrase)
    object_regex = re.escape(object_phrase)
    for name in names:
      object_regex = object_regex.replace(re.escape("{" + name + "}"), groups[name], 1)
    scene_regex = re.escape(scene_phrase)
    for name in re.findall(r"{(\w+)}", scene_phrase):
      piece = "(.+?)" if name == "objects" else groups[name]
      scene_regex = scene_regex.replace(re.escape("{" + name + "}"), piece, 1)
    scene_names = re.findall(r"{(\w+)}", scene_phrase)
    out.append((re.compile(scene_regex + r"\Z"), re.compile(object_regex + r"\Z"),
                tuple(n.replace("a_", "") for n in names), tuple(scene_names)))
  return out


def _parse(text: str) -> Tuple[int, Scene]:
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
      values = dict(zip(object_names, obj_match.groups()))
      objects.append(ShapeObject(values["shape"], values["colour"], values["size"], values["position"]))
    else:
      background = fields.get("a_bg", fields.get("bg"))
      return template, Scene.make(background, objects)
  raise ValueError(f"not a shapes caption: {text!r}")


def parse_caption(text: str) -> Scene:
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
              obj = ShapeObject(shape, colour, size, position)
              text = TEMPLATES[template][1].format(objects=_object_text(template, obj), bg=background,
                                                   a_bg=_article(background))
              words.update(text.split())
  return tuple(sorted(words))


def vocabulary() -> List[str]:
  """Sorted list of every word any caption can contain."""
  return list(_vocabulary())


# ----------------------------------------------------------------------------------------------
# The stream.


def example(seed: int, index: int, config: ShapesConfig = ShapesConfig()) -> Tuple[Scene, str]:
  """Scene and caption of example `index` of the stream `seed`."""
  rng = np.random.default_rng([seed, index])
  scene = sample_scene(rng, config)
  return scene, caption(scene, rng)


def batch(seed: int, index_start: int, n: int,
          config: ShapesConfig = ShapesConfig()) -> Tuple[np.ndarray, List[str], List[Scene]]:
  """Examples index_start .. index_start + n - 1: (images uint8 (n, H, W, 3), captions, scenes)."""
  if seed < 0 or index_start < 0:
    raise ValueError(f"seed and index_start must be non-negative, got {seed}, {index_start}")
  scenes, captions = [], []
  for i in range(index_start, index_start + n):
    scene, text = example(seed, i, config)
    scenes.append(scene)
    captions.append(text)
  return render(scenes, config), captions, scenes


def images_to_float(images: np.ndarray) -> np.ndarray:
  """uint8 (n, H, W, 3) -> float32 (n, 3, H, W) in [-1, 1] (Diffusers layout)."""
  images = np.asarray(images)
  return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def float_to_images(x: np.ndarray) -> np.ndarray:
  """float (n, 3, H, W) in [-1, 1] -> uint8 (n, H, W, 3); inverse of `images_to_float`."""
  x = np.asarray(x, np.float32).transpose(0, 2, 3, 1)
  return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def attribute_labels(scenes: Sequence[Scene], max_objects: Optional[int] = None) -> Dict[str, np.ndarray]:
  """Integer labels for a classifier.

  "shape", "colour", "size", "position": int32 (n, max_objects), ids into SHAPES / COLOURS / SIZES /
  POSITIONS per object slot (canonical order), -1 where a scene has fewer objects;
  "background": int32 (n,) ids into BACKGROUNDS; "num_objects": int32 (n,).
  `max_objects` defaults to the most objects in `scenes`.
  """
  if max_objects is None:
    max_objects = max((len(s.objects) for s in scenes), default=1)
  n = len(scenes)
  labels = {k: np.full((n, max_objects), -1, np.int32) for k in ("shape", "colour", "size", "position")}
  labels["background"] = np.zeros((n,), np.int32)
  labels["num_objects"] = np.zeros((n,), np.int32)
  vocab = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}
  for i, scene in enumerate(scenes):
    if len(scene.objects) > max_objects:
      raise ValueError(f"scene {i} has {len(scene.objects)} objects, more than max_objects={max_objects}")
    labels["background"][i] = BACKGROUNDS.index(scene.background)
    labels["num_objects"][i] = len(scene.objects)
    for j, obj in enumerate(scene.objects):
      for key, names in vocab.items():
        labels[key][i, j] = names.index(getattr(obj, key))
  return labels
