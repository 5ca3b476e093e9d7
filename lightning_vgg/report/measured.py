"""The report's measured sections: findings, per-layer measures, faithfulness, sanity.

Every per-image measure is shown as its mean over images with a bootstrap 95 %
interval, ``mean [lo, hi]``, and every good-vs-bad difference with a paired interval
(the same images for both models); measures that are not per image say so and carry
no interval. Numbers come from :class:`~lightning_vgg.report.results.ModelMeasures`
and :class:`~lightning_vgg.report.verdicts.Verdict`, as ``measures.json`` records them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lightning_vgg.report.figures import (
    SaveFigure,
    cascade_curves,
    deletion_insertion_curves,
    measures_by_layer,
)
from lightning_vgg.report.history import SEED_ROWS
from lightning_vgg.report.html import Cell, Image, Para, Section, Table, ci_cell, fmt
from lightning_vgg.report.results import ModelMeasures
from lightning_vgg.report.stats import BOOTSTRAP_B, Estimate
from lightning_vgg.report.verdicts import THRESHOLDS, Verdict

__all__ = [
    "CAM_FOCUS",
    "FEATURES",
    "faithfulness_section",
    "findings_section",
    "layer_part_section",
    "sanity_section",
]

NAMES = list(SEED_ROWS)

_Blocks = list[Para | Table | Image | Section]


def ci_words(seed: int) -> str:
    """How the intervals were made, for the sections' text."""
    return (
        f"[lo, hi] is a percentile bootstrap 95% CI of the mean over images (B = {BOOTSTRAP_B} "
        f"resamples, seed {seed}); good − bad is bootstrapped paired, image by image."
    )


def _est(e: Estimate, kind: str) -> Cell:
    return ci_cell(e.mean, e.ci95, kind)


def findings_section(verdict: Verdict, measures: Mapping[str, ModelMeasures]) -> Section:
    """What the numbers say, each finding linked to its evidence, and the thresholds."""
    blocks: _Blocks = []
    for f in verdict.findings:
        blocks.append(Para(f"{f.title}: {f.text} [Evidence](#{f.anchor}).", note=True))
    if not verdict.findings:
        blocks.append(Para("No finding was triggered by the thresholds below."))
    acc, d = verdict.accuracy, verdict.accuracy_difference
    blocks.append(
        Para(
            "Accuracy on the measured images: "
            + "; ".join(f"{n} {fmt(acc[n].mean, 'pct')} {_ci(acc[n])}" for n in NAMES)
            + f"; good − bad {d.mean:+.1%} {_ci(d)} (paired). [Setup](#setup)."
        )
    )
    blocks.append(
        Table(["finding", "raised when"], [list(r) for r in THRESHOLDS.rows()], "Thresholds")
    )
    return Section("findings", "Findings", blocks)


def _ci(e: Estimate) -> str:
    return "" if e.ci95 is None else f"(95% CI {e.ci95[0]:.1%} to {e.ci95[1]:.1%})"


@dataclass(frozen=True)
class _Measure:
    """One measure shown as a table (layers × good, bad, good − bad) and a figure panel."""

    key: str
    label: str
    kind: str
    #: What the measure is and which direction is healthy.
    meaning: str
    per_image: bool = True


@dataclass(frozen=True)
class _LayerPart:
    """One per-layer part of :class:`ModelMeasures`: its measures, text and figure."""

    part: str
    title: str
    text: str
    measures: tuple[_Measure, ...]
    figure_title: str
    alt: str


FEATURES = _LayerPart(
    part="features",
    title="Feature maps, measured",
    text="Feature maps after the ReLU, per layer, on every measured image.",
    measures=(
        _Measure(
            "dead_channel_fraction",
            "dead channels",
            "pct",
            "share of channels that never fire on any measured image (set-wide: not a "
            "per-image quantity, so no interval). Healthy: 0%.",
            per_image=False,
        ),
        _Measure(
            "dead_channel_fraction_per_image",
            "channels silent per image",
            "pct",
            "share of channels whose whole map is zero on an image, averaged over images "
            "(a channel may be silent on one image and fire on another). Healthy: well "
            "below 100%; many silent channels mean a narrow code.",
        ),
        _Measure(
            "spatial_contrast",
            "spatial contrast",
            "float",
            "std/mean over each live channel's map, averaged per image (0 = the same "
            "everywhere, carries no 'where'). Healthy: clearly above 0; higher means more "
            "localised maps (it is not bounded; compare the two models).",
        ),
        _Measure(
            "sparsity",
            "zero activations",
            "pct",
            "share of exact zeros after the ReLU. Healthy: in between (about half is "
            "usual for ReLU networks); near 100% the layer is dying, near 0% the ReLU "
            "never gates.",
        ),
        _Measure(
            "hoyer_sparsity",
            "Hoyer sparsity",
            "float",
            "scale-free sparsity of each image's code, 0..1 (0 = every unit equally "
            "active, 1 = a single unit). Healthy: in between; near 1 the code is "
            "collapsing onto a few units.",
        ),
    ),
    figure_title="Feature maps (mean over images, shaded: 95% CI)",
    alt="feature-map measures by layer",
)

