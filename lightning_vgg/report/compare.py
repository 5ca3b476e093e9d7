"""The good-vs-broken comparison: both checkpoints, one image set, one report.

The seed trained a good VGG16-BN (95.05 % test accuracy) and a broken control (3 cats
and 3 dogs with flipped labels, 50.35 %) and compared them by looking at pictures.
:func:`run_compare` does that comparison end to end and puts numbers beside the
pictures:

* the seed's results table for both runs, with the seed's published numbers;
* both learning curves on one figure;
* feature maps and Grad-CAM of every conv layer, for the same cat and dog photos,
  the two models side by side, Grad-CAM on one absolute scale shared by both;
* both models' most confident mistakes among the measured images, on one scale;
* per-layer measures on ``n_per_class`` test cats and dogs: feature-map health
  (dead channels, spatial contrast, sparsity), Grad-CAM focus (entropy, top-10 %
  mass, all-zero maps), faithfulness (deletion/insertion AUC against random pixel
  orders, by RISE's definition: delete to black, insert into RISE's blur, one step
  per 224 pixels, trapezoid AUC) and the parameter-randomisation sanity check
  (Spearman rank correlation with the maps of a re-initialised copy).

Grad-CAM in the measures explains each image's **predicted** class (what the model
decided, the usual choice for faithfulness: deletion then removes the evidence for
the decision actually taken). The atlas figures show both classes. ``score`` picks
what Grad-CAM differentiates: ``±logit`` (default) or the probability, as the seed.
Both models are fed the good checkpoint's own evaluation preprocessing
(:class:`~lightning_vgg.data.preprocess.Preprocess`), what its ``test`` saw.

The pipeline reads the runs (:mod:`~lightning_vgg.report.runs`), measures both
models (:mod:`~lightning_vgg.report.measuring`, :mod:`~lightning_vgg.report.showcase`),
renders the sections (:mod:`~lightning_vgg.report.sections`) and records every number
(:mod:`~lightning_vgg.report.schema`); each step hands the next typed values.

Everything is written into one folder through :func:`~lightning_vgg.fileio.output_dir`,
so the folder is complete or left as it was: ``report.html`` (self-contained),
``report.md`` with ``figures/*.png`` beside it, and ``measures.json`` with every number.
Only files an earlier run listed in the folder's manifest are ever replaced.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch

from lightning_vgg.checks import NonNegativeInt, PositiveInt
from lightning_vgg.errors import UserError
from lightning_vgg.explain.atlas import check_score
from lightning_vgg.explain.faithfulness import BASELINES
from lightning_vgg.fileio import check_output_dir, output_dir, write_json, write_text
from lightning_vgg.report.figures import figure_saver
from lightning_vgg.report.html import render_html, render_markdown
from lightning_vgg.report.measuring import (
    CompareSettings,
    MeasureOptions,
    ModelMeasures,
    measure_model,
)
from lightning_vgg.report.runs import (
    Notes,
    RunInfo,
    TestImages,
    compare_inputs,
    load_test_images,
    read_run,
    read_test_split,
)
from lightning_vgg.report.schema import report_json
from lightning_vgg.report.sections import TITLE, build_sections, intro
from lightning_vgg.report.showcase import (
    Gallery,
    Showcase,
    compute_galleries,
    compute_showcase,
    figure_scales,
)
from lightning_vgg.report.verdicts import Verdict, judge

__all__ = ["REPORT_FILES", "run_compare"]

#: Files every report has at its top level (never written over a user's own file).
REPORT_FILES = ("report.html", "report.md", "measures.json")


def _check_options(
    n_per_class: int,
    show_per_class: int,
    batch_size: int,
    deletion_steps: int | None,
    faithfulness_layers: str,
    score: str,
    baselines: Mapping[str, str],
) -> None:
    """Refuse impossible options before any file is read (``compare`` may run for hours)."""
    if n_per_class < 1:
        raise UserError(f"n_per_class must be at least 1, got {n_per_class}")
    if show_per_class < 0:
        raise UserError(f"show_per_class must be at least 0, got {show_per_class}")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if deletion_steps is not None and deletion_steps < 1:
        raise UserError(f"deletion_steps must be at least 1, got {deletion_steps}")
    for name, kind in baselines.items():
        if kind not in BASELINES:
            raise UserError(f"{name}_baseline must be one of {', '.join(BASELINES)}, got {kind!r}")
    check_score(score)
    if faithfulness_layers not in ("last", "all"):
        raise UserError(f"faithfulness_layers must be last or all, got {faithfulness_layers!r}")


def state_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state_dict (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _refuse_same_checkpoint(
    ckpts: Mapping[str, Path], models: Mapping[str, torch.nn.Module] | None
) -> None:
    """``compare`` of a checkpoint with itself (same file, or the same weights) is refused."""
    if ckpts["good"].resolve() == ckpts["bad"].resolve():
        raise UserError(
            f"--good and --bad are the same checkpoint ({ckpts['good'].resolve()}); compare two different models"
        )
    if models is not None and state_digest(models["good"]) == state_digest(models["bad"]):
        raise UserError(
            f"--good ({ckpts['good']}) and --bad ({ckpts['bad']}) hold identical weights; compare two different models"
        )


def _input_size(models: Mapping[str, torch.nn.Module], ckpts: Mapping[str, Path]) -> int:
    """The one input size both networks take (they are fed the same tensors)."""
    sizes = {name: int(m.hparams.input_size) for name, m in models.items()}
    if sizes["good"] != sizes["bad"]:
        raise UserError(
            f"the checkpoints need different input sizes: {sizes['good']} px ({ckpts['good']}) "
            f"and {sizes['bad']} px ({ckpts['bad']}); compare models trained at one image size"
        )
    return sizes["good"]


def _write_report(
    out: str,
    runs: Mapping[str, RunInfo],
    measures: Mapping[str, ModelMeasures],
    images: TestImages,
    showcase: Showcase | None,
    galleries: list[Gallery],
    settings: CompareSettings,
    notes: Notes,
    verdict: Verdict,
) -> None:
    """Render and write the report's files into ``out``, all or nothing."""
    accuracy = {name: m.accuracy(images.labels) for name, m in measures.items()}
    with output_dir(out, "compare") as stage_dir:
        figdir = stage_dir / "figures"
        figdir.mkdir()
        sections = build_sections(
            runs,
            measures,
            accuracy,
            showcase,
            galleries,
            settings.measure.score,
            figure_saver(figdir),
            verdict,
            settings.measure.seed,
        )
        head = intro(runs, images, settings, notes)
        write_text(stage_dir / "report.html", render_html(TITLE, head, sections, stage_dir))
        write_text(stage_dir / "report.md", render_markdown(TITLE, head, sections))
        write_json(
            stage_dir / "measures.json",
            report_json(
                runs, measures, images, settings, notes, verdict, figure_scales(showcase, galleries)
            ),
        )


