"""Deletion/insertion by RISE's definition (Petsiuk et al. 2018), checked independently (issue 12 C).

The reference here is written from RISE's ``evaluation.py`` / ``Evaluation.ipynb``:
plain numpy loops over the pixel order, the model queried once per step, deleted
pixels set to zero, insertion starting from ``conv2d(x, gkern(klen, nsig),
padding=klen // 2)`` with ``gkern`` built from ``scipy.ndimage.gaussian_filter`` of a
delta, and RISE's trapezoid ``auc``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import convolve, gaussian_filter
from torch import Tensor, nn

from lightning_vgg.data.preprocess import Preprocess
from lightning_vgg.explain import faithfulness as faith
from lightning_vgg.explain.atlas import compute_atlas
from lightning_vgg.explain.normalize import upsample
from lightning_vgg.models.vgg import VGG16

SIZE = 64


def gkern(klen: int, nsig: float) -> np.ndarray:
    """RISE's kernel (evaluation.py): ``gaussian_filter`` of a delta in a klen x klen window."""
    inp = np.zeros((klen, klen))
    inp[klen // 2, klen // 2] = 1
    return gaussian_filter(inp, nsig)


def rise_blur_reference(img: np.ndarray, sigma: float) -> np.ndarray:
    """``conv2d(x, gkern, padding=klen // 2)`` per channel: zero padding, as RISE."""
    klen = 2 * max(1, round(sigma)) + 1
    k = gkern(klen, sigma)
    return np.stack([convolve(c, k, mode="constant", cval=0.0) for c in img])


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def rise_reference(
    model: nn.Module,
    img: np.ndarray,
    saliency: np.ndarray,
    sign: float,
    steps: int,
    del_substrate: np.ndarray,
    ins_substrate: np.ndarray,
) -> dict[str, object]:
    """RISE's CausalMetric, one image: at step k the top ``k * n // steps`` pixels changed."""
    c, h, w = img.shape
    n = h * w
    order = np.argsort(-saliency.reshape(-1), kind="stable")  # most salient first
    flat, dels, ins = img.reshape(c, n), del_substrate.reshape(c, n), ins_substrate.reshape(c, n)
    del_curve, ins_curve, xs = [], [], []
    for k in range(steps + 1):
        m = k * n // steps
        top = order[:m]
        deleted = flat.copy()
        deleted[:, top] = dels[:, top]
        inserted = ins.copy()
        inserted[:, top] = flat[:, top]
        with torch.no_grad():
            for arr, curve in ((deleted, del_curve), (inserted, ins_curve)):
                x = torch.from_numpy(arr.reshape(1, c, h, w)).float()
                curve.append(sigmoid(sign * float(model(x)[0])))
        xs.append(m / n)

    def trapezoid(ys: list[float]) -> float:
        return sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(steps))

    return {
        "x": xs,
        "deletion": del_curve,
        "insertion": ins_curve,
        "deletion_auc": trapezoid(del_curve),
        "insertion_auc": trapezoid(ins_curve),
    }


@pytest.fixture(scope="module")
def tiny() -> VGG16:
    torch.manual_seed(0)
    return VGG16(width=1 / 16, input_size=SIZE, hidden=64).eval()


def test_deletion_insertion_is_rise_on_real_photos(
    tiny: VGG16, cat_photo: Path, dog_photo: Path
) -> None:
    pre = Preprocess(SIZE, "bilinear")
    images = pre.load_batch([cat_photo, dog_photo])
    atlas = compute_atlas(tiny, images, target="pred")
    saliency = upsample(atlas.cams["block4_conv3"], SIZE)[:, 0]
    got = faith.deletion_insertion(tiny, images, saliency, atlas.target_sign)  # RISE's defaults
    steps = math.ceil(SIZE * SIZE / 224)
    assert steps == 19 and got["deletion_prob"].shape == (2, steps + 1)
    worst = 0.0
    for i in range(2):
        img = images[i].double().numpy()
        ref = rise_reference(
            tiny,
            img,
            saliency[i].numpy(),
            float(atlas.target_sign[i]),
            steps,
            np.zeros_like(img),  # RISE: deletion substrate torch.zeros_like
            rise_blur_reference(img, 5 * SIZE / 224),  # RISE: the blur substrate
        )
        assert got["fractions"].tolist() == pytest.approx(ref["x"], abs=1e-7)
        for key in ("deletion", "insertion"):
            d = np.abs(got[f"{key}_prob"][i].numpy() - np.array(ref[key])).max()
            a = abs(float(got[f"{key}_auc"][i]) - ref[f"{key}_auc"])  # type: ignore[arg-type]
            worst = max(worst, float(d), a)
    assert worst <= 1e-5, worst
    print(f"deletion_insertion vs the RISE reference: max difference {worst:.2e}")
    # the end points: the full image, black, and the blurred image
    full = torch.sigmoid(atlas.target_sign * atlas.logits)
    torch.testing.assert_close(got["deletion_prob"][:, 0], full, rtol=0, atol=1e-6)
    torch.testing.assert_close(got["insertion_prob"][:, -1], full, rtol=0, atol=1e-6)
    black = torch.sigmoid(atlas.target_sign * tiny(torch.zeros_like(images)).detach())
    torch.testing.assert_close(got["deletion_prob"][:, -1], black, rtol=0, atol=1e-6)


