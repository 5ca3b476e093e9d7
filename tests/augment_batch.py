"""Test helpers: the vectorised augmentation path (parameter batches), kept as a reference.

The package augments image by image (:func:`lightning_vgg.data.augment.warp_batch`
with one :class:`AffineParams` each, or ``grid_theta`` drawn in the workers). This
batch path (parameters drawn and turned into matrices per batch, closed-form on the
device) is used only by the tests, which check it against the per-image path and
the literal Keras matrices, so it lives here rather than in the package.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from lightning_vgg.data.augment import AffineParams, AugmentConfig, warp_matrices

#: Per-sample parameters as arrays or tensors: ``theta``, ``shear``, ``zx``, ``zy``, ``flip``.
ParamBatch = Mapping[str, "torch.Tensor | np.ndarray"]
_DEFAULTS: dict[str, float] = {"theta": 0.0, "shear": 0.0, "zx": 1.0, "zy": 1.0, "flip": 0.0}


def sample_params_batch(
    cfg: AugmentConfig, rng: np.random.Generator, n: int
) -> dict[str, np.ndarray]:
    """Draw ``n`` images' parameters at once (same distributions as :func:`sample_params`).

    Vectorised draws consume the generator in a different order, so this is not the
    same as ``n`` calls of :func:`sample_params` with the same generator.

    Returns:
        ``theta``, ``shear``, ``zx``, ``zy`` as float64 arrays and ``flip`` as bool,
        each of shape ``(n,)``; :func:`warp_param_batch` takes the dict as is.
    """
    r, s = cfg.rotation_range, cfg.shear_range
    lo, hi = cfg.zoom_bounds
    theta = rng.uniform(-r, r, n) if r else np.zeros(n)
    shear = rng.uniform(-s, s, n) if s else np.zeros(n)
    zoom = np.ones((n, 2)) if lo == 1 and hi == 1 else rng.uniform(lo, hi, (n, 2))
    flip = (rng.random(n) < 0.5) & bool(cfg.horizontal_flip)
    return {"theta": theta, "shear": shear, "zx": zoom[:, 0], "zy": zoom[:, 1], "flip": flip}


def unbatch_params(batch: ParamBatch) -> list[AffineParams]:
    """Split a parameter batch into per-image :class:`AffineParams` (for logging, tests)."""
    cols = {k: np.asarray(torch.as_tensor(v).cpu()) for k, v in batch.items()}
    n = len(next(iter(cols.values())))
    return [
        AffineParams(
            theta=float(cols["theta"][i]) if "theta" in cols else 0.0,
            shear=float(cols["shear"][i]) if "shear" in cols else 0.0,
            zx=float(cols["zx"][i]) if "zx" in cols else 1.0,
            zy=float(cols["zy"][i]) if "zy" in cols else 1.0,
            flip=bool(cols["flip"][i]) if "flip" in cols else False,
        )
        for i in range(n)
    ]


def keras_matrix_batch(
    params: ParamBatch,
    h: int,
    w: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """:func:`keras_matrix` for a batch of parameters, built on ``device`` in float64.

    Uses the closed form of Keras's product, so parameters that already live on the GPU
    never travel to the host:
    ``A = [[cos(t+s) zy, sin(t) zx], [-sin(t+s) zy, cos(t) zx]]`` about the centre
    ``(row=(w-1)/2, col=(h-1)/2)``, then the flip.

    Returns:
        ``(N, 3, 3)`` float64 matrices.
    """
    cols = param_tensors(params, device)
    t, s = torch.deg2rad(cols["theta"]), torch.deg2rad(cols["shear"])
    zx, zy, flip = cols["zx"], cols["zy"], cols["flip"]
    a00, a01 = torch.cos(t + s) * zy, torch.sin(t) * zx
    a10, a11 = -torch.sin(t + s) * zy, torch.cos(t) * zx
    cr, cc = w / 2 - 0.5, h / 2 - 0.5
    t0 = cr - a00 * cr - a01 * cc
    t1 = cc - a10 * cr - a11 * cc
    # Flip: col_out -> (w - 1) - col_out before the warp.
    sign = 1 - 2 * flip
    t0 = t0 + flip * a01 * (w - 1)
    t1 = t1 + flip * a11 * (w - 1)
    a01, a11 = a01 * sign, a11 * sign
    zero, one = torch.zeros_like(t), torch.ones_like(t)
    rows = [torch.stack(r, -1) for r in ((a00, a01, t0), (a10, a11, t1), (zero, zero, one))]
    return torch.stack(rows, -2)


def param_tensors(params: ParamBatch, device: torch.device | str | None) -> dict[str, torch.Tensor]:
    """Batch dict to float64 tensors on ``device``; missing keys get neutral values."""
    given = {k: torch.as_tensor(v, device=device) for k, v in params.items()}
    if not given:
        raise ValueError("parameter batch is empty")
    n = next(iter(given.values())).shape[0]
    out: dict[str, torch.Tensor] = {}
    for key, default in _DEFAULTS.items():
        v = given.get(key)
        out[key] = (
            torch.full((n,), default, dtype=torch.float64, device=device)
            if v is None
            else v.to(device=device, dtype=torch.float64).reshape(n)
        )
    return out


def warp_param_batch(images: torch.Tensor, params: ParamBatch) -> torch.Tensor:
    """``warp_batch`` for a parameter batch at the input's size: one ``grid_sample``.

    Args:
        images: ``(N, C, H, W)``, uint8 or float, on the 0-255 scale.
        params: A batch dict (see :func:`sample_params_batch`) of arrays or tensors.

    Returns:
        ``(N, C, H, W)`` float32 (the input's dtype if already floating).
    """
    n, _, h, w = images.shape
    mats = keras_matrix_batch(params, h, w, images.device)
    if mats.shape[0] != n:
        raise ValueError(f"got {mats.shape[0]} parameter sets for {n} images")
    return warp_matrices(images, mats, (h, w))
