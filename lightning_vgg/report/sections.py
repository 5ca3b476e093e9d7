"""The comparison report's text and layout: one function per section, typed inputs in.

Every number has been measured and every map computed before these functions run
(:mod:`~lightning_vgg.report.measuring`, :mod:`~lightning_vgg.report.showcase`); here
they are only put into words, tables and figures, so the prose can be read and
changed in one place without touching what is measured. Figures are drawn with
:mod:`~lightning_vgg.report.figures` and :mod:`~lightning_vgg.explain.plots` and saved
through a :data:`~lightning_vgg.report.figures.SaveFigure`, which returns the link.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lightning_vgg.explain.atlas import score_label
from lightning_vgg.explain.plots import atlas_comparison, feature_comparison, overlay_label
from lightning_vgg.report.figures import (
    SaveFigure,
    deletion_insertion_curves,
    learning_curves,
    measures_by_layer,
)
from lightning_vgg.report.history import SEED_RESULTS, SEED_ROWS, SUMMARY_KEYS
from lightning_vgg.report.html import (
    MISSING,
    Cell,
    Image,
    Para,
    Section,
    Table,
    num_cell,
    pm_cell,
)
from lightning_vgg.report.measuring import TARGET, CompareSettings, ModelMeasures
from lightning_vgg.report.runs import RunInfo, TestImages, checkpoint_words
from lightning_vgg.report.showcase import Showcase, Shown

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


def _unit(score: str) -> str:
    return "probability" if score == "probability" else "logit"


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


def setup_section(
    runs: Mapping[str, RunInfo], accuracy: Mapping[str, float], score: str
) -> Section:
    """The checkpoints compared and what the measures explain."""
    table = Table(
        ["", *NAMES],
        [
            ["checkpoint", *[checkpoint_words(runs[n]) for n in NAMES]],
            ["accuracy on the measured images", *[num_cell(accuracy[n], "pct") for n in NAMES]],
        ],
    )
    return Section(
        "setup",
        "Setup",
        [
            table,
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
            f"The first {FEATURE_CHANNELS} channels of every conv layer, each channel "
            "min-max scaled on its own (a dead channel is flat, darkest colour); the "
            "same photo for both models."
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


def gradcam_section(showcase: Showcase | None, score: str, save: SaveFigure) -> Section:
    """Both classes' Grad-CAM of every layer, both models on one absolute scale."""
    title = "Grad-CAM of every layer"
    if showcase is None:
        return Section("gradcam", title, [_NOTHING_SHOWN])
    scale, unit = showcase.scale, _unit(score)
    blocks: list[Para | Table | Image | Section] = [
        Para(
            f"Grad-CAM of every layer for the dog score ({score_label(score, 'dog')}) and "
            f"the cat score ({score_label(score, 'cat')}), both models on one absolute "
            f"scale: 1.0 on the colour bar is {scale:.3g} {unit} per input pixel "
            "(the 99th percentile of all non-zero maps shown here, both models), so weak "
            'evidence looks weak. "all-zero map" marks layers with no evidence at all '
            "for that class."
        )
    ]
    for shown in showcase.images:
        caption = _caption(shown)
        rows = {
            f"{n}: {cls}": (shown.maps[n].classes[cls].normalized, shown.maps[n].classes[cls].zero)
            for n in NAMES
            for cls in ("dog", "cat")
        }
        figure = atlas_comparison(
            shown.maps["good"].image,
            rows,
            title=caption,
            colorbar_label=f"× {scale:.3g} {unit} / pixel",
        )
        path = save(figure, f"gradcam_{shown.stem}.png")
        blocks.append(Image(path, f"Grad-CAM atlas, {caption}", caption))
    return Section("gradcam", title, blocks)


def misclassified_section(
    runs: Mapping[str, RunInfo], galleries: Mapping[str, Sequence[str]]
) -> Section:
    """The runs' own misclassification galleries, copied beside the report."""
    blocks: list[Para | Table | Image | Section] = []
    for n in NAMES:
        for cls in galleries[n]:
            other = "dogs" if cls == "cat" else "cats"
            blocks.append(
                Image(
                    f"figures/{n}_misclassified_{cls}.png",
                    f"{n}: misclassified {cls}s",
                    f"{n} run: true {cls}s it was most sure were {other}, with the "
                    "Grad-CAM of its decision.",
                )
            )
        if not galleries[n]:
            blocks.append(
                Para(
                    f"No misclassification gallery in {runs[n].run_dir} for the {n} run: "
                    f"`lightning-vgg test --config <its config> --ckpt_path {runs[n].ckpt}` "
                    "draws it.",
                    note=True,
                )
            )
    return Section("misclassified", "Misclassification galleries", blocks)


