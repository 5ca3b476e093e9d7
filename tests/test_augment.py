"""Keras parity of the augmentation: exact warp, PIL nearest resize, batch, cv2 and draws."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_vgg.data.augment import (
    AffineParams,
    AugmentConfig,
    keras_matrix,
    pil_nearest_indices,
    resize_nearest_pil,
    sample_params,
    warp_batch,
    warp_cv2,
    warp_matrices,
)
from lightning_vgg.errors import UserError
from tests.augment_batch import (
    keras_matrix_batch,
    sample_params_batch,
    unbatch_params,
    warp_param_batch,
)

# Keras 3 still calls scipy.ndimage.interpolation.affine_transform.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Please import `affine_transform`:DeprecationWarning"
)

MAE_TOL = 0.05
MAX_TOL = 0.05

CASES = {
    "identity": AffineParams(),
    "theta40": AffineParams(theta=40.0),
    "theta-37.5_shear0.2": AffineParams(theta=-37.5, shear=0.2),
    "zx0.8_zy1.2": AffineParams(zx=0.8, zy=1.2),
    "zx1.2_zy0.8_flip": AffineParams(zx=1.2, zy=0.8, flip=True),
    "draw_seed0": sample_params(AugmentConfig(), np.random.default_rng(0)),
    "draw_seed1": sample_params(AugmentConfig(), np.random.default_rng(1)),
    "extreme_flip": AffineParams(theta=40.0, shear=-0.2, zx=0.8, zy=0.8, flip=True),
}


@pytest.fixture(scope="session")
def keras_gen() -> Any:
    """Keras's own ``ImageDataGenerator`` (nearest fill, order 1), on the torch backend."""
    os.environ["KERAS_BACKEND"] = "torch"
    pytest.importorskip("scipy")
    legacy = pytest.importorskip("keras.src.legacy.preprocessing.image")
    return legacy.ImageDataGenerator()


@pytest.fixture(scope="session")
def keras_load(keras_gen: Any) -> Callable[[Path, tuple[int, int]], np.ndarray]:
    """Keras's ``load_img`` + ``img_to_array``: RGB, PIL nearest resize, float32 HxWx3."""
    from keras.utils import img_to_array, load_img

    def load(path: Path, hw: tuple[int, int]) -> np.ndarray:
        return img_to_array(load_img(path, target_size=hw, interpolation="nearest"))

    return load


@pytest.fixture(scope="session")
def cat224(cat_photo: Path, keras_load: Callable[..., np.ndarray]) -> np.ndarray:
    """The cat photo exactly as ``flow_from_directory(target_size=(224, 224))`` loads it."""
    return keras_load(cat_photo, (224, 224))


def ours(x: np.ndarray, p: AffineParams, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """``warp_batch`` on one HxWxC array, back as float64 HxWxC."""
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].to(dtype)
    return warp_batch(t, [p])[0].permute(1, 2, 0).double().numpy()


def via_matrix(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Warp one HxWxC float array through an explicit (row, col) matrix."""
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].float()
    out = warp_matrices(t, torch.from_numpy(m)[None], x.shape[:2])
    return out[0].permute(1, 2, 0).double().numpy()


def diffs(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean and max absolute difference."""
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d.mean()), float(d.max())


