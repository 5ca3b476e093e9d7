"""Numbers for what the seed judged by eye: feature-map health and Grad-CAM focus.

The seed compared a good and a broken VGG16 by looking at pictures of feature maps and
Grad-CAM heatmaps. The functions here turn each of those impressions into a number so
that a report can put the two models side by side, layer by layer:

* feature maps (post-ReLU activations ``(N, C, h, w)`` of one layer):
  :func:`dead_channel_fraction`, :func:`spatial_contrast`, :func:`sparsity`,
  :func:`hoyer_sparsity`, bundled by :func:`feature_map_measures`;
* Grad-CAM concentration (non-negative maps ``(N, 1, h, w)`` or ``(N, h, w)``):
  :func:`cam_entropy`, :func:`top_mass_share`, bundled by :func:`cam_measures`.

Faithfulness (deletion/insertion, RISE) lives in
:mod:`~lightning_vgg.explain.faithfulness`, the parameter-randomisation check in
:mod:`~lightning_vgg.explain.sanity`.

Everything is a pure, batch-first torch function that runs on the tensors' device;
nothing loops over pixels in Python. Degenerate inputs (all-zero maps, constant maps,
dead layers) get documented finite values instead of NaN, so that means over images
and layers stay meaningful.
"""

from __future__ import annotations

import math
from typing import Literal, overload

import torch
from torch import Tensor

__all__ = [
    "cam_entropy",
    "cam_measures",
    "dead_channel_fraction",
    "dead_channel_fraction_per_image",
    "feature_map_measures",
    "hoyer_sparsity",
    "sparsity",
    "spatial_contrast",
    "spatial_contrast_per_image",
    "top_mass_share",
    "zero_map_mask",
]


# --------------------------------------------------------------------------- feature maps


def _check_acts(acts: Tensor) -> Tensor:
    """Validate ``(N, C, h, w)`` activations and upcast them to at least float32."""
    if acts.ndim != 4:
        raise ValueError(f"activations must be (N, C, h, w), got shape {tuple(acts.shape)}")
    if acts.numel() == 0:
        raise ValueError("activations are empty")
    return acts.float() if acts.dtype in (torch.float16, torch.bfloat16) else acts


def dead_channel_fraction(acts: Tensor, eps: float = 0.0) -> float:
    """Share of channels that never fire on any image of the set.

    A channel is dead when ``|activation| <= eps`` at every position of every image:
    such a channel carries no information for the whole data set (the "black tiles"
    in the seed's feature-map grids). A channel silent on some images only is not
    dead, it is selective; see :func:`dead_channel_fraction_per_image` for that.

    Args:
        acts: Post-ReLU activations ``(N, C, h, w)`` of one layer.
        eps: Tolerance below which an activation counts as zero.

    Returns:
        A fraction in ``[0, 1]``.
    """
    acts = _check_acts(acts)
    peak = acts.abs().amax(dim=(0, 2, 3))  # (C,) largest response over images and space
    return (peak <= eps).float().mean().item()


def dead_channel_fraction_per_image(acts: Tensor, eps: float = 0.0) -> Tensor:
    """Per image, the share of channels that are zero everywhere on that image.

    This mixes truly dead channels with selective ones (silent on this image only), so
    it is always at least :func:`dead_channel_fraction`; the gap measures selectivity.

    Args:
        acts: Post-ReLU activations ``(N, C, h, w)``.
        eps: Tolerance below which an activation counts as zero.

    Returns:
        ``(N,)`` float tensor of fractions in ``[0, 1]``.
    """
    acts = _check_acts(acts)
    peak = acts.abs().amax(dim=(2, 3))  # (N, C)
    return (peak <= eps).float().mean(dim=1)