CAM_FOCUS = _LayerPart(
    part="gradcam",
    title="Grad-CAM focus, measured",
    text="Per layer, on the Grad-CAM of each image's predicted class at the layer's own "
    "resolution.",
    measures=(
        _Measure(
            "cam_entropy",
            "entropy",
            "float",
            "normalised entropy (0 = one pixel, 1 = uniform; an all-zero map counts as 1). "
            "Lower = more focused.",
        ),
        _Measure(
            "top_mass_share",
            "top-10% mass",
            "pct",
            "share of the evidence in the top 10% of pixels (10% = uniform). Higher = more "
            "focused.",
        ),
        _Measure(
            "zero_map_fraction",
            "all-zero maps",
            "pct",
            "share of images whose map has no positive evidence at all. Healthy: 0%.",
        ),
    ),
    figure_title="Grad-CAM of the predicted class (mean over images, shaded: 95% CI)",
    alt="Grad-CAM measures by layer",
)


def _value(m: ModelMeasures, part: str, layer: str, measure: _Measure) -> Estimate | float:
    entry = getattr(m, part)[layer]
    return entry.per_image[measure.key] if measure.per_image else getattr(entry, measure.key)


def _measure_table(
    measures: Mapping[str, ModelMeasures], verdict: Verdict, part: str, measure: _Measure
) -> Table:
    columns = ["layer", *NAMES] + (["good − bad (paired)"] if measure.per_image else [])
    rows = []
    for layer in measures["good"].layers:
        row: list[Cell | str] = [layer]
        for n in NAMES:
            v = _value(measures[n], part, layer, measure)
            row.append(
                _est(v, measure.kind) if isinstance(v, Estimate) else ci_cell(v, None, measure.kind)
            )
        if measure.per_image:
            row.append(_est(verdict.differences[part][layer][measure.key], measure.kind))
        rows.append(row)
    return Table(columns, rows, f"{measure.label}: {measure.meaning}")


def layer_part_section(
    measures: Mapping[str, ModelMeasures],
    verdict: Verdict,
    spec: _LayerPart,
    save: SaveFigure,
    seed: int,
) -> Section:
    """Feature-map health (:data:`FEATURES`) or Grad-CAM focus (:data:`CAM_FOCUS`) by layer."""
    values: dict[str, dict[str, dict[str, float]]] = {n: {} for n in NAMES}
    bands: dict[str, dict[str, dict[str, tuple[float, float] | None]]] = {n: {} for n in NAMES}
    for n in NAMES:
        for layer in measures[n].layers:
            for m in spec.measures:
                v = _value(measures[n], spec.part, layer, m)
                values[n].setdefault(layer, {})[m.key] = v.mean if isinstance(v, Estimate) else v
                if isinstance(v, Estimate):
                    bands[n].setdefault(layer, {})[m.key] = v.ci95
    panels = []
    for m in spec.measures:
        flat = all(values[n][layer][m.key] == 0 for n in NAMES for layer in values[n])
        panels.append((m.key, m.label + (" — all zero, both models" if flat else "")))
    percent = {m.key for m in spec.measures if m.kind == "pct"}
    figure = measures_by_layer(
        values, panels, title=spec.figure_title, bands=bands, percent=percent
    )
    blocks: _Blocks = [Para(f"{spec.text} {ci_words(seed)}")]
    blocks += [_measure_table(measures, verdict, spec.part, m) for m in spec.measures]
    blocks.append(Image(save(figure, f"measures_{spec.part}.png"), spec.alt))
    return Section(f"measures-{spec.part}", spec.title, blocks)


