"""Callbacks that keep a run's records: metrics, summaries, the finite-loss guard, the data-exhaustion stop, progress lines."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info

from lightning_vgg.callbacks.ranks import device_name, local_log_dir, run_dir_of
from lightning_vgg.data.counting import COUNT_KEYS
from lightning_vgg.errors import UserError
from lightning_vgg.fileio import write_json
from lightning_vgg.report.history import (
    METRIC_COLUMNS,
    read_metrics_csv,
    summarize,
    write_run_outputs,
)


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
        log_dir = local_log_dir(trainer) if trainer.is_global_zero else None
        if log_dir is None or trainer.fast_dev_run:
            return
        write_run_outputs(
            log_dir, self._summary(trainer, self.rows, None), self.rows, self.reference
        )

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        test = {
            k: int(v) if k in COUNT_KEYS else float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("test/")
        }
        run_dir = run_dir_of(trainer)
        if run_dir is None or "test/acc" not in test:
            return  # never replace earlier results with empty ones
        rows = self.rows
        if (run_dir / "metrics.csv").exists():
            rows = read_metrics_csv(run_dir / "metrics.csv")
        summary = self._summary(trainer, rows, test)
        summary["checkpoint"] = str(trainer.ckpt_path) if trainer.ckpt_path else None
        for key in COUNT_KEYS:  # how many test images the numbers are over
            if key in test:
                summary["metrics"][key.replace("/", "_")] = test[key]
        if (
            run_dir / "summary.json" != Path(local_log_dir(trainer) or "") / "summary.json"
            and (run_dir / "summary.json").exists()
        ):
            import json

            old = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
            summary["wall_time_s"] = old.get("wall_time_s", summary["wall_time_s"])
            summary["config"] = old.get("config", summary["config"])
        write_json(run_dir / "test_metrics.json", test)
        write_run_outputs(run_dir, summary, rows, self.reference)
        rank_zero_info(f"test results written to {run_dir}/summary.md")


class StopWhenDataRunsOut(Callback):
    """Ends ``fit`` after the epoch that used up a ``data.exhausted: stop`` stream.

    tf.keras 2.x stopped ``fit`` when its input ran out before ``steps_per_epoch``
    was reached; the data module's batch sampler reproduces the short epoch, and
    this callback the stop (without it the remaining epochs would be empty).
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        if dm is None or not getattr(dm, "train_stream_exhausted", lambda: False)():
            return
        trainer.should_stop = True
        rank_zero_info(
            f"the training data ran out after {trainer.global_step} step(s): training stops "
            "(data.exhausted: stop, as tf.keras 2.x: 'Your input ran out of data')"
        )


class FiniteLossGuard(Callback):
    """Stops training loudly at the first NaN or infinite training loss.

    ``EarlyStopping(check_finite=True)`` stops quietly at the end of an epoch; this
    raises at once with the epoch and step, before the epoch-end checkpoint could
    save broken weights, so ``last.ckpt`` stays the last good state.
    """

    def __init__(self) -> None:
        self._step = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = trainer.global_step  # the step this batch's loss belongs to

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        finite = loss is None or bool(torch.isfinite(loss.detach()).all())
        # every DDP rank must stop together, or the others wait forever
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        if loss is None:
            loss = torch.tensor(float("nan"))
        ckpt_dir = Path(local_log_dir(trainer) or ".") / "checkpoints"
        kept = ckpt_dir / "last.ckpt"
        where = (
            f"the last good checkpoint is {kept}"
            if kept.exists()
            else "no checkpoint had been written yet"
        )
        raise UserError(
            f"training loss became {float(loss.detach().float().mean())} at epoch {trainer.current_epoch}, "
            f"step {self._step} (batch {batch_idx}); training stopped and {where}"
        )


class EpochProgress(Callback):
    """One plain line per training epoch on stdout, and an optional wall-clock deadline.

    Prints ``<name> epoch 12/250 step 960 train_acc 0.7100 val_acc 0.6900 elapsed 83 s``
    after each epoch's validation (flushed at once, so a driver that reads the
    process's output sees it live). With ``stop_at`` set, training stops at the end of
    the first epoch after which another epoch as long as the last one would end past
    that moment: the fit then ends normally, with its checkpoints and summary written,
    instead of being killed halfway.

    Args:
        name: What each line starts with; defaults to the logger's name.
        every_n_epochs: Print every n-th epoch (the first and a stopping one always).
        stop_at: A Unix time (``time.time()``) to stop training before; ``None``: none.
    """

    def __init__(
        self, name: str | None = None, every_n_epochs: int = 1, stop_at: float | None = None
    ) -> None:
        if every_n_epochs < 1:
            raise UserError(f"every_n_epochs must be at least 1, got {every_n_epochs}")
        self.name = name
        self.every_n_epochs = every_n_epochs
        self.stop_at = stop_at
        self._t0 = time.monotonic()
        self._last = self._t0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = self._last = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        now = time.monotonic()
        took, self._last = now - self._last, now
        epoch = trainer.current_epoch + 1
        late = self.stop_at is not None and time.time() + took > self.stop_at
        limit = trainer.max_epochs
        stopping = late and (limit is None or limit < 0 or epoch < limit)
        if self.stop_at is not None:  # every DDP rank stops at the same epoch
            stopping = trainer.strategy.reduce_boolean_decision(stopping, all=False)
        if stopping:
            trainer.should_stop = True
        if not trainer.is_global_zero:
            return
        if epoch == 1 or stopping or epoch % self.every_n_epochs == 0:
            m = trainer.callback_metrics
            cells = [
                f"{label} {float(m[key]):.4f}"
                for key, label in (("train/acc", "train_acc"), ("val/acc", "val_acc"))
                if key in m
            ]
            name = self.name or getattr(trainer.logger, "name", None) or "fit"
            print(
                f"{name} epoch {epoch}/{trainer.max_epochs} step {trainer.global_step} "
                f"{' '.join(cells)} elapsed {now - self._t0:.0f} s",
                flush=True,
            )
            if stopping:
                print(f"{name} stopping after epoch {epoch}: the deadline is near", flush=True)
