"""Feature maps and Grad-CAM of all 13 VGG16 conv layers from one forward and one backward pass.

The atlas is the point of the experiment: every conv layer's feature maps and its
Grad-CAM for the dog and the cat decision, computed together so that a batch costs one
forward and one backward pass instead of 13 of each (what calling Captum's
``LayerGradCam`` once per layer costs). Captum stays in here as the reference the
tests compare against (:func:`activations`, :func:`captum_gradcam`).

The normalisations are pure functions. :func:`normalize_per_map` answers "where does
this layer look"; :func:`to_density` / :func:`shared_scale` / :func:`normalize_shared`
answer "how much evidence is there", on one absolute scale shared by all layers and
all checkpoints, so that a weak model's weak evidence looks weak.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_vgg.errors import UserError
from lightning_vgg.models.vgg import VGG16, conv_units, keras_conv_names

Stage = Literal["post", "pre", "conv"]
TargetSpec = Literal["pred", "dog", "cat"] | Tensor
#: What Grad-CAM differentiates: ``logit`` (``+logit`` for dog, ``-logit`` for cat, our
#: default) or ``probability`` (``P(dog)`` and ``P(cat) = 1 - P(dog)``, the seed's).
Score = Literal["logit", "probability"]
SCORES: tuple[str, ...] = ("logit", "probability")

__all__ = [
    "Atlas",
    "activations",
    "captum_gradcam",
    "capture_layers",
    "check_score",
    "compute_atlas",
    "eval_mode",
    "layer_units",
    "normalize_per_map",
    "normalize_shared",
    "resolve_target",
    "score_label",
    "shared_scale",
    "to_density",
    "unwrap",
    "upsample",
]


# --------------------------------------------------------------------------- model access


def unwrap(model: nn.Module) -> VGG16:
    """Return the plain :class:`VGG16` inside ``model``.

    Accepts the network itself or anything holding it as ``.net`` (the
    ``VGGClassifier`` LightningModule), so callers can pass whatever they loaded from
    a checkpoint. Checked by attribute, not by importing Lightning here.

    Raises:
        TypeError: If no VGG16 is found.
    """
    if isinstance(model, VGG16):
        return model
    net = getattr(model, "net", None)
    if isinstance(net, VGG16):
        return net
    raise TypeError(
        f"expected a VGG16 or a module with a VGG16 as .net, got {type(model).__name__}"
    )


def layer_units(
    model: nn.Module, stage: Stage = "post", layers: Sequence[str] | None = None
) -> OrderedDict[str, nn.Module]:
    """The modules whose outputs are the requested conv layers' feature maps, in order.

    Args:
        model: A VGG16 or a module holding one as ``.net``.
        stage: ``post`` (after ReLU, Keras's conv output), ``pre`` (ReLU input) or
            ``conv`` (raw convolution); see :func:`~lightning_vgg.models.vgg.conv_units`.
        layers: Keras names to keep (``block1_conv1`` ...); ``None`` keeps all 13.
            The result always follows network order, whatever order is given.

    Raises:
        UserError: For an unknown stage or layer name (they come from configs).
    """
    if stage not in ("post", "pre", "conv"):
        raise UserError(f"stage must be post, pre or conv, got {stage!r}")
    units = conv_units(unwrap(model), stage)
    if layers is None:
        return units
    if isinstance(layers, str):  # one name, not a sequence of characters
        layers = [layers]
    unknown = [name for name in layers if name not in units]
    if unknown:
        raise UserError(
            f"unknown conv layer(s) {', '.join(map(repr, unknown))}; "
            f"expected names from {', '.join(keras_conv_names())}"
        )
    wanted = set(layers)
    return OrderedDict((name, m) for name, m in units.items() if name in wanted)


def _resolve(
    model: nn.Module,
    stage: Stage,
    layers: Sequence[str] | Mapping[str, nn.Module] | None,
) -> tuple[nn.Module, OrderedDict[str, nn.Module]]:
    """The module to run and the layers to record.

    Layer names go through :func:`layer_units` on the VGG16 inside ``model``. An
    explicit ``name -> module`` mapping is used as given (``stage`` is then
    ignored), and then ``model`` need not be a VGG16 at all: the tests check the
    Grad-CAM arithmetic on a hand-made toy network that way.
    """
    if isinstance(layers, Mapping):
        try:
            net: nn.Module = unwrap(model)
        except TypeError:
            net = model
        return net, OrderedDict(layers)
    return unwrap(model), layer_units(model, stage, layers)


def _first_param(model: nn.Module) -> Tensor:
    try:
        return next(model.parameters())
    except StopIteration as exc:  # pragma: no cover - VGG16 always has parameters
        raise TypeError("model has no parameters; cannot infer its device") from exc


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every submodule's own ``training`` flag.

    Explanations must run in eval mode: in train mode BatchNorm normalises with the
    batch's statistics (so one image's map depends on the others in the batch) and
    updates its running statistics (so explaining would change the model).
    ``model.train(previous)`` would not do: it sets one flag on every submodule and so
    loses mixed states (e.g. frozen BN layers in a training model).
    """
    # Nothing to do for a model already in eval mode (the usual case for explaining):
    # one walk over the modules instead of a recursive ``eval()`` and its restore.
    training = [m for m in model.modules() if m.training]
    if training:
        model.eval()
    try:
        yield model
    finally:
        for m in training:
            m.training = True


# --------------------------------------------------------------------------- hooks


@contextlib.contextmanager
def capture_layers(
    model: nn.Module, layers: Mapping[str, nn.Module], keep_grad: bool, clone_outputs: bool = True
) -> Iterator[dict[str, Tensor]]:
    """Record the output of each named module during forward passes inside the block.

    Yields a dict that the hooks fill (``name -> output``) as the model runs; a later
    forward pass overwrites earlier entries. Every hook is removed on exit, also when
    the block raises, so a failed explanation never leaves a model that keeps
    recording.

    In-place operations are the trap here. With ``stage='pre'`` the hooked module is
    BatchNorm (or the conv), whose output the next in-place ReLU overwrites; a stored
    reference (or ``.data``, as some CAM libraries keep) would then hold the
    post-ReLU values, and for autograd it would even *become* the ReLU's output, so
    its gradient would silently be the post-ReLU one. The hook therefore stores the
    module's real output and returns a clone, which replaces the output for the rest
    of the network: later in-place ops act on the clone, the stored tensor keeps its
    values and its place in the graph, and ``d(score)/d(stored)`` flows through the
    clone unchanged (clone's Jacobian is the identity). With ``stage='post'`` the
    hooked ReLU itself was in place, so the stored tensor is the ReLU's result (its
    autograd history is the ReLU), which is again what we want.

    Args:
        model: The module whose forward runs inside the block (only used to check
            the hooked modules belong to it).
        layers: ``name -> module`` to record (e.g. :func:`layer_units`).
        clone_outputs: Hand a clone to the rest of the network (see above). Pass
            false only when nothing after a hooked module works in place, e.g. VGG's
            post-ReLU outputs, which feed a conv, a max-pool or a BatchNorm: that
            saves one copy of every captured feature map.
        keep_grad: If true, stored outputs stay in the autograd graph (for
            ``torch.autograd.grad``); a layer output that is outside the graph (no
            parameter or input requires grad) is made a graph leaf so that its
            gradient still exists. Grad mode must then be enabled during the forward
            pass. If false, stored outputs are detached.

    Raises:
        ValueError: If a module is not part of ``model``.
        RuntimeError: From the forward pass, if ``keep_grad`` is set while grad mode
            is disabled (the gradient could not exist).
    """
    members = {id(m) for m in model.modules()}
    for name, module in layers.items():
        if id(module) not in members:
            raise ValueError(f"layer {name!r} is not a submodule of the model")

    store: dict[str, Tensor] = {}

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            if not isinstance(output, Tensor):
                raise TypeError(f"layer {name!r} returned {type(output).__name__}, not a Tensor")
            if keep_grad:
                if not torch.is_grad_enabled():
                    raise RuntimeError(
                        f"capture_layers(keep_grad=True) needs grad mode; layer {name!r} ran without it"
                    )
                if not output.requires_grad:
                    # Outside the graph means it has no history: safe to make it a leaf.
                    output.requires_grad_(True)
                store[name] = output
            else:
                store[name] = output.detach()
            return output.clone() if clone_outputs else output

        return hook

    handles = []
    try:
        for name, module in layers.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


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
    stage: Stage = "post",
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
        stage: Which tensor is "the conv layer's feature map": ``post`` (after ReLU,
            as Keras), ``pre`` (ReLU input) or ``conv``.
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
    net, units = _resolve(model, stage, layers)
    names = list(units)
    param = _first_param(net)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")

    with eval_mode(model), torch.inference_mode(False), torch.set_grad_enabled(cams):
        # A fresh copy: never an inference tensor (those cannot join a graph), and
        # requiring grad on it never leaks to the caller's tensor.
        x = images.detach().to(device=param.device, dtype=param.dtype).clone()
        if cams:
            x.requires_grad_(True)
        # VGG's post-ReLU maps feed no in-place op, so they need no protective clone.
        safe = stage == "post" and not isinstance(layers, Mapping)
        with capture_layers(net, units, keep_grad=cams, clone_outputs=not safe) as store:
            logits = net(x)
        if logits.ndim == 2 and logits.shape[1] == 1:
            logits = logits.squeeze(1)
        if logits.ndim != 1:
            raise ValueError(
                f"expected one logit per image, got output shape {tuple(logits.shape)}"
            )
        sign = resolve_target(target, logits.detach())

        cam_maps: dict[str, Tensor] = {}
        cam_signed: dict[str, Tensor] = {}
        if cams:
            feats = [store[name] for name in names]
            # The backward pass is seeded per image with the score's derivative by the
            # logit: sign for the logit, sign * p(1-p) for P(target) (see above).
            seed = sign.to(logits.dtype)
            if score == "probability":
                p = torch.sigmoid(logits.detach())
                # (1-p)*p: the product torch's sigmoid backward forms, so the rounding
                # (and the maps, bit for bit) match differentiating the sigmoid itself
                seed = seed * ((1 - p) * p)
            grads = torch.autograd.grad(logits, feats, grad_outputs=seed)
            with torch.no_grad():
                for name, a, g in zip(names, feats, grads, strict=True):
                    weights = g.mean(dim=(2, 3), keepdim=True)
                    signed = (weights * a).sum(dim=1, keepdim=True)
                    cam_signed[name] = signed
                    cam_maps[name] = F.relu(signed)
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


# --------------------------------------------------------------------------- Captum references


def activations(
    model: nn.Module,
    images: Tensor,
    stage: Stage = "post",
    layers: Sequence[str] | Mapping[str, nn.Module] | None = None,
) -> dict[str, Tensor]:
    """Feature maps of the conv layers with Captum's ``LayerActivation``, one forward pass.

    The reference for feature maps (:func:`compute_atlas` captures the same tensors
    itself in its own pass; the tests check they agree). Runs in eval mode, restoring
    every submodule's flag afterwards. ``stage`` and ``layers`` mean what they mean
    for :func:`compute_atlas`.

    Returns:
        ``name -> (N, C, h, w)`` on the model's device, in network order.
    """
    from captum.attr import LayerActivation

    net, units = _resolve(model, stage, layers)
    param = _first_param(net)
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
    stage: Stage = "post",
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
    layer = layer_units(net, stage, [layer_name])[layer_name]
    param = _first_param(net)
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


# --------------------------------------------------------------------------- normalisation


def _as_batch(t: Tensor) -> tuple[Tensor, torch.Size]:
    """Fold all leading dims into one batch of single-channel maps ``(B, 1, h, w)``."""
    if t.ndim < 2:
        raise ValueError(f"expected a map with at least 2 dims (h, w), got shape {tuple(t.shape)}")
    return t.reshape(-1, 1, *t.shape[-2:]), t.shape[:-2]


def upsample(cam: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear resize of maps to ``size`` for overlays (values, not sums, preserved).

    Accepts any shape ending in ``(h, w)`` (``(N, 1, h, w)``, ``(h, w)`` ...) and keeps
    the leading dims. ``align_corners=False`` so a pixel's value sits at its centre,
    like the image it is drawn on; integer ratios then preserve the mean exactly.
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    flat, lead = _as_batch(cam)
    out = F.interpolate(flat, size=hw, mode="bilinear", align_corners=False)
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
