"""Prototypes of the loader changes that bench.py measures beside the library as it is.

Nothing here is imported by the library. Each class is a drop-in subclass of the
library's own, so ``bench.py`` can time "as is" and "proposed" on the same images in
one run; ``benchmarks/README.md`` lists the exact diffs these stand for.

CPU (``augment_backend='fast'``):

* decode JPEGs with ``cv2.imdecode`` (about 2.5x faster than PIL here and bit-identical
  on every image of the archive: both are libjpeg-turbo), falling back to PIL for
  anything that is not a complete 8-bit gray/RGB baseline JPEG (CMYK, PNG, truncated);
* resize with OpenCV (``INTER_LINEAR`` for bilinear upscaling, a cached exact PIL
  nearest map through ``cv2.remap``), and warp 4-channel images (OpenCV's bilinear
  ``warpAffine`` is vectorised for 1 and 4 channels, not 3);
* return a ``(3, S, S)`` view of the HWC array and stack HWC in collate (a memcpy, where
  the transposing stack cost more than the decode); the transpose happens on the
  device, fused with the float conversion;
* rescale in place (``x.float().mul_(rescale)``: no second 12 MB temporary per batch);
* ``cv2.setNumThreads(1)`` once at import, before OpenCV starts a thread pool, so the
  workers inherit it (see :func:`cv2_single_thread`).

GPU (``augment_backend='gpu', gpu_decode=True``), without any host-device sync per batch:

* the batch's JPEG bytes travel as one concatenated uint8 tensor plus lengths (one
  shared-memory segment and one pinned buffer per batch instead of one per image);
* the augmentation's ``affine_grid`` matrices are computed in the workers from the
  same ``draw_params(seed, key)`` and travel pinned, ``non_blocking``;
* the nearest resize runs once per batch with index tensors cached on the device.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, get_worker_info

from lightning_vgg.data.augment import keras_matrix, pil_nearest_indices, warp_batch, warp_cv2
from lightning_vgg.data.datamodule import SPLITS, CatsDogsDataModule
from lightning_vgg.data.dataset import ImageFiles, collate_skip_broken, draw_params
from lightning_vgg.data.decode import MAX_PIXELS, ImageDecodeError, load_rgb
from lightning_vgg.data.sampler import KerasBatchSampler

_CV2_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


# --------------------------------------------------------------------------- CPU path


def jpeg_header(data: bytes) -> tuple[int, int, int, int] | None:
    """``(height, width, components, precision)`` from a JPEG's SOF marker, or None.

    None also for data that is not a complete JPEG (no SOI/EOI: truncated files go to
    PIL, which reports them as the scan does).
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8 or data[-2:] != b"\xff\xd9":
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in _SOF:
            if i + 10 > n:
                return None
            prec = data[i + 4]
            h = int.from_bytes(data[i + 5 : i + 7], "big")
            w = int.from_bytes(data[i + 7 : i + 9], "big")
            return h, w, data[i + 9], prec
        if marker == 0xDA:  # scan data before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def decode_rgb_array(path: str) -> np.ndarray:
    """Decode to an ``H x W x 3`` uint8 RGB array, as ``load_rgb`` would.

    OpenCV for complete 8-bit gray/RGB JPEGs (bit-identical to PIL's libjpeg-turbo
    decode: checked on all 1,000 images of the mini archive by ``bench.py``), PIL's
    ``load_rgb`` for everything else, so errors and odd modes behave as before.

    Raises:
        ImageDecodeError: As ``load_rgb``.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ImageDecodeError(path, f"unreadable ({exc.strerror or exc})") from exc
    info = jpeg_header(data)
    if info is not None:
        h, w, comps, prec = info
        if comps in (1, 3) and prec == 8 and 0 < h * w <= MAX_PIXELS:
            arr = cv2.imdecode(np.frombuffer(data, np.uint8), _CV2_FLAGS)
            if arr is not None and arr.shape[:2] == (h, w):
                return arr
    return np.asarray(load_rgb(data if data else path))


@functools.lru_cache(maxsize=64)
def _nearest_maps(h: int, w: int, oh: int, ow: int) -> tuple[np.ndarray, np.ndarray]:
    """``cv2.remap`` maps that pick exactly PIL NEAREST's pixels."""
    rows = pil_nearest_indices(h, oh).astype(np.float32)
    cols = pil_nearest_indices(w, ow).astype(np.float32)
    return np.ascontiguousarray(np.broadcast_to(cols[None, :], (oh, ow))), np.ascontiguousarray(
        np.broadcast_to(rows[:, None], (oh, ow))
    )


