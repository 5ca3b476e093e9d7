"""Map-style dataset of labelled image files: decode, resize and (on CPU) augment."""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from lightning_vgg.data.augment import (
    AffineParams,
    AugmentConfig,
    grid_theta,
    pil_nearest_indices,
    resize_nearest_pil,
    sample_params,
    warp_batch,
    warp_cv2,
)
from lightning_vgg.data.batches import SlotBatch, batch_storage
from lightning_vgg.data.decode import MAX_PIXELS, ImageDecodeError, load_rgb
from lightning_vgg.data.opencv import use_one_thread

#: ``keras``: PIL nearest resize then the exact Keras warp (float, per image).
#: ``fast``: one OpenCV warpAffine fusing resize and warp (bilinear, fixed point).
#: ``gpu``: resize only here; the warp runs batched on the device after transfer.
AugmentBackend = Literal["keras", "fast", "gpu"]
Sample = tuple  # (image or bytes, label, draw key[, grid theta on the gpu backend])


class EncodedBatch(NamedTuple):
    """A batch of undecoded files: every file's bytes in one tensor (one shared-memory
    segment and one pinned buffer per batch, not one per image)."""

    data: torch.Tensor  # uint8, the files one after another
    lengths: torch.Tensor  # bytes per file
    labels: torch.Tensor
    keys: torch.Tensor
    theta: torch.Tensor | None  # (N, 2, 3) warps when training on the gpu backend


_CV2_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_header(data: bytes) -> tuple[int, int, int, int] | None:
    """``(height, width, components, precision)`` from a JPEG's frame header, or None.

    None also for anything that is not a complete JPEG (no SOI or no EOI marker), so
    truncated files go to PIL, which names the problem as the scan does.
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
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length field
            i += 2
        elif marker in _SOF:
            if i + 10 > n:
                return None
            h = int.from_bytes(data[i + 5 : i + 7], "big")
            w = int.from_bytes(data[i + 7 : i + 9], "big")
            return h, w, data[i + 9], data[i + 4]
        elif marker == 0xDA:  # scan data before a frame header
            return None
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def decode_rgb_array(path: str) -> np.ndarray:
    """Decode an image file to ``H x W x 3`` uint8 RGB, as ``load_rgb`` does, faster.

    Complete 8-bit gray/RGB JPEGs go to ``cv2.imdecode`` (libjpeg-turbo like PIL, and
    bit-identical to it on the real archive, about 2.5x faster); everything else (CMYK,
    PNG, truncated or huge files) to :func:`load_rgb`, so odd files and errors behave
    exactly as before. EXIF orientation is ignored, as Keras and ``load_rgb`` do.

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
        h, w, comps, precision = info
        if comps in (1, 3) and precision == 8 and 0 < h * w <= MAX_PIXELS:
            use_one_thread()
            arr = cv2.imdecode(np.frombuffer(data, np.uint8), _CV2_FLAGS)
            if arr is not None and arr.shape[:2] == (h, w):
                return arr
    return np.asarray(load_rgb(path))


@functools.lru_cache(maxsize=64)
def _nearest_maps(h: int, w: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rows = pil_nearest_indices(h, size).astype(np.float32)
    cols = pil_nearest_indices(w, size).astype(np.float32)
    return (
        np.ascontiguousarray(np.broadcast_to(cols[None, :], (size, size))),
        np.ascontiguousarray(np.broadcast_to(rows[:, None], (size, size))),
    )


def resize_nearest_array(arr: np.ndarray, size: int, dst: np.ndarray | None = None) -> np.ndarray:
    """PIL-exact NEAREST resize of an ``H x W x C`` array (``cv2.remap`` of PIL's picks),
    into ``dst`` where it fits (use the return value)."""
    h, w = arr.shape[:2]
    if (h, w) == (size, size):
        return arr
    mx, my = _nearest_maps(h, w, size)
    use_one_thread()
    return cv2.remap(arr, mx, my, cv2.INTER_NEAREST, dst=dst)


class _Scratch(threading.local):
    """Reusable uint8 buffers for the batched fast path (one set per thread).

    A fresh 150-200 KB array per image and step (resize output, RGBA warp output) is
    above glibc's mmap threshold: page faults on every image, about a third of the
    cost of the resize itself. A buffer is valid until the next call that asks for it.
    """

    def __init__(self) -> None:
        self.bufs: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}

    def __call__(self, name: str, *shape: int) -> np.ndarray:
        key = (name, shape)
        buf = self.bufs.get(key)
        if buf is None:
            if len(self.bufs) >= 16:  # many source sizes (the real archive): start over
                self.bufs.clear()
            buf = self.bufs[key] = np.empty(shape, np.uint8)
        return buf


