"""Keras ``ImageDataGenerator`` augmentation (rotation, shear, zoom, flip) as pure functions.

The seed experiment trains with::

    ImageDataGenerator(rotation_range=40, shear_range=0.2, zoom_range=0.2,
                       horizontal_flip=True, rescale=1/255, fill_mode="nearest")
    .flow_from_directory(target_size=(224, 224))

Everything here reproduces Keras 3's ``keras.src.legacy.preprocessing.image`` exactly,
quirks included, so a run here and a run there see the same distribution of images:

* ``shear_range`` is in **degrees** (so ``0.2`` is a barely visible 0.2°), unlike
  ``zoom_range``, which is a fraction.
* ``zx`` and ``zy`` are drawn independently, so zoom also stretches the aspect ratio.
* The matrix is built in (x, y) order, centred at ``(h/2 - 0.5, w/2 - 0.5)`` and then
  has its axes swapped for numpy's (row, col) order. The centre is swapped too, so a
  non-square image is rotated about ``(row=(w-1)/2, col=(h-1)/2)``, not its real centre.
* The warp is ``scipy.ndimage.affine_transform(order=1, mode="nearest")``: bilinear with
  clamped coordinates, i.e. ``grid_sample(padding_mode="border", align_corners=True)``.
* Keras flips *after* warping, which equals one warp with the flip folded in.
* ``flow_from_directory`` resizes with PIL ``NEAREST`` before any of this.

Matrices here map an output pixel's ``(row, col)`` to the input pixel it samples,
pixel centres on integers: ``in = M[:2, :2] @ out + M[:2, 2]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lightning_vgg.data.opencv import use_one_thread
from lightning_vgg.errors import UserError

ResizeMode = Literal["nearest", "bilinear"]


@dataclass(frozen=True)
class AffineParams:
    """One image's augmentation, in Keras's own units.

    Attributes:
        theta: Rotation in degrees (Keras ``theta``).
        shear: Shear angle in degrees (Keras ``shear``; not a fraction).
        zx: Keras ``zx``; below 1 zooms in. It scales columns (Keras's axis swap).
        zy: Keras ``zy``; scales rows.
        flip: Horizontal flip, applied after the warp as Keras does.
    """

    theta: float = 0.0
    shear: float = 0.0
    zx: float = 1.0
    zy: float = 1.0
    flip: bool = False

    def as_keras(self) -> dict[str, float | bool]:
        """The ``transform_parameters`` dict ``ImageDataGenerator.apply_transform`` takes."""
        return {
            "theta": self.theta,
            "shear": self.shear,
            "zx": self.zx,
            "zy": self.zy,
            "flip_horizontal": self.flip,
        }


@dataclass(frozen=True)
class AugmentConfig:
    """The augmentation ranges, with the seed experiment's values as defaults.

    Attributes:
        rotation_range: Degrees; theta is uniform in ``[-r, r]``.
        shear_range: Degrees (Keras semantics); shear is uniform in ``[-s, s]``.
        zoom_range: ``(lo, hi)`` for ``zx`` and ``zy`` each; a float ``z`` means
            ``(1 - z, 1 + z)`` as in Keras. Stored normalised to a float pair.
        horizontal_flip: Flip half of the images left-right.
    """

    rotation_range: float = 40.0
    shear_range: float = 0.2
    zoom_range: float | tuple[float, float] = (0.8, 1.2)
    horizontal_flip: bool = True

    def __post_init__(self) -> None:
        z = self.zoom_range
        if isinstance(z, (int, float)):
            lo, hi = 1.0 - float(z), 1.0 + float(z)
        else:
            if len(z) != 2:
                raise UserError(f"zoom_range must be a float or a pair, got {z!r}")
            lo, hi = float(z[0]), float(z[1])
        if not 0 < lo <= hi:
            raise UserError(f"zoom_range must satisfy 0 < lo <= hi, got {z!r}")
        if self.rotation_range < 0:
            raise UserError(f"rotation_range must be >= 0, got {self.rotation_range!r}")
        if self.shear_range < 0:
            raise UserError(f"shear_range must be >= 0, got {self.shear_range!r}")
        object.__setattr__(self, "zoom_range", (lo, hi))

    @property
    def zoom_bounds(self) -> tuple[float, float]:
        """``zoom_range`` as the ``(lo, hi)`` pair it is stored as after init."""
        lo, hi = self.zoom_range  # type: ignore[misc]
        return float(lo), float(hi)


def sample_params(cfg: AugmentConfig, rng: np.random.Generator) -> AffineParams:
    """Draw one image's parameters from the same distributions as Keras.

    Mirrors ``ImageDataGenerator.get_random_transform``: a zero range draws nothing,
    ``zx, zy`` come from one two-value draw, and the flip coin is always tossed. The
    generator is a numpy ``Generator`` rather than Keras's global RNG, so the
    distributions match Keras but the individual values do not.
    """
    theta = (
        float(rng.uniform(-cfg.rotation_range, cfg.rotation_range)) if cfg.rotation_range else 0.0
    )
    shear = float(rng.uniform(-cfg.shear_range, cfg.shear_range)) if cfg.shear_range else 0.0
    lo, hi = cfg.zoom_bounds
    zx, zy = (1.0, 1.0) if lo == 1 and hi == 1 else (float(v) for v in rng.uniform(lo, hi, 2))
    flip = bool(rng.random() < 0.5) and cfg.horizontal_flip
    return AffineParams(theta=theta, shear=shear, zx=zx, zy=zy, flip=flip)


def keras_matrix(params: AffineParams, h: int, w: int) -> np.ndarray:
    """The output-to-input pixel map Keras applies to an ``h x w`` image.

    Follows ``apply_affine_transform`` step by step (rotation @ shear @ zoom, each only
    when not neutral; ``transform_matrix_offset_center(m, h, w)``; the (x, y) to
    (row, col) swap) so that it stays a literal reference, then folds in the flip that
    Keras applies afterwards.

    Returns:
        A 3x3 float64 matrix with ``[row_in, col_in, 1] = M @ [row_out, col_out, 1]``.
    """
    m: np.ndarray | None = None
    if params.theta != 0:
        t = np.deg2rad(params.theta)
        m = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    if params.shear != 0:
        s = np.deg2rad(params.shear)
        sm = np.array([[1, -np.sin(s), 0], [0, np.cos(s), 0], [0, 0, 1]])
        m = sm if m is None else m @ sm
    if params.zx != 1 or params.zy != 1:
        zm = np.array([[params.zx, 0, 0], [0, params.zy, 0], [0, 0, 1]], dtype=np.float64)
        m = zm if m is None else m @ zm
    if m is None:
        m = np.eye(3)
    else:
        # transform_matrix_offset_center(m, h, w): "x" is centred with h, "y" with w.
        ox, oy = h / 2 - 0.5, w / 2 - 0.5
        m = (
            np.array([[1, 0, ox], [0, 1, oy], [0, 0, 1]])
            @ m
            @ np.array([[1, 0, -ox], [0, 1, -oy], [0, 0, 1]])
        )
        m = m[[1, 0, 2]][:, [1, 0, 2]]
    if params.flip:
        m = m @ np.array([[1.0, 0, 0], [0, -1, w - 1], [0, 0, 1]])
    return np.asarray(m, dtype=np.float64)


def resize_matrix(in_h: int, in_w: int, out_h: int, out_w: int) -> np.ndarray:
    """The pixel-centre resize map ``in = (out + 0.5) * in_size / out_size - 0.5`` as 3x3.

    It is the convention of cv2 ``INTER_LINEAR`` and of PIL's bilinear upsampling.
    """
    sy, sx = in_h / out_h, in_w / out_w
    return np.array([[sy, 0, 0.5 * sy - 0.5], [0, sx, 0.5 * sx - 0.5], [0, 0, 1]], dtype=np.float64)


def fused_matrix(params: AffineParams, in_h: int, in_w: int, out_h: int, out_w: int) -> np.ndarray:
    """Keras's warp of the ``out_h x out_w`` resized image, composed with the resize.

    One resample through this matrix replaces "resize, then warp", which is what the
    fast paths want; the Keras warp itself is defined on the resized image, so its
    centre and flip use the output size.
    """
    return resize_matrix(in_h, in_w, out_h, out_w) @ keras_matrix(params, out_h, out_w)


def pil_nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source indices PIL's ``NEAREST`` resize picks along one axis.

    PIL (``ImagingScaleAffine``) starts at ``0.5 * scale`` and *adds* ``scale`` per
    pixel in double precision, then truncates. That is ``floor((i + 0.5) * scale)``
    except where the product is an exact integer and the running sum lands just below
    it (e.g. 2 -> 7 pixels), so the sum is reproduced step by step.
    """
    scale = n_in / n_out
    steps = np.full(n_out, scale)
    steps[0] = scale * 0.5
    return np.clip(np.add.accumulate(steps).astype(np.int64), 0, n_in - 1)


def resize_nearest_pil(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Convert to RGB and resize with PIL ``NEAREST``, as Keras's ``load_img`` does.

    Args:
        image: Any PIL image.
        size: Output side, or ``(height, width)`` like Keras's ``target_size``.
    """
    h, w = (size, size) if isinstance(size, int) else size
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (w, h):
        image = image.resize((w, h), Image.NEAREST)
    return image


def warp_batch(
    images: torch.Tensor,
    params: Sequence[AffineParams],
    out_size: int | tuple[int, int] | None = None,
    resize: ResizeMode = "nearest",
) -> torch.Tensor:
    """Augment a batch on its own device with one ``grid_sample``: the exact Keras path.

    At equal sizes this equals Keras's ``apply_transform`` (scipy order-1, ``nearest``
    fill, flip) to float precision. Otherwise ``resize="nearest"`` first picks pixels
    exactly as PIL ``NEAREST`` (Keras's ``flow_from_directory``), and ``"bilinear"``
    fuses the resize into the same grid, so it resamples once.

    Args:
        images: ``(N, C, H, W)``, uint8 or float, on the 0-255 scale.
        params: One :class:`AffineParams` per image.
        out_size: Output side or ``(height, width)``; ``None`` keeps ``(H, W)``.
        resize: How to get from ``(H, W)`` to ``out_size``.

    Returns:
        ``(N, C, out_h, out_w)``, float32 (the input's dtype if it is already floating),
        still on the 0-255 scale.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if resize not in ("nearest", "bilinear"):
        raise ValueError(f"resize must be 'nearest' or 'bilinear', got {resize!r}")
    n, _, h, w = images.shape
    if out_size is None:
        oh, ow = h, w
    else:
        oh, ow = (out_size, out_size) if isinstance(out_size, int) else out_size
    if resize == "nearest" and (oh, ow) != (h, w):
        rows = torch.from_numpy(pil_nearest_indices(h, oh)).to(images.device)
        cols = torch.from_numpy(pil_nearest_indices(w, ow)).to(images.device)
        # Selecting along the last dim is slow on CPU; go through a transpose.
        images = images.index_select(2, rows).transpose(2, 3).contiguous()
        images = images.index_select(2, cols).transpose(2, 3)
        h, w = oh, ow
    stack = [fused_matrix(p, h, w, oh, ow) for p in params]
    mats = torch.from_numpy(np.stack(stack) if stack else np.zeros((0, 3, 3))).to(images.device)
    if mats.shape[0] != n:
        raise ValueError(f"got {mats.shape[0]} parameter sets for {n} images")
    return warp_matrices(images, mats, (oh, ow))


def warp_matrices(
    images: torch.Tensor, matrices: torch.Tensor, out_hw: tuple[int, int]
) -> torch.Tensor:
    """Resample ``images`` through per-image pixel matrices with one ``grid_sample``.

    Bilinear with clamped coordinates is exactly scipy's ``order=1, mode="nearest"``;
    in ``grid_sample`` terms that is ``padding_mode="border", align_corners=True``.

    Args:
        images: ``(N, C, H, W)`` uint8 or float.
        matrices: ``(N, 3, 3)`` output ``(row, col)`` to input ``(row, col)`` maps.
        out_hw: Output ``(height, width)``.
    """
    n, _, h, w = images.shape
    if h < 2 or w < 2:
        raise ValueError(f"images must be at least 2x2, got {h}x{w}")
    x = images if images.is_floating_point() else images.float()
    oh, ow = out_hw
    f64 = {"dtype": torch.float64, "device": images.device}
    # Pixel centres 0 .. size-1 <-> affine_grid's [-1, 1], then (row, col) -> (x, y).
    to_norm = torch.tensor([[2 / (h - 1), 0, -1], [0, 2 / (w - 1), -1], [0, 0, 1]], **f64)
    from_norm = torch.tensor(
        [[(oh - 1) / 2, 0, (oh - 1) / 2], [0, (ow - 1) / 2, (ow - 1) / 2], [0, 0, 1]], **f64
    )
    theta = (to_norm @ matrices.to(**f64) @ from_norm)[:, [1, 0]][:, :, [1, 0, 2]]
    grid = F.affine_grid(theta.to(x.dtype), [n, x.shape[1], oh, ow], align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def grid_theta(params: AffineParams, size: int) -> np.ndarray:
    """``affine_grid`` theta of Keras's warp of a ``size x size`` image, on the host.

    The algebra of :func:`warp_matrices` (pixel centres to [-1, 1], (row, col) to
    (x, y)) for one image, so the data workers can compute it and the device only
    runs :func:`warp_theta`, with no per-image Python and no host-device sync.

    Returns:
        ``(2, 3)`` float32.
    """
    n = size - 1
    to_norm = np.array([[2 / n, 0, -1], [0, 2 / n, -1], [0, 0, 1]])
    from_norm = np.array([[n / 2, 0, n / 2], [0, n / 2, n / 2], [0, 0, 1]])
    theta = to_norm @ keras_matrix(params, size, size) @ from_norm
    return theta[[1, 0]][:, [1, 0, 2]].astype(np.float32)


def warp_theta(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """:func:`warp_matrices` with precomputed ``(N, 2, 3)`` thetas (:func:`grid_theta`).

    Returns:
        ``(N, C, H, W)`` float32 on the 0-255 scale.
    """
    x = images if images.is_floating_point() else images.float()
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def warp_cv2(
    image: np.ndarray, params: AffineParams, out_size: int, dst: np.ndarray | None = None
) -> np.ndarray:
    """Resize and augment one image with a single ``cv2.warpAffine``: the fast CPU path.

    Differs from Keras on purpose, for speed: it resamples once, bilinearly, straight
    from the source (Keras resizes with PIL ``NEAREST`` and then warps bilinearly), and
    OpenCV snaps sampling positions to 1/32 pixel (5 bits), uses fixed-point weights and
    rounds to uint8. With no resize (224 source) it is ~0.2 gray levels from Keras on
    average; with a resize the smoother single resample differs by a few gray levels.

    Args:
        image: ``H x W x C`` uint8, any size.
        params: The augmentation.
        out_size: Output side.
        dst: A buffer to write into (``out_size x out_size x C`` uint8, contiguous);
            OpenCV allocates a new one if it does not fit. Use the return value.

    Returns:
        ``out_size x out_size x C`` uint8.
    """
    use_one_thread()
    h, w = image.shape[:2]
    m = fused_matrix(params, h, w, out_size, out_size)
    m_xy = m[[1, 0]][:, [1, 0, 2]]  # (row, col) to OpenCV's (x, y)
    return cv2.warpAffine(
        np.ascontiguousarray(image),
        m_xy,
        (out_size, out_size),
        dst=dst,
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


__all__ = [
    "AffineParams",
    "AugmentConfig",
    "ResizeMode",
    "fused_matrix",
    "grid_theta",
    "keras_matrix",
    "pil_nearest_indices",
    "resize_matrix",
    "resize_nearest_pil",
    "sample_params",
    "warp_batch",
    "warp_cv2",
    "warp_matrices",
    "warp_theta",
]
