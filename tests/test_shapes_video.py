"""Moving shapes (tasks/shapes/video_data.py) and its video classifier and metrics (video_evaluator.py)."""

import collections

import numpy as np
import pytest

from tdm_jax.infra.errors import ConfigError
from tdm_jax.tasks.diffusers import evaluate
from tdm_jax.tasks.shapes import data as sd
from tdm_jax.tasks.shapes import video_data as vd
from tdm_jax.tasks.shapes import video_evaluator as ve

CONFIG = vd.VideoShapesConfig()
TINY = dict(widths=(8, 8, 16), frame_dim=16, temporal_width=8, feature_dim=16)


def test_deterministic_by_seed_and_index():
  a, a_captions, a_scenes = vd.batch(3, 0, 8, CONFIG)
  b, b_captions, b_scenes = vd.batch(3, 0, 8, CONFIG)
  np.testing.assert_array_equal(a, b)
  assert a_captions == b_captions and a_scenes == b_scenes
  tail, tail_captions, tail_scenes = vd.batch(3, 5, 3, CONFIG)  # any slice, without the rest
  np.testing.assert_array_equal(tail, a[5:])
  assert tail_captions == a_captions[5:] and tail_scenes == a_scenes[5:]
  assert vd.example(3, 6, CONFIG) == (a_scenes[6], a_captions[6])
  c, c_captions, _ = vd.batch(4, 0, 8, CONFIG)
  assert c_captions != a_captions and not np.array_equal(c, a)


def test_layouts_and_ranges():
  videos, captions, scenes = vd.batch(0, 0, 6, CONFIG)
  assert videos.shape == (6, 9, 32, 32, 3) and videos.dtype == np.uint8 and len(captions) == len(scenes) == 6
  x = vd.videos_to_float(videos, frames=9)
  assert x.shape == (6, 3, 9, 32, 32) and x.dtype == np.float32  # Diffusers' (n, C, F, H, W)
  assert x.min() >= -1.0 and x.max() <= 1.0
  np.testing.assert_array_equal(x[:, :, 4], sd.images_to_float(videos[:, 4]))
  np.testing.assert_array_equal(vd.float_to_videos(x), videos)
  five = vd.VideoShapesConfig(frames=5, image_size=64)
  assert vd.batch(0, 0, 2, five)[0].shape == (2, 5, 64, 64, 3)


