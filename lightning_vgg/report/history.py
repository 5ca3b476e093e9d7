"""Per-run results: the seed's summary table, learning curves and their files."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_vgg.fileio import save_figure, write_csv, write_json, write_text
from lightning_vgg.report.html import markdown_table

#: Columns of ``metrics.csv``, one row per epoch.
METRIC_COLUMNS = ("epoch", "step", "train/loss", "train/acc", "val/loss", "val/acc", "lr")

#: The seed's published results (Keras, Colab), for reference columns.
SEED_RESULTS: dict[str, dict[str, float]] = {
    "good": {
        "test_acc": 0.9505,
        "test_loss": 0.1351,
        "max_train_acc": 0.9500,
        "min_train_loss": 0.1458,
        "max_val_acc": 0.9700,
        "min_val_loss": 0.0965,
    },
    "broken": {
        "test_acc": 0.5035,
        "test_loss": 0.6931,
        "max_train_acc": 0.2500,
        "min_train_loss": 0.6933,
        "max_val_acc": 0.5000,
        "min_val_loss": 0.6932,
    },
}

#: A comparison's two models, in display order, and the row of SEED_RESULTS each is
#: compared to (the seed called the bad model "broken").
SEED_ROWS: dict[str, str] = {"good": "good", "bad": "broken"}

#: Row labels of the seed's table, in its order.
SUMMARY_KEYS: dict[str, str] = {
    "max_train_acc": "Max train accuracy",
    "min_train_loss": "Min train loss",
    "max_val_acc": "Max val accuracy",
    "min_val_loss": "Min val loss",
    "test_acc": "Test accuracy",
    "test_loss": "Test loss",
}


def write_metrics_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write one row per epoch; missing values are left empty."""
    write_csv(path, METRIC_COLUMNS, [[_cell(r.get(c)) for c in METRIC_COLUMNS] for r in rows])


