"""A trained network and its evaluation preprocessing, rebuilt from one checkpoint read.

Every command that explains or compares a checkpoint loads it here. The file is read
once, by :func:`~lightning_vgg.checkpointing.read_checkpoint` (tensors and plain data
only; a file naming any other object is refused with one line), and the model is built
from that dict rather than through ``VGGClassifier.load_from_checkpoint``: Lightning's
loader would read the file a second time for the data module's settings, and its
refusals (torch's ``UnpicklingError``, a strict ``load_state_dict``'s multi-line
``RuntimeError``) are not the one-line :class:`~lightning_vgg.errors.UserError` the
commands report.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_vgg.checkpointing import ARCH_KEYS, read_checkpoint
from lightning_vgg.data.preprocess import Preprocess
from lightning_vgg.errors import UserError
from lightning_vgg.models.module import VGGClassifier

__all__ = ["load_model", "load_model_and_preprocess", "model_from_checkpoint", "pick_device"]


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is the GPU when there is one; anything else names the device."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(ckpt_path: str | Path, device: str | torch.device = "auto") -> VGGClassifier:
    """Rebuild the network from a checkpoint's hyperparameters, in eval mode.

    Raises:
        UserError: The file is missing, not a checkpoint of this project, or its
            weights do not fit the architecture its hyperparameters describe.
    """
    return model_from_checkpoint(read_checkpoint(ckpt_path), ckpt_path, device)


def load_model_and_preprocess(
    ckpt_path: str | Path, device: str | torch.device = "auto"
) -> tuple[VGGClassifier, Preprocess]:
    """The network and the preprocessing it was evaluated with, from one checkpoint read.

    The preprocessing comes from the checkpoint's ``datamodule_hyper_parameters``
    (see :meth:`Preprocess.from_hparams`): what ``test`` and ``predict`` feed the
    network. A checkpoint without them gets the defaults (nearest, 1/255) and a
    warning.

    Raises:
        UserError: As :func:`load_model`.
    """
    ckpt = read_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, ckpt_path, device)
    hp = ckpt.get("datamodule_hyper_parameters")
    pre = Preprocess.from_hparams(
        hp if isinstance(hp, Mapping) else None,
        image_size=int(model.hparams.input_size),
        source=f"checkpoint {ckpt_path}",
    )
    return model, pre


def model_from_checkpoint(
    ckpt: Mapping[str, Any], ckpt_path: str | Path, device: str | torch.device = "auto"
) -> VGGClassifier:
    """The network a checkpoint dict (from :func:`read_checkpoint`) describes, in eval mode.

    Raises:
        UserError: ``ckpt`` holds no VGG hyperparameters or weights, or its weights do
            not fit the architecture its hyperparameters describe.
    """
    hp = ckpt.get("hyper_parameters")
    if not isinstance(hp, dict) or "state_dict" not in ckpt or not all(k in hp for k in ARCH_KEYS):
        raise UserError(f"{ckpt_path} is not a lightning_vgg checkpoint (no VGG hyperparameters)")
    model = VGGClassifier(**{k: v for k, v in hp.items() if not k.startswith("_")})
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:3]
        raise UserError(
            f"checkpoint {ckpt_path} does not match its own architecture: {' '.join(first)}"
        ) from exc
    return model.to(pick_device(device)).eval()
