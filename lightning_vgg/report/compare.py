"""The good-vs-broken comparison: both checkpoints, one image set, one report.

The seed trained a good VGG16-BN (95.05 % test accuracy) and a broken control (3 cats
and 3 dogs with flipped labels, 50.35 %) and compared them by looking at pictures.
:func:`run_compare` does that comparison end to end and puts numbers beside the
pictures:

* the seed's results table for both runs, with the seed's published numbers;
* both learning curves on one figure;
* feature maps and Grad-CAM of every conv layer, for the same cat and dog photos,
  the two models side by side, Grad-CAM on one absolute scale shared by both;
* the runs' misclassification galleries;
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

Everything is written into one folder through :func:`~lightning_vgg.fileio.output_dir`,
so the folder is complete or left as it was: ``report.html`` (self-contained),
``report.md`` with ``figures/*.png`` beside it, and ``measures.json`` with every number.
Only files an earlier run listed in the folder's manifest are ever replaced.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_vgg.checkpointing import read_checkpoint, run_dir_of_checkpoint
from lightning_vgg.checks import NonNegativeInt, PositiveInt
from lightning_vgg.data.preprocess import Preprocess
from lightning_vgg.errors import UserError
from lightning_vgg.explain.atlas import (
    Score,
    check_score,
    compute_atlas,
    score_label,
    shared_scale,
    upsample,
)
from lightning_vgg.explain.measures import (
    BASELINES,
    BaselineKind,
    cam_entropy,
    dead_channel_fraction_per_image,
    deletion_insertion,
    hoyer_sparsity,
    random_deletion_insertion,
    randomized_copy,
    rise_steps,
    spatial_contrast,
    spearman_rank_correlation,
    top_mass_share,
)
from lightning_vgg.fileio import (
    check_output_dir,
    output_dir,
    save_figure,
    write_json,
    write_text,
)
from lightning_vgg.report.history import SEED_RESULTS, SUMMARY_KEYS, read_metrics_csv, summarize
from lightning_vgg.report.html import (
    MISSING,
    Cell,
    Image,
    Para,
    Section,
    Table,
    fmt,
    render_html,
    render_markdown,
)

__all__ = [
    "MODELS",
    "SECTION_IDS",
    "FeatureStats",
    "RunInfo",
    "read_run",
    "run_compare",
    "select_test_images",
]

#: The two models, in display order, and the row of SEED_RESULTS each is compared to.
MODELS: dict[str, str] = {"good": "good", "bad": "broken"}

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

#: Grad-CAM target in the measures (see the module docstring).
TARGET = "pred"
#: Feature maps are taken after the ReLU, as Keras's conv layers output them.
STAGE = "post"
#: Channels per layer in the feature-map figures.
FEATURE_CHANNELS = 8
#: Fraction of pixels in the Grad-CAM "top mass" measure.
TOP_Q = 0.10
#: Files every report has at its top level (never written over a user's own file).
REPORT_FILES = ("report.html", "report.md", "measures.json")


# --------------------------------------------------------------------------- runs


@dataclass
class RunInfo:
    """What a checkpoint's run directory says about its training."""

    name: str
    ckpt: Path
    run_dir: Path
    metrics: dict[str, float | None]
    rows: list[dict[str, float]]
    has_test: bool
    sources: list[str] = field(default_factory=list)
    #: The checkpoint's ``epoch`` (0-based, as in metrics.csv) and ``global_step``.
    ckpt_epoch: int | None = None
    ckpt_step: int | None = None


