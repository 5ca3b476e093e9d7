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


def summary_markdown(summary: Mapping[str, Any], reference: str | None = "good") -> str:
    """A markdown table of the seed's metrics, with the seed's numbers beside them."""
    ref = SEED_RESULTS.get(reference or "", {})

    def shown(key: str, v: float | None) -> str:
        return "—" if v is None else (f"{v:.2%}" if key == "test_acc" else f"{v:.4f}")

    values = summary.get("metrics", summary)
    rows = [
        [label, shown(key, values.get(key)), *([shown(key, ref[key])] if ref else [])]
        for key, label in SUMMARY_KEYS.items()
    ]
    table = markdown_table(["Metric", "This run", *(["Seed (Keras)"] if ref else [])], rows)
    info = [
        f"- {k}: {summary[k]}"
        for k in ("config", "epochs", "device", "wall_time_s")
        if summary.get(k) is not None
    ]
    return "\n".join([table, *(["", *info] if info else [])]) + "\n"


def write_run_outputs(
    run_dir: str | Path,
    summary: dict[str, Any],
    rows: Sequence[Mapping[str, Any]],
    reference: str | None,
) -> None:
    """Write ``metrics.csv``, ``history.png``, ``summary.json`` and ``summary.md``."""
    run_dir = Path(run_dir)
    write_metrics_csv(run_dir / "metrics.csv", rows)
    if rows:
        from lightning_vgg.report.figures import learning_curves  # matplotlib: only when drawing

        figure = learning_curves({"": rows}, title=str(summary.get("config") or ""))
        save_figure(figure, run_dir / "history.png")
    write_json(run_dir / "summary.json", summary)
    write_text(run_dir / "summary.md", summary_markdown(summary, reference))