def run_compare(
    good: str,
    bad: str,
    out: str,
    n_per_class: PositiveInt = 100,
    show_per_class: NonNegativeInt = 1,
    split_file: str | None = None,
    device: str = "auto",
    batch_size: PositiveInt = 25,
    deletion_steps: PositiveInt | None = None,
    deletion_baseline: Literal["zero", "blur", "gaussian", "mean"] = "zero",
    insertion_baseline: Literal["blur", "gaussian", "zero", "mean"] = "blur",
    seed: int = 0,
    faithfulness_layers: Literal["last", "all"] = "last",
    overwrite: bool = False,
    score: Literal["logit", "probability"] = "logit",
    baseline: Literal["blur", "gaussian", "zero", "mean"] | None = None,
) -> Path:
    """Compare a good and a broken checkpoint layer by layer, and write one report.

    Both models see the same test images: the first ``n_per_class`` cats and dogs of
    the test split in the good run's ``split.csv``. The report (``report.html``,
    self-contained; ``report.md`` with ``figures/``; ``measures.json``) holds both
    runs' results beside the seed's, their learning curves, feature maps and Grad-CAM
    of every layer for ``show_per_class`` cats and dogs (Grad-CAM on scales shared by
    both models: one absolute, one per layer), misclassification galleries, and per-layer measures:
    feature-map health, Grad-CAM focus for the predicted class, deletion/insertion
    faithfulness against random maps, and the parameter-randomisation sanity check.

    Args:
        good: Checkpoint of the well-trained model (``runs/.../checkpoints/best.ckpt``).
        bad: Checkpoint of the broken control.
        out: Output folder: a new or empty one, or one an earlier ``compare`` wrote
            (its report is replaced). Built beside it and moved in when complete, with
            a manifest (``.lightning_vgg-manifest.json``) of the files written.
            Refused before any work: the current directory, the home directory, and
            any folder that is or holds a checkpoint, a run folder, the data or the
            split file.
        n_per_class: Test cats and test dogs the measures are computed on.
        show_per_class: Cats and dogs drawn in the feature-map and Grad-CAM figures
            (the first of the measured ones).
        split_file: A ``split.csv`` to take the test split from; defaults to the one
            in the good checkpoint's run directory.
        device: ``auto`` (the GPU when there is one), ``cpu`` or ``cuda``.
        batch_size: Images per forward/backward pass.
        deletion_steps: Steps of the deletion/insertion curves; ``None`` (default):
            RISE's one step per 224 pixels, ``ceil(S*S / 224)`` (224 steps at 224 px,
            19 at 64 px).
        deletion_baseline: What deleted pixels become: ``zero`` (black, RISE's
            deletion substrate), ``blur`` (RISE's blur), ``gaussian`` (a stronger
            Gaussian blur) or ``mean`` colour.
        insertion_baseline: What insertion starts from: ``blur`` (RISE's insertion
            substrate), ``gaussian``, ``zero`` or ``mean``.
        seed: Seed of the randomised copies (sanity check) and the random saliency
            maps (faithfulness baseline).
        faithfulness_layers: Deletion/insertion on the last conv layer's Grad-CAM
            (``last``) or on every layer's (``all``; 13 times the cost).
        overwrite: Also write into a folder holding other files (or another
            command's results). Only the files listed in the folder's manifest (the
            previous report) are replaced or removed; other files are never touched,
            and one standing where a new file goes is refused.
        score: What Grad-CAM differentiates, in the measures and the figures:
            ``logit`` (``±logit``) or ``probability`` (``P(dog)`` / ``1 - P(dog)``,
            the seed's); see :func:`~lightning_vgg.explain.atlas.compute_atlas`.
        baseline: Deprecated: one baseline for both curves (the former option);
            overrides ``deletion_baseline`` and ``insertion_baseline``, with a
            warning.

    Returns:
        The output folder.

    Raises:
        UserError: A checkpoint is missing or unreadable, the two need different
            input sizes, there is no split file, no test image can be read, or the
            output folder is refused.
    """
    from lightning_vgg.models.loading import load_model, pick_device

    if baseline is not None:
        warnings.warn(
            f"compare: baseline={baseline} is deprecated and sets both curves' baseline; "
            "use deletion_baseline and insertion_baseline (RISE: zero and blur)",
            FutureWarning,
            stacklevel=2,
        )
        deletion_baseline = insertion_baseline = baseline
    _check_options(
        n_per_class,
        show_per_class,
        batch_size,
        deletion_steps,
        faithfulness_layers,
        score,
        {"deletion": deletion_baseline, "insertion": insertion_baseline},
    )
    check_output_dir(out, compare_inputs(good, bad, split_file), overwrite, "compare", REPORT_FILES)

    ckpts = {"good": Path(good), "bad": Path(bad)}
    _refuse_same_checkpoint(ckpts, None)
    dev = pick_device(device)
    models = {name: load_model(path, dev) for name, path in ckpts.items()}
    _refuse_same_checkpoint(ckpts, models)
    size = _input_size(models, ckpts)
    notes = Notes()
    runs: dict[str, RunInfo] = {}
    for name, path in ckpts.items():
        with warnings.catch_warnings(record=True) as caught:  # into the report's notes too
            warnings.simplefilter("always")
            runs[name] = read_run(name, path)
        for w in caught:
            notes.warn(str(w.message))
    split, chosen = read_test_split(split_file, runs, n_per_class, notes)
    images = load_test_images(ckpts, split, chosen, size, notes)
    cats, dogs = images.counts()
    if min(cats, dogs) < n_per_class:
        notes.append(
            f"n_per_class is {n_per_class}, but only {cats} cats and {dogs} dogs could be "
            "measured (the test split holds fewer, or some images were unreadable)"
        )

    opts = MeasureOptions(
        batch_size=batch_size,
        deletion_steps=deletion_steps,
        deletion_baseline=deletion_baseline,
        insertion_baseline=insertion_baseline,
        seed=seed,
        faithfulness_layers=faithfulness_layers,
        score=score,
    )
    measures = {
        name: measure_model(model, images.images, opts, desc=f"measuring {name}")
        for name, model in models.items()
    }
    if measures["bad"].layers != measures["good"].layers:  # pragma: no cover - both VGG16
        raise UserError("the two checkpoints have different conv layers")
    showcase = compute_showcase(models, images, images.shown(show_per_class), dev, score)
    probs = {name: m.prob_dog for name, m in measures.items()}
    galleries = compute_galleries(models, images, probs, measures["good"].layers[-1], dev, score)
    settings = CompareSettings(n_per_class, show_per_class, size, dev, opts)
    labels = [int(v) for v in images.labels]
    verdict = judge(measures, labels, seed)
    _write_report(out, runs, measures, images, showcase, galleries, settings, notes, verdict)
    print(f"comparison report: {Path(out) / 'report.html'}")
    return Path(out)
