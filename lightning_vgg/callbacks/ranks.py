"""Where a run writes and who writes it: run folders, the device name, gathering across DDP ranks."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger


def device_name(trainer: pl.Trainer) -> str:
    """A human name for the accelerator, recorded next to every result."""
    root = trainer.strategy.root_device
    if root.type == "cuda":
        return torch.cuda.get_device_name(root)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def local_log_dir(trainer: pl.Trainer) -> str | None:
    """``trainer.log_dir`` without its broadcast, for code that only rank 0 runs.

    ``Trainer.log_dir`` is a collective under DDP (it broadcasts rank 0's directory):
    called on rank 0 alone, the other ranks never join and the run hangs. On rank 0
    this is the same directory.
    """
    logger = trainer.logger
    if logger is None:
        return trainer.default_root_dir
    if isinstance(logger, (TensorBoardLogger, CSVLogger)):
        return logger.log_dir
    return logger.save_dir


def gather_to_all(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order; ``[obj]`` in a single process.

    A collective under DDP: every rank must call it, at the same point. Objects are
    pickled, so shares of different lengths (a test split that does not divide by the
    number of ranks) gather as they are, with no padding to strip.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_dir_of(trainer: pl.Trainer) -> Path | None:
    """The run directory: where the checkpoint came from, else the logger's directory."""
    ckpt = trainer.ckpt_path
    if ckpt:
        p = Path(ckpt).resolve()
        if p.parent.name == "checkpoints":
            return p.parent.parent
    log_dir = local_log_dir(trainer)
    return Path(log_dir) if log_dir else None