_SCRATCH = _Scratch()


def _no_buffer(name: str, *shape: int) -> None:
    return None


ResizeMode = Literal["nearest", "bilinear", "antialias"]


def resize_pil(img: Any, size: int, resize: ResizeMode = "nearest") -> Any:
    """Resize a PIL image to ``size x size``: PIL ``NEAREST`` as Keras, ``BILINEAR`` or
    ``LANCZOS`` (``antialias``); an image already that size is returned as it is."""
    from PIL import Image

    if img.size == (size, size):
        return img
    if resize == "nearest":
        return resize_nearest_pil(img, size)
    resample = Image.BILINEAR if resize == "bilinear" else Image.LANCZOS
    return img.resize((size, size), resample=resample, reducing_gap=None)


def _load_fast(
    path: str,
    size: int,
    resize: ResizeMode,
    params: AffineParams | None,
    scratch: _Scratch | None = None,
) -> tuple[np.ndarray, bool]:
    """The ``fast`` backend in OpenCV: ``(contiguous S x S x 3 uint8, True)``, or
    ``(decoded image, False)`` for the one case it leaves to PIL's resize (a
    downscaling eval resize: PIL's bilinear and Lanczos antialias, OpenCV's
    ``INTER_LINEAR`` does not).

    With ``scratch`` (the batched path, :meth:`ImageFiles.__getitems__`) the steps
    write into its reusable buffers, so the result is only valid until the next call,
    and an augmented image comes back as the warp's ``S x S x 4`` RGBA (its first
    three channels are the image; the caller splits them out). Same bytes either way.
    """
    use_one_thread()
    buf = _no_buffer if scratch is None else scratch
    arr = decode_rgb_array(path)
    h, w = arr.shape[:2]
    if params is not None:
        if resize == "nearest":  # Keras: PIL nearest resize, then the warp
            arr = resize_nearest_array(arr, size, buf("rgb", size, size, 3))
        # else one bilinear warp straight from the source (fuses resize and warp).
        # Four channels: OpenCV's bilinear warpAffine is vectorised for 4, not 3.
        rgba_in = cv2.cvtColor(arr, cv2.COLOR_RGB2RGBA, dst=buf("rgba_in", *arr.shape[:2], 4))
        rgba = warp_cv2(rgba_in, params, size, buf("rgba", size, size, 4))
        if scratch is not None:
            return rgba, True
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB), True
    if (h, w) == (size, size):
        return np.ascontiguousarray(arr), True
    if resize == "nearest":
        return resize_nearest_array(arr, size, buf("rgb", size, size, 3)), True
    if resize == "bilinear" and h <= size and w <= size:
        # upscaling: PIL's bilinear is the plain triangle filter (<= 1 level apart)
        out = buf("rgb", size, size, 3)
        return cv2.resize(arr, (size, size), dst=out, interpolation=cv2.INTER_LINEAR), True
    return arr, False


def _split_into(src: np.ndarray, out: np.ndarray, scratch: _Scratch) -> None:
    """Write the first three channels of ``src`` (``S x S x C``, C = 3 or 4) into the
    planes of ``out`` (``3 x S x S`` uint8, contiguous) with one ``cv2.split``: a
    vectorised deinterleave, about 10 us for 224 x 224 (numpy's transposing copy is 5x
    that)."""
    planes = [out[0], out[1], out[2]]
    if src.ndim == 3 and src.shape[2] == 4:
        planes.append(scratch("alpha", *src.shape[:2]))
    if src.ndim == 3 and src.shape[2] == len(planes) and src.shape[:2] == out.shape[1:]:
        written = cv2.split(np.ascontiguousarray(src), planes)
        # OpenCV hands back the very arrays it wrote into
        if len(written) == len(planes) and all(
            a is b for a, b in zip(written, planes, strict=False)
        ):
            return
    # OpenCV allocated new planes instead of writing into the slots
    np.copyto(out, src[..., :3].transpose(2, 0, 1))


