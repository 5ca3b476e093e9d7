"""Checkpoint plumbing: atomic saves, run-directory lookup and architecture checks."""

from __future__ import annotations

import contextlib
import glob
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_vgg.errors import UserError
from lightning_vgg.fileio import atomic_open

#: Hyperparameters that change the network's shapes; a checkpoint must match them.
ARCH_KEYS = ("width", "batch_norm", "hidden", "input_size")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it and renames it into place.

    A save killed halfway leaves the previous ``best.ckpt``/``last.ckpt`` intact
    instead of a truncated file that a later ``--ckpt_path last`` would load. A full
    disk or an unwritable folder is a ``UserError`` naming the file, and leaves no
    partial file behind. The temporary file of a save that was killed (and so could
    not clean up) is removed by the next successful save of the same checkpoint.

    Local files are written here rather than through Lightning's fsspec transaction,
    which stages every checkpoint in the system temp folder first (a second full
    copy, on a disk that may be much smaller than the run's) and reports some failed
    copies as success when the destination file already exists.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        if "://" in str(path):  # remote storage: fsspec's own transaction is the atomic step
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"storage_options are not supported by {type(self).__name__}")
        # Serialise first: torch turns write errors into opaque RuntimeErrors, while a
        # plain write reports ENOSPC/EACCES as the OSError that atomic_open explains.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        target = Path(path)
        with atomic_open(target, "wb") as handle:
            handle.write(buffer.getbuffer())
        _remove_leftovers(target)


def _remove_leftovers(target: Path) -> None:
    """Delete temporary files of earlier saves of ``target`` that were killed mid-write.

    Only one process saves a given checkpoint at a time (rank 0, one save after
    another), so any other ``.<name>.*.tmp`` beside it is debris, as large as a
    checkpoint.
    """
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


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