def test_frames_are_the_image_data_scene():
  """A still object is the image data's rendering in every frame; a moving one in the middle frame."""
  for scene in vd.examples(1, 0, 40, CONFIG, split="all")[1]:
    video = vd.render([scene], CONFIG)[0]
    image = sd.render([vd.frame_scene(scene)], CONFIG)[0]
    np.testing.assert_array_equal(video[CONFIG.frames // 2], image)
    if all(o.motion == "still" for o in scene.objects):
      np.testing.assert_array_equal(video, np.broadcast_to(image, video.shape))


@pytest.mark.parametrize("position", sd.POSITIONS)
def test_motion_moves_the_object_the_stated_way(position):
  step = CONFIG.travel * CONFIG.image_size / (CONFIG.frames - 1)
  for motion in vd.MOTIONS:
    obj = vd.VideoObject("square", "blue", "large", position, motion)
    video = vd.render([vd.VideoScene("white", (obj,))], CONFIG)[0].astype(np.float64)
    cover = (255.0 - video[..., 0]) / (255.0 - sd.COLOUR_RGB["blue"][0])  # red channel: white -> blue
    assert cover.min() >= 0 and cover[0].sum() == pytest.approx(cover[-1].sum())  # whole in every frame
    ys, xs = np.mgrid[:32, :32] + 0.5
    centroid = np.stack([(cover * xs).sum((1, 2)), (cover * ys).sum((1, 2))], -1) / cover.sum((1, 2))[:, None]
    dx, dy = vd.MOTION_DIRECTIONS[motion]
    np.testing.assert_allclose(np.diff(centroid, axis=0), np.tile([dx * step, dy * step], (8, 1)), atol=1e-6)
    np.testing.assert_allclose(centroid[4], sd.object_center(position, CONFIG), atol=1e-6)
    np.testing.assert_allclose(centroid, [vd.object_center(obj, f, CONFIG) for f in range(9)], atol=1e-6)


def test_objects_stay_in_frame_and_apart():
  scenes = vd.examples(2, 0, 300, CONFIG, split="all")[1]
  motions = collections.Counter(o.motion for s in scenes for o in s.objects)
  assert set(motions) == set(vd.MOTIONS) and min(motions.values()) > 50
  for scene in scenes:
    assert not vd.overlaps(scene, CONFIG)
    for obj in scene.objects:
      h = sd._extent(obj.size, CONFIG) * 32  # pylint: disable=protected-access
      for f in range(CONFIG.frames):
        x, y = vd.object_center(obj, f, CONFIG)
        assert h <= x <= 32 - h and h <= y <= 32 - h
  # A corner object and the centre one moving towards each other on different axes would overlap.
  crash = vd.VideoScene.make("white", [vd.VideoObject("square", "red", "large", "top left", "right"),
                                       vd.VideoObject("square", "blue", "large", "center", "up")])
  assert vd.overlaps(crash, CONFIG)


def test_captions_parse_back_to_the_scene():
  captions, scenes = vd.examples(5, 0, 300, CONFIG, split="all")
  vocab = set(vd.vocabulary())
  templates = collections.Counter()
  for text, scene in zip(captions, scenes):
    assert text == " ".join(text.lower().split()) and set(text.split()) <= vocab, text
    assert vd.parse_caption(text) == scene, text
    assert vd.MOTION_PHRASES[scene.objects[0].motion] in text
    templates[vd.caption_template(text)] += 1
  assert set(templates) == set(range(len(vd.TEMPLATES)))
  rng = np.random.default_rng(0)
  for scene in scenes[:20]:
    for template in range(len(vd.TEMPLATES)):
      assert vd.parse_caption(vd.caption(scene, rng, template)) == scene
  example = vd.VideoScene("white", (vd.VideoObject("circle", "red", "small", "top left", "right"),))
  assert vd.caption(example, rng, 0) == "a small red circle in the top left moving right on a white background"
  for bad in ("a photo of a cat", "a small red circle in the top left on a white background"):
    with pytest.raises(ValueError):
      vd.parse_caption(bad)


def test_held_out_split_is_disjoint():
  train = vd.examples(0, 0, 200, CONFIG, split="train")[1]
  held = vd.examples(0, 0, 100, CONFIG, split="eval")[1]
  assert all(vd.split_of(s) == "train" for s in train) and all(vd.split_of(s) == "eval" for s in held)
  assert not {s.key() for s in train} & {s.key() for s in held}
  everything = vd.examples(9, 0, 1000, CONFIG, split="all")[1]
  assert 0.06 < np.mean([vd.split_of(s) == "eval" for s in everything]) < 0.14
  with pytest.raises(ValueError):
    vd.example(0, 0, CONFIG, split="test")


def test_config_validation():
  with pytest.raises(ValueError):
    vd.VideoShapesConfig(frames=1)
  with pytest.raises(ValueError):
    vd.VideoShapesConfig(travel=0.3)  # would leave the frame
  with pytest.raises(ValueError):
    vd.VideoScene("white", (vd.VideoObject("circle", "red", "small", "center", "sideways"),))


def _one_line_error(fn, *args, match, **kwargs):
  with pytest.raises(ValueError, match=match) as info:
    fn(*args, **kwargs)
  assert "\n" not in str(info.value)


def test_bad_input_refused_in_one_line():
  videos = vd.batch(0, 0, 2, CONFIG)[0]
  _one_line_error(vd.videos_to_float, videos[:, 0], match=r"RGB videos \(n, F, H, W, 3\)")
  _one_line_error(vd.videos_to_float, videos[:, :5], frames=9, match="must have 9 frames per clip, got 5")
  _one_line_error(vd.float_to_videos, vd.videos_to_float(videos).transpose(0, 2, 1, 3, 4), match="RGB videos")
  _one_line_error(ve.to_model_input, videos[:, 0], match="expected videos")
  _one_line_error(ve.to_model_input, videos[:, :5], frames=9, match="expected 9 frames per clip, got 5")
  _one_line_error(ve.to_model_input, videos, image_size=64, match="expected 64x64 frames")
  x = ve.to_model_input(vd.videos_to_float(videos), frames=9, image_size=32)  # Diffusers layout accepted
  np.testing.assert_array_equal(x, ve.to_model_input(videos))


def _perfect_predictions(scenes, frames=CONFIG.frames):
  labels = ve.labels_from_scenes(scenes)
  preds = {k: labels[k].copy() for k in ("background", "num_objects", "presence", "shape", "colour", "size",
                                         "motion")}
  for k in ("background", "presence", "shape", "colour", "size"):
    preds[f"frame_{k}"] = np.repeat(labels[k][:, None], frames, axis=1)
  return preds


def test_labels_and_metrics_on_synthetic_predictions():
  _, scenes = vd.examples(1, 0, 20, CONFIG)
  labels = ve.labels_from_scenes(scenes)
  for i, scene in enumerate(scenes):
    for obj in scene.objects:
      assert vd.MOTIONS[labels["motion"][i, sd.POSITIONS.index(obj.position)]] == obj.motion
  assert np.all((labels["motion"] >= 0) == (labels["presence"] > 0))
  preds = _perfect_predictions(scenes)
  assert ve.adherence(preds, scenes) == 1.0 and ve.temporal_consistency(preds) == 1.0
  assert ve.frame_accuracy(preds, scenes)["all"] == 1.0
  wrong = {k: v.copy() for k, v in preds.items()}
  p = sd.POSITIONS.index(scenes[0].objects[0].position)
  wrong["motion"][0, p] = (wrong["motion"][0, p] + 1) % len(vd.MOTIONS)  # wrong direction in one clip
  wrong["frame_colour"][1, 3, sd.POSITIONS.index(scenes[1].objects[0].position)] += 1  # flicker in one
  matches = ve.attribute_matches(wrong, scenes)
  assert not matches["motion"][0] and matches["motion"][1:].all() and matches["shape"].all()
  assert ve.adherence(wrong, scenes) == pytest.approx(19 / 20)
  assert ve.temporal_consistency(wrong) == pytest.approx(19 / 20)
  assert ve.temporal_consistency(wrong, keys=("shape",)) == 1.0
  rng = np.random.default_rng(0)
  f = rng.normal(size=(200, 4))
  assert ve.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-8)
  assert ve.frechet_distance(f, f + 1.0) == pytest.approx(4.0, rel=1e-6)
  assert ve.diversity([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]], [0, 0, 1]) == pytest.approx(5.0)


