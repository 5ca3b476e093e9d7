"""compute_atlas against Captum and hand-computed Grad-CAM; hooks, modes and normalisations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lightning_vgg.errors import UserError
from lightning_vgg.explain import atlas as A
from lightning_vgg.explain import hooks as H
from lightning_vgg.explain import normalize as N
from lightning_vgg.models.vgg import VGG16, keras_conv_names

SIZE = 64
SMALL = 32  # the 8-configuration Captum grid runs at the smallest legal input
NAMES = keras_conv_names()


def _randomise_bn(net: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN affine parameters and running stats, so eval mode matters."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.4 * torch.rand(n, generator=gen) - 0.2)
            m.num_batches_tracked.fill_(7)


def make_net(
    seed: int = 0,
    inplace: bool = True,
    bn: str = "every_conv",
    dtype: torch.dtype = torch.float64,
    size: int = SIZE,
) -> VGG16:
    torch.manual_seed(seed)
    net = VGG16(width=1 / 16, input_size=size, batch_norm=bn, inplace_relu=inplace)  # type: ignore[arg-type]
    _randomise_bn(net, torch.Generator().manual_seed(seed + 1))
    return net.to(dtype).eval()


def load_photo(path: Path, size: int = SIZE) -> torch.Tensor:
    img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).double() / 255.0


def photo_batch(cat_photo: Path, dog_photo: Path, size: int) -> torch.Tensor:
    """Two random inputs and two real photos (cat, dog), float64."""
    gen = torch.Generator().manual_seed(5)
    rnd = torch.rand(2, 3, size, size, generator=gen, dtype=torch.float64)
    photos = [load_photo(cat_photo, size)[None], load_photo(dog_photo, size)[None]]
    return torch.cat([rnd, *photos])


@pytest.fixture(scope="module")
def batch(cat_photo: Path, dog_photo: Path) -> torch.Tensor:
    return photo_batch(cat_photo, dog_photo, SIZE)


@pytest.fixture(scope="module")
def small_batch(cat_photo: Path, dog_photo: Path) -> torch.Tensor:
    return photo_batch(cat_photo, dog_photo, SMALL)


def centre_logits(net: VGG16, x: torch.Tensor) -> torch.Tensor:
    """Shift the last bias so the batch's logits straddle 0 (both predicted classes)."""
    with torch.no_grad():
        logits = net(x)
        mid = logits.sort().values[1:3].mean()
        net.classifier[-1].bias -= mid
        return net(x)


def assert_map_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-9 * max(scale, 1e-30))


# --------------------------------------------------------------------------- vs Captum


