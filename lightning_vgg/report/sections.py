"""The comparison report's text and layout: one function per section, typed inputs in.

Every number has been measured and every map computed before these functions run
(:mod:`~lightning_vgg.report.measuring`, :mod:`~lightning_vgg.report.showcase`); here
they are only put into words, tables and figures, so the prose can be read and
changed in one place without touching what is measured. Figures are drawn with
:mod:`~lightning_vgg.report.figures`, :mod:`~lightning_vgg.explain.plots` and
:mod:`~lightning_vgg.explain.feature_plots` and saved
through a :data:`~lightning_vgg.report.figures.SaveFigure`, which returns the link.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lightning_vgg.explain.atlas import score_label
from lightning_vgg.explain.feature_plots import feature_comparison
from lightning_vgg.explain.plots import atlas_comparison, gallery_figure, overlay_label
from lightning_vgg.explain.scales import density_unit
from lightning_vgg.labels import CLASS_NAMES
from lightning_vgg.report.figures import SaveFigure, learning_curves
from lightning_vgg.report.history import SEED_RESULTS, SEED_ROWS, SUMMARY_KEYS
from lightning_vgg.report.html import (
    MISSING,
    Cell,
    Image,
    Para,
    Section,
    Table,
    ci_cell,
    num_cell,
)
from lightning_vgg.report.measured import (
    CAM_FOCUS,
    FEATURES,
    faithfulness_section,
    findings_section,
    layer_part_section,
    sanity_section,
)
from lightning_vgg.report.measuring import TARGET, CompareSettings, ModelMeasures
from lightning_vgg.report.runs import RunInfo, TestImages, checkpoint_words
from lightning_vgg.report.showcase import GALLERY_K, VIEWS, Gallery, Showcase, Shown
from lightning_vgg.report.verdicts import Verdict

__all__ = [
    "SECTION_IDS",
    "TITLE",
    "build_sections",
    "intro",
]

#: The report's title.
TITLE = "Good vs broken VGG16: where do they look?"

#: Stable ``id`` attributes of the report's sections (HTML anchors; tests rely on them).
SECTION_IDS: tuple[str, ...] = (
    "findings",
    "setup",
    "results",
    "learning-curves",
    "feature-maps",
    "gradcam",
    "misclassified",
    "measures",
    "measures-features",
    "measures-gradcam",
    "faithfulness",
    "sanity-check",
)

#: Channels per layer in the feature-map figures.
FEATURE_CHANNELS = 8

#: The two models, in display order.
NAMES = list(SEED_ROWS)


# --------------------------------------------------------------------------- words


def _score_words(score: str) -> str:
    return "probability" if score == "probability" else "logit (±logit)"


def _caption(shown: Shown) -> str:
    """``cat.1.jpg (true cat) — good: pred cat (p=0.91) ✓; bad: ...``."""

    def verdict(name: str) -> str:
        prob = shown.maps[name].prob_dog
        return f"{name}: {overlay_label(prob, None)}" + (
            " ✓" if (prob >= 0.5) == bool(shown.label) else " ✗"
        )

    return f"{shown.name} (true {shown.cls}) — " + "; ".join(verdict(n) for n in NAMES)


def intro(
    runs: Mapping[str, RunInfo], images: TestImages, settings: CompareSettings, notes: Sequence[str]
) -> list[Para]:
    """What was compared, on what, and the notes a reader should see first."""
    cats, dogs = images.counts()
    return [
        Para(
            f"Good: `{runs['good'].ckpt}`. Bad: `{runs['bad'].ckpt}`. Measures on "
            f"{len(images.paths)} test images ({cats} cats, {dogs} dogs) from "
            f"`{images.split}`, {settings.input_size} px, on {settings.device}."
        ),
        *[Para(n, note=True) for n in notes],
    ]


# --------------------------------------------------------------------------- sections


def _wall_times(run: RunInfo) -> str:
    """``812 s / 9 s``, from the run's summary.json (— when not recorded)."""

    def seconds(v: float | None) -> str:
        return MISSING if v is None else f"{v:,.0f} s"

    return f"{seconds(run.fit_wall_time_s)} / {seconds(run.test_wall_time_s)}"


