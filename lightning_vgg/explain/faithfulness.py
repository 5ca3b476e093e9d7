"""Faithfulness of a saliency map: the deletion/insertion game of Petsiuk et al. 2018 (RISE).

RISE's defaults (deletion to black, insertion from RISE's blur, one step per 224
pixels, trapezoid AUC): :func:`deletion_insertion` and its random-map baseline
:func:`random_deletion_insertion`, with the baselines (:func:`make_baseline`) they
remove pixels to.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Literal, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_vgg.explain.hooks import eval_mode

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
    "deletion_insertion",
    "gaussian_blur",
    "make_baseline",
    "random_deletion_insertion",
    "random_saliency",
    "rise_blur",
    "rise_blur_kernel",
    "rise_steps",
]


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
    n, _, h, w = _check_shapes(images, saliency)
    if saliency.ndim == 4:
        saliency = saliency[:, 0]
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
    n_del = steps if same else steps + 1
    jobs = _jobs(n, n_del, steps, counts, npix)
    with torch.no_grad(), eval_mode(model_fn):
        raw = _run_jobs(model_fn, images, ranks, jobs, (del_base, ins_base), batch_size)
    sign_col = sign_t.view(n, 1)
    del_raw = raw[: n * n_del].view(n, n_del) * sign_col
    ins_raw = raw[n * n_del :].view(n, steps) * sign_col
    # deletion ends at the baseline: with one baseline, that is insertion's first point
    del_logit = torch.cat([del_raw, ins_raw[:, :1]], dim=1) if same else del_raw
    ins_logit = torch.cat([ins_raw, del_raw[:, :1]], dim=1)  # ends at the full image
    return _curves(counts.float() / npix, del_logit, ins_logit)


def _check_shapes(images: Tensor, saliency: Tensor) -> tuple[int, int, int, int]:
    """``images``' ``(N, C, H, W)``, after checking ``saliency`` is ``(N, [1,] H, W)``."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if saliency.ndim == 4 and saliency.shape[1] == 1:
        saliency = saliency[:, 0]
    if tuple(saliency.shape) != (n, h, w):
        raise ValueError(
            f"saliency must be (N, H, W) = {(n, h, w)} (upsample it first), "
            f"got {tuple(saliency.shape)}"
        )
    return n, c, h, w


def _jobs(
    n: int, n_del: int, steps: int, counts: Tensor, npix: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One job per perturbed image: ``(image index, lo, hi, is_insertion)``.

    A job shows the image where ``lo <= rank < hi``, a baseline elsewhere. Deletion
    step k: ``[counts[k], npix)`` over the deletion baseline; insertion step k:
    ``[0, counts[k])`` over the insertion baseline. Deletion k=0 is the full image (=
    insertion's last point), so insertion needs steps 0..steps-1; deletion's last
    point (all baseline) is insertion's first when the baselines agree (``n_del =
    steps``).
    """
    dev = counts.device
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
    return job_img, job_lo, job_hi, job_ins


def _run_jobs(
    model_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    ranks: Tensor,
    jobs: tuple[Tensor, Tensor, Tensor, Tensor],
    bases: tuple[Tensor, Tensor],
    batch_size: int,
) -> Tensor:
    """Every job's logit (float32), ``batch_size`` perturbed images per forward pass."""
    job_img, job_lo, job_hi, job_ins = jobs
    del_base, ins_base = bases
    h, w = images.shape[-2:]
    outs: list[Tensor] = []
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
    return torch.cat(outs)


def _curves(fractions: Tensor, del_logit: Tensor, ins_logit: Tensor) -> DeletionInsertion:
    """The probability curves and the four trapezoid AUCs of two logit curves."""
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
