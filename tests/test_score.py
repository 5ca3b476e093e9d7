"""Grad-CAM of the probability (the seed's score) from the logit's one backward pass (issue 12 B)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import LayerGradCam

from lightning_vgg.errors import UserError
from lightning_vgg.explain import atlas as A
from lightning_vgg.models.vgg import conv_units
from tests.test_atlas import NAMES, SMALL, centre_logits, make_net, photo_batch

LAYERS = ["block1_conv1", "block2_conv2", "block3_conv3", "block4_conv1", "block5_conv3"]


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |ours - ref| / max |ref|`` (0 when both are all zero)."""
    peak = float(ref.abs().max())
    err = float((ours - ref).abs().max())
    return err / peak if peak > 0 else (0.0 if err == 0 else float("inf"))


@pytest.fixture(scope="module")
def net_and_batch(cat_photo: Path, dog_photo: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    batch = photo_batch(cat_photo, dog_photo, SMALL).float()
    net = make_net(seed=11, size=SMALL, dtype=torch.float32)
    logits = centre_logits(net, batch)
    assert (logits >= 0).any() and (logits < 0).any()
    p = torch.sigmoid(logits)
    assert ((p > 0.02) & (p < 0.98)).all(), "p(1-p) must not underflow for the test to bite"
    return net, batch


@pytest.mark.parametrize("stage", ["post", "pre"])
def test_probability_gradcam_matches_captum_on_the_sigmoid(
    net_and_batch: tuple[torch.nn.Module, torch.Tensor], stage: str
) -> None:
    """Captum differentiates ``sigmoid(net(t))`` / ``1 - sigmoid(net(t))`` itself."""
    net, batch = net_and_batch
    units = conv_units(net, stage)  # type: ignore[arg-type]
    dog = A.compute_atlas(net, batch, target="dog", tap=stage, score="probability")  # type: ignore[arg-type]
    cat = A.compute_atlas(net, batch, target="cat", tap=stage, score="probability")  # type: ignore[arg-type]
    assert dog.score == cat.score == "probability"
    worst, nonzero = 0.0, 0
    for name in NAMES:
        for at, fn in (
            (dog, lambda t: torch.sigmoid(net(t))),
            (cat, lambda t: 1 - torch.sigmoid(net(t))),
        ):
            ref = LayerGradCam(fn, units[name]).attribute(batch.clone(), relu_attributions=True)
            ref = ref.detach()
            nonzero += int(ref.abs().max() > 0)
            d = rel_diff(at.cams[name], ref)
            worst = max(worst, d)
            assert d <= 1e-5, (name, d)
    assert nonzero >= 20  # the comparison is not vacuous
    print(f"probability Grad-CAM vs Captum, stage={stage}: max relative difference {worst:.2e}")


def test_probability_maps_are_the_logit_maps_times_p_one_minus_p(
    cat_photo: Path, dog_photo: Path
) -> None:
    """The identity behind the one-pass method, in float64 (in float32 the two orders of
    rounding differ by up to ~1e-5 of a map's peak where channels cancel)."""
    batch = photo_batch(cat_photo, dog_photo, SMALL)
    net = make_net(seed=11, size=SMALL)
    centre_logits(net, batch)
    logit = A.compute_atlas(net, batch, target="pred")
    prob = A.compute_atlas(net, batch, target="pred", score="probability")
    p = torch.sigmoid(logit.logits)
    factor = (p * (1 - p)).view(-1, 1, 1, 1)
    torch.testing.assert_close(prob.logits, logit.logits, rtol=0, atol=0)
    for name in NAMES:
        assert rel_diff(prob.cams_signed[name], logit.cams_signed[name] * factor) <= 1e-12
        assert rel_diff(prob.cams[name], logit.cams[name] * factor) <= 1e-12
        # the feature maps do not depend on the score
        torch.testing.assert_close(prob.activations[name], logit.activations[name], rtol=0, atol=0)


def test_captum_reference_helper_and_image_maps_use_the_score(
    net_and_batch: tuple[torch.nn.Module, torch.Tensor], tmp_path: Path
) -> None:
    from lightning_vgg.explain.maps import captum_agreement, image_maps, title_of, write_maps

    net, batch = net_and_batch
    units = conv_units(net, "post")
    maps = image_maps(net, batch, ["a", "b", "c", "d"], [0, 1, 0, 1], score="probability")
    for name in LAYERS:
        for cls, fn in (
            ("dog", lambda t: torch.sigmoid(net(t))),
            ("cat", lambda t: 1 - torch.sigmoid(net(t))),
        ):
            ref = LayerGradCam(fn, units[name]).attribute(batch.clone(), relu_attributions=True)
            helper = A.captum_gradcam(
                net, batch, name, 1.0 if cls == "dog" else -1.0, score="probability"
            )
            assert rel_diff(helper, ref.detach()) <= 1e-6
            ours = torch.stack([m.classes[cls].raw[name] for m in maps])
            assert rel_diff(ours, ref.detach()[:, 0]) <= 1e-5
    with torch.enable_grad():
        agreement = captum_agreement(net, batch, maps, "post")
    assert max(agreement.values()) <= 1e-5  # explain --check_captum follows the score
    assert "Grad-CAM of P(dog) / P(cat)" in title_of(maps[0])
    assert "Grad-CAM of ±logit" in title_of(image_maps(net, batch[:1], ["a"], [0])[0])
    data = np.load(write_maps(maps[1], tmp_path / "maps.npz"))
    assert str(data["score"]) == "probability"


def test_callbacks_take_the_score(net_and_batch: tuple[torch.nn.Module, torch.Tensor]) -> None:
    from lightning_vgg.callbacks import GradCAMCallback, MisclassificationGallery

    net, batch = net_and_batch
    gc = GradCAMCallback(per_class=1, score="probability")
    figs = gc.figures(net, batch[2:], torch.tensor([0, 1]), ["cat.jpg", "dog.jpg"])
    assert len(figs) == 2
    assert "P(dog)" in figs[0][1].get_suptitle()
    assert MisclassificationGallery(score="probability")._score_name(0) == "P(cat)"
    with pytest.raises(UserError, match="score"):
        GradCAMCallback(score="prob")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="score"):
        A.compute_atlas(net, batch, score="softmax")  # type: ignore[arg-type]
    assert A.score_label("probability", "cat") == "P(cat) = 1 − P(dog)"