def setup_section(runs: Mapping[str, RunInfo], verdict: Verdict, score: str) -> Section:
    """The checkpoints compared, their accuracy with intervals, and what is explained."""
    acc, d = verdict.accuracy, verdict.accuracy_difference
    table = Table(
        ["", *NAMES],
        [
            ["checkpoint", *[checkpoint_words(runs[n]) for n in NAMES]],
            [
                "accuracy on the measured images [95% CI]",
                *[ci_cell(acc[n].mean, acc[n].ci95, "pct") for n in NAMES],
            ],
            ["wall time: fit / test", *[_wall_times(runs[n]) for n in NAMES]],
            [
                "P(dog) over the measured images: std, max − min",
                *[
                    f"{verdict.output_spread[n][0]:.3f}, {verdict.output_spread[n][1]:.3f}"
                    for n in NAMES
                ],
            ],
        ],
    )
    cats, dogs = verdict.per_class
    diff = Para(
        f"Accuracy good − bad on the same {cats} cats and {dogs} dogs: "
        f"{ci_cell(d.mean, d.ci95, 'pct').text} (paired bootstrap 95% CI)."
    )
    return Section(
        "setup",
        "Setup",
        [
            table,
            diff,
            Para(
                f"Grad-CAM in the measures explains each image's predicted class "
                f"(`target={TARGET}`), differentiating its {_score_words(score)} "
                f"(`score={score}`); feature maps are taken after the ReLU. The figures "
                "show both classes."
            ),
        ],
    )


def results_section(runs: Mapping[str, RunInfo]) -> Section:
    """The seed's results table: each run beside the seed's published numbers."""
    rows = []
    for key, label in SUMMARY_KEYS.items():
        kind = "pct" if key.endswith("_acc") else "float"
        row: list[Cell | str] = [label]
        for n in NAMES:
            row.append(num_cell(runs[n].metrics[key], kind))
            row.append(num_cell(SEED_RESULTS[SEED_ROWS[n]][key], kind))
        rows.append(row)
    columns = [
        "Metric",
        "good (this run)",
        "good (seed, Keras)",
        "bad (this run)",
        "broken (seed, Keras)",
    ]
    blocks: list[Para | Table | Image | Section] = [
        Table(columns, rows),
        Para(
            "Each run's numbers come from its own `summary.json` / `metrics.csv`; the seed "
            "columns are the Keras notebook's published results."
        ),
    ]
    for n in NAMES:
        if not runs[n].has_test:
            blocks.append(
                Para(
                    f"The {n} run has no test results yet ({MISSING} above): run "
                    f"`lightning-vgg test --config <its config> --ckpt_path {runs[n].ckpt}`.",
                    note=True,
                )
            )
    return Section("results", "Results", blocks)


def curves_section(runs: Mapping[str, RunInfo], save: SaveFigure) -> Section:
    """Both learning curves on one figure, each run's checkpoint epoch marked."""
    blocks: list[Para | Table | Image | Section] = []
    if any(runs[n].rows for n in NAMES):
        figure = learning_curves(
            {n: runs[n].rows for n in NAMES}, {n: runs[n].ckpt_epoch for n in NAMES}
        )
        blocks.append(
            Image(
                save(figure, "history.png"),
                "learning curves of both runs",
                "Accuracy and loss per epoch; train solid, validation dashed; the "
                "dotted vertical line in each run's colour marks the epoch of the "
                "checkpoint that is compared.",
            )
        )
    for n in NAMES:
        if not runs[n].rows:
            blocks.append(
                Para(f"No `metrics.csv` in {runs[n].run_dir} for the {n} run.", note=True)
            )
    return Section("learning-curves", "Learning curves", blocks)


_NOTHING_SHOWN = Para("No images drawn (`show_per_class=0`).", note=True)


def feature_maps_section(showcase: Showcase | None, save: SaveFigure) -> Section:
    """The first channels of every layer, both models, for each drawn image."""
    if showcase is None:
        return Section("feature-maps", "Feature maps", [_NOTHING_SHOWN])
    blocks: list[Para | Table | Image | Section] = [
        Para(
            f"Channels 0–{FEATURE_CHANNELS - 1} of every conv layer (after its ReLU), the "
            "same photo for both models. Each channel is min-max scaled on its own, so a "
            "pattern shows whatever its magnitude: brightness is not comparable between "
            "channels, layers or models. A constant channel (dead, or saturated) is drawn "
            "grey; the measures below count them."
        )
    ]
    for shown in showcase.images:
        caption = _caption(shown)
        figure = feature_comparison(
            {n: shown.maps[n].activations for n in NAMES},
            image=shown.maps["good"].image,
            n=FEATURE_CHANNELS,
            title=caption,
        )
        path = save(figure, f"features_{shown.stem}.png")
        blocks.append(Image(path, f"feature maps, {caption}", caption))
    return Section("feature-maps", "Feature maps", blocks)


