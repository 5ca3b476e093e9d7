"""Callbacks that keep a run's records: metrics, summaries, the data-exhaustion stop, progress lines (the finite-loss guard is in guard.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_vgg.callbacks.ranks import device_name, local_log_dir, run_dir_of
from lightning_vgg.data.counting import COUNT_KEYS
from lightning_vgg.errors import UserError
from lightning_vgg.fileio import save_figure, write_json
from lightning_vgg.labels import CLASS_NAMES
from lightning_vgg.report.history import (
    METRIC_COLUMNS,
    TEST_METRIC_KEYS,
    TEST_SUMMARY_KEYS,
    fit_wall_time,
    has_test_results,
    read_metrics_csv,
    summarize,
    write_run_outputs,
)

#: What ``test`` writes into a run folder that describes the tested weights alone
#: (``MisclassificationGallery``'s gallery and listing, this callback's
#: ``test_metrics.json``, the probe callbacks' ``test_end`` figures). ``metrics.csv``
#: and ``history.png``, which ``test`` rewrites too, are the fit's history.
TEST_OUTPUTS = (
    "test_metrics.json",
    "misclassified.json",
    *(f"misclassified_{name}.png" for name in CLASS_NAMES),
    "visualizations/test_end",
)
#: Where a fit moves the test outputs that no longer describe the run's weights.
STALE_TEST_DIR = "stale_test"


class RunArtifacts(Callback):
    """Keeps ``metrics.csv``, ``history.png`` and ``summary.{json,md}`` up to date.

    Rows are kept in the callback's checkpoint state, so a resumed run continues the
    same table, and so is the fit's accumulated wall time (``fit_wall_time_s``).
    ``test`` writes its numbers into the run directory of the checkpoint it
    evaluated, next to that run's training history, with its own duration
    (``test_wall_time_s``) and the checkpoint it evaluated (``test_checkpoint``: path,
    epoch, global step); it never changes the fit's recorded time.

    When a fit trains in a folder that holds an earlier ``test``'s outputs, those no
    longer describe the run's weights: at the start of training they are moved into
    ``stale_test/`` (never deleted) and the new summary has no test numbers. A
    resumed fit with nothing left to train keeps them.

    Args:
        reference: Which of the seed's published rows to print beside ours
            (``good``, ``broken``), or ``None``.
        history_every_s: Redraw ``history.png`` at most this often, in seconds
            (matplotlib costs ~0.2 s per epoch); it is always redrawn at the end of the
            fit (and when it fails). ``0``: after every epoch. ``metrics.csv`` and
            ``summary.*`` are written after every epoch in any case.
    """

    def __init__(
        self,
        reference: Literal["good", "broken"] | None = "good",
        history_every_s: float = 30.0,
    ) -> None:
        if not history_every_s >= 0:  # NaN too; inf: only at the end of the fit
            raise UserError(
                f"artifacts.history_every_s must be 0 or more seconds, got {history_every_s}"
            )
        self.reference = reference
        self.history_every_s = float(history_every_s)
        self.rows: list[dict[str, Any]] = []
        self.fit_seconds = 0.0
        self._t0: float | None = None
        self._drawn_at: float | None = None  # when history.png was last drawn
        self._drawn_rows = 0  # ... and with how many rows
        self._test_t0: float | None = None
        self._loaded: tuple[str | None, dict[str, Any]] | None = None
        self._kept_test: dict[str, Any] | None = None  # an earlier test still valid

    def state_dict(self) -> dict[str, Any]:
        """Saved into every checkpoint so resumed runs keep their history."""
        return {"rows": self.rows, "fit_seconds": self._elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history of the interrupted run."""
        self.rows = list(state_dict.get("rows", []))
        self.fit_seconds = float(state_dict.get("fit_seconds", 0.0))

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Remember the epoch and step of the checkpoint (what ``test`` evaluates)."""
        where = {k: checkpoint.get(k) for k in ("epoch", "global_step")}
        self._loaded = (str(trainer.ckpt_path) if trainer.ckpt_path else None, where)

    def _elapsed(self) -> float:
        return self.fit_seconds + (time.monotonic() - self._t0 if self._t0 is not None else 0.0)

    def _summary(self, trainer: pl.Trainer, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The fit's summary (no test numbers: ``on_test_end`` adds those)."""
        name = getattr(trainer.logger, "name", None) if trainer.logger else None
        return {
            "config": name,
            "epochs": len(rows),
            "device": device_name(trainer),
            "fit_wall_time_s": round(self._elapsed(), 2),
            "metrics": summarize(rows, None),
        }

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.monotonic()
        self._drawn_at, self._drawn_rows = None, 0
        self._kept_test = None
        log_dir = local_log_dir(trainer) if trainer.is_global_zero else None
        if log_dir is None or trainer.fast_dev_run:
            return
        old = _read_summary(Path(log_dir) / "summary.json")
        if old is not None and has_test_results(old):  # valid until training changes weights
            metrics = old.get("metrics") if isinstance(old.get("metrics"), dict) else {}
            self._kept_test = {
                **{k: old[k] for k in TEST_SUMMARY_KEYS if k in old},
                "metrics": {k: metrics[k] for k in TEST_METRIC_KEYS if k in metrics},
            }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Training is about to change the weights: an earlier test's outputs go stale."""
        log_dir = local_log_dir(trainer) if trainer.is_global_zero else None
        if log_dir is None or trainer.fast_dev_run:
            return
        self._kept_test = None
        moved, into = retire_test_outputs(Path(log_dir))
        if moved:
            self._write(trainer, history=False)  # a summary without the stale test numbers
            rank_zero_info(
                f"moved the outputs of an earlier test ({', '.join(moved)}) into {into}: "
                "this fit changes the weights they describe (re-run test after the fit)"
            )

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
        now = time.monotonic()
        due = self._drawn_at is None or now - self._drawn_at >= self.history_every_s
        self._write(trainer, history=due)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, history=True)
        self.fit_seconds, self._t0 = self._elapsed(), None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """A fit that fails (a NaN loss, Ctrl-C) still leaves an up-to-date ``history.png``."""
        if not isinstance(exception, Exception | KeyboardInterrupt):
            return  # SystemExit and the like: leave at once
        log_dir = local_log_dir(trainer) if trainer.is_global_zero else None
        if self._t0 is None or log_dir is None or trainer.fast_dev_run:
            return
        if not self.rows or self._drawn_rows == len(self.rows):
            return
        try:
            from lightning_vgg.report.figures import learning_curves

            name = getattr(trainer.logger, "name", None) if trainer.logger else None
            figure = learning_curves({"": self.rows}, title=str(name or ""))
            save_figure(figure, Path(log_dir) / "history.png")
        except Exception as exc:  # never hide the error that ended the fit
            rank_zero_warn(f"could not redraw history.png after the error: {exc}")

    def _write(self, trainer: pl.Trainer, history: bool = True) -> None:
        log_dir = local_log_dir(trainer) if trainer.is_global_zero else None
        if log_dir is None or trainer.fast_dev_run:
            return
        summary = self._summary(trainer, self.rows)
        if self._kept_test:  # a resume that trained nothing: the test still holds
            kept = dict(self._kept_test)
            summary["metrics"].update(kept.pop("metrics", {}))
            summary.update(kept)
        write_run_outputs(log_dir, summary, self.rows, self.reference, history=history)
        if history:
            self._drawn_at, self._drawn_rows = time.monotonic(), len(self.rows)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._test_t0 = time.monotonic()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        test_seconds = time.monotonic() - self._test_t0 if self._test_t0 is not None else None
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
        summary = self._summary(trainer, rows)
        # the fit's record stays the fit's: its config, device and wall time
        old = _read_summary(run_dir / "summary.json") or {}
        fit_s = fit_wall_time(old)
        summary["fit_wall_time_s"] = (
            fit_s if fit_s is not None else (round(self.fit_seconds, 2) or None)
        )
        for key in ("config", "device"):
            if old.get(key) is not None:
                summary[key] = old[key]
        summary["metrics"] = summarize(rows, test)
        for key in COUNT_KEYS:  # how many test images the numbers are over
            if key in test:
                summary["metrics"][key.replace("/", "_")] = test[key]
        summary["test_wall_time_s"] = None if test_seconds is None else round(test_seconds, 2)
        summary["test_device"] = device_name(trainer)
        summary["test_checkpoint"] = self._tested_checkpoint(trainer, rows)
        write_json(run_dir / "test_metrics.json", test)
        write_run_outputs(run_dir, summary, rows, self.reference)
        rank_zero_info(f"test results written to {run_dir}/summary.md")

    def _tested_checkpoint(self, trainer: pl.Trainer, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Path, epoch (0-based) and global step of the weights ``test`` evaluated."""
        ckpt = str(trainer.ckpt_path) if trainer.ckpt_path else None
        if ckpt is not None:
            where = self._loaded[1] if self._loaded and self._loaded[0] == ckpt else {}
            return {
                "path": str(Path(ckpt).resolve()),
                "epoch": _int_or_none(where.get("epoch")),
                "global_step": _int_or_none(where.get("global_step")),
            }
        # the weights in memory, after a fit in this process
        return {
            "path": None,
            "epoch": _int_or_none(rows[-1].get("epoch")) if rows else None,
            "global_step": _int_or_none(trainer.global_step),
        }


def _int_or_none(v: Any) -> int | None:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _read_summary(path: Path) -> dict[str, Any] | None:
    """A run's ``summary.json``; ``None`` when missing or unreadable (with a warning)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        rank_zero_warn(f"cannot read {path}: {exc}; ignoring it")
        return None
    return data if isinstance(data, dict) else None


def retire_test_outputs(run_dir: Path) -> tuple[list[str], Path | None]:
    """Move an earlier ``test``'s outputs out of ``run_dir``, into ``stale_test/``.

    Moves the files and folders named in :data:`TEST_OUTPUTS`, and ``summary.json`` /
    ``summary.md`` when they hold test numbers, by atomic renames; nothing is deleted
    or overwritten: when ``stale_test/`` already holds one of the names (a run tested
    and resumed twice), they go into ``stale_test/2/`` (``3/``...) instead.

    Returns:
        The names moved (relative to ``run_dir``) and the folder they went to; ``[]``
        and ``None`` when there was nothing to move.
    """
    names = [n for n in TEST_OUTPUTS if (run_dir / n).exists()]
    summary = _read_summary(run_dir / "summary.json")
    if summary is not None and has_test_results(summary):
        names += [n for n in ("summary.json", "summary.md") if (run_dir / n).is_file()]
    if not names:
        return [], None
    into, n = run_dir / STALE_TEST_DIR, 1
    while into.exists() and any((into / name).exists() for name in names):
        n += 1
        into = run_dir / STALE_TEST_DIR / str(n)
    for name in names:
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        os.rename(run_dir / name, into / name)  # same folder tree: atomic, one file system
    return names, into


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
