"""Grad-CAM maps made displayable: upsampling, evidence density, per-map and shared scales.

:func:`normalize_per_map` answers "where does this layer look"; :func:`to_density` /
:func:`shared_scale` / :func:`normalize_shared` answer "how much evidence is there", on
one absolute scale shared by all layers and all checkpoints, so that a weak model's
weak evidence looks weak.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from captum.attr import LayerAttribution
from torch import Tensor

__all__ = ["normalize_per_map", "normalize_shared", "shared_scale", "to_density", "upsample"]


def _as_batch(t: Tensor) -> tuple[Tensor, torch.Size]:
    """Fold all leading dims into one batch of single-channel maps ``(B, 1, h, w)``."""
    if t.ndim < 2:
        raise ValueError(f"expected a map with at least 2 dims (h, w), got shape {tuple(t.shape)}")
    return t.reshape(-1, 1, *t.shape[-2:]), t.shape[:-2]


def upsample(cam: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear resize of maps to ``size`` for overlays (values, not sums, preserved).

    Accepts any shape ending in ``(h, w)`` (``(N, 1, h, w)``, ``(h, w)`` ...) and keeps
    the leading dims. The resize is Captum's ``LayerAttribution.interpolate`` (plain
    ``F.interpolate``, so ``align_corners=False``: a pixel's value sits at its centre,
    like the image it is drawn on, and integer ratios preserve the mean exactly).
    """
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    flat, lead = _as_batch(cam)
    out = LayerAttribution.interpolate(flat, hw, interpolate_mode="bilinear")
    return out.reshape(*lead, *hw)


def to_density(cam: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Grad-CAM as evidence per input pixel: upsampled, with its spatial sum kept.

    A layer's Grad-CAM sums to roughly its share of the logit (exactly, for a linear
    head over a bias-free feature map), but a 7x7 map packs that into 49 cells and a
    224x224 map into 50,176. Upsampling bilinearly to the input size and multiplying
    by ``h*w / (H*W)`` gives every layer the same unit (logit per input pixel), so
    one scale fits all layers and all checkpoints. Bilinear upsampling with
    ``align_corners=False`` by an integer factor (VGG's are powers of two) preserves
    the mean exactly, so the sum is preserved to rounding.
    """
    h, w = cam.shape[-2:]
    out = upsample(cam, size)
    big_h, big_w = out.shape[-2:]
    return out * (h * w / (big_h * big_w))


def normalize_per_map(cam: Tensor, eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """Scale each map by its own maximum to ``[0, 1]`` ("where", not "how much").

    A map whose maximum is ``<= eps`` (all zero after the ReLU: the layer holds no
    evidence for the target) is flagged and left at zero; dividing it by a tiny max
    would stretch rounding noise into a confident-looking heat map. Negative values
    (a signed map) are clipped to 0 first.

    Args:
        cam: ``(N, ..., h, w)``; each sample's whole map (all non-batch dims) is one
            unit.
        eps: Flag threshold on the maximum.

    Returns:
        ``(maps, zero_mask)``: maps like ``cam`` in ``[0, 1]``, ``zero_mask`` a bool
        ``(N,)`` tensor, true where the map was flagged.
    """
    pos = cam.clamp_min(0)
    peak = pos.reshape(pos.shape[0], -1).amax(dim=1)
    zero = ~(peak > eps)  # NaN peaks count as zero maps too
    safe = torch.where(zero, torch.ones_like(peak), peak)
    view = (-1,) + (1,) * (cam.ndim - 1)
    maps = torch.where(zero.view(view), torch.zeros_like(pos), pos / safe.view(view))
    return maps, zero


def shared_scale(densities: Sequence[Tensor], q: float = 0.99) -> float:
    """One display scale for many density maps: the ``q`` quantile of their non-zero values.

    Pass every layer of every checkpoint (and image) that will be shown together;
    :func:`normalize_shared` by the result then keeps relative magnitudes between
    layers and between models. A quantile rather than the maximum so one hot pixel
    does not wash everything else out; zeros (ReLU-clipped background) are left out
    so a mostly empty map does not drag the scale to zero. Magnitudes are used, so
    signed maps work too.

    Returns:
        The scale (> 0). If no value is non-zero at all, ``1.0``: any positive
        scale then maps everything to 0, which is the truth (no evidence anywhere),
        and callers need no special case.

    Raises:
        ValueError: If ``q`` is outside ``[0, 1]`` or no tensors are given.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if len(densities) == 0:
        raise ValueError("shared_scale needs at least one map")
    values = torch.cat([d.detach().abs().reshape(-1).to("cpu", torch.float64) for d in densities])
    values = values[values > 0]
    if values.numel() == 0:
        return 1.0
    # torch.quantile refuses inputs over 2**24 elements; sorting has no such limit and
    # many checkpoints x 13 full-size layers exceed it. Same linear interpolation.
    values, _ = torch.sort(values)
    pos = q * (values.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, values.numel() - 1)
    frac = pos - lo
    scale = float(values[lo] * (1 - frac) + values[hi] * frac)
    return scale if scale > 0 else 1.0


def normalize_shared(density: Tensor, scale: float) -> Tensor:
    """Divide by a shared scale and clip to ``[0, 1]`` (negatives to 0, top 1-q to 1).

    Raises:
        ValueError: If ``scale`` is not a positive finite number.
    """
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    return (density / scale).clamp(0.0, 1.0)