def shifted_centre(m: np.ndarray, delta: float) -> np.ndarray:
    """The same warp about a centre moved by ``delta`` pixels along both axes."""
    t = np.array([[1, 0, delta], [0, 1, delta], [0, 0, 1]], dtype=np.float64)
    return t @ m @ np.linalg.inv(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_keras_apply_transform(
    name: str, dtype: torch.dtype, cat224: np.ndarray, keras_gen: Any
) -> None:
    p = CASES[name]
    ref = keras_gen.apply_transform(cat224, p.as_keras())
    mae, mx = diffs(ours(cat224, p, dtype), ref)
    assert mae <= MAE_TOL and mx <= MAX_TOL, f"{name} {dtype}: mae={mae:.2e} max={mx:.2e}"


@pytest.mark.parametrize("hw", [(224, 160), (160, 224)])
def test_matches_keras_non_square(
    hw: tuple[int, int], cat_photo: Path, keras_load: Callable[..., np.ndarray], keras_gen: Any
) -> None:
    x = keras_load(cat_photo, hw)
    for p in (AffineParams(theta=30.0, shear=0.2, zx=0.9, zy=1.1, flip=True), CASES["draw_seed1"]):
        ref = keras_gen.apply_transform(x, p.as_keras())
        mae, mx = diffs(ours(x, p), ref)
        assert mae <= MAE_TOL and mx <= MAX_TOL, f"{hw} {p}: mae={mae:.2e} max={mx:.2e}"
    # Keras rotates a non-square image about (row=(w-1)/2, col=(h-1)/2); the true centre fails.
    p = AffineParams(theta=30.0, zx=0.9, zy=1.1)
    ref = keras_gen.apply_transform(x, p.as_keras())
    true_centre = keras_matrix(p, hw[1], hw[0])
    mae, _ = diffs(via_matrix(x, true_centre), ref)
    assert mae > 1.0, f"true-centre mae={mae:.2e}"


def test_negative_controls_fail(cat224: np.ndarray, keras_gen: Any) -> None:
    p = AffineParams(theta=40.0, zx=1.2, zy=1.2)
    ref = keras_gen.apply_transform(cat224, p.as_keras())
    m = keras_matrix(p, 224, 224)
    good, _ = diffs(via_matrix(cat224, m), ref)
    assert good <= MAE_TOL, f"faithful mae={good:.2e}"
    wrong = {
        "centre h/2 (half pixel off)": shifted_centre(m, 0.5),
        "centre h/2 + 0.5": shifted_centre(m, 1.0),
        "axes not swapped": m[[1, 0, 2]][:, [1, 0, 2]],
    }
    for label, bad in wrong.items():
        mae, _ = diffs(via_matrix(cat224, bad), ref)
        assert mae > 1.0, f"{label}: mae={mae:.2e}"


@pytest.mark.parametrize("hw", [(224, 224), (224, 160)])
def test_resize_nearest_equals_keras_load_img(
    hw: tuple[int, int], cat_photo: Path, keras_load: Callable[..., np.ndarray], tmp_path: Path
) -> None:
    ours_img = np.asarray(resize_nearest_pil(Image.open(cat_photo), hw), dtype=np.float32)
    np.testing.assert_array_equal(ours_img, keras_load(cat_photo, hw))
    gray = tmp_path / "gray.png"
    Image.open(cat_photo).convert("L").save(gray)
    ours_gray = np.asarray(resize_nearest_pil(Image.open(gray), hw), dtype=np.float32)
    np.testing.assert_array_equal(ours_gray, keras_load(gray, hw))


def test_pil_nearest_indices_match_pil() -> None:
    for n_in in (2, 3, 7, 180, 224, 255):
        row = np.arange(n_in, dtype=np.uint8)[None, :]
        im = Image.fromarray(row, "L")
        for n_out in (1, 7, 15, 97, 160, 224, 301):
            got = np.asarray(im.resize((n_out, 1), Image.NEAREST))[0]
            np.testing.assert_array_equal(pil_nearest_indices(n_in, n_out), got, f"{n_in}->{n_out}")
    # The closed form floor((i + 0.5) * scale) is off at 2 -> 7; PIL's running sum is not.
    assert int(np.floor(3.5 * 2 / 7)) == 1 and pil_nearest_indices(2, 7)[3] == 0


@pytest.mark.parametrize("hw", [(224, 224), (224, 160)])
def test_source_to_keras_end_to_end(
    hw: tuple[int, int], dog_photo: Path, keras_load: Callable[..., np.ndarray], keras_gen: Any
) -> None:
    """Raw JPEG -> nearest resize + warp in one call equals load_img + apply_transform."""
    raw = torch.from_numpy(np.asarray(Image.open(dog_photo).convert("RGB")).copy())
    p = AffineParams(theta=-25.0, shear=0.15, zx=1.1, zy=0.85, flip=True)
    out = warp_batch(raw.permute(2, 0, 1)[None], [p], hw, resize="nearest")
    assert out.dtype == torch.float32 and out.shape == (1, 3, *hw)
    ref = keras_gen.apply_transform(keras_load(dog_photo, hw), p.as_keras())
    mae, mx = diffs(out[0].permute(1, 2, 0).numpy(), ref)
    assert mae <= MAE_TOL and mx <= MAX_TOL, f"mae={mae:.2e} max={mx:.2e}"


def test_batch_equals_per_image(cat224: np.ndarray, dog_photo: Path) -> None:
    dog = np.asarray(resize_nearest_pil(Image.open(dog_photo), 224), dtype=np.float32)
    imgs = np.stack([cat224, dog, cat224[::-1], dog[:, ::-1]])
    batch = torch.from_numpy(imgs.copy()).permute(0, 3, 1, 2).contiguous()
    draws = sample_params_batch(AugmentConfig(), np.random.default_rng(7), 4)
    draws["flip"] = np.array([True, False, True, False])
    plist = unbatch_params(draws)
    assert len({p.theta for p in plist}) == 4
    from_dict = warp_param_batch(batch, draws)
    from_list = warp_batch(batch, plist)
    torch.testing.assert_close(from_dict, from_list, atol=1e-3, rtol=0)
    for i, p in enumerate(plist):
        single = warp_batch(batch[i : i + 1], [p])[0]
        torch.testing.assert_close(from_list[i], single, atol=1e-3, rtol=0)
    as_uint8 = warp_batch(batch.round().to(torch.uint8), plist)
    torch.testing.assert_close(as_uint8, from_list, atol=1e-3, rtol=0)


def test_closed_form_matrices_equal_literal_keras() -> None:
    plist = [*CASES.values(), AffineParams(theta=12.0, shear=-0.1, zx=1.15, zy=0.9, flip=True)]
    draws = {
        "theta": np.array([p.theta for p in plist]),
        "shear": np.array([p.shear for p in plist]),
        "zx": np.array([p.zx for p in plist]),
        "zy": np.array([p.zy for p in plist]),
        "flip": np.array([p.flip for p in plist]),
    }
    for h, w in ((224, 224), (224, 160), (97, 301)):
        literal = np.stack([keras_matrix(p, h, w) for p in plist])
        closed = keras_matrix_batch(draws, h, w).numpy()
        np.testing.assert_allclose(closed, literal, atol=1e-9)


def test_fused_bilinear_matches_cv2(cat_photo: Path) -> None:
    """Same fused matrix through grid_sample and warpAffine: only cv2 fixed point differs."""
    raw = np.asarray(Image.open(cat_photo).convert("RGB"))
    for p in (CASES["extreme_flip"], CASES["draw_seed0"]):
        fused = warp_batch(
            torch.from_numpy(raw.copy()).permute(2, 0, 1)[None], [p], 224, "bilinear"
        )
        mae, mx = diffs(warp_cv2(raw, p, 224), fused[0].permute(1, 2, 0).numpy())
        assert mae < 0.5 and mx <= 2.0, f"mae={mae:.2e} max={mx:.2e}"


def test_warp_cv2_close_to_keras(cat224: np.ndarray, keras_gen: Any) -> None:
    """Sanity, not parity: on a 224 source cv2 differs by rounding only (measured ~0.23)."""
    src = cat224.astype(np.uint8)
    for name in ("theta-37.5_shear0.2", "zx1.2_zy0.8_flip", "draw_seed1"):
        p = CASES[name]
        out = warp_cv2(src, p, 224)
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
        mae, _ = diffs(out, keras_gen.apply_transform(cat224, p.as_keras()))
        assert mae < 2.0, f"{name}: mae={mae:.2e}"


def test_sample_params_distributions() -> None:
    cfg = AugmentConfig()
    rng = np.random.default_rng(123)
    singles = [sample_params(cfg, rng) for _ in range(4000)]
    loop = {
        k: np.array([getattr(p, k) for p in singles], dtype=np.float64)
        for k in ("theta", "shear", "zx", "zy", "flip")
    }
    batch = {
        k: np.asarray(v, dtype=np.float64) for k, v in sample_params_batch(cfg, rng, 20000).items()
    }
    for draws in (loop, batch):
        theta, shear, zx, zy, flip = (draws[k] for k in ("theta", "shear", "zx", "zy", "flip"))
        assert theta.min() >= -40 and theta.max() <= 40 and theta.min() < -39 and theta.max() > 39
        assert abs(theta.mean()) < 2.0 and abs(theta.std() - 80 / np.sqrt(12)) < 1.0
        assert (
            shear.min() >= -0.2
            and shear.max() <= 0.2
            and shear.min() < -0.19
            and shear.max() > 0.19
        )
        for z in (zx, zy):
            assert z.min() >= 0.8 and z.max() <= 1.2 and abs(z.mean() - 1.0) < 0.01
        assert abs(np.corrcoef(zx, zy)[0, 1]) < 0.06
        assert abs(flip.mean() - 0.5) < 0.03


def test_config_semantics() -> None:
    assert AugmentConfig(zoom_range=0.2).zoom_range == pytest.approx((0.8, 1.2))
    assert AugmentConfig().zoom_range == (0.8, 1.2)
    rng = np.random.default_rng(0)
    neutral = AugmentConfig(rotation_range=0, shear_range=0, zoom_range=0.0, horizontal_flip=False)
    assert {sample_params(neutral, rng) for _ in range(50)} == {AffineParams()}
    no_flip = AugmentConfig(horizontal_flip=False)
    assert not any(sample_params(no_flip, rng).flip for _ in range(200))
    assert not sample_params_batch(no_flip, rng, 200)["flip"].any()
    for bad in (
        {"zoom_range": (1.2, 0.8)},
        {"zoom_range": (0.5, 1.0, 2.0)},
        {"rotation_range": -1.0},
    ):
        with pytest.raises(UserError):
            AugmentConfig(**bad)


def test_opencv_threads_are_set_on_first_use_not_on_import() -> None:
    """Importing the data package changes nothing; its first OpenCV call sets one thread."""
    code = (
        "import cv2, numpy as np\n"
        "cv2.setNumThreads(3)\n"
        "import lightning_vgg.data.datamodule\n"
        "assert cv2.getNumThreads() == 3, cv2.getNumThreads()\n"
        "from lightning_vgg.data.dataset import resize_nearest_array\n"
        "resize_nearest_array(np.zeros((4, 4, 3), np.uint8), 2)\n"
        "assert cv2.getNumThreads() == 1, cv2.getNumThreads()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