#: How the report introduces each Grad-CAM view.
_VIEW_WORDS = {
    "absolute": (
        "one absolute scale for every layer, both models and both classes: the top of "
        "the colour bar is {top:.3g} {unit} per input pixel (the 99th percentile of all "
        "non-zero maps shown here). Weak evidence looks weak, so the two models' "
        "amounts of evidence can be compared anywhere; deep layers spread their "
        "evidence thin and can look dark."
    ),
    "per_layer": (
        "one scale per layer, shared by both models and both classes (the 99th "
        "percentile of that layer's non-zero maps; its value is under each column). "
        "Deep layers stay readable and, within a column, the two models stay "
        "comparable; columns are not comparable with each other."
    ),
}


def gradcam_section(showcase: Showcase | None, score: str, save: SaveFigure) -> Section:
    """Both classes' Grad-CAM of every layer, both models on shared scales, in two views."""
    title = "Grad-CAM of every layer"
    if showcase is None:
        return Section("gradcam", title, [_NOTHING_SHOWN])
    unit = density_unit(score)
    blocks: list[Para | Table | Image | Section] = [
        Para(
            f"Grad-CAM of every layer for the dog score ({score_label(score, 'dog')}) and "
            f"the cat score ({score_label(score, 'cat')}), in the score's units per input "
            "pixel, both models always on one scale, never stretched per map. Two views. "
            + " ".join(
                f"{view.replace('_', '-').capitalize()}: "
                + _VIEW_WORDS[view].format(top=showcase.scales[view].value, unit=unit)
                for view in VIEWS
            )
            + ' "all-zero map" marks a layer with no evidence at all for that class '
            "(drawn in the darkest colour)."
        )
    ]
    for shown in showcase.images:
        caption = _caption(shown)
        for view in VIEWS:
            figure = atlas_comparison(
                shown.maps["good"].image,
                showcase.rows(shown, view),
                showcase.scales[view],
                title=caption,
            )
            path = save(figure, f"gradcam_{view}_{shown.stem}.png")
            alt = f"Grad-CAM atlas ({view.replace('_', '-')} scale), {caption}"
            blocks.append(Image(path, alt, f"{caption} — {view.replace('_', '-')} scale"))
    return Section("gradcam", title, blocks)


def misclassified_section(galleries: Sequence[Gallery], score: str, save: SaveFigure) -> Section:
    """Each model's most confident mistakes among the measured images, both on one scale."""
    title = "Misclassification galleries"
    if not galleries:
        return Section("misclassified", title, [_NOTHING_SHOWN])
    first = galleries[0]
    blocks: list[Para | Table | Image | Section] = [
        Para(
            f"Per model and true class, its {GALLERY_K} most confident mistakes among the "
            f"measured images, with the Grad-CAM of the class it predicted at {first.layer} "
            "(where it looked to make the mistake). Both models' maps share one absolute "
            f"scale: the top of the colour bar is {first.scale.value:.3g} "
            f"{density_unit(score)} per input pixel. The runs' own galleries (over their "
            "whole test split, each on its own scale) stay in their run folders."
        )
    ]
    for g in galleries:
        cname, other = CLASS_NAMES[g.true_class], CLASS_NAMES[1 - g.true_class]
        if not g.names:
            blocks.append(
                Para(f"{g.model}: none of the {g.among} measured {cname}s was called {other}.")
            )
            continue
        captions = [
            f"{name}\n{overlay_label(p, g.true_class)}"
            for name, p in zip(g.names, g.prob_dog, strict=True)
        ]
        heading = (
            f"{g.model}: true {cname}s most confidently called {other} "
            f"(of {g.among} measured; Grad-CAM of {score_label(score, other)}, {g.layer})"
        )
        figure = gallery_figure(g.images, g.maps, captions, heading, g.scale)
        path = save(figure, f"{g.model}_misclassified_{cname}.png")
        blocks.append(Image(path, heading, heading))
    return Section("misclassified", title, blocks)


def build_sections(
    runs: Mapping[str, RunInfo],
    measures: Mapping[str, ModelMeasures],
    accuracy: Mapping[str, float],
    showcase: Showcase | None,
    galleries: Sequence[Gallery],
    score: str,
    save: SaveFigure,
    verdict: Verdict,
    seed: int = 0,
) -> list[Section]:
    """Every section of the report, in reading order (ids as :data:`SECTION_IDS`)."""
    del accuracy  # the verdict's accuracies carry their intervals
    measured = [
        layer_part_section(measures, verdict, FEATURES, save, seed),
        layer_part_section(measures, verdict, CAM_FOCUS, save, seed),
        faithfulness_section(measures, verdict, save, seed),
        sanity_section(measures, verdict, save, seed),
    ]
    return [
        findings_section(verdict, measures),
        setup_section(runs, verdict, score),
        results_section(runs),
        curves_section(runs, save),
        feature_maps_section(showcase, save),
        gradcam_section(showcase, score, save),
        misclassified_section(galleries, score, save),
        Section("measures", "Measures", list(measured)),
    ]
