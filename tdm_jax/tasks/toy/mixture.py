"""Toy data distribution and sample-set metrics for the vector distillation demo.

A class-conditional mixture of Gaussians is cheap to sample, has well separated
classes (so classifier-free guidance matters) and lets us compare sample sets
with a distribution distance instead of image metrics.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=64)
def _place_means(dim: int, num_classes: int, modes_per_class: int, mode_std: float,
                 scale: float, seed: int) -> np.ndarray:
    """Rejection-sample mode centres so modes of different classes do not overlap.

    Cached because `sample` re-traces with the same mixture many times.
    """
    rng = np.random.default_rng(seed)
    half_width = math.sqrt(3.0) * scale  # uniform on [-a, a] has unit variance when a = sqrt(3)
    radius = mode_std * (math.sqrt(dim) + 3.0)
    between = 2.0 * radius + 2.0 * mode_std  # between-class centres: discs of `radius` never touch
    within = 2.0 * radius  # same-class modes stay distinct
    for _ in range(200):
        means = np.zeros((num_classes, modes_per_class, dim))
        placed: list[tuple[int, np.ndarray]] = []
        ok = True
        for c in range(num_classes):
            for m in range(modes_per_class):
                for _ in range(2000):
                    cand = rng.uniform(-half_width, half_width, size=dim)
                    if all(np.linalg.norm(cand - p) >= (within if pc == c else between)
                           for pc, p in placed):
                        break
                else:
                    ok = False
                    break
                placed.append((c, cand))
                means[c, m] = cand
            if not ok:
                break
        if ok:
            return means
        # Too crowded for the requested spread: relax the constraints and retry.
        between *= 0.9
        within *= 0.9
    raise RuntimeError("could not place mixture means; lower mode_std or raise scale")


@dataclasses.dataclass(frozen=True)
class MixtureOfGaussians:
    """Each class is a mixture of `modes_per_class` isotropic Gaussians in `dim` dimensions; means fixed by `seed`.

    Means are uniform on [-sqrt(3)*scale, sqrt(3)*scale]^dim (about unit variance per
    coordinate) subject to a minimum spacing, so classes are well separated at `mode_std`.
    """

    dim: int = 2
    num_classes: int = 4
    modes_per_class: int = 3
    mode_std: float = 0.08
    scale: float = 1.0
    seed: int = 0

    def means(self) -> np.ndarray:
        """(num_classes, modes_per_class, dim) float64, deterministic from `seed`."""
        return _place_means(self.dim, self.num_classes, self.modes_per_class,
                            float(self.mode_std), float(self.scale), self.seed).copy()

    def mode_radius(self, num_std: float = 3.0) -> float:
        """Distance from a mode centre that holds essentially all of its mass.

        The noise norm concentrates near mode_std*sqrt(dim), so a radius in
        plain "std" units would be meaningless in higher dimensions.
        """
        return self.mode_std * (math.sqrt(self.dim) + num_std)

    def sample(self, key: jax.Array, labels: jax.Array) -> jax.Array:
        """labels (B,) int -> x0 (B, dim) float32; jittable."""
        labels = jnp.asarray(labels, jnp.int32)
        means = jnp.asarray(self.means(), jnp.float32)
        k_mode, k_noise = jax.random.split(key)
        modes = jax.random.randint(k_mode, labels.shape, 0, self.modes_per_class)
        centres = means[labels, modes]
        noise = jax.random.normal(k_noise, centres.shape, jnp.float32)
        return centres + self.mode_std * noise

    def sample_labels(self, key: jax.Array, batch_size: int) -> jax.Array:
        """Uniform labels in [0, num_classes), int32; jittable."""
        return jax.random.randint(key, (batch_size,), 0, self.num_classes, dtype=jnp.int32)


def _as_points(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(-1, 1) if x.ndim == 1 else x.reshape(x.shape[0], -1)


def _subsample(x: np.ndarray, max_points: int, seed: int) -> np.ndarray:
    # Random (not strided) so that sets ordered by class are still subsampled fairly.
    if x.shape[0] <= max_points:
        return x
    idx = np.random.default_rng(seed).choice(x.shape[0], size=max_points, replace=False)
    return x[np.sort(idx)]


def _mean_pairwise_distance(a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> float:
    # Gram-matrix form uses BLAS; clamping guards the tiny negative round-off
    # on (near-)coincident points.
    b_sq = np.einsum("ij,ij->i", b, b)
    total = 0.0
    for i in range(0, a.shape[0], chunk):
        ai = a[i:i + chunk]
        sq = np.einsum("ij,ij->i", ai, ai)[:, None] + b_sq[None, :] - 2.0 * (ai @ b.T)
        total += np.sqrt(np.maximum(sq, 0.0)).sum()
    return total / (a.shape[0] * b.shape[0])


def energy_distance(x, y, max_points: int = 2000, seed: int = 0) -> float:
    """Energy distance between two sample sets (numpy, float64): 2E|X-Y| - E|X-X'| - E|Y-Y'|.

    Uses the V-statistic (diagonal included), which is the squared distance between
    the empirical distributions' embeddings and hence never negative; it is biased
    upwards by O(1/n) for equal distributions. Each set is subsampled to at most
    `max_points` points with a fixed seed to bound the O(n^2) cost.
    """
    x = _subsample(_as_points(x), max_points, seed)
    y = _subsample(_as_points(y), max_points, seed + 1)
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("energy_distance needs non-empty sample sets")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    exy = _mean_pairwise_distance(x, y)
    exx = _mean_pairwise_distance(x, x)
    eyy = _mean_pairwise_distance(y, y)
    return float(max(2.0 * exy - exx - eyy, 0.0))


def classwise_energy_distance(x, x_labels, y, y_labels, num_classes: int,
                              max_points: int = 2000, seed: int = 0) -> float:
    """Mean over classes of energy_distance on each class's points.

    Measures conditional (prompt-adherent) match rather than only the marginal.
    Classes with no points in either set are skipped; a class present in only
    one set is an error, since the distance is undefined there.
    """
    x, y = _as_points(x), _as_points(y)
    xl = np.asarray(x_labels).reshape(-1)
    yl = np.asarray(y_labels).reshape(-1)
    dists = []
    for c in range(num_classes):
        xc, yc = x[xl == c], y[yl == c]
        if xc.shape[0] == 0 and yc.shape[0] == 0:
            continue
        if xc.shape[0] == 0 or yc.shape[0] == 0:
            raise ValueError(f"class {c} has points in only one of the two sets")
        dists.append(energy_distance(xc, yc, max_points=max_points, seed=seed + 2 * c))
    if not dists:
        raise ValueError("no class has points in both sets")
    return float(np.mean(dists))


def mode_coverage(x, labels, mixture: MixtureOfGaussians, num_std: float = 3.0) -> float:
    """Fraction of points within `mixture.mode_radius(num_std)` of a mode of their own class.

    A cheap prompt-adherence score: off-manifold or wrong-class samples count as misses.
    """
    x = _as_points(x)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    own = mixture.means()[labels]  # (N, modes, dim)
    dist = np.linalg.norm(x[:, None, :] - own, axis=-1).min(axis=1)
    return float(np.mean(dist <= mixture.mode_radius(num_std)))


def mode_weights_by_class(x, labels, mixture: MixtureOfGaussians,
                          num_std: float = 3.0) -> np.ndarray:
    """(num_classes, modes_per_class) fraction of each class's covered points per mode.

    Detects mode collapse (a class's samples piling into one of its modes), which
    mode_coverage alone cannot see. Rows of absent classes are NaN.
    """
    x = _as_points(x)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    own = mixture.means()[labels]
    d = np.linalg.norm(x[:, None, :] - own, axis=-1)
    nearest = d.argmin(axis=1)
    covered = d.min(axis=1) <= mixture.mode_radius(num_std)
    out = np.full((mixture.num_classes, mixture.modes_per_class), np.nan)
    for c in range(mixture.num_classes):
        sel = (labels == c) & covered
        if sel.any():
            out[c] = np.bincount(nearest[sel], minlength=mixture.modes_per_class) / sel.sum()
    return out
