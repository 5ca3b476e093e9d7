"""Tests of the feature-map, Grad-CAM, faithfulness and sanity-check measures."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pytest
import torch
from scipy.stats import spearmanr
from torch import Tensor, nn

from lightning_vgg.explain import faithfulness as faith
from lightning_vgg.explain import measures as M
from lightning_vgg.explain import sanity as S
from lightning_vgg.models.vgg import VGG16

# --------------------------------------------------------------------------- feature maps


def test_dead_channel_fraction_needs_dead_on_every_image() -> None:
    acts = torch.rand(3, 8, 4, 4) + 0.1
    acts[:, [2, 5]] = 0.0  # dead on every image
    acts[0, 7] = 0.0  # silent on one image only: selective, not dead
    assert M.dead_channel_fraction(acts) == pytest.approx(0.25)
    per_image = M.dead_channel_fraction_per_image(acts)
    assert per_image.tolist() == pytest.approx([3 / 8, 2 / 8, 2 / 8])
    # eps lifts near-zero channels into the dead set
    acts[:, 3] = 1e-6
    assert M.dead_channel_fraction(acts) == pytest.approx(0.25)
    assert M.dead_channel_fraction(acts, eps=1e-5) == pytest.approx(3 / 8)


def test_spatial_contrast_constant_spike_and_dead() -> None:
    const = torch.full((2, 3, 4, 4), 2.0)
    assert M.spatial_contrast(const) == pytest.approx(0.0)
    spike = torch.zeros(2, 3, 4, 4)
    spike[..., 1, 2] = 5.0
    assert M.spatial_contrast(spike) == pytest.approx(math.sqrt(16 - 1), rel=1e-5)
    # dead channels are skipped instead of producing 0/0
    mixed = torch.cat([spike[:, :1], torch.zeros(2, 4, 4, 4)], dim=1)
    assert M.spatial_contrast(mixed) == pytest.approx(math.sqrt(15), rel=1e-5)
    assert M.spatial_contrast(torch.zeros(2, 3, 4, 4)) == 0.0
    per_image = M.spatial_contrast_per_image(torch.cat([spike[:1], const[:1]]))
    assert per_image.tolist() == pytest.approx([math.sqrt(15), 0.0], rel=1e-5)


def test_sparsity_and_hoyer() -> None:
    acts = torch.ones(2, 2, 2, 2)
    acts.view(-1)[[0, 3, 4, 9, 15]] = 0.0
    assert M.sparsity(acts) == pytest.approx(5 / 16)
    assert M.hoyer_sparsity(torch.ones(2, 2, 3, 3)) == pytest.approx(0.0, abs=1e-6)
    one_hot = torch.zeros(2, 2, 3, 3)
    one_hot[:, 0, 1, 1] = 3.0
    assert M.hoyer_sparsity(one_hot) == pytest.approx(1.0)
    assert M.hoyer_sparsity(torch.zeros(2, 2, 3, 3)) == 1.0
    row = M.feature_map_measures(acts)
    assert set(row) == {
        "dead_channel_fraction",
        "dead_channel_fraction_per_image",
        "spatial_contrast",
        "sparsity",
        "hoyer_sparsity",
    }
    assert all(math.isfinite(v) for v in row.values())


# --------------------------------------------------------------------------- Grad-CAM focus


def test_cam_entropy_and_top_mass() -> None:
    uniform = torch.ones(1, 1, 10, 10)
    peak = torch.zeros(1, 1, 10, 10)
    peak[0, 0, 3, 4] = 7.0
    zero = torch.zeros(1, 1, 10, 10)
    maps = torch.cat([uniform, peak, zero])
    ent, zmask = M.cam_entropy(maps, return_zero_mask=True)
    assert ent[0].item() == pytest.approx(1.0)
    assert ent[1].item() == pytest.approx(0.0)
    assert ent[2].item() == 1.0  # zero map: "no focus", flagged by the mask
    assert zmask.tolist() == [False, False, True]
    assert torch.equal(M.zero_map_mask(maps), zmask)
    raw = M.cam_entropy(maps[:, 0], normalized=False)  # (N, h, w) input
    assert raw[0].item() == pytest.approx(math.log(100), rel=1e-6)
    top = M.top_mass_share(maps, q=0.10)
    assert top.tolist() == pytest.approx([0.10, 1.0, 0.10])
    assert ent[1] < ent[0] and top[1] > top[0]
    row = M.cam_measures(maps)
    assert row["zero_map_fraction"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        M.cam_entropy(torch.ones(2, 3, 4, 4))


# --------------------------------------------------------------------------- faithfulness


class QuadrantModel(nn.Module):
    """Toy classifier whose logit is the (scaled) sum of the top-left quadrant's pixels."""

    def __init__(self, size: int) -> None:
        super().__init__()
        weight = torch.zeros(3, size, size)
        weight[:, : size // 2, : size // 2] = 4.0 / (3 * (size // 2) ** 2)
        self.register_buffer("weight", weight)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return (x * self.weight).sum(dim=(1, 2, 3))


def test_deletion_insertion_prefers_the_oracle_map() -> None:
    size, n, steps = 8, 3, 8
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=gen) * 0.5 + 0.5
    model = QuadrantModel(size)
    oracle = torch.zeros(n, size, size)
    oracle[:, : size // 2, : size // 2] = 1.0
    anti = 1.0 - oracle
    res = {
        name: faith.deletion_insertion(
            model,
            images,
            sal,
            torch.ones(n),
            steps=steps,
            deletion_baseline="zero",
            insertion_baseline="zero",
            batch_size=10,
        )
        for name, sal in {"oracle": oracle, "anti": anti}.items()
    }
    res["random"] = faith.random_deletion_insertion(
        model,
        images,
        1.0,
        generator=gen,
        steps=steps,
        deletion_baseline="zero",
        insertion_baseline="zero",
    )
    full = model(images)
    for r in res.values():
        assert r["deletion_prob"].shape == (n, steps + 1)
        assert r["fractions"].tolist() == pytest.approx([k / steps for k in range(steps + 1)])
        # deletion starts at the full image, insertion at the baseline (score 0)
        assert torch.allclose(r["deletion_logit"][:, 0], full)
        assert torch.allclose(r["insertion_logit"][:, 0], torch.zeros(n))
        assert torch.allclose(r["deletion_logit"][:, -1], torch.zeros(n))
        assert torch.allclose(r["insertion_logit"][:, -1], full)
        for key in ("deletion_auc", "insertion_auc"):
            assert ((r[key] >= 0) & (r[key] <= 1)).all()
    o, a, rnd = res["oracle"], res["anti"], res["random"]
    assert (o["deletion_auc"] < rnd["deletion_auc"] - 0.05).all()
    assert (rnd["deletion_auc"] < a["deletion_auc"] - 0.05).all()
    assert (o["insertion_auc"] > rnd["insertion_auc"] + 0.05).all()
    assert (rnd["insertion_auc"] > a["insertion_auc"] + 0.05).all()
    # the oracle removes the whole quadrant in the first quarter of the steps
    assert torch.allclose(o["deletion_logit"][:, 2:], torch.zeros(n, steps - 1), atol=1e-6)
    assert (o["deletion_auc_logit"] < a["deletion_auc_logit"]).all()


def test_deletion_insertion_sign_batching_and_baselines() -> None:
    size, n, steps = 8, 2, 4
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))
    sal = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(2))
    model = QuadrantModel(size).train()
    sign = torch.tensor([1.0, -1.0])
    big = faith.deletion_insertion(
        model, images, sal, sign, steps=steps, deletion_baseline="mean", insertion_baseline="mean"
    )
    assert model.calls == 1  # 2 images x 2 curves x 4 steps fit in one forward pass
    assert model.training  # eval only for the call
    small = faith.deletion_insertion(
        model,
        images,
        sal,
        sign,
        steps=steps,
        deletion_baseline="mean",
        insertion_baseline="mean",
        batch_size=3,
    )
    for key in ("deletion_logit", "insertion_logit", "deletion_auc"):
        assert torch.allclose(big[key], small[key])
    assert torch.allclose(big["deletion_logit"][:, 0], model(images) * sign)
    assert torch.allclose(big["deletion_prob"], torch.sigmoid(big["deletion_logit"]))
    blur = faith.deletion_insertion(
        model, images, sal, sign, steps=steps, deletion_baseline="blur", insertion_baseline="blur"
    )
    assert torch.isfinite(blur["insertion_auc"]).all()
    # all-zero saliency: deterministic raster order, same result twice
    flat = torch.zeros(n, size, size)
    r1 = faith.deletion_insertion(
        model, images, flat, sign, steps=steps, deletion_baseline="zero", insertion_baseline="zero"
    )
    r2 = faith.deletion_insertion(
        model, images, flat, sign, steps=steps, deletion_baseline="zero", insertion_baseline="zero"
    )
    assert torch.equal(r1["deletion_logit"], r2["deletion_logit"])
    with pytest.raises(ValueError, match="upsample"):
        faith.deletion_insertion(model, images, torch.zeros(n, 4, 4), sign)


