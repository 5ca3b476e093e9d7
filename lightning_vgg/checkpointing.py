"""Checkpoint plumbing: atomic saves, run-directory lookup and architecture checks."""

from __future__ import annotations

import contextlib
import glob
import pickle
import re
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
        target = Path(path)
        with atomic_open(target, "wb") as handle:
            # Straight into the temporary file: serialising a seed-size checkpoint
            # (0.5-1 GB) into memory first made a second full copy, ~40% of a save.
            sink = _KeepWriteError(handle)
            try:
                torch.save(checkpoint, sink)
            except Exception:
                if sink.error is None:
                    raise
                # torch reports a failed write as an opaque RuntimeError; the OSError
                # (ENOSPC, EIO...) is what atomic_open explains, naming the file
                raise sink.error from None
        _remove_leftovers(target)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Resume and evaluation loads: never unpickle anything but tensors and plain data.

        ``weights_only=None`` would leave the choice to torch's default and its
        environment overrides; a checkpoint that needs more is refused with one line.
        """
        if weights_only is False:
            raise UserError("lightning_vgg loads checkpoints with weights_only=True only")
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return read_checkpoint(path, map_location or "cpu")


class _KeepWriteError:
    """A file to ``torch.save`` into that remembers the ``OSError`` of a failed write."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self._handle.flush()


def _remove_leftovers(target: Path) -> None:
    """Delete temporary files of earlier saves of ``target`` that were killed mid-write.

    Only one process saves a given checkpoint at a time (rank 0, one save after
    another), so any other ``.<name>.*.tmp`` beside it is debris, as large as a
    checkpoint.
    """
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint on the CPU without running any code stored in it.

    Checkpoints are what people download and share, and a pickle can call any
    function while it loads. ``weights_only=True`` lets torch's restricted unpickler
    build tensors and plain data only (our checkpoints hold nothing else); a file
    that names any other object is refused before that object is created.

    Raises:
        UserError: The file is missing, truncated, not a checkpoint, or holds
            Python objects beyond tensors and plain data.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True, mmap=_is_zip(p))
    except pickle.UnpicklingError as exc:
        found = _UNSAFE.search(str(exc))
        if found:  # torch's restricted unpickler met an object it will not build
            raise UserError(unsafe_checkpoint_message(p, found.group(1))) from None
        raise UserError(f"cannot read checkpoint {p}: not a readable checkpoint") from None
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {p}: {_first_line(exc)}") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{p} is not a checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    return ckpt


#: How torch's restricted unpickler names an object it refused to build.
_UNSAFE = re.compile(r"(?:unsupported GLOBAL|Unsupported global:? ?(?:GLOBAL)?) ?([\w.]+)")


def unsafe_checkpoint_message(path: Path, what: str) -> str:
    """One line for a checkpoint that the restricted unpickler refused."""
    return (
        f"refusing checkpoint {path}: it holds a Python object ({what}) beyond tensors and "
        "plain data, which loading would have to run; it was not loaded, and nothing in it ran"
    )


def _is_zip(path: Path) -> bool:
    """torch's zip format can be memory-mapped (only the tensors read are paged in)."""
    with path.open("rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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


#: Data settings that decide which image lands in which split (and which train).
SPLIT_KEYS = ("source", "split_sizes", "split_file", "seed", "subset_per_class", "flip_labels")


def _same_setting(key: str, old: Any, new: Any) -> bool:
    if key == "split_sizes" and old is not None and new is not None:
        return [float(v) for v in old] == [float(v) for v in new]
    if key in ("source", "split_file") and old is not None and new is not None:
        a, b = Path(str(old)), Path(str(new))
        if "://" not in str(old) and a.exists() and b.exists():
            return a.resolve() == b.resolve()
    return old == new


def check_split_settings(
    ckpt_data: Mapping[str, Any] | None, data: Mapping[str, Any], path: str | Path
) -> None:
    """Refuse to resume a run under data settings that would give it another split.

    A resume with another ``data.seed`` used to rewrite the run's ``split.csv``, so
    that ``test`` then scored images the model had trained on.
    """
    if not isinstance(ckpt_data, Mapping):
        return
    diffs = [
        f"{k}={ckpt_data.get(k)!r} in the checkpoint but {data.get(k)!r} now"
        for k in SPLIT_KEYS
        if k in ckpt_data and k in data and not _same_setting(k, ckpt_data[k], data[k])
    ]
    if diffs:
        raise UserError(
            f"cannot resume {path} with other data settings (the split would change): "
            + "; ".join(diffs)
            + ". Resume with the run's settings, or start a new run without --ckpt_path"
        )


def run_dir_of_checkpoint(path: str | Path) -> Path:
    """``runs/x/version_0/checkpoints/best.ckpt`` -> ``runs/x/version_0``."""
    p = Path(path).resolve()
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def find_last_checkpoint(save_dir: str | Path, name: str) -> Path | None:
    """The newest ``last.ckpt`` among the versions of a run name, if any."""
    root = Path(save_dir) / name
    found = sorted(root.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None