# --------------------------------------------------------------------------- measures


def _pair_table(
    measures: Mapping[str, ModelMeasures], part: str, keys: Sequence[tuple[str, str, str]]
) -> Table:
    """One row per layer; per measure, one column per model (``part``: a per-layer map)."""
    columns = ["layer"]
    for _, label, _ in keys:
        columns += [f"{label} ({n})" for n in NAMES]
    body = []
    for layer in measures["good"].layers:
        row: list[Cell | str] = [layer]
        for key, _, kind in keys:
            for n in NAMES:
                row.append(num_cell(getattr(getattr(measures[n], part)[layer], key), kind, 3))
        body.append(row)
    return Table(columns, body)


def _by_layer(measures: Mapping[str, ModelMeasures], part: str) -> dict[str, dict[str, Any]]:
    """``model -> layer -> measure -> value`` of one per-layer map, for the figures."""
    return {n: {layer: asdict(v) for layer, v in getattr(measures[n], part).items()} for n in NAMES}


@dataclass(frozen=True)
class _LayerPart:
    """How one per-layer part of :class:`ModelMeasures` is shown: text, table, figure."""

    #: The :class:`ModelMeasures` attribute (``layer -> measures``); it names the
    #: section (``measures-<part>``) and its figure (``measures_<part>.png``).
    part: str
    title: str
    text: str
    #: Table columns: ``(measure, label, number format)``.
    columns: tuple[tuple[str, str, str], ...]
    #: Figure panels: ``(measure, panel title)``.
    panels: tuple[tuple[str, str], ...]
    figure_title: str
    alt: str


FEATURES = _LayerPart(
    part="features",
    title="Feature maps, measured",
    text="Dead channels never fire on any of the measured images; spatial contrast is "
    "the mean std/mean over each live channel's map (0 = the same everywhere, "
    "carries no 'where'); zero activations is the share of exact zeros after the "
    "ReLU; Hoyer sparsity (0..1) is scale-free.",
    columns=(
        ("dead_channel_fraction", "dead channels", "pct"),
        ("spatial_contrast", "spatial contrast", "float"),
        ("sparsity", "zero activations", "pct"),
        ("hoyer_sparsity", "Hoyer sparsity", "float"),
    ),
    panels=(
        ("dead_channel_fraction", "dead channels (fraction)"),
        ("spatial_contrast", "spatial contrast (std / mean)"),
        ("sparsity", "zero activations (fraction)"),
        ("hoyer_sparsity", "Hoyer sparsity"),
        ("dead_channel_fraction_per_image", "channels silent per image"),
    ),
    figure_title="Feature maps",
    alt="feature-map measures by layer",
)

CAM_FOCUS = _LayerPart(
    part="gradcam",
    title="Grad-CAM focus, measured",
    text="Per layer, on the Grad-CAM of each image's predicted class at the layer's own "
    "resolution: normalised entropy (0 = one pixel, 1 = uniform; an all-zero map "
    "counts as 1), share of the evidence in the top 10% of pixels (0.1 = uniform), "
    "and the share of maps with no positive evidence at all.",
    columns=(
        ("cam_entropy", "entropy", "float"),
        ("top_mass_share", "top-10% mass", "pct"),
        ("zero_map_fraction", "all-zero maps", "pct"),
    ),
    panels=(
        ("cam_entropy", "entropy (1 = uniform)"),
        ("top_mass_share", "mass in top 10% of pixels"),
        ("zero_map_fraction", "all-zero maps (fraction)"),
    ),
    figure_title="Grad-CAM of the predicted class",
    alt="Grad-CAM measures by layer",
)