def _cell(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    """Read ``metrics.csv`` back as floats (empty cells are dropped)."""
    with open(path, encoding="utf-8", newline="") as handle:
        return [
            {
                k: (int(float(v)) if k in ("epoch", "step") else float(v))
                for k, v in row.items()
                if v not in ("", None)
            }
            for row in csv.DictReader(handle)
        ]


def summarize(
    rows: Sequence[Mapping[str, float]], test: Mapping[str, float] | None = None
) -> dict[str, float | None]:
    """The seed's table: best train/val values over epochs, plus test if known."""

    def pick(key: str, fn: Any) -> float | None:
        vals = [
            float(r[key]) for r in rows if r.get(key) is not None and not math.isnan(float(r[key]))
        ]
        return fn(vals) if vals else None

    out: dict[str, float | None] = {
        "max_train_acc": pick("train/acc", max),
        "min_train_loss": pick("train/loss", min),
        "max_val_acc": pick("val/acc", max),
        "min_val_loss": pick("val/loss", min),
        "test_acc": None,
        "test_loss": None,
    }
    if test:
        out["test_acc"] = test.get("test/acc")
        out["test_loss"] = test.get("test/loss")
    return out


#: ``summary.json`` keys that belong to a ``test`` (not to the fit); a fit whose
#: training changes the weights drops them, as the test then describes older weights.
TEST_SUMMARY_KEYS = ("test_wall_time_s", "test_device", "test_checkpoint", "checkpoint")
#: The test's numbers inside ``summary.json``'s ``metrics``.
TEST_METRIC_KEYS = ("test_acc", "test_loss", "test_n_images", "test_n_skipped")


def fit_wall_time(summary: Mapping[str, Any]) -> float | None:
    """The fit's accumulated wall time in seconds, from a ``summary.json``.

    Reads ``fit_wall_time_s``, else the ``wall_time_s`` of summaries written before the
    fit's and the test's times were kept apart: the fit's time (after a ``test``, the
    fit's time up to the tested checkpoint's save).
    """
    for key in ("fit_wall_time_s", "wall_time_s"):
        v = summary.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def has_test_results(summary: Mapping[str, Any]) -> bool:
    """Whether a ``summary.json`` holds the numbers of a ``test``."""
    metrics = summary.get("metrics")
    metrics = metrics if isinstance(metrics, Mapping) else {}
    return any(metrics.get(k) is not None for k in TEST_METRIC_KEYS) or any(
        summary.get(k) is not None for k in TEST_SUMMARY_KEYS
    )


def _seconds(v: float) -> str:
    return f"{v:.1f} s" + (f" ({v / 60:.1f} min)" if v >= 120 else "")


def _percent_or_number(key: str, v: Any) -> str:
    if v is None or not isinstance(v, int | float) or not math.isfinite(v):
        return "—"
    return f"{v:.2%}" if key.endswith("_acc") else f"{v:.4f}"


def summary_markdown(summary: Mapping[str, Any], reference: str | None = "good") -> str:
    """A markdown table of the seed's metrics, with the seed's numbers beside them.

    Accuracies are percents with two decimals (the seed's too: ``SEED_RESULTS`` holds
    fractions, as ours), losses plain numbers with four. Below the table: the run's
    config, how many epochs (0-based, as in ``metrics.csv``), the fit's device and wall
    time, and, after a ``test``, which checkpoint it evaluated and how long it took.
    """
    ref = SEED_RESULTS.get(reference or "", {})
    values = summary.get("metrics", summary)
    rows = [
        [
            label,
            _percent_or_number(key, values.get(key)),
            *([_percent_or_number(key, ref[key])] if ref else []),
        ]
        for key, label in SUMMARY_KEYS.items()
    ]
    table = markdown_table(["Metric", "This run", *(["Seed (Keras)"] if ref else [])], rows)
    info = []
    if summary.get("config") is not None:
        info.append(f"- config: {summary['config']}")
    epochs = summary.get("epochs")
    if isinstance(epochs, int):
        numbered = f" (numbered 0–{epochs - 1}: epochs are 0-based, as in metrics.csv)"
        info.append(f"- epochs: {epochs}{numbered if epochs > 0 else ''}")
    if summary.get("device") is not None:
        info.append(f"- device: {summary['device']}")
    fit_s = fit_wall_time(summary)
    if fit_s is not None:
        info.append(f"- fit wall time: {_seconds(fit_s)}")
    tested = summary.get("test_checkpoint")
    if isinstance(tested, Mapping):
        where = f"`{tested['path']}`" if tested.get("path") else "the weights in memory"
        at = []
        if tested.get("epoch") is not None:
            at.append(f"saved after epoch {tested['epoch']} (0-based)")
        if tested.get("global_step") is not None:
            at.append(f"training step {tested['global_step']}")
        info.append(f"- tested checkpoint: {where}" + (f", {', '.join(at)}" if at else ""))
    elif summary.get("checkpoint"):
        info.append(f"- tested checkpoint: `{summary['checkpoint']}`")
    n_images = values.get("test_n_images")
    if n_images is not None:
        skipped = values.get("test_n_skipped")
        info.append(
            f"- test images: {n_images}" + (f" ({skipped} unreadable skipped)" if skipped else "")
        )
    test_s = summary.get("test_wall_time_s")
    if isinstance(test_s, int | float):
        info.append(f"- test wall time: {_seconds(float(test_s))}")
    test_device = summary.get("test_device")
    if test_device is not None and test_device != summary.get("device"):
        info.append(f"- test device: {test_device}")
    return "\n".join([table, *(["", *info] if info else [])]) + "\n"


def write_run_outputs(
    run_dir: str | Path,
    summary: dict[str, Any],
    rows: Sequence[Mapping[str, Any]],
    reference: str | None,
    history: bool = True,
) -> None:
    """Write ``metrics.csv``, ``history.png``, ``summary.json`` and ``summary.md``.

    Args:
        history: Redraw ``history.png`` (matplotlib: most of this function's time);
            the other files are written in any case.
    """
    run_dir = Path(run_dir)
    write_metrics_csv(run_dir / "metrics.csv", rows)
    if rows and history:
        from lightning_vgg.report.figures import learning_curves  # matplotlib: only when drawing

        figure = learning_curves({"": rows}, title=str(summary.get("config") or ""))
        save_figure(figure, run_dir / "history.png")
    write_json(run_dir / "summary.json", summary)
    write_text(run_dir / "summary.md", summary_markdown(summary, reference))