def test_gaussian_blur_keeps_constants_and_random_saliency_shape() -> None:
    const = torch.full((1, 3, 6, 6), 0.3)
    assert torch.allclose(faith.gaussian_blur(const, 2.0), const)
    gen = torch.Generator().manual_seed(3)
    noise = faith.random_saliency((2, 5, 5), gen)
    assert noise.shape == (2, 5, 5) and noise.min() >= 0 and noise.max() < 1


# --------------------------------------------------------------------------- sanity check


def test_spearman_matches_scipy_with_ties() -> None:
    gen = torch.Generator().manual_seed(4)
    a = torch.randint(0, 5, (4, 3, 7), generator=gen).float()  # many ties
    b = torch.randint(0, 5, (4, 3, 7), generator=gen).float()
    b[0] = a[0] * 2 + torch.rand(3, 7, generator=gen)  # a correlated pair
    rho = S.spearman_rank_correlation(a, b)
    expected = [spearmanr(a[i].flatten(), b[i].flatten()).statistic for i in range(4)]
    assert rho.tolist() == pytest.approx(expected, abs=1e-6)
    assert S.spearman_rank_correlation(a, a).tolist() == pytest.approx([1.0] * 4)
    rev = -a
    assert S.spearman_rank_correlation(a, rev).tolist() == pytest.approx([-1.0] * 4)
    const = torch.zeros(4, 3, 7)
    assert S.spearman_rank_correlation(a, const).tolist() == [0.0] * 4


