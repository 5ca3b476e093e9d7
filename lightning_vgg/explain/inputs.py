"""The images to explain: files and folders expanded, decoded into model inputs, failures listed."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_vgg.data.decode import IMAGE_SUFFIXES, ImageDecodeError
from lightning_vgg.data.preprocess import Preprocess
from lightning_vgg.errors import UserError
from lightning_vgg.labels import label_from_path

__all__ = ["collect_images", "load_inputs"]

#: One readable image: its path, its model input ``(3, S, S)`` and its label, if known.
Loaded = tuple[Path, torch.Tensor, int | None]


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into a list of image files.

    Folders contribute their images sorted; a file named twice (on its own and inside
    a folder given too) is kept once, where it first appears.

    Raises:
        UserError: A path does not exist, or a folder holds no images.
    """
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise UserError(
                    f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in folder {p}"
                )
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"image not found: {p}")
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def load_inputs(
    paths: Sequence[Path], pre: Preprocess, labels: Sequence[int | None] | None = None
) -> tuple[list[Loaded], list[tuple[str, str]]]:
    """Model inputs (:meth:`Preprocess.load`) of the readable images, and the reasons
    for the others (also given in one warning).

    ``labels`` default to what each path says (:func:`~lightning_vgg.labels.label_from_path`).
    """
    ok: list[Loaded] = []
    skipped: list[tuple[str, str]] = []
    for i, p in enumerate(paths):
        try:
            x = pre.load(p)
        except (ImageDecodeError, OSError) as exc:
            skipped.append((str(p), getattr(exc, "reason", str(exc))))
            continue
        ok.append((p, x, labels[i] if labels is not None else label_from_path(p)))
    if skipped:
        listed = "; ".join(f"{p} ({r})" for p, r in skipped[:20])
        more = f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        warnings.warn(f"skipped {len(skipped)} unreadable image(s): {listed}{more}", stacklevel=2)
    return ok, skipped