def faithfulness_section(
    measures: Mapping[str, ModelMeasures], verdict: Verdict, save: SaveFigure, seed: int
) -> Section:
    """Deletion and insertion areas of Grad-CAM against random pixel orders, with CIs."""
    rows = []
    for n in NAMES:
        f = measures[n].faithfulness
        vs = verdict.vs_random[n]
        for layer, g in f.gradcam.items():
            last = layer == f.layer
            rows.append(
                [
                    n,
                    layer,
                    _est(g.deletion_auc, "float"),
                    _est(f.random.deletion_auc, "float"),
                    _est(vs["deletion"], "float") if last else Cell("—"),
                    _est(g.insertion_auc, "float"),
                    _est(f.random.insertion_auc, "float"),
                    _est(vs["insertion"], "float") if last else Cell("—"),
                ]
            )
    fa = measures["good"].faithfulness
    curves = {n: measures[n].faithfulness.curves for n in NAMES}
    figure = deletion_insertion_curves(curves, fa.layer, fa.baseline)
    columns = [
        "model",
        "layer",
        "deletion AUC (Grad-CAM)",
        "deletion AUC (random)",
        "Grad-CAM − random (deletion; < 0 is better)",
        "insertion AUC (Grad-CAM)",
        "insertion AUC (random)",
        "Grad-CAM − random (insertion; > 0 is better)",
    ]
    text = (
        f"Pixels are removed (deletion) or revealed (insertion) in the order of the "
        f"Grad-CAM of the predicted class, in {fa.steps} equal steps, as RISE "
        "(Petsiuk et al. 2018) defines the game: deleted pixels become the "
        f"`{fa.deletion_baseline}` baseline, insertion starts from the "
        f"`{fa.insertion_baseline}` baseline (RISE: zero = black, and RISE's blur); the "
        "curve follows the probability of the predicted class and the area is the "
        "trapezoid rule over the fraction of pixels (0 to 1). A faithful map has a lower "
        "deletion and a higher insertion area than a random pixel order (same random "
        "orders for both models); the difference to random is paired over images. " + ci_words(seed)
    )
    return Section(
        "faithfulness",
        "Faithfulness: deletion and insertion",
        [
            Para(text),
            Table(columns, rows),
            Image(save(figure, "faithfulness.png"), "deletion and insertion curves"),
        ],
    )


def sanity_section(
    measures: Mapping[str, ModelMeasures], verdict: Verdict, save: SaveFigure, seed: int
) -> Section:
    """Cascading randomisation with its random-vs-random baseline, then the per-layer check."""
    good = measures["good"]
    cascade = {n: measures[n].cascade for n in NAMES}
    rows = []
    for k, step in enumerate(good.cascade.steps):
        rows.append([f"+ {step}", *[_est(cascade[n].rho[k], "float") for n in NAMES]])
    rows.append(
        ["random vs random (baseline)", *[_est(cascade[n].baseline, "float") for n in NAMES]]
    )
    body = []
    for layer in good.layers:
        row: list[Cell | str] = [layer]
        for n in NAMES:
            s = measures[n].sanity[layer]
            row.append(ci_cell(s.spearman_mean, s.ci95))
        row.append(_est(verdict.differences["sanity"][layer]["spearman"], "float"))
        body.append(row)
    figure = measures_by_layer(
        {
            n: {
                layer: {"spearman_mean": measures[n].sanity[layer].spearman_mean}
                for layer in good.layers
            }
            for n in NAMES
        },
        [("spearman_mean", "Spearman ρ, trained vs fully randomised")],
        cols=1,
        bands={
            n: {layer: {"spearman_mean": measures[n].sanity[layer].ci95} for layer in good.layers}
            for n in NAMES
        },
    )
    return Section(
        "sanity-check",
        "Sanity check: parameter randomisation",
        [
            Para(
                "Cascading randomisation (Adebayo et al. 2018): the layers are "
                "re-initialised from the top (the classifier, then block5_conv3) down, one "
                "more at each step (seeded Keras-style initialisation, BatchNorm reset), and "
                f"the Spearman rank correlation between the trained model's {good.cascade.layer} "
                "Grad-CAM and the randomised model's, for the same class, is taken per image. "
                "A map that depends on the learned weights falls towards the random-vs-random "
                "baseline (two independently re-initialised copies) as soon as the top layers "
                "are randomised; a map that stays high does not depend on them. A constant "
                "(e.g. all-zero) map counts as 0. " + ci_words(seed)
            ),
            Table(["layers randomised (cumulative)", *[f"ρ ({n})" for n in NAMES]], rows),
            Image(save(cascade_curves(cascade), "sanity_cascade.png"), "cascading randomisation"),
            Para(
                "Per layer, each layer's own Grad-CAM against that of a fully re-initialised "
                "copy (all layers at once). Near 0: the map depends on what the model learned; "
                "near 1: it would look the same for an untrained network."
            ),
            Table(["layer", *[f"ρ ({n})" for n in NAMES], "good − bad (paired)"], body),
            Image(save(figure, "sanity.png"), "sanity check by layer"),
        ],
    )
