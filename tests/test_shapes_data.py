"""The procedural shapes dataset: determinism, rendering matches attributes, captions state them."""

import collections
import itertools
import math
import time

import numpy as np
import pytest
from PIL import Image

from tdm_jax.core import sample
from tdm_jax.tasks.shapes import data as sd

CONFIG = sd.ShapesConfig()


def test_deterministic_by_seed_and_index():
  a_images, a_captions, a_scenes = sd.batch(3, 0, 16, CONFIG)
  b_images, b_captions, b_scenes = sd.batch(3, 0, 16, CONFIG)
  np.testing.assert_array_equal(a_images, b_images)
  assert a_captions == b_captions and a_scenes == b_scenes
  c_images, c_captions, _ = sd.batch(4, 0, 16, CONFIG)
  assert c_captions != a_captions and not np.array_equal(c_images, a_images)


def test_slice_independence():
  images, captions, scenes = sd.batch(7, 10, 5, CONFIG)
  long_images, long_captions, long_scenes = sd.batch(7, 5, 10, CONFIG)
  np.testing.assert_array_equal(images, long_images[5:])
  assert captions == long_captions[5:] and scenes == long_scenes[5:]
  # Example i is the one default_rng([seed, i]) gives.
  assert sd.example(7, 12, CONFIG) == (scenes[2], captions[2])


def test_shapes_and_dtypes_and_speed():
  start = time.perf_counter()
  images, captions, scenes = sd.batch(0, 0, 256, CONFIG)
  elapsed = time.perf_counter() - start
  assert images.shape == (256, 32, 32, 3) and images.dtype == np.uint8
  assert len(captions) == len(scenes) == 256
  assert elapsed < 1.0, elapsed
  x = sd.images_to_float(images[:4])
  assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32
  assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < -0.9 and x.max() > 0.9
  np.testing.assert_array_equal(sd.float_to_images(x), images[:4])


@pytest.mark.parametrize("image_size", [32, 64])
def test_pixels_match_caption(image_size):
  config = sd.ShapesConfig(image_size=image_size)
  images, captions, _ = sd.batch(1, 0, 200, config)
  corner_checked = 0
  for image, text in zip(images, captions):
    scene = sd.parse_caption(text)  # judge the pixels against what the caption says
    for obj in scene.objects:
      cx, cy = sd.object_center(obj.position, config)
      np.testing.assert_array_equal(image[int(cy), int(cx)], sd.COLOUR_RGB[obj.colour], err_msg=text)
    occupied = {obj.position for obj in scene.objects}
    for position, (row, col) in (("top left", (0, 0)), ("top right", (0, -1)),
                                 ("bottom left", (-1, 0)), ("bottom right", (-1, -1))):
      if position not in occupied:
        np.testing.assert_array_equal(image[row, col], sd.BACKGROUND_RGB[scene.background], err_msg=text)
        corner_checked += 1
  assert corner_checked > 200


def test_objects_are_drawn_only_in_their_box():
  config = sd.ShapesConfig(image_size=32)
  for scene in sd.sample_attributes(np.random.default_rng(0), 50, config):
    image = sd.render([scene], config)[0]
    differs = np.any(image != np.asarray(sd.BACKGROUND_RGB[scene.background], np.uint8), axis=-1)
    allowed = np.zeros_like(differs)
    for obj in scene.objects:
      x0, y0, x1, y1 = sd.object_box(obj, config)
      allowed[math.floor(y0):math.ceil(y1), math.floor(x0):math.ceil(x1)] = True
    assert not np.any(differs & ~allowed)


def test_colour_never_equals_background():
  for background in sd.BACKGROUNDS:
    allowed = sd.ALLOWED_COLOURS[background]
    assert len(allowed) >= 4
    for colour in allowed:
      distance = np.linalg.norm(np.subtract(sd.COLOUR_RGB[colour], sd.BACKGROUND_RGB[background]))
      assert distance > 90, (colour, background)
  for a, b in itertools.combinations(sd.COLOURS, 2):
    assert np.linalg.norm(np.subtract(sd.COLOUR_RGB[a], sd.COLOUR_RGB[b])) > 90, (a, b)
  scenes = sd.sample_attributes(np.random.default_rng(0), 500, CONFIG)
  assert all(o.colour not in s.background.split() for s in scenes for o in s.objects)
  with pytest.raises(ValueError):
    sd.Scene("light blue", (sd.ShapeObject("circle", "blue", "small", "center"),))


