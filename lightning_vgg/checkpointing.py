"""Checkpoint plumbing: atomic saves, run-directory lookup and architecture checks."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_vgg.errors import UserError
from lightning_vgg.fileio import atomic_path

#: Hyperparameters that change the network's shapes; a checkpoint must match them.
ARCH_KEYS = ("width", "batch_norm", "hidden", "input_size")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place.

    A save killed halfway leaves the previous ``best.ckpt``/``last.ckpt`` intact
    instead of a truncated file that a later ``--ckpt_path last`` would load.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU with a clear error for missing or broken files."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {p}: {exc}") from exc


def check_architecture(
    ckpt_hparams: Mapping[str, Any], model_hparams: Mapping[str, Any], path: str | Path
) -> None:
    """Refuse a checkpoint whose network differs from the configured one."""
    diffs = [
        f"{k}={ckpt_hparams.get(k)!r} in the checkpoint but {model_hparams.get(k)!r} in the config"
        for k in ARCH_KEYS
        if k in ckpt_hparams and k in model_hparams and ckpt_hparams[k] != model_hparams[k]
    ]
    if diffs:
        raise UserError(f"checkpoint {path} is for another architecture: " + "; ".join(diffs))


def run_dir_of_checkpoint(path: str | Path) -> Path:
    """``runs/x/version_0/checkpoints/best.ckpt`` -> ``runs/x/version_0``."""
    p = Path(path).resolve()
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def find_last_checkpoint(save_dir: str | Path, name: str) -> Path | None:
    """The newest ``last.ckpt`` among the versions of a run name, if any."""
    root = Path(save_dir) / name
    found = sorted(root.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None
