"""Verdicts from the numbers: paired good-vs-bad differences and the report's findings.

:func:`judge` takes both models' measures on the same images and returns a
:class:`Verdict`: each model's accuracy with its bootstrap interval, the paired
differences (good − bad, image by image) of every per-image measure, each model's
faithfulness against its random-order baseline (paired over images), and the
:class:`Finding` s that the thresholds in :data:`THRESHOLDS` trigger. The thresholds
live here and only here; the report prints them beside the findings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lightning_vgg.report.results import ModelMeasures
from lightning_vgg.report.stats import Estimate, estimate, paired_difference

__all__ = ["THRESHOLDS", "Finding", "Thresholds", "Verdict", "judge"]


@dataclass(frozen=True)
class Thresholds:
    """When a finding is raised (all on the measured images)."""

    #: Near-constant output: std of P(dog) below this ...
    output_std: float = 0.02
    #: ... or max − min of P(dog) below this.
    output_range: float = 0.05
    #: Input-invariant explanations: mean pairwise correlation of the last layer's maps above.
    cam_similarity: float = 0.95
    #: Dead layer: share of channels that never fire above this.
    dead_fraction: float = 0.5
    #: Good model near chance: accuracy below this (or its interval includes 0.5).
    min_accuracy: float = 0.60
    #: Too few images: fewer than this per class.
    min_per_class: int = 50

    def rows(self) -> list[tuple[str, str]]:
        """``(finding, rule)`` in words, for the report's threshold table."""
        return [
            (
                "near-constant output",
                f"std of P(dog) < {self.output_std} or max − min < {self.output_range}",
            ),
            (
                "input-invariant explanations",
                f"mean pairwise correlation of the last layer's Grad-CAMs > {self.cam_similarity}",
            ),
            ("dead layer", f"dead-channel fraction > {self.dead_fraction:.0%}"),
            (
                "good model near chance",
                f"accuracy < {self.min_accuracy:.0%} or its 95% CI includes 50%",
            ),
            (
                "faithfulness not better than random",
                "95% CI of (Grad-CAM − random) AUC includes 0 or has the wrong sign",
            ),
            (
                "bad model not worse",
                "95% CI of the accuracy difference (good − bad) includes 0 or favours bad",
            ),
            ("too few images", f"fewer than {self.min_per_class} images per class"),
        ]


#: The one set of thresholds the report uses.
THRESHOLDS = Thresholds()


@dataclass(frozen=True)
class Finding:
    """One sentence of the findings, with the section (anchor) holding its evidence."""

    title: str
    text: str
    anchor: str


@dataclass(frozen=True)
class Verdict:
    """The comparison's judged numbers (see the module docstring)."""

    accuracy: dict[str, Estimate]
    accuracy_difference: Estimate
    #: ``part -> layer -> measure -> paired difference good − bad``.
    differences: dict[str, dict[str, dict[str, Estimate]]]
    #: ``model -> deletion|insertion -> paired difference Grad-CAM − random``.
    vs_random: dict[str, dict[str, Estimate]]
    #: ``model -> std and range of P(dog)``.
    output_spread: dict[str, tuple[float, float]]
    per_class: tuple[int, int]
    findings: list[Finding]


def _correct(m: ModelMeasures, labels: Sequence[int]) -> np.ndarray:
    return ((np.asarray(m.prob_dog) >= 0.5) == np.asarray(labels, dtype=bool)).astype(float)


def _differences(
    good: ModelMeasures, bad: ModelMeasures, seed: int
) -> dict[str, dict[str, dict[str, Estimate]]]:
    out: dict[str, dict[str, dict[str, Estimate]]] = {}
    for part in ("features", "gradcam"):
        g, b = getattr(good.per_image, part), getattr(bad.per_image, part)
        out[part] = {
            layer: {k: paired_difference(v, b[layer][k], seed) for k, v in g[layer].items()}
            for layer in g
        }
    out["sanity"] = {
        layer: {"spearman": paired_difference(v, bad.per_image.sanity[layer], seed)}
        for layer, v in good.per_image.sanity.items()
    }
    return out


def _vs_random(m: ModelMeasures, seed: int) -> dict[str, Estimate]:
    f = m.per_image.faithfulness
    return {
        kind: paired_difference(f[f"{kind}_auc"], f[f"random_{kind}_auc"], seed)
        for kind in ("deletion", "insertion")
    }