def test_captions_words_templates_and_roundtrip():
  _, captions, scenes = sd.batch(2, 0, 400, CONFIG)
  vocab = set(sd.vocabulary())
  assert sd.vocabulary() == sorted(vocab)
  templates = collections.Counter()
  for text, scene in zip(captions, scenes):
    assert text == text.lower() and text.split() and " ".join(text.split()) == text
    assert set(text.split()) <= vocab, text
    assert sd.parse_caption(text) == scene, text  # every attribute is stated
    templates[sd.caption_template(text)] += 1
  assert len(sd.TEMPLATES) >= 4
  assert set(templates) == set(range(len(sd.TEMPLATES))), templates
  for template in range(len(sd.TEMPLATES)):
    assert set(sd.attributes_in_caption(template)) == {"shape", "colour", "size", "position", "background"}
  with pytest.raises(ValueError):
    sd.parse_caption("a photo of a cat")


def test_every_template_states_every_attribute():
  rng = np.random.default_rng(0)
  two = sd.ShapesConfig(min_shapes=2, max_shapes=2)
  for scene in sd.sample_attributes(rng, 20, CONFIG) + sd.sample_attributes(rng, 20, two):
    for template in range(len(sd.TEMPLATES)):
      text = sd.caption(scene, rng, template=template)
      assert sd.caption_template(text) == template and sd.parse_caption(text) == scene, text
      if len(scene.objects) == 2:
        assert " and " in text


def test_large_is_clearly_larger_than_small():
  config = sd.ShapesConfig(image_size=32)
  for shape in sd.SHAPES:
    areas = {}
    for size in sd.SIZES:
      scene = sd.Scene("white", (sd.ShapeObject(shape, "blue", size, "center"),))
      image = sd.render([scene], config)[0].astype(np.float32)
      areas[size] = np.sum(255.0 - image[..., 0]) / (255.0 - sd.COLOUR_RGB["blue"][0])  # coverage
    assert areas["large"] > 2.5 * areas["small"], (shape, areas)


def test_two_shape_scenes_have_distinct_positions():
  config = sd.ShapesConfig(max_shapes=2)
  scenes = sd.batch(5, 0, 300, config)[2]
  counts = collections.Counter(len(s.objects) for s in scenes)
  assert set(counts) == {1, 2} and min(counts.values()) > 90
  for scene in scenes:
    positions = [o.position for o in scene.objects]
    assert len(set(positions)) == len(positions)
  one = sd.ShapesConfig(max_shapes=1)
  assert all(len(s.objects) == 1 for s in sd.batch(5, 0, 50, one)[2])


def test_attribute_labels():
  scenes = [
      sd.Scene.make("gray", [sd.ShapeObject("triangle", "red", "large", "center"),
                             sd.ShapeObject("circle", "orange", "small", "top left")]),
      sd.Scene("black", (sd.ShapeObject("square", "green", "small", "bottom right"),)),
  ]
  labels = sd.attribute_labels(scenes)
  np.testing.assert_array_equal(labels["shape"], [[0, 2], [1, -1]])
  np.testing.assert_array_equal(labels["colour"], [[5, 0], [1, -1]])
  np.testing.assert_array_equal(labels["size"], [[0, 1], [0, -1]])
  np.testing.assert_array_equal(labels["position"], [[0, 4], [3, -1]])
  np.testing.assert_array_equal(labels["background"], [2, 1])
  np.testing.assert_array_equal(labels["num_objects"], [2, 1])
  assert all(v.dtype == np.int32 for v in labels.values())
  assert sd.attribute_labels(scenes[1:], max_objects=2)["shape"].shape == (1, 2)


def test_config_validation():
  with pytest.raises(ValueError):
    sd.ShapesConfig(max_shapes=0)
  with pytest.raises(ValueError):
    sd.ShapesConfig(large_extent=0.2)


def test_grid_png_smoke(tmp_path):
  images = sd.batch(0, 0, 64, sd.ShapesConfig(image_size=64))[0]
  assert images.shape == (64, 64, 64, 3)
  path = tmp_path / "grid.png"
  sample.save_pixel_grid(images, str(path), columns=8)
  with Image.open(path) as im:
    assert im.size == (512, 512) and im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im)[:64, 64:128], images[1])
  sample.save_pixel_grid(images[:3], str(path), columns=2, upscale=2, pad=1)
  with Image.open(path) as im:
    grid = np.asarray(im)
    assert im.size == (2 * 128 + 1, 2 * 128 + 1)
    np.testing.assert_array_equal(grid[129:, :128], images[2].repeat(2, 0).repeat(2, 1))
    assert (grid[128] == 255).all() and (grid[129:, 129:] == 255).all()
