"""The comparison's inputs: what each run's folder says, and which test images both models see.

Reading is kept apart from measuring and rendering so that every later step works on
typed values (:class:`RunInfo`, :class:`TestImages`) and never re-opens a run folder.
Problems a reader should know about, but that do not stop the comparison, are
collected in :class:`Notes` and shown at the top of the report.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_vgg.checkpointing import read_checkpoint, run_dir_of_checkpoint
from lightning_vgg.data.preprocess import Preprocess
from lightning_vgg.errors import UserError
from lightning_vgg.labels import SplitRow
from lightning_vgg.report.history import (
    SUMMARY_KEYS,
    fit_wall_time,
    read_metrics_csv,
    summarize,
)
from lightning_vgg.report.html import finite_or_none

__all__ = [
    "Notes",
    "RunInfo",
    "TestImages",
    "checkpoint_words",
    "compare_inputs",
    "load_test_images",
    "read_run",
    "read_test_split",
    "select_test_images",
]


class Notes(list[str]):
    """Remarks for the report's reader; the ones that matter now also go to the console."""

    def warn(self, message: str) -> None:
        """Record ``message`` and raise it as a warning (the caller may be unattended)."""
        warnings.warn(message, stacklevel=3)
        self.append(message)


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
    #: The fit's accumulated and the test's own wall time in seconds (``summary.json``;
    #: the fit's falls back to the ``wall_time_s`` of older summaries).
    fit_wall_time_s: float | None = None
    test_wall_time_s: float | None = None
    #: What the test numbers were measured on (``path``, ``epoch``, ``global_step``),
    #: when ``summary.json`` says so.
    test_checkpoint: dict[str, Any] | None = None


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
    values from ``test_metrics.json``. Missing values stay ``None``. Warns when
    ``summary.json`` says its test numbers are of another checkpoint than ``ckpt``.
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
        v = finite_or_none(from_summary.get(key))
        metrics[key] = v if v is not None else finite_or_none(computed.get(key))
    raw = read_checkpoint(ckpt)
    epoch, step = raw.get("epoch"), raw.get("global_step")
    tested = summary.get("test_checkpoint")
    tested = dict(tested) if isinstance(tested, dict) else None
    if tested is not None and metrics["test_acc"] is not None:
        _check_tested_checkpoint(run_dir, ckpt, tested, epoch, step)
    test_s = finite_or_none(summary.get("test_wall_time_s"))
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
        fit_wall_time_s=fit_wall_time(summary),
        test_wall_time_s=test_s,
        test_checkpoint=tested,
    )


def _check_tested_checkpoint(
    run_dir: Path, ckpt: Path, tested: Mapping[str, Any], epoch: Any, step: Any
) -> None:
    """Warn when the run's test numbers were measured on other weights than ``ckpt``'s."""
    theirs = (tested.get("epoch"), tested.get("global_step"))
    if None in theirs or not isinstance(epoch, int) or not isinstance(step, int):
        return
    if theirs != (epoch, step):
        warnings.warn(
            f"the test results in {run_dir / 'summary.json'} are of {tested.get('path')} "
            f"(epoch {theirs[0]}, step {theirs[1]}), not of {ckpt} (epoch {epoch}, step "
            f"{step}): test that checkpoint for its own numbers",
            stacklevel=3,
        )


def checkpoint_words(run: RunInfo) -> str:
    """``best.ckpt``, saved after epoch 12 (0-based), step 1,040: for the setup table."""
    where = f"`{run.ckpt}`"
    if run.ckpt_epoch is None:
        return where
    step = f", training step {run.ckpt_step:,}" if run.ckpt_step is not None else ""
    return f"{where}: saved after epoch {run.ckpt_epoch} (0-based, as in metrics.csv){step}"


def data_hparams(ckpt: Path) -> dict[str, Any]:
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
            source = data_hparams(ckpt).get("source")
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
    return inputs + sorted({Path(r.path).parent for r in rows})


# --------------------------------------------------------------------------- images


def select_test_images(rows: Sequence[SplitRow], n_per_class: int) -> list[tuple[str, int]]:
    """The first ``n_per_class`` cats, then dogs, of the test split, in file order.

    Deterministic: ``split.csv`` is sorted by path within a split, so the same file
    gives the same images on every machine and for both models.
    """
    test = [(r.path, r.label) for r in rows if r.split == "test"]
    cats = [(path, label) for path, label in test if label == 0][:n_per_class]
    dogs = [(path, label) for path, label in test if label == 1][:n_per_class]
    return cats + dogs


