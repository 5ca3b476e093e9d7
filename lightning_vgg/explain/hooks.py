"""Where the atlas taps the network: finding the conv layers, eval mode, and recording their outputs.

A *tap* is the tensor taken as a conv layer's feature map: ``post`` (after the ReLU,
Keras's conv output), ``pre`` (the ReLU's input) or ``conv`` (the raw convolution).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn

from lightning_vgg.errors import UserError
from lightning_vgg.models.vgg import VGG16, conv_units, keras_conv_names

#: Which tensor is "the conv layer's feature map" (the user-facing ``--stage`` option).
Tap = Literal["post", "pre", "conv"]
TAPS: tuple[str, ...] = ("post", "pre", "conv")

__all__ = [
    "TAPS",
    "Tap",
    "capture_layers",
    "eval_mode",
    "first_param",
    "layer_units",
    "resolve_layers",
    "unwrap",
]


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
    model: nn.Module, tap: Tap = "post", layers: Sequence[str] | None = None
) -> OrderedDict[str, nn.Module]:
    """The modules whose outputs are the requested conv layers' feature maps, in order.

    Args:
        model: A VGG16 or a module holding one as ``.net``.
        tap: ``post`` (after ReLU, Keras's conv output), ``pre`` (ReLU input) or
            ``conv`` (raw convolution); see :func:`~lightning_vgg.models.vgg.conv_units`.
        layers: Keras names to keep (``block1_conv1`` ...); ``None`` keeps all 13.
            The result always follows network order, whatever order is given.

    Raises:
        UserError: For an unknown tap or layer name (they come from configs; the
            message names the user-facing ``stage`` option).
    """
    if tap not in TAPS:
        raise UserError(f"stage must be post, pre or conv, got {tap!r}")
    units = conv_units(unwrap(model), tap)
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


def resolve_layers(
    model: nn.Module,
    tap: Tap,
    layers: Sequence[str] | Mapping[str, nn.Module] | None,
) -> tuple[nn.Module, OrderedDict[str, nn.Module]]:
    """The module to run and the layers to record.

    Layer names go through :func:`layer_units` on the VGG16 inside ``model``. An
    explicit ``name -> module`` mapping is used as given (``tap`` is then
    ignored), and then ``model`` need not be a VGG16 at all: the tests check the
    Grad-CAM arithmetic on a hand-made toy network that way.
    """
    if isinstance(layers, Mapping):
        try:
            net: nn.Module = unwrap(model)
        except TypeError:
            net = model
        return net, OrderedDict(layers)
    return unwrap(model), layer_units(model, tap, layers)


def first_param(model: nn.Module) -> Tensor:
    """The model's first parameter: where (device, dtype) its inputs must go."""
    try:
        return next(model.parameters())
    except StopIteration as exc:  # pragma: no cover - VGG16 always has parameters
        raise TypeError("model has no parameters; cannot infer its device") from exc


_M = TypeVar("_M")


@contextlib.contextmanager
def eval_mode(model: _M) -> Iterator[_M]:
    """Put ``model`` in eval mode and restore every submodule's own ``training`` flag.

    Explanations must run in eval mode: in train mode BatchNorm normalises with the
    batch's statistics (so one image's map depends on the others in the batch) and
    updates its running statistics (so explaining would change the model).
    ``model.train(previous)`` would not do: it sets one flag on every submodule and so
    loses mixed states (e.g. frozen BN layers in a training model). Anything that is
    not an ``nn.Module`` (a plain model function) is left alone: its mode is the
    caller's job.
    """
    if not isinstance(model, nn.Module):
        yield model
        return
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


@contextlib.contextmanager
def capture_layers(
    model: nn.Module, layers: Mapping[str, nn.Module], keep_grad: bool, clone_outputs: bool = True
) -> Iterator[dict[str, Tensor]]:
    """Record the output of each named module during forward passes inside the block.

    Yields a dict that the hooks fill (``name -> output``) as the model runs; a later
    forward pass overwrites earlier entries. Every hook is removed on exit, also when
    the block raises, so a failed explanation never leaves a model that keeps
    recording.

    In-place operations are the trap here. With ``tap='pre'`` the hooked module is
    BatchNorm (or the conv), whose output the next in-place ReLU overwrites; a stored
    reference (or ``.data``, as some CAM libraries keep) would then hold the
    post-ReLU values, and for autograd it would even *become* the ReLU's output, so
    its gradient would silently be the post-ReLU one. The hook therefore stores the
    module's real output and returns a clone, which replaces the output for the rest
    of the network: later in-place ops act on the clone, the stored tensor keeps its
    values and its place in the graph, and ``d(score)/d(stored)`` flows through the
    clone unchanged (clone's Jacobian is the identity). With ``tap='post'`` the
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