def _channel_cv(acts: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Coefficient of variation of every (image, channel) map and which ones are live."""
    flat = acts.flatten(2)  # (N, C, h*w)
    mean = flat.mean(dim=2)
    # Population std (correction=0): a spike in one of P pixels gives exactly sqrt(P - 1).
    std = flat.std(dim=2, correction=0)
    live = mean > eps
    cv = torch.where(live, std / torch.where(live, mean, torch.ones_like(mean)), 0.0)
    return cv, live


def spatial_contrast(acts: Tensor, eps: float = 0.0) -> float:
    """Mean spatial coefficient of variation (std / mean) over images and live channels.

    High contrast means a channel responds at a few places (edges, an eye, an ear);
    a channel that is the same everywhere (contrast 0) carries no "where" information.
    The std is the population std over the ``h*w`` positions, so a constant map gives
    0 and a single spike gives ``sqrt(h*w - 1)``, the maximum for a non-negative map.

    Channels whose spatial mean is ``<= eps`` on an image are skipped for that image
    (their CV is 0/0); the mean pools all remaining (image, channel) pairs. If no pair
    is live the layer has no contrast to speak of and the result is 0.0.

    Args:
        acts: Post-ReLU (non-negative) activations ``(N, C, h, w)``; with signed
            activations the mean can be near zero and the CV meaningless.
        eps: Means at or below this count as zero.

    Returns:
        A non-negative float (unitless).
    """
    cv, live = _channel_cv(_check_acts(acts), eps)
    n_live = live.sum()
    return (cv.sum() / n_live.clamp_min(1)).item()


def spatial_contrast_per_image(acts: Tensor, eps: float = 0.0) -> Tensor:
    """:func:`spatial_contrast` for each image separately.

    Returns:
        ``(N,)`` tensor: the mean CV over that image's live channels, 0.0 for an image
        on which no channel fires.
    """
    cv, live = _channel_cv(_check_acts(acts), eps)
    return cv.sum(dim=1) / live.sum(dim=1).clamp_min(1)


def sparsity(acts: Tensor, eps: float = 0.0) -> float:
    """Share of activations that are exactly zero (``|a| <= eps``) over the whole set.

    The plain zero count is what the ReLU produces and is easy to read ("62% of this
    layer's outputs are zero"). It cannot tell a code where many units fire weakly
    from one where few fire strongly; :func:`hoyer_sparsity` does.

    Args:
        acts: Activations ``(N, C, h, w)``.
        eps: Tolerance below which an activation counts as zero.

    Returns:
        A fraction in ``[0, 1]``.
    """
    acts = _check_acts(acts)
    return (acts.abs() <= eps).float().mean().item()


def hoyer_sparsity(acts: Tensor) -> float:
    """Hoyer (2004) sparsity of each image's whole layer code, averaged over images.

    For a vector ``x`` of ``n = C*h*w`` entries it is
    ``(sqrt(n) - |x|_1 / |x|_2) / (sqrt(n) - 1)``: 1 when a single unit is active, 0
    when all are equally active, and it ignores the overall scale. It is computed on
    the whole ``(C, h, w)`` code of an image (population sparsity of the layer), not
    per channel, because per channel it would be a monotone function of
    :func:`spatial_contrast` and add nothing.

    All-zero images are left out of the mean (the ratio is 0/0); if every image is
    all-zero the result is 1.0, matching :func:`sparsity` (every activation is zero).

    Args:
        acts: Activations ``(N, C, h, w)``.

    Returns:
        A float in ``[0, 1]``.
    """
    acts = _check_acts(acts)
    flat = acts.flatten(1).abs()
    n = flat.shape[1]
    if n == 1:
        return 1.0  # a single unit is trivially as sparse as it gets
    l1 = flat.sum(dim=1)
    l2 = flat.norm(dim=1)
    nonzero = l2 > 0
    if not bool(nonzero.any()):
        return 1.0
    root = math.sqrt(n)
    h = (root - l1[nonzero] / l2[nonzero]) / (root - 1)
    return h.clamp(0.0, 1.0).mean().item()


def feature_map_measures(acts: Tensor, eps: float = 0.0) -> dict[str, float]:
    """All feature-map measures of one layer, as one row of a report.

    Keys: ``dead_channel_fraction``, ``dead_channel_fraction_per_image`` (mean over
    images), ``spatial_contrast``, ``sparsity``, ``hoyer_sparsity``.
    """
    return {
        "dead_channel_fraction": dead_channel_fraction(acts, eps),
        "dead_channel_fraction_per_image": dead_channel_fraction_per_image(acts, eps).mean().item(),
        "spatial_contrast": spatial_contrast(acts, eps),
        "sparsity": sparsity(acts, eps),
        "hoyer_sparsity": hoyer_sparsity(acts),
    }


# --------------------------------------------------------------------------- Grad-CAM focus


def _flat_maps(maps: Tensor) -> Tensor:
    """``(N, 1, h, w)`` or ``(N, h, w)`` maps as ``(N, h*w)`` float64, negatives clipped."""
    if maps.ndim == 4:
        if maps.shape[1] != 1:
            raise ValueError(f"maps must have one channel, got shape {tuple(maps.shape)}")
    elif maps.ndim != 3:
        raise ValueError(f"maps must be (N, 1, h, w) or (N, h, w), got {tuple(maps.shape)}")
    if maps.numel() == 0:
        raise ValueError("maps are empty")
    # Grad-CAM ends with a ReLU; clip round-off negatives so the maps are distributions.
    # float64 so that tiny but non-zero maps still normalise cleanly.
    return maps.flatten(1).to(torch.float64).clamp_min(0.0)


def zero_map_mask(maps: Tensor) -> Tensor:
    """``(N,)`` bool: which maps have no positive mass (Grad-CAM found no evidence)."""
    return _flat_maps(maps).sum(dim=1) <= 0


@overload
def cam_entropy(
    maps: Tensor, normalized: bool = ..., *, return_zero_mask: Literal[False] = ...
) -> Tensor: ...
@overload
def cam_entropy(
    maps: Tensor, normalized: bool = ..., *, return_zero_mask: Literal[True]
) -> tuple[Tensor, Tensor]: ...
def cam_entropy(
    maps: Tensor, normalized: bool = True, *, return_zero_mask: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Shannon entropy of each map read as a distribution over its pixels.

    Low entropy = the map points at a few places (focused); high = spread out. With
    ``normalized`` the entropy (in nats) is divided by ``log(h*w)``, the entropy of a
    uniform map, so it lies in ``[0, 1]`` and layers of different resolution compare.

    An all-zero map has no distribution. It gets the uniform value (1.0 normalized,
    ``log(h*w)`` otherwise): "no focus", which is what a blank heatmap shows. Ask for
    ``return_zero_mask`` (or call :func:`zero_map_mask`) to tell the two apart. For a
    1-pixel map the normalised entropy of a non-zero map is 0.

    Args:
        maps: Non-negative maps ``(N, 1, h, w)`` or ``(N, h, w)``; negatives are
            clipped to 0 (Grad-CAM's final ReLU).
        normalized: Divide by ``log(h*w)``.
        return_zero_mask: Also return the ``(N,)`` bool mask of all-zero maps.

    Returns:
        ``(N,)`` float32 entropies on the maps' device, and the mask if asked.
    """
    flat = _flat_maps(maps)
    total = flat.sum(dim=1, keepdim=True)
    zero = total.squeeze(1) <= 0
    p = flat / torch.where(total > 0, total, torch.ones_like(total))
    ent = -torch.xlogy(p, p).sum(dim=1)  # xlogy: 0 * log 0 = 0
    max_ent = math.log(flat.shape[1])
    if normalized:
        ent = (ent / max_ent).clamp(0.0, 1.0) if max_ent > 0 else torch.zeros_like(ent)
        ent = torch.where(zero, 1.0, ent)
    else:
        ent = torch.where(zero, max_ent, ent.clamp_min(0.0))
    ent = ent.float()
    return (ent, zero) if return_zero_mask else ent


def top_mass_share(maps: Tensor, q: float = 0.10) -> Tensor:
    """Share of each map's total mass that sits in its top ``q`` fraction of pixels.

    1.0 means all evidence is in the top ``q`` of pixels (focused); a uniform map gets
    ``k / (h*w) ≈ q``. ``k = ceil(q * h*w)`` pixels, at least 1. An all-zero map also
    gets ``k / (h*w)``, the uniform value, for the same "no focus" reason as in
    :func:`cam_entropy`.

    Args:
        maps: Non-negative maps ``(N, 1, h, w)`` or ``(N, h, w)``.
        q: Fraction of pixels in ``(0, 1]``.

    Returns:
        ``(N,)`` float32 shares in ``[k/(h*w), 1]``.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q}")
    flat = _flat_maps(maps)
    m = flat.shape[1]
    # round() first so that e.g. 0.1 * 100 = 10.000000000000002 gives 10, not 11.
    k = min(m, max(1, math.ceil(round(q * m, 9))))
    total = flat.sum(dim=1)
    top = flat.topk(k, dim=1).values.sum(dim=1)
    share = torch.where(total > 0, top / torch.where(total > 0, total, 1.0), k / m)
    return share.clamp(0.0, 1.0).float()


def cam_measures(maps: Tensor, q: float = 0.10) -> dict[str, float]:
    """Grad-CAM focus measures of one layer, as one row of a report.

    Keys: ``cam_entropy`` (mean normalised entropy, zero maps counted as 1.0),
    ``top_mass_share`` (mean share in the top ``q`` pixels, zero maps counted as the
    uniform value), ``zero_map_fraction`` (share of maps with no evidence at all).
    """
    ent, zero = cam_entropy(maps, return_zero_mask=True)
    return {
        "cam_entropy": ent.mean().item(),
        "top_mass_share": top_mass_share(maps, q).mean().item(),
        "zero_map_fraction": zero.float().mean().item(),
    }