def _load_fast_planes(
    path: str,
    size: int,
    resize: ResizeMode,
    params: AffineParams | None,
    out: np.ndarray,
    scratch: _Scratch,
) -> None:
    """Write one image of the ``fast`` backend into ``out`` (``3 x S x S`` uint8): the
    bytes of ``ImageFiles.load`` (or :func:`load_eval_image`), already as planes."""
    arr, done = _load_fast(path, size, resize, params, scratch)
    if not done:  # as load_eval_image: PIL's resize
        from PIL import Image

        arr = np.asarray(resize_pil(Image.fromarray(arr), size, resize), dtype=np.uint8)
    _split_into(arr, out, scratch)


def load_eval_image(
    path: str | Path, size: int, resize: ResizeMode = "nearest", backend: AugmentBackend = "keras"
) -> torch.Tensor:
    """One image file as the model's evaluation input, before rescaling: decode and resize.

    The single definition of "what the model sees" outside training: the val/test/
    predict datasets (:class:`ImageFiles` without augmentation) and
    :class:`~lightning_vgg.data.preprocess.Preprocess` (``explain``, ``compare``, the
    probe images of the visualisation callbacks, the misclassification gallery) all
    call it, so they cannot drift apart. The ``fast`` backend decodes and resizes
    with OpenCV where that is PIL-exact (nearest, bilinear upscaling within one
    level); every other case uses PIL (:func:`~lightning_vgg.data.decode.load_rgb`,
    :func:`resize_pil`).

    Returns:
        ``(3, S, S)`` uint8; on the ``fast`` backend a view of HWC memory.

    Raises:
        ImageDecodeError: The file cannot be decoded.
    """
    path = str(path)
    if backend == "fast":
        arr, done = _load_fast(path, size, resize, None)
        if done:
            return torch.from_numpy(arr).permute(2, 0, 1)
        from PIL import Image

        img = Image.fromarray(arr)
    else:
        img = load_rgb(path)
    img = resize_pil(img, size, resize)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


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
        resize: ResizeMode = "nearest",
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
        use_one_thread()  # in the parent, so forked loader workers start with it set

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, key: int | None = None) -> torch.Tensor:
        """Decode, resize and (if training on CPU) augment one image.

        Without augmentation this is :func:`load_eval_image`, the one function that
        evaluation, ``predict``, the probes and ``explain`` all go through.

        Returns:
            ``(3, S, S)`` uint8; on the ``fast`` backend a view of HWC memory, which
            :func:`collate_skip_broken` splits into the planes of a contiguous batch.

        Raises:
            ImageDecodeError: The file can no longer be decoded.
        """
        cpu_aug = self.augment and self.backend != "gpu"
        if not cpu_aug:
            return load_eval_image(self.paths[index], self.image_size, self.resize, self.backend)
        params = draw_params(self.cfg, self.seed, index if key is None else key)
        if self.backend == "fast":
            return torch.from_numpy(
                _load_fast(self.paths[index], self.image_size, self.resize, params)[0]
            ).permute(2, 0, 1)
        img = resize_pil(load_rgb(self.paths[index]), self.image_size, self.resize)
        chw = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        # Keras warps in float32 and never rounds; keep that for the exact path.
        return warp_batch(chw[None].float(), [params])[0]

    def __getitem__(self, item: int | tuple[int, int]) -> Sample | None:
        index, key = item if isinstance(item, tuple) else (item, item)
        try:
            if self.encoded:
                # raw file bytes; decoded in batches on the training device
                x = torch.from_numpy(np.fromfile(self.paths[index], dtype=np.uint8))
            else:
                x = self.load(index, key)
        except (ImageDecodeError, OSError) as exc:
            warnings.warn(f"skipping unreadable image {self.paths[index]}: {exc}", stacklevel=2)
            return None
        if self.augment and self.backend == "gpu":
            # the warp is drawn here, in the workers; the device only resamples
            theta = grid_theta(draw_params(self.cfg, self.seed, key), self.image_size)
            return x, self.labels[index], key, torch.from_numpy(theta)
        return x, self.labels[index], key

    def __getitems__(self, items: Sequence[int | tuple[int, int]]) -> list[Sample | None]:
        """A whole batch; the ``DataLoader`` calls this instead of ``__getitem__`` per item.

        On the ``fast`` backend every image is decoded, resized or augmented and
        written straight into its slot of one contiguous ``(N, 3, S, S)`` uint8 batch
        (in shared memory inside a loader worker) through reusable buffers: no array
        per image and step, and :func:`collate_skip_broken` has nothing left to copy.
        The values are :meth:`load`'s. Other backends: ``__getitem__`` per item.
        """
        if self.encoded or self.backend != "fast" or not items:
            return [self[item] for item in items]
        slots = SlotBatch.allocate(len(items), self.image_size)
        out = slots.x.numpy()
        for i, item in enumerate(items):
            index, key = item if isinstance(item, tuple) else (item, item)
            params = draw_params(self.cfg, self.seed, key) if self.augment else None
            try:
                _load_fast_planes(
                    self.paths[index], self.image_size, self.resize, params, out[i], _SCRATCH
                )
            except (ImageDecodeError, OSError) as exc:
                warnings.warn(f"skipping unreadable image {self.paths[index]}: {exc}", stacklevel=2)
                slots.append(None)
                continue
            slots.append((slots.x[i], self.labels[index], key))
        return slots


