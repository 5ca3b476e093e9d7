"""Map-style dataset of labelled image files: decode, resize and (on CPU) augment."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from lightning_vgg.data.augment import (
    AffineParams,
    AugmentConfig,
    resize_nearest_pil,
    sample_params,
    warp_batch,
    warp_cv2,
)
from lightning_vgg.data.decode import ImageDecodeError, load_rgb

#: ``keras``: PIL nearest resize then the exact Keras warp (float, per image).
#: ``fast``: one OpenCV warpAffine fusing resize and warp (bilinear, fixed point).
#: ``gpu``: resize only here; the warp runs batched on the device after transfer.
AugmentBackend = Literal["keras", "fast", "gpu"]
Sample = tuple[torch.Tensor, int, int]


def draw_params(cfg: AugmentConfig, seed: int, key: int) -> AffineParams:
    """Augmentation parameters as a pure function of (seed, draw key).

    Workers, resumes and DDP ranks then all draw the same parameters for the same
    position of the Keras batch stream.
    """
    return sample_params(cfg, np.random.default_rng([seed, key]))


class ImageFiles(Dataset[Sample | None]):
    """Labelled image files as uint8 ``(3, S, S)`` tensors.

    Items are requested as ``(index, draw_key)`` pairs (see ``KerasBatchSampler``) or
    plain indices. Rescaling to [0, 1] happens after transfer to the device, so
    batches travel as uint8 (a quarter of the bytes); only the exact-Keras augmented
    path returns float32 on the 0-255 scale, because Keras never rounds.

    Args:
        paths: Image files.
        labels: 0 = cat, 1 = dog.
        image_size: Output side ``S``.
        augment: Apply the Keras training augmentation.
        cfg: Augmentation ranges.
        backend: Where and how to resize/augment (see ``AugmentBackend``).
        resize: ``nearest`` as Keras's ``flow_from_directory``; ``bilinear`` and
            ``antialias`` are smoother options.
        seed: Base seed of the augmentation draws.
        encoded: Return the file's bytes instead (decoded later on the device, see
            :mod:`lightning_vgg.data.gpu`).
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int],
        image_size: int,
        augment: bool = False,
        cfg: AugmentConfig | None = None,
        backend: AugmentBackend = "keras",
        resize: Literal["nearest", "bilinear", "antialias"] = "nearest",
        seed: int = 0,
        encoded: bool = False,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError("paths and labels differ in length")
        self.paths = [str(p) for p in paths]
        self.labels = [int(v) for v in labels]
        self.image_size = image_size
        self.augment = augment
        self.cfg = cfg or AugmentConfig()
        self.backend = backend
        self.resize = resize
        self.seed = seed
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.paths)

    def _resize(self, img):
        from PIL import Image

        s = self.image_size
        if img.size == (s, s):
            return img
        if self.resize == "nearest":
            return resize_nearest_pil(img, s)
        resample = Image.BILINEAR if self.resize == "bilinear" else Image.LANCZOS
        return img.resize((s, s), resample=resample, reducing_gap=None)

    def load(self, index: int, key: int | None = None) -> torch.Tensor:
        """Decode, resize and (if training on CPU) augment one image.

        Raises:
            ImageDecodeError: The file can no longer be decoded.
        """
        img = load_rgb(self.paths[index])
        s = self.image_size
        cpu_aug = self.augment and self.backend != "gpu"
        params = (
            draw_params(self.cfg, self.seed, index if key is None else key) if cpu_aug else None
        )
        if params is not None and self.backend == "fast" and self.resize != "nearest":
            arr = warp_cv2(np.asarray(img), params, s)
            return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
        img = self._resize(img)
        chw = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        if params is None:
            return chw
        if self.backend == "fast":
            arr = warp_cv2(np.asarray(img), params, s)
            return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
        # Keras warps in float32 and never rounds; keep that for the exact path.
        return warp_batch(chw[None].float(), [params])[0]

    def __getitem__(self, item: int | tuple[int, int]) -> Sample | None:
        index, key = item if isinstance(item, tuple) else (item, item)
        try:
            if self.encoded:
                # raw file bytes; decoded in batches on the training device
                data = Path(self.paths[index]).read_bytes()
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), self.labels[index], key
            x = self.load(index, key)
        except (ImageDecodeError, OSError) as exc:
            warnings.warn(f"skipping unreadable image {self.paths[index]}: {exc}", stacklevel=2)
            return None
        return x, self.labels[index], key


def collate_skip_broken(batch: list[Sample | None]) -> list[torch.Tensor] | None:
    """Collate, dropping samples that failed to load; ``None`` if none are left."""
    good = [b for b in batch if b is not None]
    if not good:
        return None
    if good[0][0].ndim == 1:  # encoded bytes of different lengths: keep a list
        return [
            [b[0] for b in good],
            torch.tensor([b[1] for b in good]),
            torch.tensor([b[2] for b in good]),
        ]
    return default_collate(good)