def _finite_or_none(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        warnings.warn(f"cannot read {path}: {exc}; ignoring it", stacklevel=3)
        return None
    return data if isinstance(data, dict) else None


def read_run(name: str, ckpt: str | Path) -> RunInfo:
    """The seed's table for one run, from its ``summary.json`` and ``metrics.csv``.

    ``summary.json`` wins where it has a value (it holds the test numbers after
    ``test``); train/val values it lacks are computed from ``metrics.csv``, and test
    values from ``test_metrics.json``. Missing values stay ``None``.
    """
    ckpt = Path(ckpt)
    run_dir = run_dir_of_checkpoint(ckpt)
    rows: list[dict[str, float]] = []
    sources = []
    if (run_dir / "metrics.csv").is_file():
        try:
            rows = read_metrics_csv(run_dir / "metrics.csv")
            sources.append("metrics.csv")
        except (OSError, ValueError) as exc:
            warnings.warn(f"cannot read {run_dir / 'metrics.csv'}: {exc}", stacklevel=2)
    summary = _read_json(run_dir / "summary.json") or {}
    from_summary = summary.get("metrics") if isinstance(summary.get("metrics"), dict) else {}
    if from_summary:
        sources.append("summary.json")
    test = _read_json(run_dir / "test_metrics.json")
    computed = summarize(
        rows, {k: v for k, v in (test or {}).items() if isinstance(v, int | float)}
    )
    metrics: dict[str, float | None] = {}
    for key in SUMMARY_KEYS:
        v = _finite_or_none(from_summary.get(key))
        metrics[key] = v if v is not None else _finite_or_none(computed.get(key))
    raw = read_checkpoint(ckpt)
    epoch, step = raw.get("epoch"), raw.get("global_step")
    return RunInfo(
        name=name,
        ckpt=ckpt,
        run_dir=run_dir,
        metrics=metrics,
        rows=rows,
        has_test=metrics["test_acc"] is not None,
        sources=sources,
        ckpt_epoch=int(epoch) if isinstance(epoch, int) else None,
        ckpt_step=int(step) if isinstance(step, int) else None,
    )


def checkpoint_words(run: RunInfo) -> str:
    """``best.ckpt``, saved after epoch 12 (0-based), step 1,040: for the setup table."""
    where = f"`{run.ckpt}`"
    if run.ckpt_epoch is None:
        return where
    step = f", training step {run.ckpt_step:,}" if run.ckpt_step is not None else ""
    return f"{where}: saved after epoch {run.ckpt_epoch} (0-based, as in metrics.csv){step}"


# --------------------------------------------------------------------------- images


def select_test_images(
    rows: Sequence[tuple[str, int, str]], n_per_class: int
) -> list[tuple[str, int]]:
    """The first ``n_per_class`` cats, then dogs, of the test split, in file order.

    Deterministic: ``split.csv`` is sorted by path within a split, so the same file
    gives the same images on every machine and for both models.
    """
    test = [(p, label) for p, label, split in rows if split == "test"]
    cats = [r for r in test if r[1] == 0][:n_per_class]
    dogs = [r for r in test if r[1] == 1][:n_per_class]
    return cats + dogs


def _test_set(rows: Sequence[tuple[str, int, str]]) -> set[tuple[str, int]]:
    return {(p, label) for p, label, split in rows if split == "test"}


def _data_hparams(ckpt: Path) -> dict[str, Any]:
    """The data module's hyperparameters saved in a checkpoint (resize, rescale...)."""
    raw = read_checkpoint(ckpt)
    hp = raw.get("datamodule_hyper_parameters") if isinstance(raw, dict) else None
    return dict(hp) if isinstance(hp, Mapping) else {}


def compare_inputs(good: str | Path, bad: str | Path, split_file: str | None) -> list[Path]:
    """What ``compare`` reads, so that its ``--out`` is never one of them or holds one.

    Both checkpoints and their run folders, their local data sources, the split file
    and the folders of the images it lists. Unreadable files are skipped here (the
    comparison itself says what is wrong with them).
    """
    from lightning_vgg.data.split import read_split_csv

    inputs: list[Path] = []
    for ckpt in (Path(good), Path(bad)):
        inputs += [ckpt, run_dir_of_checkpoint(ckpt)]
        try:
            source = _data_hparams(ckpt).get("source")
        except UserError:
            continue
        if isinstance(source, str) and source and "://" not in source:
            inputs.append(Path(source))
    split = Path(split_file) if split_file else run_dir_of_checkpoint(good) / "split.csv"
    inputs.append(split)
    try:
        rows = read_split_csv(split) if split.is_file() else []
    except UserError:
        rows = []
    return inputs + sorted({Path(p).parent for p, _, _ in rows})


# --------------------------------------------------------------------------- measures


class FeatureStats:
    """Feature-map measures of one layer, accumulated batch by batch.

    Gives the same numbers as
    :func:`~lightning_vgg.explain.measures.feature_map_measures` on all images at
    once, without holding every image's activations (block1 of a full VGG16 at 224 px
    is 12 MB per image): per-channel peaks for the dead fraction, and sums with
    counts for the pooled means.
    """

    def __init__(self) -> None:
        self.peak: Tensor | None = None
        self.images = 0
        self.dead_per_image = 0.0
        self.contrast_sum = 0.0
        self.live = 0
        self.zeros = 0
        self.total = 0
        self.hoyer_sum = 0.0
        self.hoyer_n = 0

    def update(self, acts: Tensor) -> None:
        """Add a batch ``(N, C, h, w)`` of post-ReLU activations."""
        a = acts.detach().float()
        peak = a.abs().amax(dim=(0, 2, 3))
        self.peak = peak if self.peak is None else torch.maximum(self.peak, peak)
        self.images += a.shape[0]
        self.dead_per_image += float(dead_channel_fraction_per_image(a).sum())
        live = int((a.flatten(2).mean(dim=2) > 0).sum())
        self.contrast_sum += spatial_contrast(a) * live
        self.live += live
        self.zeros += int((a.abs() <= 0).sum())
        self.total += a.numel()
        nonzero = int((a.flatten(1).norm(dim=1) > 0).sum())
        self.hoyer_sum += hoyer_sparsity(a) * nonzero
        self.hoyer_n += nonzero

    def result(self) -> dict[str, float]:
        """The measures (same keys as ``feature_map_measures``)."""
        if self.peak is None:
            raise ValueError("FeatureStats.result() before any update()")
        return {
            "dead_channel_fraction": float((self.peak <= 0).float().mean()),
            "dead_channel_fraction_per_image": self.dead_per_image / self.images,
            "spatial_contrast": self.contrast_sum / max(self.live, 1),
            "sparsity": self.zeros / self.total,
            "hoyer_sparsity": self.hoyer_sum / self.hoyer_n if self.hoyer_n else 1.0,
        }


def _summary(values: Tensor) -> dict[str, float]:
    v = values.double()
    return {
        "mean": float(v.mean()),
        "std": float(v.std(correction=0)) if v.numel() > 1 else 0.0,
    }


def _di_summary(di: Mapping[str, Tensor]) -> dict[str, Any]:
    return {
        "deletion_auc": _summary(di["deletion_auc"].cpu()),
        "insertion_auc": _summary(di["insertion_auc"].cpu()),
        "deletion_auc_logit": _summary(di["deletion_auc_logit"].cpu()),
        "insertion_auc_logit": _summary(di["insertion_auc_logit"].cpu()),
    }


def _cat_di(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    keys = [k for k in parts[0] if k != "fractions"]
    out = {k: torch.cat([p[k].cpu() for p in parts]) for k in keys}
    out["fractions"] = parts[0]["fractions"].cpu()
    return out


def measure_model(
    model: torch.nn.Module,
    images: Tensor,
    batch_size: int,
    deletion_steps: int | None,
    deletion_baseline: BaselineKind,
    seed: int,
    faithfulness_layers: Literal["last", "all"] = "last",
    desc: str = "",
    insertion_baseline: BaselineKind = "blur",
    score: Score = "logit",
) -> dict[str, Any]:
    """Every measure of one model on one image set, batch by batch, on its device.

    Args:
        model: The trained network (eval mode, on its device).
        images: ``(N, 3, S, S)`` model inputs on the CPU.
        batch_size: Images per forward/backward pass.
        deletion_steps: Steps of the deletion/insertion curves; ``None`` for
            RISE's one step per 224 pixels (:func:`rise_steps`).
        deletion_baseline: What deleted pixels become (see ``make_baseline``).
        seed: Seed of the randomised copy and of the random saliency maps.
        faithfulness_layers: Deletion/insertion for the last conv layer only, or
            for every layer (13 times the cost).
        desc: Progress bar label.
        insertion_baseline: What insertion starts from.
        score: What Grad-CAM differentiates (``logit`` or ``probability``). The
            focus measures, the rank correlations and the pixel orders are
            invariant to the per-image factor ``p(1-p)`` that tells the two apart,
            except where it underflows to 0 (saturated predictions: all-zero maps).

    Returns:
        ``{"layers": [...], "prob_dog": [...], "features": {layer: {...}},
        "gradcam": {layer: {...}}, "sanity": {layer: {...}},
        "faithfulness": {...}}``; all plain floats.
    """
    device = next(model.parameters()).device
    rand = randomized_copy(model, seed)
    gen = torch.Generator().manual_seed(seed)  # same random maps for every model
    feats: dict[str, FeatureStats] = {}
    cam_parts: dict[str, dict[str, list[Tensor]]] = {}
    rho: dict[str, list[Tensor]] = {}
    di_parts: dict[str, list[dict[str, Tensor]]] = {}
    rand_parts: list[dict[str, Tensor]] = []
    probs: list[Tensor] = []
    layers: list[str] = []
    size = tuple(images.shape[-2:])
    steps = rise_steps(*size) if deletion_steps is None else deletion_steps
    di_options = {
        "steps": steps,
        "deletion_baseline": deletion_baseline,
        "insertion_baseline": insertion_baseline,
        "batch_size": 4 * batch_size,
    }
    bar = tqdm(total=images.shape[0], desc=desc or "measuring", unit="img", leave=False)
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        atlas = compute_atlas(model, x, target=TARGET, stage=STAGE, activations=True, score=score)
        layers = atlas.layer_names
        sign = atlas.target_sign
        probs.append(atlas.probs.cpu())
        ratlas = compute_atlas(rand, x, target=sign, stage=STAGE, activations=False, score=score)
        for layer in layers:
            feats.setdefault(layer, FeatureStats()).update(atlas.activations[layer])
            cam = atlas.cams[layer]
            ent, zero = cam_entropy(cam, return_zero_mask=True)
            parts = cam_parts.setdefault(layer, {"entropy": [], "top": [], "zero": []})
            parts["entropy"].append(ent.cpu())
            parts["top"].append(top_mass_share(cam, TOP_Q).cpu())
            parts["zero"].append(zero.cpu())
            rho.setdefault(layer, []).append(
                spearman_rank_correlation(cam, ratlas.cams[layer]).cpu()
            )
        del ratlas
        explained = layers if faithfulness_layers == "all" else layers[-1:]
        for layer in explained:
            saliency = upsample(atlas.cams[layer], size)[:, 0]
            di = deletion_insertion(model, x, saliency, sign, **di_options)
            di_parts.setdefault(layer, []).append(dict(di))
        rdi = random_deletion_insertion(model, x, sign, generator=gen, **di_options)
        rand_parts.append(dict(rdi))
        del atlas
        bar.update(x.shape[0])
    bar.close()
    del rand

    gradcam = {}
    for layer in layers:
        p = cam_parts[layer]
        gradcam[layer] = {
            "cam_entropy": float(torch.cat(p["entropy"]).double().mean()),
            "top_mass_share": float(torch.cat(p["top"]).double().mean()),
            "zero_map_fraction": float(torch.cat(p["zero"]).double().mean()),
        }
    sanity = {}
    for layer in layers:
        r = torch.cat(rho[layer])
        sanity[layer] = {"spearman_mean": _summary(r)["mean"], "spearman_std": _summary(r)["std"]}
    random_di = _cat_di(rand_parts)
    per_layer = {layer: _cat_di(parts) for layer, parts in di_parts.items()}
    last = layers[-1]
    faith = {
        "layer": last,
        "target": TARGET,
        "score": score,
        "deletion_baseline": deletion_baseline,
        "insertion_baseline": insertion_baseline,
        "baseline": f"deletion → {deletion_baseline}, insertion → {insertion_baseline}",
        "steps": steps,
        "auc": "trapezoid rule over the fraction of pixels, [0, 1]",
        "gradcam": {layer: _di_summary(di) for layer, di in per_layer.items()},
        "random": _di_summary(random_di),
        "curves": {
            "fractions": [float(v) for v in random_di["fractions"]],
            "gradcam": {
                "deletion": per_layer[last]["deletion_prob"].double().mean(0).tolist(),
                "insertion": per_layer[last]["insertion_prob"].double().mean(0).tolist(),
            },
            "random": {
                "deletion": random_di["deletion_prob"].double().mean(0).tolist(),
                "insertion": random_di["insertion_prob"].double().mean(0).tolist(),
            },
        },
    }
    return {
        "layers": layers,
        "prob_dog": torch.cat(probs).tolist(),
        "features": {layer: feats[layer].result() for layer in layers},
        "gradcam": gradcam,
        "sanity": sanity,
        "faithfulness": faith,
    }


# --------------------------------------------------------------------------- helpers


def _clean(obj: Any) -> Any:
    """A JSON-ready copy with every non-finite float replaced by ``None``."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _num(v: float | None, kind: str = "float", digits: int = 4) -> Cell:
    f = _finite_or_none(v)
    return Cell(fmt(f, kind, digits), f)


def _pm(mean: float | None, std: float | None, digits: int = 3) -> Cell:
    m, s = _finite_or_none(mean), _finite_or_none(std)
    if m is None:
        return Cell(MISSING)
    return Cell(f"{m:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{m:.{digits}f}", m)


def _stem(path: str) -> str:
    import re

    return re.sub(r"[^\w.\-]+", "_", Path(path).stem)[:40]


def _score_words(score: str) -> str:
    return "probability" if score == "probability" else "logit (±logit)"


def _unit(score: str) -> str:
    return "probability" if score == "probability" else "logit"


def _caption(name: str, prob: float, label: int | None) -> str:
    from lightning_vgg.explain.plots import overlay_label

    return f"{name}: {overlay_label(prob, None)}" + (
        "" if label is None else (" ✓" if (prob >= 0.5) == bool(label) else " ✗")
    )


# --------------------------------------------------------------------------- the command


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
    of every layer for ``show_per_class`` cats and dogs (Grad-CAM on one scale shared
    by both models), the misclassification galleries, and per-layer measures:
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
    from lightning_vgg.data.split import read_split_csv
    from lightning_vgg.explain.run import load_inputs, load_model, pick_device

    if n_per_class < 1:
        raise UserError(f"n_per_class must be at least 1, got {n_per_class}")
    if show_per_class < 0:
        raise UserError(f"show_per_class must be at least 0, got {show_per_class}")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if deletion_steps is not None and deletion_steps < 1:
        raise UserError(f"deletion_steps must be at least 1, got {deletion_steps}")
    if baseline is not None:
        warnings.warn(
            f"compare: baseline={baseline} is deprecated and sets both curves' baseline; "
            "use deletion_baseline and insertion_baseline (RISE: zero and blur)",
            FutureWarning,
            stacklevel=2,
        )
        deletion_baseline = insertion_baseline = baseline
    for name, kind in (("deletion", deletion_baseline), ("insertion", insertion_baseline)):
        if kind not in BASELINES:
            raise UserError(f"{name}_baseline must be one of {', '.join(BASELINES)}, got {kind!r}")
    check_score(score)
    if faithfulness_layers not in ("last", "all"):
        raise UserError(f"faithfulness_layers must be last or all, got {faithfulness_layers!r}")
    check_output_dir(out, compare_inputs(good, bad, split_file), overwrite, "compare", REPORT_FILES)

    ckpts = {"good": Path(good), "bad": Path(bad)}
    dev = pick_device(device)
    models = {name: load_model(path, dev) for name, path in ckpts.items()}
    sizes = {name: int(m.hparams.input_size) for name, m in models.items()}
    if sizes["good"] != sizes["bad"]:
        raise UserError(
            f"the checkpoints need different input sizes: {sizes['good']} px ({good}) "
            f"and {sizes['bad']} px ({bad}); compare models trained at one image size"
        )
    size = sizes["good"]
    notes: list[str] = []

    def note(msg: str) -> None:
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)

    # ------------------------------------------------------------ runs and images
    runs = {name: read_run(name, path) for name, path in ckpts.items()}
    split = Path(split_file) if split_file else runs["good"].run_dir / "split.csv"
    if not split.is_file():
        raise UserError(
            f"no split file at {split}: pass --split_file, or a checkpoint inside its run "
            "directory (runs/<name>/version_N/checkpoints/)"
        )
    rows = read_split_csv(split)
    bad_split = runs["bad"].run_dir / "split.csv"
    if bad_split.is_file() and bad_split.resolve() != split.resolve():
        if _test_set(read_split_csv(bad_split)) != _test_set(rows):
            note(
                f"the test split in {bad_split} differs from the one in {split}: the bad run "
                "was tested on other images (the comparison uses the latter)"
            )
    elif not bad_split.is_file():
        note(f"no split.csv in {runs['bad'].run_dir}: cannot check the bad run's test split")
    chosen = select_test_images(rows, n_per_class)
    if not chosen:
        raise UserError(f"the test split in {split} is empty")
    n_cats = sum(1 for _, label in chosen if label == 0)
    n_dogs = len(chosen) - n_cats
    if n_cats < n_per_class or n_dogs < n_per_class:
        note(
            f"asked for {n_per_class} cats and {n_per_class} dogs but the test split has "
            f"{n_cats} and {n_dogs}; using those"
        )

    # Each checkpoint's own evaluation preprocessing (what its test run saw); the
    # good run's is used for both models, and a difference is reported.
    pre: dict[str, Preprocess] = {}
    for name, path in ckpts.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pre[name] = Preprocess.from_hparams(
                _data_hparams(path), image_size=size, source=f"the {name} checkpoint"
            )
        for w in caught:
            note(str(w.message))
    if pre["bad"] != pre["good"]:
        note(
            f"the runs preprocess differently (good: {pre['good'].describe()}; bad: "
            f"{pre['bad'].describe()}); both models get the good run's images"
        )
    resize, rescale = pre["good"].resize, pre["good"].rescale
    loaded, skipped = load_inputs(
        [Path(p) for p, _ in chosen], pre["good"], [label for _, label in chosen]
    )
    if not loaded:
        raise UserError(
            f"none of the {len(chosen)} test image(s) could be read: "
            + "; ".join(f"{p} ({r})" for p, r in skipped[:5])
        )
    if skipped:
        notes.append(f"skipped {len(skipped)} unreadable test image(s)")
    images = torch.stack([t for _, t, _ in loaded])
    labels = torch.tensor([int(label) for _, _, label in loaded])
    paths = [str(p) for p, _, _ in loaded]

    # ------------------------------------------------------------ measures
    results: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        results[name] = measure_model(
            model,
            images,
            batch_size,
            deletion_steps,
            deletion_baseline,
            seed,
            faithfulness_layers,
            desc=f"measuring {name}",
            insertion_baseline=insertion_baseline,
            score=score,
        )
    layers = results["good"]["layers"]
    if results["bad"]["layers"] != layers:  # pragma: no cover - both are VGG16
        raise UserError("the two checkpoints have different conv layers")
    accuracy = {}
    for name, r in results.items():
        pred = torch.tensor(r["prob_dog"]) >= 0.5
        accuracy[name] = float((pred.long() == labels).double().mean())

    # ------------------------------------------------------------ figures and report
    show = [i for i in range(len(loaded)) if int(labels[i]) == 0][:show_per_class] + [
        i for i in range(len(loaded)) if int(labels[i]) == 1
    ][:show_per_class]

    with output_dir(out, "compare") as stage_dir:
        figdir = stage_dir / "figures"
        figdir.mkdir()
        sections = _build_sections(
            stage_dir,
            figdir,
            runs,
            models,
            results,
            accuracy,
            images,
            labels,
            paths,
            show,
            size,
            dev,
            score,
        )
        intro = [
            Para(
                f"Good: `{ckpts['good']}`. Bad: `{ckpts['bad']}`. Measures on "
                f"{len(loaded)} test images ({int((labels == 0).sum())} cats, "
                f"{int((labels == 1).sum())} dogs) from `{split}`, {size} px, on {dev}."
            ),
            *[Para(n, note=True) for n in notes],
        ]
        title = "Good vs broken VGG16: where do they look?"
        write_text(stage_dir / "report.html", render_html(title, intro, sections, stage_dir))
        write_text(stage_dir / "report.md", render_markdown(title, intro, sections))
        measures = {
            **{
                n: {
                    "checkpoint": str(ckpts[n].resolve()),
                    "run_dir": str(runs[n].run_dir),
                    "checkpoint_epoch": runs[n].ckpt_epoch,
                    "checkpoint_step": runs[n].ckpt_step,
                }
                for n in ("good", "bad")
            },
            "settings": {
                "split_file": str(split.resolve()),
                "n_per_class": n_per_class,
                "show_per_class": show_per_class,
                "input_size": size,
                "resize": resize,
                "rescale": rescale,
                "preprocess": pre["good"].describe(),
                "device": str(dev),
                "batch_size": batch_size,
                "deletion_steps": results["good"]["faithfulness"]["steps"],
                "deletion_baseline": deletion_baseline,
                "insertion_baseline": insertion_baseline,
                "seed": seed,
                "gradcam_target": TARGET,
                "score": score,
                "stage": STAGE,
                "faithfulness_layers": faithfulness_layers,
            },
            "notes": notes,
            "images": [
                {
                    "path": p,
                    "label": int(labels[i]),
                    "prob_dog": {name: results[name]["prob_dog"][i] for name in results},
                }
                for i, p in enumerate(paths)
            ],
            "skipped": [{"image": p, "reason": r} for p, r in skipped],
            "layers": layers,
        }
        for name in MODELS:
            r = results[name]
            measures[name].update(
                {
                    "results": runs[name].metrics,
                    "seed_results": SEED_RESULTS[MODELS[name]],
                    "accuracy_on_images": accuracy[name],
                    "features": r["features"],
                    "gradcam": r["gradcam"],
                    "faithfulness": r["faithfulness"],
                    "sanity": r["sanity"],
                }
            )
        write_json(stage_dir / "measures.json", _clean(measures))
    report = Path(out) / "report.html"
    print(f"comparison report: {report}")
    return Path(out)


# --------------------------------------------------------------------------- report body


def _build_sections(
    stage_dir: Path,
    figdir: Path,
    runs: Mapping[str, RunInfo],
    models: Mapping[str, torch.nn.Module],
    results: Mapping[str, dict[str, Any]],
    accuracy: Mapping[str, float],
    images: Tensor,
    labels: Tensor,
    paths: Sequence[str],
    show: Sequence[int],
    size: int,
    dev: torch.device,
    score: Score = "logit",
) -> list[Section]:
    from lightning_vgg.explain.plots import atlas_comparison, feature_comparison
    from lightning_vgg.explain.run import image_maps, normalise_maps
    from lightning_vgg.report.figures import (
        deletion_insertion_curves,
        history_comparison,
        measures_by_layer,
    )

    def fig(figure: Any, name: str) -> str:
        save_figure(figure, figdir / name)
        return f"figures/{name}"

    names = list(MODELS)
    layers = results["good"]["layers"]

    # (setup)
    setup = Section(
        "setup",
        "Setup",
        [
            Table(
                ["", *names],
                [
                    ["checkpoint", *[checkpoint_words(runs[n]) for n in names]],
                    [
                        "accuracy on the measured images",
                        *[_num(accuracy[n], "pct") for n in names],
                    ],
                ],
            ),
            Para(
                f"Grad-CAM in the measures explains each image's predicted class "
                f"(`target={TARGET}`), differentiating its {_score_words(score)} "
                f"(`score={score}`); feature maps are taken after the ReLU. The figures "
                "show both classes."
            ),
        ],
    )

    # (a) results
    res_rows = []
    for key, label in SUMMARY_KEYS.items():
        kind = "pct" if key.endswith("_acc") else "float"
        row: list[Cell | str] = [label]
        for n in names:
            row.append(_num(runs[n].metrics[key], kind))
            row.append(_num(SEED_RESULTS[MODELS[n]][key], kind))
        res_rows.append(row)
    results_blocks: list[Any] = [
        Table(
            [
                "Metric",
                "good (this run)",
                "good (seed, Keras)",
                "bad (this run)",
                "broken (seed, Keras)",
            ],
            res_rows,
        ),
        Para(
            "Each run's numbers come from its own `summary.json` / `metrics.csv`; the seed "
            "columns are the Keras notebook's published results."
        ),
    ]
    for n in names:
        if not runs[n].has_test:
            results_blocks.append(
                Para(
                    f"The {n} run has no test results yet ({MISSING} above): run "
                    f"`lightning-vgg test --config <its config> --ckpt_path {runs[n].ckpt}`.",
                    note=True,
                )
            )
    results_sec = Section("results", "Results", results_blocks)

    # (b) learning curves
    curves_blocks: list[Any] = []
    if any(runs[n].rows for n in names):
        curves_blocks.append(
            Image(
                fig(
                    history_comparison(
                        {n: runs[n].rows for n in names},
                        {n: runs[n].ckpt_epoch for n in names},
                    ),
                    "history.png",
                ),
                "learning curves of both runs",
                "Accuracy and loss per epoch; train solid, validation dashed; the "
                "dotted vertical line in each run's colour marks the epoch of the "
                "checkpoint that is compared.",
            )
        )
    for n in names:
        if not runs[n].rows:
            curves_blocks.append(
                Para(f"No `metrics.csv` in {runs[n].run_dir} for the {n} run.", note=True)
            )
    curves_sec = Section("learning-curves", "Learning curves", curves_blocks)

    # (c), (d) feature maps and Grad-CAM of the shown images
    feat_blocks: list[Any] = []
    cam_blocks: list[Any] = []
    if show:
        x = images[list(show)]
        y = [int(labels[i]) for i in show]
        names_img = [Path(paths[i]).name for i in show]
        maps = {
            n: image_maps(
                models[n], x.to(dev), names_img, y, stage=STAGE, keep_activations=True, score=score
            )
            for n in names
        }
        scale = shared_scale(
            [
                d
                for n in names
                for m in maps[n]
                for d in (*m.density_dog.values(), *m.density_cat.values())
            ]
        )
        for n in names:
            normalise_maps(maps[n], "shared", scale)
        feat_blocks.append(
            Para(
                f"The first {FEATURE_CHANNELS} channels of every conv layer, each channel "
                "min-max scaled on its own (a dead channel is flat, darkest colour); the "
                "same photo for both models."
            )
        )
        cam_blocks.append(
            Para(
                f"Grad-CAM of every layer for the dog score ({score_label(score, 'dog')}) and "
                f"the cat score ({score_label(score, 'cat')}), both models on one absolute "
                f"scale: 1.0 on the colour bar is {scale:.3g} {_unit(score)} per input pixel "
                "(the 99th percentile of all non-zero maps shown here, both models), so weak "
                'evidence looks weak. "all-zero map" marks layers with no evidence at all '
                "for that class."
            )
        )
        for k, i in enumerate(show):
            cls = "cat" if y[k] == 0 else "dog"
            stem = f"{k:02d}_{cls}_{_stem(paths[i])}"
            caption = f"{names_img[k]} (true {cls}) — " + "; ".join(
                _caption(n, maps[n][k].prob_dog, y[k]) for n in names
            )
            f = feature_comparison(
                {n: maps[n][k].activations for n in names},
                image=maps["good"][k].image,
                n=FEATURE_CHANNELS,
                title=caption,
            )
            feat_blocks.append(
                Image(fig(f, f"features_{stem}.png"), f"feature maps, {caption}", caption)
            )
            rows = {}
            for n in names:
                m = maps[n][k]
                rows[f"{n}: dog"] = (m.dog, m.zero_dog)
                rows[f"{n}: cat"] = (m.cat, m.zero_cat)
            a = atlas_comparison(
                maps["good"][k].image,
                rows,
                title=caption,
                colorbar_label=f"× {scale:.3g} {_unit(score)} / pixel",
            )
            cam_blocks.append(
                Image(fig(a, f"gradcam_{stem}.png"), f"Grad-CAM atlas, {caption}", caption)
            )
    else:
        feat_blocks.append(Para("No images drawn (`show_per_class=0`).", note=True))
        cam_blocks.append(Para("No images drawn (`show_per_class=0`).", note=True))
    feat_sec = Section("feature-maps", "Feature maps", feat_blocks)
    cam_sec = Section("gradcam", "Grad-CAM of every layer", cam_blocks)

    # (e) misclassification galleries
    mis_blocks: list[Any] = []
    for n in names:
        found = False
        for cls in ("cat", "dog"):
            src = runs[n].run_dir / f"misclassified_{cls}.png"
            if src.is_file():
                dst = figdir / f"{n}_misclassified_{cls}.png"
                shutil.copyfile(src, dst)
                mis_blocks.append(
                    Image(
                        f"figures/{dst.name}",
                        f"{n}: misclassified {cls}s",
                        f"{n} run: true {cls}s it was most sure were "
                        f"{'dogs' if cls == 'cat' else 'cats'}, with the Grad-CAM of its decision.",
                    )
                )
                found = True
        if not found:
            mis_blocks.append(
                Para(
                    f"No misclassification gallery in {runs[n].run_dir} for the {n} run: "
                    f"`lightning-vgg test --config <its config> --ckpt_path {runs[n].ckpt}` "
                    "draws it.",
                    note=True,
                )
            )
    mis_sec = Section("misclassified", "Misclassification galleries", mis_blocks)

    # (f) measures
    def pair_table(kind: str, keys: Sequence[tuple[str, str, str]]) -> Table:
        cols = ["layer"]
        for _, label, _ in keys:
            cols += [f"{label} ({n})" for n in names]
        body = []
        for layer in layers:
            row: list[Cell | str] = [layer]
            for key, _, fkind in keys:
                for n in names:
                    row.append(_num(results[n][kind][layer][key], fkind, 3))
            body.append(row)
        return Table(cols, body)

    feature_keys = [
        ("dead_channel_fraction", "dead channels", "pct"),
        ("spatial_contrast", "spatial contrast", "float"),
        ("sparsity", "zero activations", "pct"),
        ("hoyer_sparsity", "Hoyer sparsity", "float"),
    ]
    f1 = measures_by_layer(
        {n: results[n]["features"] for n in names},
        [
            ("dead_channel_fraction", "dead channels (fraction)"),
            ("spatial_contrast", "spatial contrast (std / mean)"),
            ("sparsity", "zero activations (fraction)"),
            ("hoyer_sparsity", "Hoyer sparsity"),
            ("dead_channel_fraction_per_image", "channels silent per image"),
        ],
        title="Feature maps",
    )
    feat_measures = Section(
        "measures-features",
        "Feature maps, measured",
        [
            Para(
                "Dead channels never fire on any of the measured images; spatial contrast is "
                "the mean std/mean over each live channel's map (0 = the same everywhere, "
                "carries no 'where'); zero activations is the share of exact zeros after the "
                "ReLU; Hoyer sparsity (0..1) is scale-free."
            ),
            pair_table("features", feature_keys),
            Image(fig(f1, "measures_features.png"), "feature-map measures by layer"),
        ],
    )
    cam_keys = [
        ("cam_entropy", "entropy", "float"),
        ("top_mass_share", "top-10% mass", "pct"),
        ("zero_map_fraction", "all-zero maps", "pct"),
    ]
    sanity_rows = {
        n: {
            layer: {"spearman_mean": results[n]["sanity"][layer]["spearman_mean"]}
            for layer in layers
        }
        for n in names
    }
    f2 = measures_by_layer(
        {
            n: {
                layer: {**results[n]["gradcam"][layer], **sanity_rows[n][layer]} for layer in layers
            }
            for n in names
        },
        [
            ("cam_entropy", "entropy (1 = uniform)"),
            ("top_mass_share", "mass in top 10% of pixels"),
            ("zero_map_fraction", "all-zero maps (fraction)"),
        ],
        title="Grad-CAM of the predicted class",
    )
    cam_measures_sec = Section(
        "measures-gradcam",
        "Grad-CAM focus, measured",
        [
            Para(
                "Per layer, on the Grad-CAM of each image's predicted class at the layer's own "
                "resolution: normalised entropy (0 = one pixel, 1 = uniform; an all-zero map "
                "counts as 1), share of the evidence in the top 10% of pixels (0.1 = uniform), "
                "and the share of maps with no positive evidence at all."
            ),
            pair_table("gradcam", cam_keys),
            Image(fig(f2, "measures_gradcam.png"), "Grad-CAM measures by layer"),
        ],
    )

    # faithfulness
    faith_rows = []
    for n in names:
        fa = results[n]["faithfulness"]
        rnd = fa["random"]
        for layer, g in fa["gradcam"].items():
            faith_rows.append(
                [
                    n,
                    layer,
                    _pm(g["deletion_auc"]["mean"], g["deletion_auc"]["std"]),
                    _pm(rnd["deletion_auc"]["mean"], rnd["deletion_auc"]["std"]),
                    _pm(g["insertion_auc"]["mean"], g["insertion_auc"]["std"]),
                    _pm(rnd["insertion_auc"]["mean"], rnd["insertion_auc"]["std"]),
                ]
            )
    fa0 = results["good"]["faithfulness"]
    f3 = deletion_insertion_curves(
        {n: results[n]["faithfulness"]["curves"] for n in names}, fa0["layer"], fa0["baseline"]
    )
    faith_sec = Section(
        "faithfulness",
        "Faithfulness: deletion and insertion",
        [
            Para(
                f"Pixels are removed (deletion) or revealed (insertion) in the order of the "
                f"Grad-CAM of the predicted class, in {fa0['steps']} equal steps, as RISE "
                "(Petsiuk et al. 2018) defines the game: deleted pixels become the "
                f"`{fa0['deletion_baseline']}` baseline, insertion starts from the "
                f"`{fa0['insertion_baseline']}` baseline (RISE: zero = black, and RISE's "
                "blur); the curve follows the probability of the predicted class and the "
                "area is the trapezoid rule over the fraction of pixels (0 to 1). A "
                "faithful map has a lower deletion and a higher insertion area than a "
                "random pixel order (same random orders for both models). Mean ± std over "
                "images."
            ),
            Table(
                [
                    "model",
                    "layer",
                    "deletion AUC (Grad-CAM)",
                    "deletion AUC (random)",
                    "insertion AUC (Grad-CAM)",
                    "insertion AUC (random)",
                ],
                faith_rows,
            ),
            Image(fig(f3, "faithfulness.png"), "deletion and insertion curves"),
        ],
    )

    # sanity check
    san_body = []
    for layer in layers:
        row: list[Cell | str] = [layer]
        for n in names:
            s = results[n]["sanity"][layer]
            row.append(_pm(s["spearman_mean"], s["spearman_std"]))
        san_body.append(row)
    f4 = measures_by_layer(
        sanity_rows,
        [("spearman_mean", "Spearman ρ, trained vs randomised")],
        cols=1,
    )
    sanity_sec = Section(
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
            Table(["layer", *[f"ρ ({n}, mean ± std)" for n in names]], san_body),
            Image(fig(f4, "sanity.png"), "sanity check by layer"),
        ],
    )
    measures_sec = Section(
        "measures",
        "Measures",
        [feat_measures, cam_measures_sec, faith_sec, sanity_sec],
    )
    return [setup, results_sec, curves_sec, feat_sec, cam_sec, mis_sec, measures_sec]