def _random_params(model):
  """Random parameters of `model`'s shapes, without compiling its initialisers (slow on CPU)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 9, 32, 32, 3), np.float32)))
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(np.float32), shapes["params"])


def test_tiny_classifier_predicts_saves_and_scores(tmp_path):
  """An untrained tiny classifier: output layout, save/load round trip, the scorer."""
  params = _random_params(ve.VideoClassifier(**TINY))
  captions = vd.examples(0, 0, 3, CONFIG, split="eval")[0]
  prompts = [c for c in captions for _ in range(2)]
  videos = vd.render([vd.parse_caption(p) for p in prompts], CONFIG)
  preds = ve.predict(params, videos, CONFIG)
  assert preds["features"].shape == (6, 16) and preds["motion"].shape == (6, 5)
  assert preds["frame_shape"].shape == (6, 9, 5) and preds["frame_background"].shape == (6, 9)
  path = str(tmp_path / "clf")
  ve.save_classifier(path, params, {"config": CONFIG, "steps": 2})
  assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == [ve.META_FILE, ve.WEIGHTS_FILE]
  loaded, meta = ve.load_classifier(path)
  assert meta["config"] == CONFIG and meta["steps"] == 2
  again = ve.predict(loaded, vd.videos_to_float(videos), CONFIG)
  for key in preds:
    np.testing.assert_array_equal(preds[key], again[key])
  scorer = evaluate._scorer(path, prompts, is_video=True)  # what a video teacher's evaluation scores with
  np.testing.assert_array_equal(scorer.real, videos)  # the captions' real clips, the comparison grid's first row
  scores = scorer(videos)
  assert set(scores) == {"fd", "adherence", "temporal_consistency", "diversity"}
  assert scores["diversity"] == pytest.approx(0.0, abs=1e-5) and np.isfinite(scores["fd"])
  with pytest.raises(ValueError, match="expected 9 frames"):
    ve.VideoPromptScorer(path, prompts)(videos[:, :5])
  with pytest.raises(ConfigError, match="not a moving-shapes caption"):
    ve.VideoPromptScorer(path, ["a small red circle in the top left on a white background"])


def test_model_outputs_and_logical_axes():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  model = ve.VideoClassifier()
  x = np.zeros((2, 9, 32, 32, 3), np.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  boxed = jax.tree_util.tree_leaves(variables["params"], is_leaf=lambda l: isinstance(l, nn.Partitioned))
  assert boxed and all(isinstance(l, nn.Partitioned) and len(l.names) == len(l.value.shape) for l in boxed)
  assert sum(l.value.size for l in boxed) * 4 < 2 * 2 ** 20  # the shipped float32 file stays under 2 MB
  logits, feats = jax.eval_shape(model.apply, nn.meta.unbox(variables), x)
  assert feats.shape == (2, model.feature_dim)
  assert logits["motion"].shape == (2, 5, len(vd.MOTIONS)) and logits["num_objects"].shape == (2, 2)
  assert logits["frame_shape"].shape == (2, 9, 5, 3) and logits["frame_background"].shape == (2, 9, 6)
  assert ve._module_from_params(nn.meta.unbox(variables["params"])) == model  # pylint: disable=protected-access


def test_training_loss_counts_only_present_objects():
  import jax  # pylint: disable=g-import-not-at-top
  _, scenes = vd.examples(2, 0, 6, CONFIG)
  loss = jax.jit(ve._loss)  # pylint: disable=protected-access
  preds = _perfect_predictions(scenes)

  def logits_of(p):
    sizes = {"background": 6, "presence": 2, "shape": 3, "colour": 6, "size": 2, "motion": 5}
    out = {"num_objects": 30.0 * np.eye(2, dtype=np.float32)[p["num_objects"] - 1]}
    for key, n in sizes.items():
      for prefix in ("", "frame_"):
        if prefix + key in p:  # absent objects (-1) get arbitrary logits: the mask must ignore them
          out[prefix + key] = 30.0 * np.eye(n, dtype=np.float32)[np.maximum(p[prefix + key], 0)] * (
              p[prefix + key] >= 0)[..., None]
    return out

  labels = ve.labels_from_scenes(scenes)
  assert float(loss(logits_of(preds), labels)) < 1e-6
  wrong = {k: v.copy() for k, v in preds.items()}
  p = sd.POSITIONS.index(scenes[0].objects[0].position)
  wrong["motion"][0, p] = (wrong["motion"][0, p] + 1) % len(vd.MOTIONS)
  assert float(loss(logits_of(wrong), labels)) > 1.0


def test_shipped_classifier_reads_held_out_real_clips():
  """The shipped video evaluator (1,500 steps on train-split clips) on 64 held-out real clips: every caption
  attribute and motion right, and the per-frame attributes steady (0.969 on 512 clips when trained)."""
  import os  # pylint: disable=g-import-not-at-top
  import tdm_jax  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(tdm_jax.__file__), "assets", "shapes_cogvideox", "evaluator")
  captions = vd.examples(1, ve.HELD_OUT_INDEX, 64, CONFIG, split="eval")[0]
  scorer = ve.VideoPromptScorer(path, captions)
  scores = scorer(scorer.real)
  assert scores["adherence"] >= 0.98 and scores["temporal_consistency"] >= 0.9, scores