def resize_nearest_cv2(arr: np.ndarray, size: int) -> np.ndarray:
    """PIL-exact NEAREST resize (the library's ``pil_nearest_indices``) via ``cv2.remap``."""
    h, w = arr.shape[:2]
    if (h, w) == (size, size):
        return arr
    mx, my = _nearest_maps(h, w, size, size)
    return cv2.remap(arr, mx, my, cv2.INTER_NEAREST)


class FastImageFiles(ImageFiles):
    """``ImageFiles`` with the proposed OpenCV fast path for ``backend='fast'``."""

    def load(self, index: int, key: int | None = None) -> torch.Tensor:
        if self.backend != "fast" or self.resize == "antialias":
            return super().load(index, key)
        arr = decode_rgb_array(self.paths[index])
        s = self.image_size
        h, w = arr.shape[:2]
        if self.augment:
            params = draw_params(self.cfg, self.seed, index if key is None else key)
            if self.resize == "nearest":
                arr = resize_nearest_cv2(arr, s)
            # 4 channels: OpenCV's bilinear warpAffine is vectorised for 4, not 3
            rgba = warp_cv2(cv2.cvtColor(arr, cv2.COLOR_RGB2RGBA), params, s)
            out = cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)  # contiguous HWC again
        elif (h, w) == (s, s):
            out = arr
        elif self.resize == "nearest":
            out = resize_nearest_cv2(arr, s)
        elif h <= s and w <= s:
            # upscaling: PIL's bilinear is the plain triangle filter here (<= 1 level off)
            out = cv2.resize(arr, (s, s), interpolation=cv2.INTER_LINEAR)
        else:
            return super().load(index, key)  # downscaling: keep PIL's antialiased bilinear
        # a (3, S, S) view of contiguous HWC memory: collate_hwc stacks it with one memcpy
        return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)


def collate_hwc(batch: list[Any]) -> Any:
    """``collate_skip_broken`` that stacks HWC images with a plain copy.

    Images that are ``(3, S, S)`` views of HWC memory (``FastImageFiles``) are stacked
    as ``(N, S, S, 3)`` and returned as its ``(N, 3, S, S)`` view (channels_last
    strides): no transposing copy in the workers (that copy cost more than the JPEG
    decode). It travels as uint8; ``on_after_batch_transfer`` makes it contiguous NCHW
    float32 in the same pass that converts it, on the training device.
    """
    good = [b for b in batch if b is not None]
    if not good:
        return None
    imgs = [b[0] for b in good]
    if not all(im.ndim == 3 and im.permute(1, 2, 0).is_contiguous() for im in imgs):
        return collate_skip_broken(batch)
    hwc = [im.permute(1, 2, 0) for im in imgs]
    out = None
    if get_worker_info() is not None:  # as default_collate: straight into shared memory
        numel = sum(x.numel() for x in hwc)
        storage = hwc[0]._typed_storage()._new_shared(numel, device=hwc[0].device)
        out = hwc[0].new(storage).resize_(len(hwc), *hwc[0].shape)
    x = torch.stack(hwc, 0, out=out).permute(0, 3, 1, 2)
    return [x, torch.tensor([b[1] for b in good]), torch.tensor([b[2] for b in good])]


def cv2_single_thread() -> None:
    """One OpenCV thread, set before OpenCV starts its thread pool.

    The library would call it at import (``augment.py``); here the data module calls it
    when built, so that bench.py can time the library as it is first. Set in the
    process that forks the DataLoader workers, they inherit it. Two reasons: two workers with a pool each fight over two cores; and a
    pthreads pool does not survive ``fork`` (a worker that calls
    ``cv2.setNumThreads(1)`` in ``worker_init_fn`` after the parent had used the pool
    hung once in this benchmark, blocked inside OpenCV).
    """
    cv2.setNumThreads(1)


# --------------------------------------------------------------------------- GPU path


def grid_theta(params_m: np.ndarray, size: int) -> np.ndarray:
    """``affine_grid`` theta for a Keras pixel matrix on a ``size x size`` image.

    The same algebra as ``augment.warp_matrices`` (pixel centres 0..size-1 to [-1, 1],
    then (row, col) to (x, y)), in float64 on the host.
    """
    h = w = oh = ow = size
    to_norm = np.array([[2 / (h - 1), 0, -1], [0, 2 / (w - 1), -1], [0, 0, 1]])
    from_norm = np.array(
        [[(oh - 1) / 2, 0, (oh - 1) / 2], [0, (ow - 1) / 2, (ow - 1) / 2], [0, 0, 1]]
    )
    theta = to_norm @ params_m @ from_norm
    return theta[[1, 0]][:, [1, 0, 2]]