def test_rise_blur_is_rises_kernel() -> None:
    rng = np.random.default_rng(1)
    for size in (224, 64, 32):
        img = rng.random((2, 3, size, size))
        ours = faith.rise_blur(torch.from_numpy(img)).numpy()
        ref = np.stack([rise_blur_reference(x, 5 * size / 224) for x in img])
        assert np.abs(ours - ref).max() < 1e-12, size
    # at 224 px exactly RISE's gkern(11, 5)
    k = faith.rise_blur_kernel(5.0, 5).numpy()
    assert np.abs(np.outer(k, k) - gkern(11, 5)).max() < 1e-15


def test_trapezoid_not_left_sum() -> None:
    """A curve where the rectangle (left) sum and the trapezoid rule differ by 0.125."""

    class Sum(nn.Module):  # logit = 4 * (share of bright pixels) - 2
        def forward(self, x: Tensor) -> Tensor:
            return 4 * x.mean(dim=(1, 2, 3)) - 2

    images = torch.ones(1, 1, 4, 4)
    saliency = torch.arange(16.0).view(1, 4, 4)
    res = faith.deletion_insertion(
        Sum(), images, saliency, steps=4, deletion_baseline="zero", insertion_baseline="zero"
    )
    logit = res["deletion_logit"][0]
    torch.testing.assert_close(logit, torch.tensor([2.0, 1.0, 0.0, -1.0, -2.0]))
    trapezoid = float(sum(logit[k : k + 2].mean() * 0.25 for k in range(4)))
    left_sum = float(sum(logit[k] * 0.25 for k in range(4)))
    assert trapezoid == pytest.approx(0.0) and left_sum == pytest.approx(0.5)
    assert float(res["deletion_auc_logit"][0]) == pytest.approx(trapezoid, abs=1e-6)
    assert abs(float(res["deletion_auc_logit"][0]) - left_sum) > 0.4  # a left sum fails
    # probabilities: symmetric around 0.5, trapezoid area exactly 0.5
    assert float(res["deletion_auc"][0]) == pytest.approx(0.5, abs=1e-6)
    assert float((res["deletion_prob"][0, :-1] * 0.25).sum()) > 0.5 + 0.05


def test_defaults_steps_baselines_and_the_deprecated_alias(tiny: VGG16) -> None:
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, SIZE, SIZE, generator=gen)
    sal = torch.rand(2, SIZE, SIZE, generator=gen)
    assert faith.rise_steps(224, 224) == 224 and faith.rise_steps(32, 32) == 5
    shared = faith.deletion_insertion(
        tiny, images, sal, steps=6, deletion_baseline="zero", insertion_baseline="zero"
    )
    # a tensor baseline takes the general path (both curves' end points evaluated)
    general = faith.deletion_insertion(
        tiny,
        images,
        sal,
        steps=6,
        deletion_baseline=torch.zeros(1),
        insertion_baseline=torch.zeros(1),
    )
    for key in ("deletion_logit", "insertion_logit", "deletion_auc", "insertion_auc"):
        torch.testing.assert_close(shared[key], general[key], rtol=0, atol=1e-6)
    with pytest.warns(DeprecationWarning, match="deletion_baseline"):
        alias = faith.deletion_insertion(tiny, images, sal, steps=6, baseline="zero")
    torch.testing.assert_close(alias["deletion_auc"], shared["deletion_auc"], rtol=0, atol=0)
    rise = faith.deletion_insertion(tiny, images, sal, steps=6)
    torch.testing.assert_close(rise["deletion_logit"], shared["deletion_logit"], rtol=0, atol=0)
    blurred = tiny(faith.rise_blur(images)).detach()
    torch.testing.assert_close(rise["insertion_logit"][:, 0], blurred, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="baseline"):
        faith.deletion_insertion(tiny, images, sal, steps=2, insertion_baseline="noise")  # type: ignore[arg-type]


def test_gaussian_baseline_is_torchvision_and_the_former_blur() -> None:
    """``gaussian_blur`` now calls torchvision; the hand-written separable blur agrees."""
    import torch.nn.functional as F

    def former(images: Tensor, sigma: float) -> Tensor:
        _, c, h, w = images.shape
        radius = min(max(1, math.ceil(3 * sigma)), h - 1, w - 1)
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-(x**2) / (2 * sigma**2))
        k = (k / k.sum()).to(images.dtype)
        kx = k.view(1, 1, 1, -1).expand(c, 1, 1, -1)
        ky = k.view(1, 1, -1, 1).expand(c, 1, -1, 1)
        out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="reflect"), kx, groups=c)
        return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), ky, groups=c)

    gen = torch.Generator().manual_seed(3)
    for size in (32, 64, 224):
        images = torch.rand(2, 3, size, size, generator=gen)
        sigma = 5 * size / 224
        diff = (faith.gaussian_blur(images, sigma) - former(images, sigma)).abs().max()
        assert float(diff) < 2e-6, (size, float(diff))
        torch.testing.assert_close(
            faith.make_baseline(images, "gaussian"), faith.gaussian_blur(images, sigma)
        )
    const = torch.full((1, 3, 6, 6), 0.3)
    torch.testing.assert_close(faith.gaussian_blur(const, 2.0), const)
