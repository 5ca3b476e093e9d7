"""The parameter-randomisation sanity check of Adebayo et al. 2018.

Maps of the trained model are compared with maps of :func:`randomized_copy` by
:func:`spearman_rank_correlation`: a map that survives the randomisation does not
depend on what the model learned. :func:`cascading_randomization` is the paper's
cascading version: the layers are re-initialised from the top (the classifier, then
``block5_conv3``) down to ``block1_conv1``, one more at each step, and the map of one
layer is compared with the trained model's after every step.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from lightning_vgg.explain.atlas import Score, compute_atlas
from lightning_vgg.explain.hooks import unwrap
from lightning_vgg.models.vgg import he_normal_, keras_conv_names

__all__ = [
    "CLASSIFIER",
    "cascade_order",
    "cascading_randomization",
    "randomized_copy",
    "spearman_rank_correlation",
]

#: The first step of the cascade: every dense layer of the head at once.
CLASSIFIER = "classifier"


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

    Not ``torchmetrics.functional.spearman_corrcoef``: it agrees to 1.5e-8 up to
    65,535 pixels a map (tests/test_measures.py compares them), but torchmetrics
    1.9 sums tied ranks in int32, which overflows for a run of ties past ~65,536
    pixels (the zero background of block1's map at an input of 256 px or more): its
    rank of such a run comes out negative, and rho drifts.

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


def cascade_order() -> list[str]:
    """The cascade's steps, top first: ``classifier``, ``block5_conv3`` ... ``block1_conv1``."""
    return [CLASSIFIER, *reversed(keras_conv_names())]


def _units_by_step(model: nn.Module) -> dict[str, list[nn.Module]]:
    """``step -> modules re-initialised by it``: a conv with the BatchNorm after it."""
    net = unwrap(model)
    names = iter(keras_conv_names())
    units: dict[str, list[nn.Module]] = {CLASSIFIER: list(net.classifier)}
    current: list[nn.Module] = []
    for m in net.features:
        if isinstance(m, nn.Conv2d):
            current = units.setdefault(next(names), [])
            current.append(m)
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            current.append(m)
    return units


def _reinit(modules: list[nn.Module], seed: int) -> None:
    """Keras-style re-initialisation (as :class:`~lightning_vgg.models.vgg.VGG16`), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        for m in modules:
            with torch.no_grad():
                if isinstance(m, nn.Conv2d):
                    m.weight.copy_(he_normal_(torch.empty_like(m.weight, device="cpu")))
                    m.bias.zero_()
                elif isinstance(m, nn.Linear):
                    m.weight.copy_(
                        nn.init.xavier_uniform_(torch.empty_like(m.weight, device="cpu"))
                    )
                    m.bias.zero_()
                elif isinstance(m, nn.modules.batchnorm._NormBase):
                    m.reset_parameters()
                    m.reset_running_stats()


def cascading_randomization(
    model: nn.Module,
    images: Tensor,
    target_sign: Tensor,
    layer: str,
    seed: int,
    score: Score = "logit",
) -> tuple[list[str], Tensor]:
    """Spearman ρ of ``layer``'s Grad-CAM, trained vs cumulatively randomised (Adebayo 2018).

    Step ``k`` re-initialises the first ``k + 1`` entries of :func:`cascade_order` (the
    classifier, then the conv layers from the top down, each with its BatchNorm) in a
    copy of ``model``, and correlates its Grad-CAM of ``layer`` for the same class
    (``target_sign``) with the trained model's, image by image. A map that depends on
    the learned weights decorrelates as more layers are randomised; ``model`` itself is
    not modified.

    Returns:
        The steps (the layer newly randomised at each) and ``(steps, N)`` float32 ρ on
        the CPU.
    """
    options = {"target": target_sign, "activations": False, "layers": [layer], "score": score}
    trained = compute_atlas(model, images, **options).cams[layer].detach()
    clone = copy.deepcopy(model).eval()
    units = _units_by_step(clone)
    order = cascade_order()
    rhos = []
    for step, name in enumerate(order):
        _reinit(units[name], seed + step)
        cam = compute_atlas(clone, images, **options).cams[layer].detach()
        rhos.append(spearman_rank_correlation(trained, cam).cpu())
    del clone
    return order, torch.stack(rhos)
