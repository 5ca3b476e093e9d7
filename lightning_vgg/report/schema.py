"""The layout of ``measures.json``: every number of a comparison, as plain JSON.

One place states the file's keys and their order, so that scripts reading it (and the
tests) have a single definition to follow, and the pipeline hands over typed values
instead of assembling nested dictionaries. Non-finite floats become ``null``: the
file is strict JSON (``allow_nan=False``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightning_vgg.report.history import SEED_RESULTS, SEED_ROWS
from lightning_vgg.report.measuring import (
    AUC_RULE,
    STAGE,
    TARGET,
    CompareSettings,
    Faithfulness,
    ModelMeasures,
)
from lightning_vgg.report.runs import RunInfo, TestImages
from lightning_vgg.report.stats import bootstrap_settings
from lightning_vgg.report.verdicts import THRESHOLDS, Verdict

__all__ = ["clean", "report_json", "to_json", "verdict_json"]


def clean(obj: Any) -> Any:
    """A JSON-ready copy with every non-finite float replaced by ``None``."""
    if isinstance(obj, Mapping):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _faithfulness_json(f: Faithfulness) -> dict[str, Any]:
    return {
        "layer": f.layer,
        "target": f.target,
        "score": f.score,
        "deletion_baseline": f.deletion_baseline,
        "insertion_baseline": f.insertion_baseline,
        "baseline": f.baseline,
        "steps": f.steps,
        "auc": AUC_RULE,
        "gradcam": {layer: asdict(a) for layer, a in f.gradcam.items()},
        "random": asdict(f.random),
        "curves": asdict(f.curves),
    }


def to_json(m: ModelMeasures) -> dict[str, Any]:
    """One model's per-layer measures: ``features``, ``gradcam``, ``faithfulness``, ``sanity``."""
    return {
        "features": {layer: asdict(v) for layer, v in m.features.items()},
        "gradcam": {layer: asdict(v) for layer, v in m.gradcam.items()},
        "faithfulness": _faithfulness_json(m.faithfulness),
        "sanity": {layer: asdict(v) for layer, v in m.sanity.items()},
        "cascade": asdict(m.cascade),
        "cam_similarity": m.cam_similarity,
        "per_image": asdict(m.per_image),
    }


def verdict_json(v: Verdict) -> dict[str, Any]:
    """Accuracy intervals, paired differences (good − bad), baselines and findings."""
    return {
        "accuracy": {n: asdict(e) for n, e in v.accuracy.items()},
        "accuracy_difference_good_minus_bad": asdict(v.accuracy_difference),
        "differences_good_minus_bad": {
            part: {layer: {k: asdict(e) for k, e in d.items()} for layer, d in layers.items()}
            for part, layers in v.differences.items()
        },
        "gradcam_minus_random_auc": {
            n: {k: asdict(e) for k, e in d.items()} for n, d in v.vs_random.items()
        },
        "output_spread": {n: {"std": s, "range": r} for n, (s, r) in v.output_spread.items()},
        "per_class": {"cats": v.per_class[0], "dogs": v.per_class[1]},
        "thresholds": asdict(THRESHOLDS),
        "findings": [asdict(f) for f in v.findings],
    }


def _model_json(run: RunInfo, m: ModelMeasures, images: TestImages) -> dict[str, Any]:
    return {
        "checkpoint": str(run.ckpt.resolve()),
        "run_dir": str(run.run_dir),
        "checkpoint_epoch": run.ckpt_epoch,
        "checkpoint_step": run.ckpt_step,
        "results": run.metrics,
        "seed_results": SEED_RESULTS[SEED_ROWS[run.name]],
        "accuracy_on_images": m.accuracy(images.labels),
        **to_json(m),
    }


def _settings_json(s: CompareSettings, images: TestImages, steps: int) -> dict[str, Any]:
    opts = s.measure
    return {
        "split_file": str(images.split.resolve()),
        "n_per_class": s.n_per_class,
        "show_per_class": s.show_per_class,
        "input_size": s.input_size,
        "resize": images.preprocess.resize,
        "rescale": images.preprocess.rescale,
        "preprocess": images.preprocess.describe(),
        "device": str(s.device),
        "batch_size": opts.batch_size,
        "deletion_steps": steps,
        "deletion_baseline": opts.deletion_baseline,
        "insertion_baseline": opts.insertion_baseline,
        "seed": opts.seed,
        "gradcam_target": TARGET,
        "score": opts.score,
        "stage": STAGE,
        "faithfulness_layers": opts.faithfulness_layers,
    }


def report_json(
    runs: Mapping[str, RunInfo],
    measures: Mapping[str, ModelMeasures],
    images: TestImages,
    settings: CompareSettings,
    notes: Sequence[str],
    verdict: Verdict,
    figure_scales: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole ``measures.json``: both models, the settings, verdict, notes, images and
    the Grad-CAM scales of the figures."""
    good = measures["good"]
    doc: dict[str, Any] = {n: _model_json(runs[n], measures[n], images) for n in SEED_ROWS}
    doc["settings"] = _settings_json(settings, images, good.faithfulness.steps)
    doc["bootstrap"] = bootstrap_settings(settings.measure.seed)
    doc["verdict"] = verdict_json(verdict)
    doc["notes"] = list(notes)
    doc["images"] = [
        {
            "path": p,
            "label": int(images.labels[i]),
            "prob_dog": {name: m.prob_dog[i] for name, m in measures.items()},
        }
        for i, p in enumerate(images.paths)
    ]
    doc["skipped"] = [{"image": p, "reason": r} for p, r in images.skipped]
    doc["layers"] = good.layers
    doc["figure_scales"] = dict(figure_scales or {})
    return clean(doc)
