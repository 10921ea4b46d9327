"""Tests of the shapes attribute classifier and the image metrics (tdm_jax/tasks/shapes/evaluator.py)."""

import numpy as np
import pytest

from tdm_jax.tasks.shapes import data as shapes_data
from tdm_jax.tasks.shapes import evaluator

CONFIG = shapes_data.ShapesConfig(image_size=32)
TRAIN_SEED = 0
# 300 steps of 64 reach 100% held-out adherence in ~20 s on 2 CPU cores (150 steps: ~95%).
TRAIN_STEPS = 300
TRAIN_BATCH = 64
HELD_OUT = 5_000_000  # far beyond the training indices (0 .. 300 * 64)


@pytest.fixture(scope="module")
def classifier():
  stats = {}
  params = evaluator.train_classifier(CONFIG, steps=TRAIN_STEPS, batch_size=TRAIN_BATCH, seed=TRAIN_SEED,
                                      learning_rate=2e-3, stats=stats)
  return params, stats


@pytest.fixture(scope="module")
def held_out():
  images, captions, scenes = shapes_data.batch(TRAIN_SEED, HELD_OUT, 512, CONFIG)
  return images, captions, scenes


def test_labels_from_scenes_matches_attribute_labels():
  _, _, scenes = shapes_data.batch(3, 0, 64, CONFIG)
  labels = evaluator.labels_from_scenes(scenes)
  ref = shapes_data.attribute_labels(scenes, max_objects=CONFIG.max_shapes)
  np.testing.assert_array_equal(labels["background"], ref["background"])
  np.testing.assert_array_equal(labels["num_objects"], ref["num_objects"])
  np.testing.assert_array_equal(labels["presence"].sum(1), ref["num_objects"])
  for i in range(len(scenes)):
    for j in range(ref["num_objects"][i]):
      p = ref["position"][i, j]
      assert labels["presence"][i, p] == 1
      for key in ("shape", "colour", "size"):
        assert labels[key][i, p] == ref[key][i, j]
    absent = labels["presence"][i] == 0
    for key in ("shape", "colour", "size"):
      assert np.all(labels[key][i][absent] == -1)


def test_model_shapes_and_logical_axes():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  model = evaluator.AttributeClassifier(max_objects=2)
  x = np.zeros((3, 32, 32, 3), np.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  boxed = jax.tree_util.tree_leaves(variables["params"], is_leaf=lambda l: isinstance(l, nn.Partitioned))
  assert boxed and all(isinstance(l, nn.Partitioned) for l in boxed)
  assert all(len(l.names) == len(l.value.shape) for l in boxed)
  logits, feats = jax.eval_shape(model.apply, nn.meta.unbox(variables), x)
  assert feats.shape == (3, model.feature_dim)
  assert logits["background"].shape == (3, len(shapes_data.BACKGROUNDS))
  assert logits["num_objects"].shape == (3, 2)
  assert logits["presence"].shape == (3, 5, 2)
  assert logits["shape"].shape == (3, 5, 3)
  assert logits["colour"].shape == (3, 5, 6)
  assert logits["size"].shape == (3, 5, 2)


def test_adherence_on_held_out_real_images(classifier, held_out):
  params, _ = classifier
  images, captions, scenes = held_out
  prompt_scenes = [shapes_data.parse_caption(c) for c in captions]
  assert prompt_scenes == list(scenes)
  preds = evaluator.predict(params, images)
  score = evaluator.adherence(preds, prompt_scenes)
  per_head = {k: float(v.mean()) for k, v in evaluator.attribute_matches(preds, prompt_scenes).items()}
  assert score >= 0.95, per_head
  # Float NCHW input (the Diffusers layout) gives the same answers as uint8 NHWC.
  preds_float = evaluator.predict(params, shapes_data.images_to_float(images), batch_size=100)
  for key in ("background", "num_objects", "presence", "shape", "colour", "size"):
    np.testing.assert_array_equal(preds_float[key], preds[key])


def test_adherence_collapses_with_shuffled_captions(classifier, held_out):
  params, _ = classifier
  images, _, scenes = held_out
  preds = evaluator.predict(params, images)
  perm = np.random.default_rng(1).permutation(len(scenes))
  shuffled = [scenes[i] for i in perm]
  assert evaluator.adherence(preds, shuffled) < 0.2


def test_frechet_distance_exact_cases():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(400, 6))
  assert evaluator.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
  shift = np.array([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
  assert evaluator.frechet_distance(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
  # 1-D, scaled by 2: var + 4 var - 2 * 2 var = var.
  x1 = x[:, :1] - x[:, :1].mean()
  assert evaluator.frechet_distance(x1, 2.0 * x1) == pytest.approx(np.var(x1, ddof=1), rel=1e-6)


def test_frechet_distance_separates_real_from_corrupted(classifier):
  params, _ = classifier
  # FD's estimation bias falls like 1/n; 4096 per side keeps real-vs-real well below the corruptions.
  a, _, _ = shapes_data.batch(1, 0, 4096, CONFIG)
  b, _, _ = shapes_data.batch(2, 0, 4096, CONFIG)
  fa = evaluator.features(params, a)
  fb = evaluator.features(params, b)
  shuffled_colours = b[..., [2, 0, 1]]  # RGB -> BRG: same shapes, wrong colours
  noise = np.random.default_rng(0).integers(0, 256, size=b.shape, dtype=np.uint8)
  fd_real = evaluator.frechet_distance(fa, fb)
  fd_colours = evaluator.frechet_distance(fa, evaluator.features(params, shuffled_colours))
  fd_noise = evaluator.frechet_distance(fa, evaluator.features(params, noise))
  assert evaluator.frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-6 * max(1.0, fd_real))
  assert fd_real >= 0.0
  assert 10 * fd_real < fd_colours, (fd_real, fd_colours)
  assert 10 * fd_real < fd_noise, (fd_real, fd_noise)


def test_diversity(classifier):
  params, _ = classifier
  assert evaluator.diversity(np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]]), [0, 0, 1]) == pytest.approx(5.0)
  images, _, _ = shapes_data.batch(4, 0, 8, CONFIG)
  ids = np.repeat(np.arange(8), 3)
  same = evaluator.features(params, np.repeat(images, 3, axis=0))
  assert evaluator.diversity(same, ids) == pytest.approx(0.0, abs=1e-5)
  different, _, _ = shapes_data.batch(5, 0, 24, CONFIG)
  assert evaluator.diversity(evaluator.features(params, different), ids) > 0.1
  with pytest.raises(ValueError):
    evaluator.diversity(same[:3], [0, 1, 2])


def test_save_load_round_trip(classifier, held_out, tmp_path):
  params, _ = classifier
  images = held_out[0][:64]
  meta = {"config": CONFIG, "steps": TRAIN_STEPS}
  path = str(tmp_path / "clf")
  evaluator.save_classifier(path, params, meta)
  loaded, loaded_meta = evaluator.load_classifier(path)
  assert loaded_meta["config"] == CONFIG and loaded_meta["steps"] == TRAIN_STEPS
  a = evaluator.predict(params, images)
  b = evaluator.predict(loaded, images)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  # No temporary files left behind.
  assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == [evaluator.META_FILE, evaluator.WEIGHTS_FILE]