@pytest.mark.parametrize("stage", ["post", "pre"])
@pytest.mark.parametrize("bn", ["every_conv", "per_block"])
@pytest.mark.parametrize("inplace", [True, False])
def test_gradcam_matches_captum_on_all_layers(
    small_batch: torch.Tensor, inplace: bool, bn: str, stage: str
) -> None:
    batch = small_batch
    net = make_net(inplace=inplace, bn=bn, size=SMALL)
    centre_logits(net, batch)
    dog = A.compute_atlas(net, batch, target="dog", tap=stage)  # type: ignore[arg-type]
    cat = A.compute_atlas(net, batch, target="cat", tap=stage)  # type: ignore[arg-type]
    assert dog.layer_names == NAMES
    torch.testing.assert_close(dog.target_sign, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(cat.target_sign, -torch.ones(4, dtype=torch.float64))
    ref_acts = A.activations(net, batch, tap=stage)  # type: ignore[arg-type]
    nonzero_layers = 0
    for name in NAMES:
        ref_dog = A.captum_gradcam(net, batch, name, 1.0, tap=stage)  # type: ignore[arg-type]
        ref_cat = A.captum_gradcam(net, batch, name, -1.0, tap=stage)  # type: ignore[arg-type]
        assert dog.cams[name].shape == ref_dog.shape
        assert_map_close(dog.cams[name], ref_dog)
        assert_map_close(cat.cams[name], ref_cat)
        if inplace and bn == "every_conv":  # the signed maps once per stage is enough
            signed = A.captum_gradcam(net, batch, name, 1.0, relu=False, tap=stage)  # type: ignore[arg-type]
            assert_map_close(dog.cams_signed[name], signed)
            assert_map_close(cat.cams_signed[name], -signed)
        # Feature maps from the same pass equal Captum's LayerActivation exactly.
        torch.testing.assert_close(dog.activations[name], ref_acts[name], rtol=0, atol=0)
        nonzero_layers += int(ref_dog.abs().max() > 0) + int(ref_cat.abs().max() > 0)
    assert nonzero_layers >= 20  # the comparison is not vacuous


def test_pred_target_picks_per_sample(batch: torch.Tensor) -> None:
    net = make_net(seed=3)
    logits = centre_logits(net, batch)
    assert (logits >= 0).any() and (logits < 0).any()
    at = A.compute_atlas(net, batch, target="pred")
    sign = torch.where(logits >= 0, 1.0, -1.0).double()
    torch.testing.assert_close(at.target_sign, sign)
    torch.testing.assert_close(at.logits, logits)
    torch.testing.assert_close(at.probs, torch.sigmoid(logits))
    dog = A.compute_atlas(net, batch, target="dog")
    cat = A.compute_atlas(net, batch, target="cat")
    is_dog = logits >= 0
    for name in NAMES:
        assert_map_close(at.cams[name], A.captum_gradcam(net, batch, name, sign))
        torch.testing.assert_close(at.cams[name][is_dog], dog.cams[name][is_dog])
        torch.testing.assert_close(at.cams[name][~is_dog], cat.cams[name][~is_dog])
    # Labels (cat=0, dog=1) and signs (-1, +1) as tensors mean the same thing.
    labels = torch.tensor([0, 1, 1, 0])
    by_label = A.compute_atlas(net, batch, target=labels, activations=False)
    by_sign = A.compute_atlas(net, batch, target=labels * 2 - 1, activations=False)
    torch.testing.assert_close(by_label.target_sign, torch.tensor([-1.0, 1, 1, -1]).double())
    for name in NAMES:
        torch.testing.assert_close(by_label.cams[name], by_sign.cams[name])
    with pytest.raises(ValueError):
        A.compute_atlas(net, batch, target=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError):
        A.compute_atlas(net, batch, target=torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        A.compute_atlas(net, batch, target="horse")  # type: ignore[arg-type]


def test_inplace_and_out_of_place_relu_agree(batch: torch.Tensor) -> None:
    """An independent check of the hook's clone: same weights, with and without in-place ReLU."""
    a_net = make_net(seed=1, inplace=True)
    b_net = make_net(seed=1, inplace=False)
    b_net.load_state_dict(a_net.state_dict())
    for stage in ("post", "pre", "conv"):
        a = A.compute_atlas(a_net, batch, target="dog", tap=stage)  # type: ignore[arg-type]
        b = A.compute_atlas(b_net, batch, target="dog", tap=stage)  # type: ignore[arg-type]
        for name in NAMES:
            torch.testing.assert_close(a.activations[name], b.activations[name], rtol=0, atol=0)
            torch.testing.assert_close(a.cams[name], b.cams[name], rtol=1e-12, atol=0)
        if stage != "post":
            # Pre-ReLU maps must keep their negative half despite the in-place ReLU after them.
            assert all(a.activations[n].min() < 0 for n in NAMES)
        else:
            assert all(a.activations[n].min() >= 0 for n in NAMES)


def test_stored_reference_without_clone_would_be_wrong(batch: torch.Tensor) -> None:
    """Documents the trap capture_layers avoids: a plain stored output gets overwritten."""
    net = make_net(inplace=True)
    unit = A.layer_units(net, "pre", ["block2_conv1"])["block2_conv1"]
    kept: list[torch.Tensor] = []
    handle = unit.register_forward_hook(lambda m, i, o: kept.append(o))
    try:
        with torch.no_grad():
            net(batch)
    finally:
        handle.remove()
    assert kept[0].min() >= 0  # the in-place ReLU overwrote it
    good = A.compute_atlas(net, batch, tap="pre", layers=["block2_conv1"], cams=False)
    assert good.activations["block2_conv1"].min() < 0


# --------------------------------------------------------------------------- by hand


class Toy(nn.Module):
    """1x1 conv (1 -> 2 channels, weights [2, -1]), global average pool, linear [3, 5]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=1, bias=False)
        self.head = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
            self.head.weight.copy_(torch.tensor([[3.0, 5.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3))).squeeze(1)


def test_gradcam_by_hand_on_toy_net() -> None:
    # A_k = w_k * x with w = (2, -1); logit = sum_k v_k * mean_ij A_k with v = (3, 5).
    # dS/dA_k,ij = sign * v_k / (h*w) everywhere, so alpha_k = sign * v_k / 4 and
    # cam = sign * sum_k (v_k / 4) * w_k * x = sign * (3*2 + 5*(-1)) / 4 * x = sign * x / 4.
    # logit = mean(x) * (3*2 - 5) = mean(x) = 0.5 -> 'pred' is dog.
    toy = Toy().double()
    x = torch.tensor([[1.0, 2.0], [3.0, -4.0]], dtype=torch.float64).view(1, 1, 2, 2)
    layers = {"conv": toy.conv}
    dog = A.compute_atlas(toy, x, target="dog", layers=layers)
    cat = A.compute_atlas(toy, x, target="cat", layers=layers)
    pred = A.compute_atlas(toy, x, target="pred", layers=layers)
    torch.testing.assert_close(dog.logits, torch.tensor([0.5], dtype=torch.float64))
    expected_signed = x / 4
    torch.testing.assert_close(dog.cams_signed["conv"], expected_signed)
    torch.testing.assert_close(
        dog.cams["conv"], torch.tensor([[0.25, 0.5], [0.75, 0.0]]).double().view(1, 1, 2, 2)
    )
    torch.testing.assert_close(
        cat.cams["conv"], torch.tensor([[0.0, 0.0], [0.0, 1.0]]).double().view(1, 1, 2, 2)
    )
    torch.testing.assert_close(pred.cams["conv"], dog.cams["conv"])
    # Here the signed map sums exactly to the score: Grad-CAM is in logit units.
    torch.testing.assert_close(dog.cams_signed["conv"].sum(), dog.logits[0])
    torch.testing.assert_close(
        dog.activations["conv"], torch.cat([2 * x, -x], dim=1), rtol=0, atol=0
    )


# --------------------------------------------------------------------------- side effects


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_modes_stats_grads_and_hooks_untouched(batch: torch.Tensor) -> None:
    net = make_net(seed=2, dtype=torch.float32)
    x = batch.float()
    expected = A.compute_atlas(net, x, target="dog")
    net.train()
    net.features[1].eval()  # a mixed state must survive too
    modes = [m.training for m in net.modules()]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x_before = x.clone()
    got = A.compute_atlas(net, x, target="dog")
    assert [m.training for m in net.modules()] == modes
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)
    assert all(p.grad is None for p in net.parameters())
    assert _hook_count(net) == 0
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)
    assert not x.requires_grad
    for name in NAMES:  # computed in eval mode whatever the model's mode was
        torch.testing.assert_close(got.cams[name], expected.cams[name])
        assert not got.cams[name].requires_grad and not got.activations[name].requires_grad


def test_frozen_parameters_inference_mode_and_no_grad(batch: torch.Tensor) -> None:
    net = make_net(seed=4)
    ref = A.compute_atlas(net, batch, target="pred")
    for p in net.parameters():
        p.requires_grad_(False)
    frozen = A.compute_atlas(net, batch, target="pred")
    with torch.inference_mode():
        inf_x = batch.clone()  # an inference tensor, as Lightning's test loop hands over
        in_inference = A.compute_atlas(net, inf_x, target="pred")
    with torch.no_grad():
        in_no_grad = A.compute_atlas(net, batch, target="pred")
    for other in (frozen, in_inference, in_no_grad):
        torch.testing.assert_close(other.logits, ref.logits)
        for name in NAMES:
            torch.testing.assert_close(other.cams[name], ref.cams[name])
            torch.testing.assert_close(other.activations[name], ref.activations[name])
    assert all(not p.requires_grad and p.grad is None for p in net.parameters())


def test_lightning_module_is_accepted(batch: torch.Tensor) -> None:
    from lightning_vgg.models.module import VGGClassifier

    module = VGGClassifier(width=1 / 16, input_size=SIZE, hidden=64).double()
    module.train()
    at = A.compute_atlas(module, batch[:2], target="cat", layers=["block5_conv3", "block1_conv1"])
    assert at.layer_names == ["block1_conv1", "block5_conv3"]  # network order
    assert list(A.layer_units(module, "post", "block5_conv3")) == ["block5_conv3"]
    assert module.training and module.net.training
    assert H.unwrap(module) is module.net
    torch.testing.assert_close(
        at.cams["block5_conv3"], A.captum_gradcam(module, batch[:2], "block5_conv3", -1.0)
    )
    with pytest.raises(TypeError):
        H.unwrap(nn.Linear(2, 2))


def test_hooks_removed_after_exceptions(batch: torch.Tensor) -> None:
    net = make_net()
    units = A.layer_units(net, "pre")
    with pytest.raises(RuntimeError, match="boom"), H.capture_layers(net, units, keep_grad=False):
        assert _hook_count(net) == 13
        raise RuntimeError("boom")
    assert _hook_count(net) == 0
    # A failure inside the forward pass (wrong input size for the dense head).
    net.train()
    with pytest.raises(RuntimeError):
        A.compute_atlas(net, torch.rand(1, 3, 32, 32, dtype=torch.float64))
    assert _hook_count(net) == 0 and all(m.training for m in net.modules())
    # keep_grad needs grad mode: a clear error, hooks still removed.
    with (
        pytest.raises(RuntimeError, match="grad mode"),
        torch.no_grad(),
        H.capture_layers(net, units, keep_grad=True),
    ):
        net(batch)
    assert _hook_count(net) == 0
    with pytest.raises(ValueError), H.capture_layers(net, {"x": nn.ReLU()}, keep_grad=False):
        pass


def test_capture_layers_grad_and_detach(batch: torch.Tensor) -> None:
    net = make_net(inplace=True)
    units = A.layer_units(net, "pre", ["block3_conv1"])
    with H.capture_layers(net, units, keep_grad=False) as store:
        net(batch)
    assert not store["block3_conv1"].requires_grad
    x = batch.clone().requires_grad_(True)
    with H.capture_layers(net, units, keep_grad=True) as store:
        out = net(x)
    (g,) = torch.autograd.grad(out.sum(), [store["block3_conv1"]])
    # d logit / d (pre-ReLU) is zero wherever the ReLU clipped: the gradient is the
    # pre-ReLU one, not the post-ReLU tensor's that an in-place overwrite would give.
    ref_net = make_net(inplace=False)
    ref_units = A.layer_units(ref_net, "pre", ["block3_conv1"])
    with H.capture_layers(ref_net, ref_units, keep_grad=True) as ref_store:
        ref_out = ref_net(batch.clone().requires_grad_(True))
    (ref_g,) = torch.autograd.grad(ref_out.sum(), [ref_store["block3_conv1"]])
    torch.testing.assert_close(g, ref_g, rtol=1e-12, atol=0)
    assert (g[store["block3_conv1"] < 0] == 0).all()


def test_options_and_errors(batch: torch.Tensor) -> None:
    net = make_net()
    only_acts = A.compute_atlas(net, batch, cams=False)
    assert only_acts.cams == {} and only_acts.cams_signed == {}
    assert set(only_acts.activations) == set(NAMES)
    only_cams = A.compute_atlas(net, batch, activations=False)
    assert only_cams.activations == {} and set(only_cams.cams) == set(NAMES)
    assert only_cams.cams["block1_conv1"].shape == (4, 1, SIZE, SIZE)
    assert only_cams.cams["block5_conv3"].shape == (4, 1, SIZE // 16, SIZE // 16)
    moved = only_cams.to("cpu")
    assert moved.layer_names == only_cams.layer_names
    with pytest.raises(UserError, match="block9_conv1"):
        A.compute_atlas(net, batch, layers=["block9_conv1"])
    with pytest.raises(UserError):
        A.compute_atlas(net, batch, tap="after")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        A.compute_atlas(net, batch[0])


# --------------------------------------------------------------------------- normalisation


def test_normalize_per_map() -> None:
    gen = torch.Generator().manual_seed(0)
    cam = torch.rand(4, 1, 7, 7, generator=gen) * torch.tensor([1e-6, 1.0, 0.0, 30.0]).view(
        4, 1, 1, 1
    )
    maps, zero = N.normalize_per_map(cam)
    assert zero.tolist() == [False, False, True, False]
    torch.testing.assert_close(maps.amax(dim=(1, 2, 3)), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    assert (maps[2] == 0).all() and maps.min() >= 0
    torch.testing.assert_close(maps[3], cam[3] / cam[3].max())
    # Signed maps: negatives clipped first; an all-negative map is a zero map.
    maps2, zero2 = N.normalize_per_map(torch.stack([-cam[1], cam[1] - 0.5]))
    assert zero2.tolist() == [True, False] and (maps2[0] == 0).all()
    _, zero3 = N.normalize_per_map(cam, eps=1e-3)
    assert zero3.tolist() == [True, False, True, False]


@pytest.mark.parametrize("h", [2, 4, 8, 16, 32, 64])
def test_density_preserves_sum(h: int) -> None:
    cam = torch.rand(3, 1, h, h, dtype=torch.float64, generator=torch.Generator().manual_seed(h))
    dens = N.to_density(cam, SIZE)
    assert dens.shape == (3, 1, SIZE, SIZE)
    torch.testing.assert_close(dens.sum(dim=(1, 2, 3)), cam.sum(dim=(1, 2, 3)), rtol=1e-12, atol=0)
    up = N.upsample(cam, (SIZE, SIZE))
    torch.testing.assert_close(up.mean(dim=(1, 2, 3)), cam.mean(dim=(1, 2, 3)), rtol=1e-12, atol=0)
    assert N.upsample(cam[0, 0], SIZE).shape == (SIZE, SIZE)


def test_shared_scale_quantile_and_zero_guard() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(2, 1, 8, 8, generator=gen)
    b = torch.zeros(2, 1, 8, 8)
    b[0, 0, :4] = torch.rand(4, 8, generator=gen) * 3
    vals = torch.cat([a.flatten(), b.flatten()])
    vals = vals[vals > 0].double()
    for q in (0.0, 0.5, 0.99, 1.0):
        assert N.shared_scale([a, b], q=q) == pytest.approx(
            float(torch.quantile(vals, q)), rel=1e-12
        )
    assert N.shared_scale([torch.zeros(3, 1, 4, 4)]) == 1.0
    assert (N.normalize_shared(torch.zeros(3, 1, 4, 4), 1.0) == 0).all()
    with pytest.raises(ValueError):
        N.shared_scale([a], q=1.5)
    with pytest.raises(ValueError):
        N.shared_scale([])
    with pytest.raises(ValueError):
        N.normalize_shared(a, 0.0)
    n = N.normalize_shared(torch.tensor([-1.0, 0.5, 2.0, 9.0]), 2.0)
    torch.testing.assert_close(n, torch.tensor([0.0, 0.25, 1.0, 1.0]))


def test_shared_scale_keeps_weak_evidence_weak(batch: torch.Tensor) -> None:
    strong = make_net(seed=6)
    weak = make_net(seed=6)
    weak.load_state_dict(strong.state_dict())
    with torch.no_grad():  # same features, a 10x weaker decision
        weak.classifier[-1].weight.mul_(0.1)
        weak.classifier[-1].bias.mul_(0.1)
    s_at = A.compute_atlas(strong, batch, target="dog")
    w_at = A.compute_atlas(weak, batch, target="dog")
    s_dens = {n: N.to_density(s_at.cams[n], SIZE) for n in NAMES}
    w_dens = {n: N.to_density(w_at.cams[n], SIZE) for n in NAMES}
    scale = N.shared_scale([*s_dens.values(), *w_dens.values()])
    for name in NAMES:
        s_shared = N.normalize_shared(s_dens[name], scale)
        w_shared = N.normalize_shared(w_dens[name], scale)
        unclipped = s_shared < 1
        torch.testing.assert_close(w_shared[unclipped], 0.1 * s_shared[unclipped])
        # Per-map normalisation hides the difference entirely.
        s_map, s_zero = N.normalize_per_map(s_at.cams[name])
        w_map, w_zero = N.normalize_per_map(w_at.cams[name])
        torch.testing.assert_close(w_map, s_map)
        assert torch.equal(s_zero, w_zero)
    # Relative magnitudes between layers survive too (same scale for all of them).
    last, first = s_dens["block5_conv3"], s_dens["block1_conv1"]
    ratio = float(last.max() / first.max())
    roomy = 2 * max(last.max().item(), first.max().item())  # nothing clipped
    shared_ratio = float(
        N.normalize_shared(last, roomy).max() / N.normalize_shared(first, roomy).max()
    )
    assert shared_ratio == pytest.approx(ratio, rel=1e-9)


def test_upsample_is_bilinear_without_corner_alignment() -> None:
    """The Captum call behind upsample equals the F.interpolate it replaced, bit for bit."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(2)
    for shape, size in [((3, 1, 7, 7), 224), ((2, 1, 14, 14), (56, 28)), ((5, 9), 20)]:
        cam = torch.rand(shape, generator=gen)
        hw = (size, size) if isinstance(size, int) else size
        flat = cam.reshape(-1, 1, *cam.shape[-2:])
        ref = F.interpolate(flat, size=hw, mode="bilinear", align_corners=False)
        assert torch.equal(N.upsample(cam, size), ref.reshape(*cam.shape[:-2], *hw))


def test_eval_mode_restores_mixed_flags_and_ignores_plain_functions() -> None:
    net = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1), nn.ReLU())
    net.train()
    net[1].eval()  # a frozen BatchNorm inside a training model
    with H.eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == [True, True, False, True]

    def fn(x: torch.Tensor) -> torch.Tensor:
        return x

    with H.eval_mode(fn) as same:
        assert same is fn