class EncodedImageFiles(ImageFiles):
    """``ImageFiles(encoded=True)`` that also ships each image's warp as a grid theta."""

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        index, key = item if isinstance(item, tuple) else (item, item)
        try:
            data = np.fromfile(self.paths[index], dtype=np.uint8)
        except OSError as exc:
            warnings.warn(f"skipping unreadable image {self.paths[index]}: {exc}", stacklevel=2)
            return None
        if self.augment and self.backend == "gpu":
            m = keras_matrix(
                draw_params(self.cfg, self.seed, key), self.image_size, self.image_size
            )
            theta = grid_theta(m, self.image_size)
        else:
            theta = np.array([[1.0, 0, 0], [0, 1, 0]])
        return torch.from_numpy(data), self.labels[index], key, torch.from_numpy(theta).float()


def collate_encoded(batch: list[Any]) -> Any:
    """One concatenated byte tensor + lengths (one shared-memory segment per batch)."""
    good = [b for b in batch if b is not None]
    if not good:
        return None
    lengths = torch.tensor([len(b[0]) for b in good])
    return (
        torch.cat([b[0] for b in good]),
        lengths,
        torch.tensor([b[1] for b in good]),
        torch.tensor([b[2] for b in good]),
        torch.stack([b[3] for b in good]),
    )


