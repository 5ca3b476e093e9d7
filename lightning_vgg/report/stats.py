"""Bootstrap confidence intervals over images: one model's mean, and paired differences.

Every per-image measure of the comparison is summarised by its mean over the measured
images and a percentile bootstrap interval (Efron & Tibshirani 1993): the images are
resampled with replacement :data:`BOOTSTRAP_B` times with a seeded generator, and the
interval is the 2.5th and 97.5th percentile of the resampled means. The two models are
measured on the *same* images, so a difference between them is bootstrapped **paired**:
each resample draws image indices once and takes both models' values of those images
(:func:`paired_difference`), which removes the spread between images from the
difference's interval.

Numbers only (NumPy), no torch and no project imports: the report's lowest layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BOOTSTRAP_B",
    "CI_LEVEL",
    "Estimate",
    "bootstrap_settings",
    "estimate",
    "mean_pairwise_correlation",
    "paired_difference",
]

#: Bootstrap resamples of every interval.
BOOTSTRAP_B = 1000
#: Coverage of every interval (percentile method).
CI_LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """Mean over images, its population std, and a bootstrap 95 % interval of the mean.

    ``ci95`` is ``None`` when fewer than two finite values exist (no interval can be
    estimated); ``n`` counts the finite values the mean is over.
    """

    mean: float
    std: float
    n: int
    ci95: tuple[float, float] | None

    def excludes(self, value: float) -> bool:
        """Whether the interval lies entirely above or below ``value``."""
        return self.ci95 is not None and (self.ci95[0] > value or self.ci95[1] < value)


def bootstrap_settings(seed: int) -> dict[str, object]:
    """What ``measures.json`` records about the intervals."""
    return {"B": BOOTSTRAP_B, "seed": seed, "level": CI_LEVEL, "method": "percentile"}


def _interval(means: np.ndarray) -> tuple[float, float]:
    tail = (1.0 - CI_LEVEL) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def _resample(n: int, seed: int, b: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(b, n))


def estimate(values: Sequence[float] | np.ndarray, seed: int = 0, b: int = BOOTSTRAP_B) -> Estimate:
    """Mean, std and percentile bootstrap interval of ``values`` (non-finite ones dropped).

    Args:
        values: One number per image.
        seed: Seed of the resampling (the same seed gives the same interval).
        b: Resamples.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Estimate(float("nan"), float("nan"), 0, None)
    mean, std = float(v.mean()), float(v.std())
    if v.size < 2:
        return Estimate(mean, std, int(v.size), None)
    return Estimate(mean, std, int(v.size), _interval(v[_resample(v.size, seed, b)].mean(axis=1)))


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b_values: Sequence[float] | np.ndarray,
    seed: int = 0,
    b: int = BOOTSTRAP_B,
) -> Estimate:
    """Mean of ``a - b_values`` image by image, with a paired bootstrap interval.

    Both sequences hold one value per image, for the same images in the same order;
    pairs where either value is not finite are dropped.
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b_values, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired values must match image for image, got {x.size} and {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    return estimate(x[keep] - y[keep], seed, b)


def mean_pairwise_correlation(maps: np.ndarray) -> float:
    """Mean Pearson correlation over all pairs of maps ``(N, ...)`` (flattened).

    Near 1: every image got the same map (the explanation ignores its input). A pair of
    constant maps (e.g. two all-zero Grad-CAMs) counts as 1 (they are the same map); a
    constant map beside a varying one counts as 0. ``nan`` for fewer than two maps.
    """
    x = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    n = x.shape[0]
    if n < 2:
        return float("nan")
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1)
    flat = norm <= 1e-12 * max(float(np.abs(x).max()), 1e-300)
    z = np.where(flat[:, None], 0.0, x / np.where(flat, 1.0, norm)[:, None])
    corr = z @ z.T
    corr[np.ix_(flat, flat)] = 1.0
    upper = np.triu_indices(n, k=1)
    return float(corr[upper].mean())