def layer_part_section(
    measures: Mapping[str, ModelMeasures], spec: _LayerPart, save: SaveFigure
) -> Section:
    """Feature-map health (:data:`FEATURES`) or Grad-CAM focus (:data:`CAM_FOCUS`) by layer."""
    by_layer = _by_layer(measures, spec.part)
    figure = measures_by_layer(by_layer, spec.panels, title=spec.figure_title)
    return Section(
        f"measures-{spec.part}",
        spec.title,
        [
            Para(spec.text),
            _pair_table(measures, spec.part, spec.columns),
            Image(save(figure, f"measures_{spec.part}.png"), spec.alt),
        ],
    )


def faithfulness_section(measures: Mapping[str, ModelMeasures], save: SaveFigure) -> Section:
    """Deletion and insertion areas of Grad-CAM against random pixel orders."""
    rows = []
    for n in NAMES:
        rnd = measures[n].faithfulness.random
        for layer, g in measures[n].faithfulness.gradcam.items():
            rows.append(
                [
                    n,
                    layer,
                    pm_cell(g.deletion_auc.mean, g.deletion_auc.std),
                    pm_cell(rnd.deletion_auc.mean, rnd.deletion_auc.std),
                    pm_cell(g.insertion_auc.mean, g.insertion_auc.std),
                    pm_cell(rnd.insertion_auc.mean, rnd.insertion_auc.std),
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
        "insertion AUC (Grad-CAM)",
        "insertion AUC (random)",
    ]
    return Section(
        "faithfulness",
        "Faithfulness: deletion and insertion",
        [
            Para(
                f"Pixels are removed (deletion) or revealed (insertion) in the order of the "
                f"Grad-CAM of the predicted class, in {fa.steps} equal steps, as RISE "
                "(Petsiuk et al. 2018) defines the game: deleted pixels become the "
                f"`{fa.deletion_baseline}` baseline, insertion starts from the "
                f"`{fa.insertion_baseline}` baseline (RISE: zero = black, and RISE's "
                "blur); the curve follows the probability of the predicted class and the "
                "area is the trapezoid rule over the fraction of pixels (0 to 1). A "
                "faithful map has a lower deletion and a higher insertion area than a "
                "random pixel order (same random orders for both models). Mean ± std over "
                "images."
            ),
            Table(columns, rows),
            Image(save(figure, "faithfulness.png"), "deletion and insertion curves"),
        ],
    )


def sanity_section(measures: Mapping[str, ModelMeasures], save: SaveFigure) -> Section:
    """The parameter-randomisation check: trained maps against a re-initialised copy's."""
    body = []
    for layer in measures["good"].layers:
        row: list[Cell | str] = [layer]
        for n in NAMES:
            s = measures[n].sanity[layer]
            row.append(pm_cell(s.spearman_mean, s.spearman_std))
        body.append(row)
    figure = measures_by_layer(
        _by_layer(measures, "sanity"),
        [("spearman_mean", "Spearman ρ, trained vs randomised")],
        cols=1,
    )
    return Section(
        "sanity-check",
        "Sanity check: parameter randomisation",
        [
            Para(
                "Spearman rank correlation, per layer and image, between the Grad-CAM of the "
                "trained model and that of a re-initialised copy (same architecture, seeded "
                "Keras-style initialisation) for the same class (Adebayo et al. 2018). Near 0: "
                "the map depends on what the model learned; near 1: it would look the same "
                "for an untrained network. A constant (e.g. all-zero) map counts as 0."
            ),
            Table(["layer", *[f"ρ ({n}, mean ± std)" for n in NAMES]], body),
            Image(save(figure, "sanity.png"), "sanity check by layer"),
        ],
    )


def build_sections(
    runs: Mapping[str, RunInfo],
    measures: Mapping[str, ModelMeasures],
    accuracy: Mapping[str, float],
    showcase: Showcase | None,
    galleries: Mapping[str, Sequence[str]],
    score: str,
    save: SaveFigure,
) -> list[Section]:
    """Every section of the report, in reading order (ids as :data:`SECTION_IDS`)."""
    measured = [
        layer_part_section(measures, FEATURES, save),
        layer_part_section(measures, CAM_FOCUS, save),
        faithfulness_section(measures, save),
        sanity_section(measures, save),
    ]
    return [
        setup_section(runs, accuracy, score),
        results_section(runs),
        curves_section(runs, save),
        feature_maps_section(showcase, save),
        gradcam_section(showcase, score, save),
        misclassified_section(runs, galleries),
        Section("measures", "Measures", list(measured)),
    ]