@functools.lru_cache(maxsize=32)
def _device_indices(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(pil_nearest_indices(n_in, n_out)).to(device)


def decode_resize(
    chunks: list[torch.Tensor], device: torch.device, size: int
) -> tuple[torch.Tensor, list[int]]:
    """nvJPEG batch decode, then PIL-exact nearest resize once per distinct input size."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from lightning_vgg.data.gpu import decode_batch

    try:
        images = decode_jpeg(chunks, mode=ImageReadMode.RGB, device=device)
        kept = list(range(len(images)))
    except RuntimeError:  # an odd file: the library's per-image fallback
        return decode_batch(chunks, device, size)
    shapes = {tuple(im.shape[1:]) for im in images}
    if len(shapes) == 1:
        x = torch.stack(images)
        h, w = x.shape[2:]
        if (h, w) != (size, size):
            x = x.index_select(2, _device_indices(h, size, device))
            x = x.index_select(3, _device_indices(w, size, device))
        return x, kept
    out = []
    for im in images:
        h, w = im.shape[1:]
        if (h, w) != (size, size):
            im = im.index_select(1, _device_indices(h, size, device))
            im = im.index_select(2, _device_indices(w, size, device))
        out.append(im)
    return torch.stack(out), kept


class GpuProtoDataModule(CatsDogsDataModule):
    """``augment_backend='gpu', gpu_decode=True`` without host-device syncs per batch."""

    def _dataset(self, split: str) -> ImageFiles:
        rows = self.split_rows(split)
        hp = self.hparams
        return EncodedImageFiles(
            [r[0] for r in rows],
            [r[1] for r in rows],
            image_size=hp.image_size,
            augment=split == "train",
            cfg=self.augment_cfg,
            backend=hp.augment_backend,
            resize=hp.resize,
            seed=hp.seed,
            encoded=True,
        )

    def _loader(self, split: str) -> DataLoader:
        return _make_loader(self, split, collate_encoded, None)

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        if batch is None:
            return None
        data, lengths, y, keys, theta = batch
        chunks = list(torch.split(data, lengths.tolist()))  # lengths live on the host
        x, kept = decode_resize(chunks, torch.device(device), self.hparams.image_size)
        if not kept:
            return None
        if len(kept) != len(chunks):
            idx = torch.tensor(kept)
            y, keys, theta = y[idx], keys[idx], theta[idx]
        nb = {"device": device, "non_blocking": True}
        return x, y.to(**nb), keys.to(**nb), theta.to(**nb)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if batch is None:
            return None
        x, y, keys, theta = batch
        x = x.float()
        training = self.trainer is not None and self.trainer.training
        if training and self.hparams.augment_backend == "gpu":
            grid = F.affine_grid(theta, list(x.shape), align_corners=True)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return x * self.hparams.rescale, y, keys


class CpuProtoDataModule(CatsDogsDataModule):
    """``augment_backend='fast'`` with :class:`FastImageFiles` and one cv2 thread per worker."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cv2_single_thread()

    def _dataset(self, split: str) -> ImageFiles:
        rows = self.split_rows(split)
        hp = self.hparams
        return FastImageFiles(
            [r[0] for r in rows],
            [r[1] for r in rows],
            image_size=hp.image_size,
            augment=split == "train",
            cfg=self.augment_cfg,
            backend=hp.augment_backend,
            resize=hp.resize,
            seed=hp.seed,
            encoded=hp.gpu_decode,
        )

    def _loader(self, split: str) -> DataLoader:
        return _make_loader(self, split, collate_hwc, None)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The library's, with the rescale in place on the fresh float tensor."""
        if batch is None:
            return None
        x, y, keys = batch
        fresh = x.dtype != torch.float32
        # contiguous NCHW float32 in one pass: the HWC batches arrive channels_last, and
        # feeding channels_last to an NCHW model changes its numerics (the DDP-vs-one-
        # process test then drifts past 1e-4 on the CPU)
        x = x.to(torch.float32, memory_format=torch.contiguous_format)
        if (
            self.trainer is not None
            and self.trainer.training
            and self.hparams.augment_backend == "gpu"
        ):
            params = [
                draw_params(self.augment_cfg, self.hparams.seed, int(k)) for k in keys.tolist()
            ]
            x, fresh = warp_batch(x, params), True
        x = x.mul_(self.hparams.rescale) if fresh else x * self.hparams.rescale
        return x, y, keys


def _make_loader(dm: CatsDogsDataModule, split: str, collate: Any, init: Any) -> DataLoader:
    """The library's ``CatsDogsDataModule._loader`` with a collate and worker_init_fn."""
    hp = dm.hparams
    ds = dm._dataset(split)
    world, rank = 1, 0
    if dm.trainer is not None:
        world, rank = dm.trainer.world_size, dm.trainer.global_rank
    bs = hp.batch_size if split == "train" else (hp.eval_batch_size or hp.batch_size)
    steps = {"train": hp.train_steps_per_epoch, "val": hp.val_steps_per_epoch}.get(split)
    sampler = KerasBatchSampler(
        len(ds),
        bs,
        steps=steps,
        shuffle=split == "train" or steps is not None,
        seed=hp.seed + SPLITS.index(split),
        num_replicas=world,
        rank=rank,
    )
    workers = hp.num_workers
    pin = torch.cuda.is_available() if hp.pin_memory is None else hp.pin_memory
    return DataLoader(
        ds,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=hp.persistent_workers and workers > 0,
        prefetch_factor=hp.prefetch_factor if workers > 0 else None,
        collate_fn=collate,
        worker_init_fn=init if workers > 0 else None,
    )


def check_decode_identical(paths: list[str]) -> tuple[int, int]:
    """How many of ``paths`` decode differently with :func:`decode_rgb_array` than with PIL."""
    differ = 0
    for p in paths:
        a = decode_rgb_array(p)
        b = np.asarray(load_rgb(p))
        differ += int(a.shape != b.shape or not np.array_equal(a, b))
    return differ, len(paths)


class DevicePrefetcher:
    """Run ``transfer_batch_to_device`` + ``on_after_batch_transfer`` one batch ahead.

    A background thread decodes and warps batch k+1 on its own CUDA stream while the
    main thread's stream trains on batch k, so host-side work inside the decode (nvJPEG's
    Huffman stage runs on the CPU) overlaps the training step instead of adding to it.
    Measured by bench.py as ``proposed+thread``; inside Lightning this would be an
    iterable the data module returns, yielding batches that are already on the device.
    """

    def __init__(self, loader: Any, dm: CatsDogsDataModule, device: torch.device, depth: int = 2):
        import queue
        import threading

        self.loader, self.dm, self.device = loader, dm, device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
                for b in self.loader:
                    if self.stop.is_set():
                        return
                    b = self.dm.transfer_batch_to_device(b, self.device, 0)
                    b = self.dm.on_after_batch_transfer(b, 0)
                    event = None
                    if self.cuda:
                        event = torch.cuda.Event()
                        event.record(self.stream)
                    self.queue.put((b, event))
        except BaseException as exc:  # handed to the consumer
            self.error = exc
        self.queue.put(None)

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> Any:
        item = self.queue.get()
        if item is None:
            if self.error is not None:
                raise self.error
            raise StopIteration
        batch, event = item
        if event is None:
            return batch
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in batch or ():
            if isinstance(t, torch.Tensor) and t.is_cuda:
                t.record_stream(current)  # allocated on the side stream, used on this one
        return batch

    def close(self) -> None:
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.1)
            except Exception:
                continue


__all__ = [
    "CpuProtoDataModule",
    "DevicePrefetcher",
    "EncodedImageFiles",
    "FastImageFiles",
    "GpuProtoDataModule",
    "check_decode_identical",
    "collate_encoded",
    "collate_hwc",
    "cv2_single_thread",
    "decode_resize",
    "decode_rgb_array",
    "grid_theta",
    "jpeg_header",
    "resize_nearest_cv2",
]
