"""Batch decoding on the training device: nvJPEG through torchvision, then Keras's nearest resize."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from lightning_vgg.data.augment import pil_nearest_indices
from lightning_vgg.data.decode import ImageDecodeError, load_rgb


@functools.lru_cache(maxsize=64)
def _indices(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    # cached: building them per image meant two blocking host-to-device copies each
    return torch.from_numpy(pil_nearest_indices(n_in, n_out)).to(device)


def resize_nearest(img: torch.Tensor, size: int) -> torch.Tensor:
    """PIL-exact nearest resize of ``(..., h, w)`` tensors, on their own device."""
    h, w = img.shape[-2:]
    if (h, w) == (size, size):
        return img
    rows = _indices(h, size, img.device)
    cols = _indices(w, size, img.device)
    return img.index_select(-2, rows).index_select(-1, cols)


def _cpu_decode(data: torch.Tensor) -> torch.Tensor:
    arr = np.asarray(load_rgb(data.numpy().tobytes()), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def decode_batch(
    encoded: Sequence[torch.Tensor], device: torch.device | str, size: int
) -> tuple[torch.Tensor, list[int]]:
    """Decode JPEG byte tensors on ``device`` and resize them to ``size`` (nearest).

    The whole list goes to nvJPEG in one call on CUDA (libjpeg-turbo on the CPU).
    Files it cannot take (PNG named ``.jpg``, CMYK, progressive oddities) fall back
    to the CPU decoder one by one, so a batch never fails for one odd file.

    Returns:
        ``(M, 3, size, size)`` uint8 on ``device``, and the indices of the ``M``
        inputs that decoded (unreadable ones are dropped with a warning).
    """
    device = torch.device(device)
    try:
        images = list(decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=device))
        kept = list(range(len(images)))
    except RuntimeError:
        images, kept, bad = [], [], []
        for i, data in enumerate(encoded):
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                try:
                    images.append(_cpu_decode(data).to(device))
                except ImageDecodeError as exc:
                    bad.append(exc.reason)
                    continue
            kept.append(i)
        if bad:
            warnings.warn(
                f"skipped {len(bad)} undecodable image(s) in a batch: {bad}", stacklevel=2
            )
    if not images:
        return torch.empty(0, 3, size, size, dtype=torch.uint8, device=device), []
    if len({tuple(im.shape) for im in images}) == 1:  # one resize for the whole batch
        return resize_nearest(torch.stack(images), size), kept
    return torch.stack([resize_nearest(img, size) for img in images]), kept
