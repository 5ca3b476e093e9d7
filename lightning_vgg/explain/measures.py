"""Numbers for what the seed judged by eye: feature-map health, Grad-CAM focus, faithfulness.

The seed compared a good and a broken VGG16 by looking at pictures of feature maps and
Grad-CAM heatmaps. The functions here turn each of those impressions into a number so
that a report can put the two models side by side, layer by layer:

* feature maps (post-ReLU activations ``(N, C, h, w)`` of one layer):
  :func:`dead_channel_fraction`, :func:`spatial_contrast`, :func:`sparsity`,
  :func:`hoyer_sparsity`, bundled by :func:`feature_map_measures`;
* Grad-CAM concentration (non-negative maps ``(N, 1, h, w)`` or ``(N, h, w)``):
  :func:`cam_entropy`, :func:`top_mass_share`, bundled by :func:`cam_measures`;
* faithfulness, the deletion/insertion game of Petsiuk et al. 2018 (RISE), with
  RISE's defaults (deletion to black, insertion from RISE's blur, one step per 224
  pixels, trapezoid AUC): :func:`deletion_insertion` and its random-map baseline
  :func:`random_deletion_insertion`;
* the parameter-randomisation sanity check of Adebayo et al. 2018:
  :func:`randomized_copy` and :func:`spearman_rank_correlation`;
* :func:`layer_table` / :func:`markdown_table` to turn per-layer numbers into rows.

Everything is a pure, batch-first torch function that runs on the tensors' device;
nothing loops over pixels in Python. Degenerate inputs (all-zero maps, constant maps,
dead layers) get documented finite values instead of NaN, so that means over images
and layers stay meaningful.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal, TypedDict, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BaselineKind = Literal["blur", "gaussian", "zero", "mean"]
BASELINES: tuple[str, ...] = ("blur", "gaussian", "zero", "mean")

#: RISE's ``CausalMetric(step=224)``: pixels changed per deletion/insertion step.
RISE_PIXELS_PER_STEP = 224
#: RISE's substrate blur at 224 px: ``gkern(klen=11, nsig=5)`` (Evaluation.ipynb).
RISE_SIGMA_AT_224 = 5.0

__all__ = [
    "BASELINES",
    "RISE_PIXELS_PER_STEP",
    "BaselineKind",
    "DeletionInsertion",
    "cam_entropy",
    "cam_measures",
    "dead_channel_fraction",
    "dead_channel_fraction_per_image",
    "deletion_insertion",
    "feature_map_measures",
    "gaussian_blur",
    "hoyer_sparsity",
    "layer_table",
    "make_baseline",
    "markdown_table",
    "random_deletion_insertion",
    "random_saliency",
    "randomized_copy",
    "rise_blur",
    "rise_blur_kernel",
    "rise_steps",
    "sparsity",
    "spatial_contrast",
    "spatial_contrast_per_image",
    "spearman_rank_correlation",
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


# --------------------------------------------------------------------------- faithfulness


class DeletionInsertion(TypedDict):
    """What :func:`deletion_insertion` returns; all tensors on the images' device.

    ``fractions`` is the x axis (share of pixels removed / inserted, from 0 to 1).
    Curves are ``(N, steps + 1)``, AUCs ``(N,)``. ``*_prob`` curves are
    ``sigmoid(sign * logit)``, the probability of the explained class; ``*_logit``
    curves are ``sign * logit``. ``deletion_auc`` / ``insertion_auc`` are on the
    probability curves (in ``[0, 1]``, comparable across models); the ``*_auc_logit``
    ones are on the logit curves (unbounded, comparable within a model only).
    """

    fractions: Tensor
    deletion_prob: Tensor
    insertion_prob: Tensor
    deletion_logit: Tensor
    insertion_logit: Tensor
    deletion_auc: Tensor
    insertion_auc: Tensor
    deletion_auc_logit: Tensor
    insertion_auc_logit: Tensor


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of ``(N, C, H, W)`` images with reflect padding (the ``gaussian``
    baseline).

    The kernel radius is ``ceil(3 * sigma)``, capped so that reflect padding stays
    valid on small images; the work is torchvision's
    ``transforms.v2.functional.gaussian_blur`` (same kernel and padding as the
    separable convolution this replaced, to 1.5e-6 on ``[0, 1]`` images).
    ``sigma <= 0`` returns a copy.
    """
    from torchvision.transforms.v2.functional import gaussian_blur as tv_gaussian_blur

    if sigma <= 0:
        return images.clone()
    h, w = images.shape[-2:]
    radius = min(max(1, math.ceil(3 * sigma)), h - 1, w - 1)
    if radius < 1:
        return images.clone()
    size = 2 * radius + 1
    return tv_gaussian_blur(images, kernel_size=[size, size], sigma=[sigma, sigma])