def _ci(e: Estimate, pct: bool = False) -> str:
    if e.ci95 is None:
        return "no CI"
    lo, hi = e.ci95
    return f"95% CI [{lo:.1%}, {hi:.1%}]" if pct else f"95% CI [{lo:.3f}, {hi:.3f}]"


def _findings(v: Verdict, measures: Mapping[str, ModelMeasures], t: Thresholds) -> list[Finding]:
    out: list[Finding] = []
    cats, dogs = v.per_class
    if min(cats, dogs) < t.min_per_class:
        out.append(
            Finding(
                "Too few images",
                f"{cats} cats and {dogs} dogs were measured (fewer than {t.min_per_class} per class): every interval is wide and the findings below are tentative.",
                "setup",
            )
        )
    good_acc = v.accuracy["good"]
    if good_acc.mean < t.min_accuracy or not good_acc.excludes(0.5):
        out.append(
            Finding(
                "Good model near chance",
                f"the good model's accuracy is {good_acc.mean:.1%} ({_ci(good_acc, True)}).",
                "setup",
            )
        )
    d = v.accuracy_difference
    if d.mean <= 0 or not d.excludes(0.0):
        out.append(
            Finding(
                "Bad model not worse",
                f"accuracy good − bad is {d.mean:+.1%} ({_ci(d, True)}, paired over the same images): the comparison does not show the bad model to be worse.",
                "setup",
            )
        )
    for name, m in measures.items():
        std, rng = v.output_spread[name]
        if std < t.output_std or rng < t.output_range:
            out.append(
                Finding(
                    f"Near-constant output ({name})",
                    f"P(dog) has std {std:.4f} and range {rng:.4f} over the measured images: the {name} model answers (almost) the same for every image, and its maps explain that constant.",
                    "setup",
                )
            )
        if m.cam_similarity > t.cam_similarity:
            out.append(
                Finding(
                    f"Input-invariant explanations ({name})",
                    f"the {name} model's {m.layers[-1]} Grad-CAMs have a mean pairwise correlation of {m.cam_similarity:.3f}: about the same map for every image.",
                    "measures-gradcam",
                )
            )
        dead = [
            layer for layer in m.layers if m.features[layer].dead_channel_fraction > t.dead_fraction
        ]
        if dead:
            out.append(
                Finding(
                    f"Dead layers ({name})",
                    f"more than {t.dead_fraction:.0%} of the channels never fire in {', '.join(dead)}.",
                    "measures-features",
                )
            )
        dele, ins = v.vs_random[name]["deletion"], v.vs_random[name]["insertion"]
        if not (dele.mean < 0 and dele.excludes(0.0)) or not (ins.mean > 0 and ins.excludes(0.0)):
            out.append(
                Finding(
                    f"Faithfulness not better than random ({name})",
                    f"Grad-CAM − random AUC: deletion {dele.mean:+.3f} ({_ci(dele)}; lower is better), insertion {ins.mean:+.3f} ({_ci(ins)}; higher is better).",
                    "faithfulness",
                )
            )
    return out


def judge(
    measures: Mapping[str, ModelMeasures],
    labels: Sequence[int],
    seed: int = 0,
    thresholds: Thresholds = THRESHOLDS,
) -> Verdict:
    """Paired differences and findings of ``measures['good']`` vs ``measures['bad']``."""
    good, bad = measures["good"], measures["bad"]
    correct = {n: _correct(m, labels) for n, m in measures.items()}
    lab = np.asarray(labels)
    spread = {}
    for n, m in measures.items():
        p = np.asarray(m.prob_dog, dtype=float)
        spread[n] = (float(p.std()), float(p.max() - p.min())) if p.size else (0.0, 0.0)
    verdict = Verdict(
        accuracy={n: estimate(c, seed) for n, c in correct.items()},
        accuracy_difference=paired_difference(correct["good"], correct["bad"], seed),
        differences=_differences(good, bad, seed),
        vs_random={n: _vs_random(m, seed) for n, m in measures.items()},
        output_spread=spread,
        per_class=(int((lab == 0).sum()), int((lab == 1).sum())),
        findings=[],
    )
    verdict.findings.extend(_findings(verdict, measures, thresholds))
    return verdict
