"""Feature maps and Grad-CAM of all 13 VGG16 conv layers from one forward and one backward pass.

The atlas is the point of the experiment: every conv layer's feature maps and its
Grad-CAM for the dog and the cat decision, computed together so that a batch costs one
forward and one backward pass instead of 13 of each (what calling Captum's
``LayerGradCam`` once per layer costs). Captum stays in here as the reference the
tests compare against (:func:`activations`, :func:`captum_gradcam`). Where the layers
are tapped lives in :mod:`~lightning_vgg.explain.hooks`; making the maps displayable in
:mod:`~lightning_vgg.explain.normalize`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_vgg.errors import UserError
from lightning_vgg.explain.hooks import (
    Tap,
    capture_layers,
    eval_mode,
    first_param,
    layer_units,
    resolve_layers,
    unwrap,
)

TargetSpec = Literal["pred", "dog", "cat"] | Tensor
#: What Grad-CAM differentiates: ``logit`` (``+logit`` for dog, ``-logit`` for cat, our
#: default) or ``probability`` (``P(dog)`` and ``P(cat) = 1 - P(dog)``, the seed's).
Score = Literal["logit", "probability"]
SCORES: tuple[str, ...] = ("logit", "probability")

__all__ = [
    "Atlas",
    "activations",
    "captum_gradcam",
    "check_score",
    "compute_atlas",
    "layer_units",
    "resolve_target",
    "score_label",
]


# --------------------------------------------------------------------------- the atlas


@dataclass
class Atlas:
    """Everything one pass over a batch yields, for the layers in ``layer_names``.

    Attributes:
        logits: ``(N,)`` the model's logits; ``P(dog) = sigmoid(logit)``.
        probs: ``(N,)`` P(dog).
        target_sign: ``(N,)`` +1 where the maps explain "dog", -1 where they explain
            "cat" (the score differentiated is ``sign * logit``).
        layer_names: Keras names, in network order.
        activations: ``name -> (N, C, h, w)`` feature maps, detached (empty if not
            requested).
        cams: ``name -> (N, 1, h, w)`` Grad-CAM after ReLU, in units of ``score``,
            not normalised (empty if not requested).
        cams_signed: ``name -> (N, 1, h, w)`` the same before the ReLU; negative
            parts are evidence against the target class. Kept because it costs one
            small tensor per layer and lets callers measure how much was clipped.
        score: What was differentiated: ``logit`` or ``probability`` (see
            :func:`compute_atlas`).
    """

    logits: Tensor
    probs: Tensor
    target_sign: Tensor
    layer_names: list[str]
    activations: dict[str, Tensor] = field(default_factory=dict)
    cams: dict[str, Tensor] = field(default_factory=dict)
    cams_signed: dict[str, Tensor] = field(default_factory=dict)
    score: Score = "logit"

    def to(self, device: torch.device | str) -> Atlas:
        """A copy with every tensor on ``device`` (e.g. ``"cpu"`` before plotting)."""

        def move(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v.to(device) for k, v in d.items()}

        return Atlas(
            logits=self.logits.to(device),
            probs=self.probs.to(device),
            target_sign=self.target_sign.to(device),
            layer_names=list(self.layer_names),
            activations=move(self.activations),
            cams=move(self.cams),
            cams_signed=move(self.cams_signed),
            score=self.score,
        )


def check_score(score: str) -> Score:
    """``score`` itself, or a :class:`UserError` naming the choices (it comes from configs)."""
    if score not in SCORES:
        raise UserError(f"score must be logit or probability, got {score!r}")
    return score  # type: ignore[return-value]


def score_label(score: Score, cls: str | None = None) -> str:
    """How figures name the differentiated score: ``P(dog)``, ``-logit`` ...

    ``cls`` is ``dog`` or ``cat``; without it, both (``±logit``, ``P(dog) / P(cat)``).
    """
    check_score(score)
    if score == "probability":
        return {"dog": "P(dog)", "cat": "P(cat) = 1 − P(dog)"}.get(cls or "", "P(dog) / P(cat)")
    return {"dog": "+logit (dog)", "cat": "−logit (cat)"}.get(cls or "", "±logit")


def resolve_target(target: TargetSpec, logits: Tensor) -> Tensor:
    """Turn a target spec into per-sample signs (+1 dog, -1 cat) like ``logits``.

    ``pred`` follows the logit (``logit >= 0`` is dog, the same as ``p >= 0.5``), not
    the rounded probability, so it is exact even where the sigmoid saturates. A
    tensor may hold labels (cat=0, dog=1) or signs (-1, +1); both read as "positive
    means dog", so the two conventions never disagree.

    Raises:
        ValueError: For an unknown string, a wrong shape or values outside
            {-1, 0, 1}.
    """
    n = logits.shape[0]
    if isinstance(target, str):
        if target == "pred":
            return torch.where(logits >= 0, 1.0, -1.0).to(logits.dtype)
        if target == "dog":
            return torch.ones_like(logits)
        if target == "cat":
            return -torch.ones_like(logits)
        raise ValueError(f"target must be 'pred', 'dog', 'cat' or a tensor, got {target!r}")
    t = torch.as_tensor(target).to(logits.device).reshape(-1)
    if t.numel() == 1 and n != 1:
        t = t.expand(n)
    if t.shape[0] != n:
        raise ValueError(f"target has {t.shape[0]} entries for a batch of {n}")
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError("target tensor must hold labels 0/1 or signs -1/+1")
    if ((t < -1) | (t > 1)).any():
        raise ValueError("target tensor must hold labels 0/1 or signs -1/+1")
    return torch.where(t > 0, 1.0, -1.0).to(logits.dtype)


def compute_atlas(
    model: nn.Module,
    images: Tensor,
    target: TargetSpec = "pred",
    tap: Tap = "post",
    activations: bool = True,
    cams: bool = True,
    layers: Sequence[str] | Mapping[str, nn.Module] | None = None,
    score: Score = "logit",
) -> Atlas:
    """Feature maps and Grad-CAM of every conv layer, one forward + one backward pass.

    Grad-CAM of layer ``A`` (``(N, C, h, w)``) for score ``S = sign * logit`` is
    ``ReLU(sum_k mean_ij(dS/dA_k) * A_k)``. One ``torch.autograd.grad`` call returns
    ``dS/dA`` for all layers at once; summing ``S`` over the batch is exact because in
    eval mode the samples do not interact. Parameters' ``.grad`` are never touched
    (``autograd.grad`` does not accumulate and skips weight gradients altogether).

    By default the score is the logit, not the probability: ``d sigmoid/d logit`` is
    ~0 for a confident prediction, which flattens every map to nothing. The seed
    differentiated the probability (Keras's sigmoid output: ``P(dog)`` for dog,
    ``1 - P(dog)`` for cat); ``score="probability"`` gives those maps from the *same*
    single backward pass. With ``p = P(dog)``, ``dp/dA = p(1-p) dlogit/dA`` and
    ``d(1-p)/dA = -p(1-p) dlogit/dA``, so the probability score's gradient is the
    signed logit score's times ``p(1-p) >= 0`` per image. Grad-CAM is linear in the
    gradient before its ReLU, and ``ReLU(c x) = c ReLU(x)`` for ``c >= 0``, so each
    image's signed and ReLU'd maps are its logit maps scaled by its ``p(1-p)``. The
    scaling is applied where backpropagation starts (the pass is seeded with
    ``sign * p(1-p)`` instead of ``sign``; backpropagation is linear in its seed), so
    the float rounding is the same as when the sigmoid itself is differentiated: the
    maps equal Captum's ``LayerGradCam`` of ``sigmoid(net(x))`` /
    ``1 - sigmoid(net(x))`` bit for bit in practice, not just to float32 rounding
    (rescaling the finished maps instead differs from it by up to ~1e-5 of a map's
    peak in float32, through cancellation between channels). A saturated prediction
    (``p(1-p)`` = 0 in floating point) gives all-zero maps, as the seed's did.

    Safe to call from anywhere: inside ``torch.inference_mode()`` or ``no_grad()``
    (Lightning's validate/test), on a model in train mode (it runs in eval mode and
    restores each submodule's flag; BatchNorm statistics are not updated), and with
    frozen parameters (the input is made to require grad instead).

    Args:
        model: A :class:`VGG16` or a module holding one as ``.net``.
        images: ``(N, 3, H, W)`` float model input (normalised as for training). It
            is copied to the model's device and dtype; the caller's tensor is never
            modified.
        target: ``pred`` (each image's predicted class), ``dog``, ``cat``, or an
            ``(N,)`` tensor of labels (cat=0, dog=1) or signs (-1, +1).
        tap: Which tensor is "the conv layer's feature map": ``post`` (after ReLU,
            as Keras), ``pre`` (ReLU input) or ``conv`` (the ``--stage`` option).
        activations: Keep the feature maps in the result.
        cams: Compute Grad-CAM (needs the backward pass; without it the call is one
            forward pass under ``no_grad``).
        layers: Keras layer names to cover; ``None`` for all 13. A ``name -> module``
            mapping hooks those modules directly (any single-logit model).
        score: ``logit`` (``sign * logit``) or ``probability`` (``P(target)``).

    Returns:
        An :class:`Atlas`; its tensors are detached and on the model's device.
    """
    check_score(score)
    net, units = resolve_layers(model, tap, layers)
    names = list(units)
    param = first_param(net)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")

    with eval_mode(model), torch.inference_mode(False), torch.set_grad_enabled(cams):
        # A fresh copy: never an inference tensor (those cannot join a graph), and
        # requiring grad on it never leaks to the caller's tensor.
        x = images.detach().to(device=param.device, dtype=param.dtype).clone()
        if cams:
            x.requires_grad_(True)
        # VGG's post-ReLU maps feed no in-place op, so they need no protective clone.
        safe = tap == "post" and not isinstance(layers, Mapping)
        with capture_layers(net, units, keep_grad=cams, clone_outputs=not safe) as store:
            logits = net(x)
        if logits.ndim == 2 and logits.shape[1] == 1:
            logits = logits.squeeze(1)
        if logits.ndim != 1:
            raise ValueError(
                f"expected one logit per image, got output shape {tuple(logits.shape)}"
            )
        sign = resolve_target(target, logits.detach())

        feats = [store[name] for name in names]
        cam_signed = _gradcams(names, feats, logits, sign, score) if cams else {}
        cam_maps = {name: F.relu(signed) for name, signed in cam_signed.items()}
        acts = {name: store[name].detach() for name in names} if activations else {}

    logits = logits.detach()
    return Atlas(
        logits=logits,
        probs=torch.sigmoid(logits),
        target_sign=sign,
        layer_names=names,
        activations=acts,
        cams=cam_maps,
        cams_signed=cam_signed,
        score=score,
    )


def _gradcams(
    names: Sequence[str], feats: Sequence[Tensor], logits: Tensor, sign: Tensor, score: Score
) -> dict[str, Tensor]:
    """Every layer's signed Grad-CAM ``sum_k mean_ij(dS/dA_k) * A_k`` from one backward pass.

    The backward pass is seeded per image with the score's derivative by the logit:
    ``sign`` for the logit, ``sign * p(1-p)`` for ``P(target)`` (see
    :func:`compute_atlas`).
    """
    seed = sign.to(logits.dtype)
    if score == "probability":
        p = torch.sigmoid(logits.detach())
        # (1-p)*p: the product torch's sigmoid backward forms, so the rounding
        # (and the maps, bit for bit) match differentiating the sigmoid itself
        seed = seed * ((1 - p) * p)
    grads = torch.autograd.grad(logits, list(feats), grad_outputs=seed)
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, a, g in zip(names, feats, grads, strict=True):
            weights = g.mean(dim=(2, 3), keepdim=True)
            out[name] = (weights * a).sum(dim=1, keepdim=True)
    return out


# --------------------------------------------------------------------------- Captum references


def activations(
    model: nn.Module,
    images: Tensor,
    tap: Tap = "post",
    layers: Sequence[str] | Mapping[str, nn.Module] | None = None,
) -> dict[str, Tensor]:
    """Feature maps of the conv layers with Captum's ``LayerActivation``, one forward pass.

    The reference for feature maps (:func:`compute_atlas` captures the same tensors
    itself in its own pass; the tests check they agree). Runs in eval mode, restoring
    every submodule's flag afterwards. ``tap`` and ``layers`` mean what they mean
    for :func:`compute_atlas`.

    Returns:
        ``name -> (N, C, h, w)`` on the model's device, in network order.
    """
    from captum.attr import LayerActivation

    net, units = resolve_layers(model, tap, layers)
    param = first_param(net)
    with eval_mode(model), torch.no_grad():
        x = images.detach().to(device=param.device, dtype=param.dtype)
        out = LayerActivation(net, list(units.values())).attribute(x)
    return {name: t.detach() for name, t in zip(units, out, strict=True)}


def captum_gradcam(
    model: nn.Module,
    images: Tensor,
    layer_name: str,
    sign: float | Tensor,
    relu: bool = True,
    tap: Tap = "post",
    score: Score = "logit",
) -> Tensor:
    """Grad-CAM of one layer with Captum's ``LayerGradCam`` (reference and baseline).

    ``forward_func = lambda x: sign * net(x)``, so ``sign=+1`` explains "dog" and
    ``sign=-1`` "cat"; a ``(N,)`` tensor picks per sample. With
    ``score="probability"`` it is ``sigmoid(net(x))`` for dog and
    ``1 - sigmoid(net(x))`` for cat, written as ``(1 - sign)/2 + sign * sigmoid``
    (the same function, and the same gradient to the bit). One forward and one backward
    pass per call: 13 calls is what :func:`compute_atlas` replaces. Runs in eval
    mode and restores every submodule's flag. Being only a reference, it does not
    leave inference mode for you: call it with grad mode enabled.

    Returns:
        ``(N, 1, h, w)`` on the model's device.
    """
    from captum.attr import LayerGradCam

    net = unwrap(model)
    layer = layer_units(net, tap, [layer_name])[layer_name]
    param = first_param(net)
    s = torch.as_tensor(sign, dtype=param.dtype, device=param.device)
    x = images.detach().to(device=param.device, dtype=param.dtype).clone()
    check_score(score)
    if score == "probability":

        def forward(inp: Tensor) -> Tensor:
            return (1 - s) / 2 + s * torch.sigmoid(net(inp))

    else:

        def forward(inp: Tensor) -> Tensor:
            return s * net(inp)

    with eval_mode(model):
        gc = LayerGradCam(forward, layer)
        out = gc.attribute(x, relu_attributions=relu)
    return out.detach()
