"""Bootstrap intervals, paired differences, findings, the cascade and same-checkpoint refusal."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_vgg.errors import UserError
from lightning_vgg.explain.sanity import cascade_order, cascading_randomization
from lightning_vgg.models.module import VGGClassifier
from lightning_vgg.report.compare import run_compare
from lightning_vgg.report.stats import estimate, mean_pairwise_correlation, paired_difference
from lightning_vgg.report.verdicts import THRESHOLDS, judge


def test_bootstrap_interval_covers_the_true_mean_at_its_rate() -> None:
    rng = np.random.default_rng(1)
    trials, hits = 300, 0
    for t in range(trials):
        e = estimate(rng.normal(2.0, 1.0, size=60), seed=t, b=400)
        assert e.n == 60 and e.ci95 is not None and e.ci95[0] < e.mean < e.ci95[1]
        hits += e.ci95[0] <= 2.0 <= e.ci95[1]
    # Percentile intervals run a little short at n = 60; 95 % nominal, binomial sd ~1.3 %.
    assert 0.89 <= hits / trials <= 0.99
    assert estimate([1.0], seed=0).ci95 is None  # one value: no interval, not a fake one
    assert estimate([1.0, float("nan"), 3.0]).n == 2
    assert estimate([0.1, 0.5, 0.9], seed=3) == estimate([0.1, 0.5, 0.9], seed=3)


def test_paired_difference_is_narrower_than_unpaired_and_covers_the_truth() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 5.0, size=80)  # large spread between images, shared
    a = image + 0.3 + rng.normal(0, 0.2, 80)
    b = image + rng.normal(0, 0.2, 80)
    d = paired_difference(a, b, seed=0)
    assert d.ci95 is not None and d.ci95[0] <= 0.3 <= d.ci95[1] and d.excludes(0.0)
    ea, eb = estimate(a, seed=0), estimate(b, seed=1)
    assert ea.ci95 is not None and eb.ci95 is not None
    unpaired_width = (ea.ci95[1] - ea.ci95[0]) + (eb.ci95[1] - eb.ci95[0])
    assert d.ci95[1] - d.ci95[0] < unpaired_width / 10
    with pytest.raises(ValueError, match="image for image"):
        paired_difference([1.0, 2.0], [1.0])


def test_mean_pairwise_correlation() -> None:
    rng = np.random.default_rng(0)
    same = np.repeat(rng.random((1, 7, 7)), 5, axis=0) * rng.random((5, 1, 1))
    assert mean_pairwise_correlation(same) == pytest.approx(1.0)
    assert mean_pairwise_correlation(np.zeros((4, 3, 3))) == pytest.approx(1.0)
    assert abs(mean_pairwise_correlation(rng.random((40, 14, 14)))) < 0.05


LAYERS = ["block1_conv1", "block5_conv3"]


def _fake(prob: list[float], *, similarity: float = 0.2, dead: float = 0.0, faithful: bool = True):
    n = len(prob)
    rng = np.random.default_rng(len(prob))
    noise = rng.normal(0, 0.01, n)
    dele = (0.2 if faithful else 0.5) + noise
    ins = (0.8 if faithful else 0.5) + noise
    per = SimpleNamespace(
        features={lay: {"sparsity": list(0.5 + noise)} for lay in LAYERS},
        gradcam={lay: {"cam_entropy": list(0.7 + noise)} for lay in LAYERS},
        sanity={lay: list(noise) for lay in LAYERS},
        faithfulness={
            "deletion_auc": list(dele),
            "insertion_auc": list(ins),
            "random_deletion_auc": list(0.5 + rng.normal(0, 0.01, n)),
            "random_insertion_auc": list(0.5 + rng.normal(0, 0.01, n)),
        },
    )
    feats = {lay: SimpleNamespace(dead_channel_fraction=dead) for lay in LAYERS}
    return SimpleNamespace(
        prob_dog=prob, per_image=per, cam_similarity=similarity, layers=LAYERS, features=feats
    )


def _titles(verdict) -> set[str]:
    return {f.title for f in verdict.findings}


def test_findings_triggered_and_not() -> None:
    labels = [0] * 60 + [1] * 60
    rng = np.random.default_rng(0)
    good_p = [float(v) for v in np.r_[rng.uniform(0, 0.3, 60), rng.uniform(0.7, 1, 60)]]
    good_p[0] = 0.9  # one mistake
    bad_p = [float(v) for v in rng.uniform(0.4, 0.6, 120)]
    healthy = judge({"good": _fake(good_p), "bad": _fake(bad_p)}, labels)
    assert _titles(healthy) == set(), healthy.findings
    assert healthy.accuracy["good"].mean == pytest.approx(119 / 120)
    assert healthy.accuracy_difference.excludes(0.0)

    const = [0.5 + 0.001 * (i % 3) for i in range(120)]
    broken = judge(
        {
            "good": _fake(const, similarity=0.99, dead=0.8, faithful=False),
            "bad": _fake(good_p),
        },
        labels,
    )
    titles = _titles(broken)
    assert {
        "Near-constant output (good)",
        "Input-invariant explanations (good)",
        "Dead layers (good)",
        "Faithfulness not better than random (good)",
        "Good model near chance",
        "Bad model not worse",
    } <= titles
    assert "Near-constant output (bad)" not in titles
    assert all(
        f.anchor in {"setup", "measures-gradcam", "measures-features", "faithfulness"}
        for f in broken.findings
    )

    few = judge(
        {"good": _fake(good_p[:10] + good_p[60:70]), "bad": _fake(bad_p[:20])}, [0] * 10 + [1] * 10
    )
    assert "Too few images" in _titles(few)
    assert THRESHOLDS.min_per_class == 50 and THRESHOLDS.cam_similarity == 0.95


def test_cascade_randomises_from_the_top_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = VGGClassifier(width=1 / 16, hidden=64, input_size=64).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 3, 64, 64)
    sign = torch.where(torch.sigmoid(model(x)) >= 0.5, 1.0, -1.0)
    steps, rho = cascading_randomization(model, x, sign, "block5_conv3", seed=0)
    assert steps == cascade_order() and steps[:2] == ["classifier", "block5_conv3"]
    assert steps[-1] == "block1_conv1" and rho.shape == (14, 6)
    assert bool(((rho >= -1) & (rho <= 1)).all())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Monotone-ish: with everything randomised the map is further from the trained one
    # than after the classifier alone (the conv layers that made it are gone).
    assert float(rho[-1].mean()) < float(rho[0].mean()) + 0.05 or float(rho[0].mean()) < 0.3
    again = cascading_randomization(model, x, sign, "block5_conv3", seed=0)[1]
    assert torch.equal(rho, again)


def _ckpt(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = VGGClassifier(width=1 / 16, hidden=64, input_size=32)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


def test_compare_refuses_the_same_checkpoint_twice(tmp_path: Path) -> None:
    a = _ckpt(tmp_path / "a" / "version_0" / "checkpoints" / "best.ckpt", 0)
    with pytest.raises(UserError, match="same checkpoint"):
        run_compare(str(a), str(a), str(tmp_path / "out"), device="cpu")
    copy = tmp_path / "b" / "version_0" / "checkpoints" / "best.ckpt"
    copy.parent.mkdir(parents=True)
    shutil.copy(a, copy)
    with pytest.raises(UserError, match="identical weights"):
        run_compare(str(a), str(copy), str(tmp_path / "out"), device="cpu")
    assert not (tmp_path / "out").exists()