def collate_skip_broken(batch: list[Sample | None]) -> list[torch.Tensor] | None:
    """Collate, dropping samples that failed to load; ``None`` if none are left.

    The ``fast`` backend's batches (from :meth:`ImageFiles.__getitems__` or of HWC
    images) are contiguous ``(N, 3, S, S)`` uint8 whose labels and keys share the
    images' storage; ``CatsDogsDataModule.on_after_batch_transfer`` copies those two
    out, so that keeping them does not keep the batch alive.
    """
    if isinstance(batch, SlotBatch):
        return batch.collate()
    good = [b for b in batch if b is not None]
    if not good:
        return None
    if good[0][0].ndim == 1:  # encoded bytes of different lengths
        return EncodedBatch(
            torch.cat([b[0] for b in good]),
            torch.tensor([len(b[0]) for b in good]),
            torch.tensor([b[1] for b in good]),
            torch.tensor([b[2] for b in good]),
            torch.stack([b[3] for b in good]) if len(good[0]) > 3 else None,
        )
    imgs = [b[0] for b in good]
    if all(
        im.ndim == 3 and not im.is_contiguous() and im.permute(1, 2, 0).is_contiguous()
        for im in imgs
    ):
        return _collate_hwc(imgs, good)
    return default_collate(good)


def _collate_hwc(imgs: list[torch.Tensor], good: list[Sample]) -> list[torch.Tensor]:
    """Batch ``(3, S, S)`` views of HWC images (``ImageFiles.load`` of the ``fast``
    backend) as contiguous ``(N, 3, S, S)`` uint8: each image split into its planes
    (:func:`_split_into`), labels and keys in the same storage (:func:`~lightning_vgg.data.batches.batch_storage`).
    The bytes of ``torch.stack(imgs)``, laid out so that the float conversion in the
    main process reads and writes in order (a transposing conversion cost about 4x).
    The ``DataLoader`` takes :meth:`ImageFiles.__getitems__` instead; this is for
    lists of samples collated by hand."""
    c, h, w = imgs[0].shape
    x, ints = batch_storage(len(imgs), c, h, w)
    ints[0] = torch.tensor([b[1] for b in good])
    ints[1] = torch.tensor([b[2] for b in good])
    out = x.numpy()
    use_one_thread()
    for i, im in enumerate(imgs):
        _split_into(im.permute(1, 2, 0).numpy(), out[i], _SCRATCH)
    rest = [ints[0], ints[1]]
    if len(good[0]) > 3:
        rest.append(torch.stack([b[3] for b in good]))
    return [x, *rest]
