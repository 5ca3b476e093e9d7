"""Callbacks: they decide when and where to write; the computing lives in report/ and explain/."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info

from lightning_vgg.fileio import write_json
from lightning_vgg.report.history import (
    METRIC_COLUMNS,
    read_metrics_csv,
    summarize,
    write_run_outputs,
)


def device_name(trainer: pl.Trainer) -> str:
    """A human name for the accelerator, recorded next to every result."""
    root = trainer.strategy.root_device
    if root.type == "cuda":
        return torch.cuda.get_device_name(root)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_dir_of(trainer: pl.Trainer) -> Path | None:
    """The run directory: where the checkpoint came from, else the logger's directory."""
    ckpt = trainer.ckpt_path
    if ckpt:
        p = Path(ckpt).resolve()
        if p.parent.name == "checkpoints":
            return p.parent.parent
    return Path(trainer.log_dir) if trainer.log_dir else None


class RunArtifacts(Callback):
    """Keeps ``metrics.csv``, ``history.png`` and ``summary.{json,md}`` up to date.

    Rows are kept in the callback's checkpoint state, so a resumed run continues the
    same table. ``test`` writes its numbers into the run directory of the checkpoint
    it evaluated, next to that run's training history.

    Args:
        reference: Which of the seed's published rows to print beside ours
            (``good``, ``broken``), or ``None``.
    """

    def __init__(self, reference: Literal["good", "broken"] | None = "good") -> None:
        self.reference = reference
        self.rows: list[dict[str, Any]] = []
        self.fit_seconds = 0.0
        self._t0: float | None = None

    def state_dict(self) -> dict[str, Any]:
        """Saved into every checkpoint so resumed runs keep their history."""
        return {"rows": self.rows, "fit_seconds": self._elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history of the interrupted run."""
        self.rows = list(state_dict.get("rows", []))
        self.fit_seconds = float(state_dict.get("fit_seconds", 0.0))

    def _elapsed(self) -> float:
        return self.fit_seconds + (time.monotonic() - self._t0 if self._t0 is not None else 0.0)

    def _summary(
        self, trainer: pl.Trainer, rows: list[dict[str, Any]], test: dict[str, float] | None
    ) -> dict[str, Any]:
        name = getattr(trainer.logger, "name", None) if trainer.logger else None
        return {
            "config": name,
            "epochs": len(rows),
            "device": device_name(trainer),
            "wall_time_s": round(self._elapsed(), 2),
            "metrics": summarize(rows, test),
        }

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        row: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for key in METRIC_COLUMNS[2:-1]:
            if key in m:
                row[key] = float(m[key])
        if trainer.optimizers:
            row["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        self._write(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer)
        self.fit_seconds, self._t0 = self._elapsed(), None

    def _write(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero or trainer.log_dir is None or trainer.fast_dev_run:
            return
        write_run_outputs(
            trainer.log_dir, self._summary(trainer, self.rows, None), self.rows, self.reference
        )

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        test = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        run_dir = run_dir_of(trainer)
        if run_dir is None:
            return
        rows = self.rows
        if (run_dir / "metrics.csv").exists():
            rows = read_metrics_csv(run_dir / "metrics.csv")
        summary = self._summary(trainer, rows, test)
        summary["checkpoint"] = str(trainer.ckpt_path) if trainer.ckpt_path else None
        if (
            run_dir / "summary.json" != Path(trainer.log_dir or "") / "summary.json"
            and (run_dir / "summary.json").exists()
        ):
            import json

            old = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
            summary["wall_time_s"] = old.get("wall_time_s", summary["wall_time_s"])
            summary["config"] = old.get("config", summary["config"])
        write_json(run_dir / "test_metrics.json", test)
        write_run_outputs(run_dir, summary, rows, self.reference)
        rank_zero_info(f"test results written to {run_dir}/summary.md")