def _reflect_index(i: Tensor, n: int) -> Tensor:
    """``scipy.ndimage`` ``reflect`` extension (``d c b a | a b c d | d c b a``), any offset."""
    i = torch.remainder(i, 2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def rise_blur_kernel(sigma: float, radius: int) -> Tensor:
    """One axis of RISE's blur kernel: ``gkern(klen=2*radius+1, nsig=sigma)``.

    RISE builds its kernel as ``scipy.ndimage.gaussian_filter`` of a delta in a
    ``klen x klen`` window (scipy's defaults: ``reflect`` mode, ``truncate=4``), so
    the Gaussian's tails are folded back into the window rather than cut off; the 2-D
    kernel is the outer product of this 1-D one with itself. Computed here without
    scipy, in float64.

    Returns:
        ``(2 * radius + 1,)`` float64 weights summing to 1.
    """
    n = 2 * radius + 1
    r = int(4.0 * sigma + 0.5)  # scipy: radius = int(truncate * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    phi = torch.exp(-0.5 * (x / sigma) ** 2)
    phi = phi / phi.sum()
    out = torch.zeros(n, dtype=torch.float64)
    pos = torch.arange(n).view(-1, 1) + torch.arange(-r, r + 1).view(1, -1)  # (n, 2r+1)
    hits = (_reflect_index(pos, n) == radius).to(torch.float64)  # where the delta sits
    out += (hits * phi.view(1, -1)).sum(dim=1)
    return out


def rise_blur(images: Tensor, sigma: float | None = None) -> Tensor:
    """RISE's insertion substrate: its ``gkern`` blur with zero padding (the ``blur`` baseline).

    RISE (Evaluation.ipynb) blurs with ``gkern(klen=11, nsig=5)`` and
    ``conv2d(x, kern, padding=klen // 2)`` at 224 px: sigma 5, a window of ±5 pixels
    (so the kernel is a folded, nearly flat Gaussian) and zero padding (the border
    darkens). Here ``sigma = 5 * max(H, W) / 224`` and the window ``±max(1,
    round(sigma))``, which is exactly RISE's kernel at 224 px and the same blur
    relative to the image at other sizes.
    """
    h, w = images.shape[-2:]
    sigma = RISE_SIGMA_AT_224 * max(h, w) / 224 if sigma is None else float(sigma)
    if sigma <= 0:
        return images.clone()
    radius = max(1, round(sigma))
    c = images.shape[1]
    k = rise_blur_kernel(sigma, radius).to(device=images.device, dtype=images.dtype)
    kx = k.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = k.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    out = F.conv2d(images, kx, padding=(0, radius), groups=c)
    return F.conv2d(out, ky, padding=(radius, 0), groups=c)


def rise_steps(height: int, width: int) -> int:
    """RISE's number of steps: one per 224 pixels, ``ceil(H * W / 224)`` (224 at 224 px)."""
    return max(1, math.ceil(height * width / RISE_PIXELS_PER_STEP))


def make_baseline(
    images: Tensor, kind: BaselineKind | Tensor = "blur", blur_sigma: float | None = None
) -> Tensor:
    """The "removed" version of each image, in the model's input space.

    Args:
        images: ``(N, C, H, W)`` model inputs (the seed feeds ``[0, 1]`` pixels).
        kind: ``blur`` (RISE's insertion substrate, :func:`rise_blur`: removes the
            object's detail but not its colours), ``gaussian`` (a plain Gaussian of
            the same sigma, radius ``3 sigma``, reflect padding: a stronger blur,
            this project's former default), ``zero`` (zeros: black for ``[0, 1]``
            inputs, RISE's deletion substrate), ``mean`` (each image's per-channel
            mean colour), or a tensor broadcastable to ``images``.
        blur_sigma: Gaussian std in pixels for ``blur``/``gaussian``; default
            ``5 * max(H, W) / 224``, RISE's sigma of 5 at 224 px scaled to the input.

    Returns:
        ``(N, C, H, W)`` tensor like ``images``.
    """
    if isinstance(kind, Tensor):
        return kind.to(device=images.device, dtype=images.dtype).expand_as(images)
    if kind == "zero":
        return torch.zeros_like(images)
    if kind == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    if kind == "blur":
        return rise_blur(images, blur_sigma)
    if kind == "gaussian":
        sigma = (
            RISE_SIGMA_AT_224 * max(images.shape[-2:]) / 224 if blur_sigma is None else blur_sigma
        )
        return gaussian_blur(images, sigma)
    raise ValueError(
        f"baseline must be 'blur', 'gaussian', 'zero', 'mean' or a tensor, got {kind!r}"
    )


@contextlib.contextmanager
def _eval_mode(model: object) -> Iterator[None]:
    """Eval mode for an ``nn.Module`` (restoring each submodule's flag), no-op otherwise."""
    if not isinstance(model, nn.Module):
        yield
        return
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, was_training in saved:
            m.training = was_training


def _pixel_ranks(saliency: Tensor) -> Tensor:
    """``(N, H*W)`` rank of every pixel, 0 = most salient; ties go in raster order."""
    flat = saliency.flatten(1).float()
    flat = torch.nan_to_num(flat, nan=-math.inf)  # NaN = least salient
    # Stable descending sort keeps equal values in index order: deterministic ties.
    order = flat.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    pos = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return ranks.scatter_(1, order, pos)


def deletion_insertion(
    model_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    saliency: Tensor,
    sign: Tensor | float = 1.0,
    steps: int | None = None,
    deletion_baseline: BaselineKind | Tensor = "zero",
    insertion_baseline: BaselineKind | Tensor = "blur",
    batch_size: int = 128,
    blur_sigma: float | None = None,
    baseline: BaselineKind | Tensor | None = None,
) -> DeletionInsertion:
    """Deletion and insertion curves of a saliency map (Petsiuk et al. 2018, RISE).

    Deletion removes the most-attributed pixels first (replacing them by the
    deletion baseline) and follows the explained class's score: a faithful map makes
    it fall fast, so a *lower* deletion AUC is better. Insertion starts from the
    insertion baseline and reveals the most-attributed pixels first: a faithful map
    makes the score rise fast, so a *higher* insertion AUC is better. Compare against
    :func:`random_deletion_insertion` on the same images.

    The defaults are RISE's (``evaluation.py`` / ``Evaluation.ipynb``): deleted
    pixels become zero (black), insertion starts from RISE's blur (:func:`rise_blur`),
    one step per 224 pixels (``CausalMetric(step=224)``; ``steps=None`` means
    :func:`rise_steps`, 224 steps at 224 x 224), and the AUC is the trapezoid rule
    over the fraction axis ``[0, 1]`` (RISE's ``auc``). Where ``H*W`` is not a
    multiple of ``steps``, step ``k`` affects the first ``floor(k * H*W / steps)``
    pixels (equal shares; RISE instead moves 224 pixels per step and a short last
    one, which only differs below 224 x 224), and the x axis is that exact share.

    Pixels are ordered by saliency, descending; ties (flat regions of an upsampled
    Grad-CAM, all-zero maps) are broken in raster order, so results are
    deterministic; NaN saliency counts as least salient. A step affects all channels
    of its pixels. All perturbed images of all inputs are stacked and run through
    the model in batches of ``batch_size`` under ``torch.no_grad``: ``2 * steps + 1``
    per image (the full image, shared by both curves, once; ``2 * steps`` when the
    two baselines are the same, as the fully-removed image is shared too). An
    ``nn.Module`` is put in eval mode for the call and restored afterwards; for any
    other callable that is the caller's job.

    Args:
        model_fn: Maps ``(B, C, H, W)`` inputs to logits ``(B,)`` or ``(B, 1)``; the
            one-logit VGG16 (``+logit`` = dog score).
        images: ``(N, C, H, W)`` model inputs.
        saliency: ``(N, H, W)`` or ``(N, 1, H, W)`` maps already upsampled to the
            input size.
        sign: ``(N,)`` or scalar, ``+1`` to explain "dog", ``-1`` for "cat".
        steps: Number of deletion / insertion steps; curves have ``steps + 1``
            points. ``None``: RISE's one step per 224 pixels.
        deletion_baseline: What deleted pixels become (see :func:`make_baseline`);
            RISE's ``zero`` by default.
        insertion_baseline: What insertion starts from; RISE's ``blur`` by default.
        batch_size: Perturbed images per forward pass.
        blur_sigma: See :func:`make_baseline`.
        baseline: Deprecated: one baseline for both curves (the former single
            option); overrides the two above, with a ``DeprecationWarning``.

    Returns:
        A :class:`DeletionInsertion` dict. AUCs use the trapezoid rule over the
        fraction axis ``[0, 1]``; for probabilities they lie in ``[0, 1]``.
    """
    if baseline is not None:
        warnings.warn(
            "deletion_insertion(baseline=...) is deprecated; pass deletion_baseline and "
            "insertion_baseline",
            DeprecationWarning,
            stacklevel=2,
        )
        deletion_baseline = insertion_baseline = baseline
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    if saliency.ndim == 4 and saliency.shape[1] == 1:
        saliency = saliency[:, 0]
    if tuple(saliency.shape) != (n, h, w):
        raise ValueError(
            f"saliency must be (N, H, W) = {(n, h, w)} (upsample it first), "
            f"got {tuple(saliency.shape)}"
        )
    if steps is None:
        steps = rise_steps(h, w)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    dev = images.device
    sign_t = torch.as_tensor(sign, dtype=torch.float32, device=dev).expand(n)
    if not bool(((sign_t == 1) | (sign_t == -1)).all()):
        raise ValueError("sign must be +1 (dog) or -1 (cat)")

    npix = h * w
    ranks = _pixel_ranks(saliency.to(dev))  # (N, H*W)
    # the fully-removed image is shared by both curves only when the baselines agree
    same = (
        isinstance(deletion_baseline, str)
        and isinstance(insertion_baseline, str)
        and deletion_baseline == insertion_baseline
    )
    del_base = make_baseline(images, deletion_baseline, blur_sigma)
    ins_base = del_base if same else make_baseline(images, insertion_baseline, blur_sigma)
    counts = torch.arange(steps + 1, device=dev) * npix // steps  # pixels affected per step
    fractions = counts.float() / npix

    # One job per perturbed image: show the image where lo <= rank < hi, a baseline
    # elsewhere. Deletion step k: [counts[k], npix) over the deletion baseline;
    # insertion step k: [0, counts[k]) over the insertion baseline. Deletion k=0 is
    # the full image (= insertion's last point), so insertion needs steps 0..steps-1;
    # deletion's last point (all baseline) is insertion's first when they agree.
    n_del = steps if same else steps + 1
    k_del = torch.arange(n_del, device=dev).repeat(n)
    k_ins = torch.arange(steps, device=dev).repeat(n)
    job_img = torch.cat(
        [
            torch.arange(n, device=dev).repeat_interleave(n_del),
            torch.arange(n, device=dev).repeat_interleave(steps),
        ]
    )
    job_lo = torch.cat([counts[k_del], torch.zeros_like(k_ins)])
    job_hi = torch.cat([torch.full_like(k_del, npix), counts[k_ins]])
    job_ins = torch.cat(
        [torch.zeros_like(k_del, dtype=torch.bool), torch.ones_like(k_ins, dtype=torch.bool)]
    )

    outs: list[Tensor] = []
    with torch.no_grad(), _eval_mode(model_fn):
        for start in range(0, job_img.numel(), batch_size):
            sl = slice(start, start + batch_size)
            i = job_img[sl]
            r = ranks[i]
            show = (r >= job_lo[sl, None]) & (r < job_hi[sl, None])
            base = torch.where(job_ins[sl].view(-1, 1, 1, 1), ins_base[i], del_base[i])
            x = torch.where(show.view(-1, 1, h, w), images[i], base)
            logits = model_fn(x)
            if logits.ndim == 2 and logits.shape[1] == 1:
                logits = logits[:, 0]
            if logits.shape != (x.shape[0],):
                raise ValueError(
                    f"model_fn must return one logit per image, got shape {tuple(logits.shape)}"
                )
            outs.append(logits.float())
    raw = torch.cat(outs)
    del_raw = raw[: n * n_del].view(n, n_del) * sign_t.view(n, 1)
    ins_raw = raw[n * n_del :].view(n, steps) * sign_t.view(n, 1)
    # deletion ends at the baseline: with one baseline, that is insertion's first point
    del_logit = torch.cat([del_raw, ins_raw[:, :1]], dim=1) if same else del_raw
    ins_logit = torch.cat([ins_raw, del_raw[:, :1]], dim=1)  # ends at the full image
    del_prob, ins_prob = torch.sigmoid(del_logit), torch.sigmoid(ins_logit)
    return DeletionInsertion(
        fractions=fractions,
        deletion_prob=del_prob,
        insertion_prob=ins_prob,
        deletion_logit=del_logit,
        insertion_logit=ins_logit,
        deletion_auc=torch.trapezoid(del_prob, fractions, dim=1),
        insertion_auc=torch.trapezoid(ins_prob, fractions, dim=1),
        deletion_auc_logit=torch.trapezoid(del_logit, fractions, dim=1),
        insertion_auc_logit=torch.trapezoid(ins_logit, fractions, dim=1),
    )


def random_saliency(
    shape: Sequence[int] | torch.Size,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Uniform ``[0, 1)`` noise of ``shape``: the "no explanation" saliency baseline.

    Its pixel order is a uniformly random permutation, so deletion/insertion with it
    measures how the score responds to removing pixels at random. ``device`` defaults
    to the generator's device (CPU without a generator).
    """
    if device is None and generator is not None:
        device = generator.device
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)


def random_deletion_insertion(
    model_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    sign: Tensor | float = 1.0,
    generator: torch.Generator | None = None,
    repeats: int = 1,
    **kwargs: object,
) -> DeletionInsertion:
    """:func:`deletion_insertion` with random saliency maps: the chance-level numbers.

    Args:
        model_fn, images, sign: As for :func:`deletion_insertion`.
        generator: Source of the noise (any device); the global RNG of the images'
            device if None.
        repeats: Average curves and AUCs over this many independent random maps
            (the AUC is linear in the curve, so this equals the mean AUC).
        **kwargs: Passed on (``steps``, ``deletion_baseline``, ``insertion_baseline``,
            ``batch_size``, ``blur_sigma``).

    Returns:
        A :class:`DeletionInsertion` dict, averaged over ``repeats``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    n, _, h, w = images.shape
    noise_device = generator.device if generator is not None else images.device
    runs = [
        deletion_insertion(
            model_fn,
            images,
            # Noise is drawn where the generator lives, then moved to the images.
            random_saliency((n, h, w), generator, device=noise_device).to(images.device),
            sign,
            **kwargs,  # type: ignore[arg-type]
        )
        for _ in range(repeats)
    ]
    if repeats == 1:
        return runs[0]
    keys = DeletionInsertion.__annotations__.keys()
    return DeletionInsertion(**{k: torch.stack([r[k] for r in runs]).mean(0) for k in keys})  # type: ignore[typeddict-item]


# --------------------------------------------------------------------------- sanity check


def _average_ranks(x: Tensor) -> Tensor:
    """Per-row ranks 1..M of ``(N, M)`` values, ties getting their average rank (float64)."""
    n, m = x.shape
    sorted_vals, order = x.sort(dim=1, stable=True)
    new_group = torch.ones_like(sorted_vals, dtype=torch.bool)
    new_group[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    # A globally unique id per run of equal values, so one scatter handles all rows.
    group = new_group.cumsum(dim=1) - 1 + torch.arange(n, device=x.device).unsqueeze(1) * m
    pos = torch.arange(1, m + 1, device=x.device, dtype=torch.float64).expand(n, m)
    sums = torch.zeros(n * m, device=x.device, dtype=torch.float64)
    sums.scatter_add_(0, group.flatten(), pos.flatten())
    sizes = torch.zeros_like(sums).scatter_add_(0, group.flatten(), torch.ones_like(sums))
    avg = sums / sizes.clamp_min(1)
    return torch.empty_like(pos).scatter_(1, order, avg[group])


def spearman_rank_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample Spearman rank correlation of two sets of maps.

    Used for the parameter-randomisation sanity check (Adebayo et al. 2018): maps of
    the trained model vs. of :func:`randomized_copy`. A high rho means the map does
    not depend on what the model learned (the method fails the check); rho near 0
    means it does. Each pair is flattened; ties get average ranks (as
    ``scipy.stats.spearmanr``), and rho is the Pearson correlation of the ranks.

    If either map of a pair is constant (e.g. an all-zero Grad-CAM), rho is undefined
    (scipy gives NaN). It is defined as 0.0 here: a constant map orders no pixels, so
    it shares no ranking with the other map, and 0.0 keeps means over images finite.

    Args:
        a: ``(N, ...)`` maps.
        b: ``(N, ...)`` maps of the same shape.

    Returns:
        ``(N,)`` float32 rho in ``[-1, 1]`` on ``a``'s device.
    """
    if a.shape != b.shape:
        raise ValueError(
            f"a and b must have the same shape, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if a.ndim < 2:
        raise ValueError(f"maps must be batch-first (N, ...), got shape {tuple(a.shape)}")
    ra = _average_ranks(a.flatten(1).to(torch.float64))
    rb = _average_ranks(b.flatten(1).to(device=a.device, dtype=torch.float64))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denom = (ra.square().sum(dim=1) * rb.square().sum(dim=1)).sqrt()
    rho = (ra * rb).sum(dim=1) / torch.where(denom > 0, denom, 1.0)
    return torch.where(denom > 0, rho, 0.0).clamp(-1.0, 1.0).float()


def _reset_outermost(module: nn.Module) -> None:
    """Call ``reset_parameters()`` on the outermost modules that have it.

    Stopping at the first module with the method lets a model's own initialiser
    (VGG16's Keras-style one) win over the PyTorch defaults of its layers.
    """
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()
        return
    for child in module.children():
        _reset_outermost(child)


def randomized_copy(model: nn.Module, seed: int) -> nn.Module:
    """A re-initialised deep copy of ``model`` for the parameter-randomisation check.

    Every module with ``reset_parameters()`` is re-initialised, outermost first (so
    :class:`~lightning_vgg.models.vgg.VGG16` uses its own Keras-style
    ``reset_parameters``, and a wrapper holding it as ``.net`` works too); BatchNorm
    running statistics are reset as well. Parameters of modules without
    ``reset_parameters`` are left as they were.

    The re-initialisation runs on the CPU with a seeded CPU generator inside
    ``torch.random.fork_rng``, so the copy is the same for a given seed whatever the
    device, and the global RNG state is not touched. The copy is then moved back to
    the model's device (dtype is kept), put in eval mode, and returned; ``model``
    itself is not modified.

    Args:
        model: The trained network (all parameters on one device).
        seed: Seed of the new initialisation.

    Returns:
        The randomised copy, in eval mode.
    """
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    if len(devices) > 1:
        raise ValueError(f"model spans several devices: {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    clone = copy.deepcopy(model).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        _reset_outermost(clone)
    for m in clone.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            m.reset_running_stats()
    return clone.to(device).eval()


# --------------------------------------------------------------------------- summaries


def layer_table(
    per_layer: Mapping[str, Mapping[str, float]], layer_key: str = "layer"
) -> list[dict[str, str | float | None]]:
    """Rows for a report: one per layer, in the mapping's order.

    Columns are ``layer_key`` followed by the union of all measure names in
    first-seen order; a measure missing for a layer is ``None``.
    """
    columns: dict[str, None] = {}
    for measures in per_layer.values():
        columns.update(dict.fromkeys(measures))
    return [
        {layer_key: name, **{c: measures.get(c) for c in columns}}
        for name, measures in per_layer.items()
    ]


def markdown_table(rows: Sequence[Mapping[str, object]], float_format: str = ".3f") -> str:
    """A GitHub-flavoured Markdown table of :func:`layer_table` rows ("" for no rows)."""
    if not rows:
        return ""
    columns = list(dict.fromkeys(c for row in rows for c in row))

    def cell(v: object) -> str:
        if v is None:
            return ""
        return format(v, float_format) if isinstance(v, float) else str(v)

    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