def _test_set(rows: Sequence[SplitRow]) -> set[tuple[str, int]]:
    return {(r.path, r.label) for r in rows if r.split == "test"}


def read_test_split(
    split_file: str | None, runs: Mapping[str, RunInfo], n_per_class: int, notes: Notes
) -> tuple[Path, list[tuple[str, int]]]:
    """The split file used and the images chosen from its test split.

    The good run's ``split.csv`` unless ``split_file`` is given. The bad run's own
    test split is checked against it, since its test numbers are only comparable on
    the same images.

    Raises:
        UserError: No split file, or an empty test split.
    """
    from lightning_vgg.data.split import read_split_csv

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
            notes.warn(
                f"the test split in {bad_split} differs from the one in {split}: the bad run "
                "was tested on other images (the comparison uses the latter)"
            )
    elif not bad_split.is_file():
        notes.warn(f"no split.csv in {runs['bad'].run_dir}: cannot check the bad run's test split")
    chosen = select_test_images(rows, n_per_class)
    if not chosen:
        raise UserError(f"the test split in {split} is empty")
    n_cats = sum(1 for _, label in chosen if label == 0)
    n_dogs = len(chosen) - n_cats
    if n_cats < n_per_class or n_dogs < n_per_class:
        notes.warn(
            f"asked for {n_per_class} cats and {n_per_class} dogs but the test split has "
            f"{n_cats} and {n_dogs}; using those"
        )
    return split, chosen


@dataclass
class TestImages:
    """The model inputs both networks are measured on, and what could not be read."""

    split: Path
    images: Tensor
    labels: Tensor
    paths: list[str]
    skipped: list[tuple[str, str]]
    preprocess: Preprocess

    def counts(self) -> tuple[int, int]:
        """How many cats and dogs were loaded."""
        return int((self.labels == 0).sum()), int((self.labels == 1).sum())

    def shown(self, per_class: int) -> list[int]:
        """Indices of the first ``per_class`` cats, then dogs: the ones drawn in figures."""
        labels = [int(v) for v in self.labels]
        by_class = [[i for i, v in enumerate(labels) if v == c][:per_class] for c in (0, 1)]
        return by_class[0] + by_class[1]


def _preprocessing(ckpts: Mapping[str, Path], size: int, notes: Notes) -> Preprocess:
    """The good checkpoint's evaluation preprocessing, noting how the bad one's differs."""
    pre: dict[str, Preprocess] = {}
    for name, path in ckpts.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pre[name] = Preprocess.from_hparams(
                data_hparams(path), image_size=size, source=f"the {name} checkpoint"
            )
        for w in caught:
            notes.warn(str(w.message))
    if pre["bad"] != pre["good"]:
        notes.warn(
            f"the runs preprocess differently (good: {pre['good'].describe()}; bad: "
            f"{pre['bad'].describe()}); both models get the good run's images"
        )
    return pre["good"]


def load_test_images(
    ckpts: Mapping[str, Path],
    split: Path,
    chosen: Sequence[tuple[str, int]],
    size: int,
    notes: Notes,
) -> TestImages:
    """The chosen images as the good checkpoint's ``test`` saw them, for both models.

    Each checkpoint carries its own evaluation preprocessing; feeding both models the
    same tensors keeps the comparison about the weights, and a difference is noted.

    Raises:
        UserError: None of the images can be read.
    """
    from lightning_vgg.explain.inputs import load_inputs

    pre = _preprocessing(ckpts, size, notes)
    loaded, skipped = load_inputs([Path(p) for p, _ in chosen], pre, [label for _, label in chosen])
    if not loaded:
        raise UserError(
            f"none of the {len(chosen)} test image(s) could be read: "
            + "; ".join(f"{p} ({r})" for p, r in skipped[:5])
        )
    if skipped:
        notes.append(f"skipped {len(skipped)} unreadable test image(s)")
    return TestImages(
        split=split,
        images=torch.stack([t for _, t, _ in loaded]),
        labels=torch.tensor([int(label) for _, _, label in loaded]),
        paths=[str(p) for p, _, _ in loaded],
        skipped=skipped,
        preprocess=pre,
    )