def test_spearman_agrees_with_torchmetrics_up_to_its_int32_limit() -> None:
    """torchmetrics' spearman_corrcoef was the candidate replacement: equal to float32
    rounding on maps up to 65,535 pixels, with ties and constant maps, but its int32
    rank sums overflow on a longer run of ties, so ours stays (see its docstring)."""
    from torchmetrics.functional import spearman_corrcoef

    def theirs(a: Tensor, b: Tensor) -> Tensor:
        return spearman_corrcoef(a.flatten(1).double().T, b.flatten(1).double().T).reshape(-1)

    gen = torch.Generator().manual_seed(11)
    for shape in [(4, 1, 7, 7), (3, 1, 28, 28), (2, 1, 224, 224)]:
        a = torch.relu(torch.randn(shape, generator=gen))  # ReLU: ties at zero
        b = torch.relu(torch.randn(shape, generator=gen) + 0.3 * a)
        a[0] = 0.0  # constant: 0 in both
        b[1] = b[1].round()  # heavy ties
        ours = S.spearman_rank_correlation(a, b).double()
        assert (ours - theirs(a, b)).abs().max() <= 1e-6, shape
    a = torch.zeros(1, 1, 300, 300)
    a[..., :10, :] = torch.rand(1, 1, 10, 300, generator=gen) + 1  # 87,000 tied zeros
    b = a + 0.1 * torch.rand(a.shape, generator=gen)
    expected = spearmanr(a.flatten(), b.flatten()).statistic
    assert float(S.spearman_rank_correlation(a, b)[0]) == pytest.approx(expected, abs=1e-6)


def test_randomized_copy_reinitialises_everything() -> None:
    torch.manual_seed(5)
    model = VGG16(width=1 / 16, input_size=32, hidden=64)
    with torch.no_grad():  # pretend it was trained: no parameter or BN stat at its init value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, buf in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.uniform_(0.5, 1.5)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    rand = S.randomized_copy(model, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert not rand.training and model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # original untouched
    for (name, p), (_, q) in zip(model.named_parameters(), rand.named_parameters(), strict=True):
        assert q.shape == p.shape and q.device == p.device and q.dtype == p.dtype
        assert not torch.equal(p, q), name
    for name, buf in rand.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            assert not torch.equal(buf, model.get_buffer(name)), name
    again = S.randomized_copy(model, seed=7)
    assert all(
        torch.equal(x, y) for x, y in zip(rand.parameters(), again.parameters(), strict=True)
    )
    other = S.randomized_copy(model, seed=8)
    assert not torch.equal(next(rand.parameters()), next(other.parameters()))


# --------------------------------------------------------------------------- summaries


def layer_table(
    per_layer: Mapping[str, Mapping[str, float]], layer_key: str = "layer"
) -> list[dict[str, str | float | None]]:
    """Rows for a report (test-only helper, moved from measures.py): one per layer, in the mapping's order.

    Columns are ``layer_key`` followed by the union of all measure names in
    first-seen order; a measure missing for a layer is ``None``.
    """
    columns: dict[str, None] = {}
    for measures in per_layer.values():
        columns.update(dict.fromkeys(measures))
    return [
        {layer_key: name, **{c: measures.get(c) for c in columns}}
        for name, measures in per_layer.items()
    ]


def markdown_table(rows: Sequence[Mapping[str, object]], float_format: str = ".3f") -> str:
    """A GitHub-flavoured Markdown table of :func:`layer_table` rows ("" for no rows)."""
    if not rows:
        return ""
    columns = list(dict.fromkeys(c for row in rows for c in row))

    def cell(v: object) -> str:
        if v is None:
            return ""
        return format(v, float_format) if isinstance(v, float) else str(v)

    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def test_layer_table_and_markdown() -> None:
    rows = layer_table({"block1_conv1": {"a": 0.5}, "block1_conv2": {"a": 0.25, "b": 1.0}})
    assert rows == [
        {"layer": "block1_conv1", "a": 0.5, "b": None},
        {"layer": "block1_conv2", "a": 0.25, "b": 1.0},
    ]
    md = markdown_table(rows).splitlines()
    assert md[0] == "| layer | a | b |"
    assert md[2] == "| block1_conv1 | 0.500 |  |"
    assert markdown_table([]) == ""
