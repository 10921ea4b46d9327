"""Tests for the toy denoiser, mixture data and sample-set metrics."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdm_jax.models.mlp import MLPDenoiser, init_params, timestep_embedding
from tdm_jax.tasks.toy.mixture import (
    MixtureOfGaussians,
    classwise_energy_distance,
    energy_distance,
    mode_coverage,
    mode_weights_by_class,
)

B = 8
# One small config shared by the model tests so JAX's per-op compile caches are reused.
SMALL = dict(dim=2, num_classes=4, width=32, depth=2)


def _inputs(dim=2, num_classes=4, batch=B):
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, dim))
    t = jnp.arange(batch, dtype=jnp.int32) * 100
    cond = {"label": jnp.arange(batch, dtype=jnp.int32) % (num_classes + 1)}
    return x, t, cond


def test_timestep_embedding_cos_first():
    emb = timestep_embedding(jnp.array([0, 5]), 8)
    assert emb.shape == (2, 8)
    np.testing.assert_allclose(emb[0, :4], 1.0)  # cos(0)
    np.testing.assert_allclose(emb[0, 4:], 0.0)  # sin(0)
    np.testing.assert_allclose(emb[1, 0], np.cos(5.0), rtol=1e-6)


@pytest.fixture(scope="module")
def steps_model():
    model = MLPDenoiser(**SMALL, max_num_steps=8)
    return model, init_params(model, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def plain_model(steps_model):
    # The step-count table is the only extra parameter, so a teacher's tree is the
    # student's minus that table (and initialising once keeps the suite fast).
    params = {k: v for k, v in steps_model[1].items() if k != "num_steps_embed"}
    return MLPDenoiser(**SMALL), params


def test_model_shape_and_jit(plain_model):
    model, params = plain_model
    x, t, cond = _inputs()
    apply = jax.jit(model.apply)
    out = apply({"params": params}, x, t, cond)
    assert out.shape == (B, 2)
    assert out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))
    # Conditioning actually reaches the output.
    other = apply({"params": params}, x, t, {"label": (cond["label"] + 1) % 5})
    assert not np.allclose(out, other, atol=1e-5)


def test_params_have_logical_axes(steps_model):
    model, plain = steps_model
    x, t, cond = _inputs()
    # eval_shape keeps the boxes without paying for a compile.
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, cond, jnp.full((B,), 4))
    leaves = jax.tree_util.tree_leaves(
        variables["params"], is_leaf=lambda l: isinstance(l, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(l, nn.LogicallyPartitioned) for l in leaves)
    for leaf in leaves:
        assert len(leaf.names) == len(leaf.value.shape)
        assert all(isinstance(n, str) for n in leaf.names)
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["label_embed"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["num_steps_embed"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["block_0"]["fc1"]["kernel"]) == ("embed", "mlp")
    # init_params unboxes to plain arrays with the same structure and shapes.
    assert all(isinstance(l, jax.Array) for l in jax.tree_util.tree_leaves(plain))
    shapes = jax.tree_util.tree_map(lambda a: a.shape, nn.unbox(variables["params"]))
    assert jax.tree_util.tree_map(lambda a: a.shape, plain) == shapes


def test_num_steps_embedding_is_zero_at_init(steps_model):
    model, params = steps_model
    x, t, cond = _inputs()
    apply = jax.jit(model.apply)
    outs = [apply({"params": params}, x, t, cond, jnp.full((B,), n)) for n in (1, 2, 4, 8)]
    for o in outs[1:]:
        np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(o))
    # Omitting num_steps (the teacher) adds no row; eager vs jit may differ only by round-off.
    default = model.apply({"params": params}, x, t, cond)
    np.testing.assert_allclose(np.asarray(default), np.asarray(outs[0]), rtol=1e-5, atol=1e-6)


def test_student_matches_teacher_at_init(plain_model, steps_model):
    x, t, cond = _inputs()
    teacher = plain_model[0].apply({"params": plain_model[1]}, x, t, cond)
    student = steps_model[0].apply({"params": steps_model[1]}, x, t, cond, jnp.full((B,), 4))
    np.testing.assert_allclose(np.asarray(student), np.asarray(teacher), rtol=1e-6, atol=1e-6)


def test_teacher_training_leaves_the_step_table_at_zero(steps_model):
    """The toy teacher is pretrained with num_steps=None; nothing of that may reach the step table,
    or a unified student (same weights, told its K) would not start equal to its teacher."""
    model, params = steps_model
    x, t, cond = _inputs()
    loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, cond) ** 2)
    grads = jax.jit(jax.grad(loss))(params)
    assert float(jnp.abs(grads["num_steps_embed"]["embedding"]).max()) == 0.0
    assert float(jnp.abs(grads["in_proj"]["kernel"]).max()) > 0.0
    trained = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, grads)  # a teacher that moved
    teacher = model.apply({"params": trained}, x, t, cond)
    for k in (1, 2, 4):
        student = model.apply({"params": trained}, x, t, cond, jnp.full((B,), k))
        np.testing.assert_allclose(np.asarray(student), np.asarray(teacher), rtol=1e-6, atol=1e-6)


def test_num_steps_without_support_raises(plain_model):
    model, params = plain_model
    x, t, cond = _inputs()
    with pytest.raises(ValueError, match="max_num_steps"):
        model.apply({"params": params}, x, t, cond, jnp.full((B,), 4))


MIX = MixtureOfGaussians()
N = 2000


@jax.jit
def _draw(key):
    """One compiled sampler shared by the mixture tests (same shapes, one compile)."""
    k1, k2 = jax.random.split(key)
    labels = MIX.sample_labels(k1, N)
    return labels, MIX.sample(k2, labels)


def _assert_classes_separated(mix):
    mu = mix.means()
    r = mix.mode_radius()
    for c in range(mix.num_classes):
        for d in range(mix.num_classes):
            if c != d:
                gaps = np.linalg.norm(mu[c][:, None] - mu[d][None], axis=-1)
                assert gaps.min() > 2 * r


def test_mixture_deterministic_and_separated():
    np.testing.assert_array_equal(MIX.means(), MixtureOfGaussians().means())
    assert not np.allclose(MIX.means(), MixtureOfGaussians(seed=1).means())
    assert MIX.means().shape == (4, 3, 2)
    _assert_classes_separated(MIX)
    a, b = _draw(jax.random.PRNGKey(3)), _draw(jax.random.PRNGKey(3))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_mixture_samples_near_own_class():
    labels, x = _draw(jax.random.PRNGKey(0))
    assert x.shape == (N, 2) and labels.dtype == jnp.int32
    counts = np.bincount(np.asarray(labels), minlength=4)
    assert counts.min() > 400
    assert mode_coverage(x, labels, MIX) > 0.99
    # With wrong labels almost nothing is within a mode of the claimed class.
    assert mode_coverage(x, (labels + 1) % 4, MIX) < 0.01
    w = mode_weights_by_class(x, labels, MIX)
    assert np.all(w > 0.2)
    # Roughly unit scale per coordinate.
    std = np.asarray(x).std(axis=0)
    assert np.all(std > 0.5) and np.all(std < 1.6)


def test_mixture_higher_dim():
    mix = MixtureOfGaussians(dim=8, num_classes=3, modes_per_class=2, seed=5)
    assert mix.means().shape == (3, 2, 8)
    _assert_classes_separated(mix)
    # Numpy draw from the same law: mode_radius must cover 8-d Gaussian shells.
    rng = np.random.default_rng(0)
    labels = np.arange(300) % 3
    x = mix.means()[labels, rng.integers(0, 2, 300)] + mix.mode_std * rng.normal(size=(300, 8))
    assert mode_coverage(x, labels, mix) > 0.99


def test_energy_distance_properties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 2))
    y = rng.normal(size=(1000, 2))
    shifted = y + np.array([0.5, 0.0])
    same = energy_distance(x, y)
    diff = energy_distance(x, shifted)
    assert 0.0 <= same < 0.02
    assert diff > 0.1 and diff > 5 * same
    assert energy_distance(shifted, x) == pytest.approx(diff, rel=1e-12)
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    # Subsampling caps cost and is deterministic.
    big = rng.normal(size=(3000, 2))
    assert energy_distance(big, x, max_points=500) == energy_distance(big, x, max_points=500)


def test_classwise_energy_distance():
    la, a = _draw(jax.random.PRNGKey(0))
    lb, b = _draw(jax.random.PRNGKey(1))
    good = classwise_energy_distance(a, la, b, lb, num_classes=4)
    # Correct marginal but scrambled labels: only the class-wise metric notices.
    bad = classwise_energy_distance(a, la, b, (lb + 1) % 4, num_classes=4)
    assert 0.0 <= good < 0.02
    assert bad > 10 * good
    assert energy_distance(a, b) < 0.02
