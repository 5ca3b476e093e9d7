"""Callbacks: they decide when and where to write; the computing lives in report/ and explain/."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, Callback
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info

from lightning_vgg.errors import UserError
from lightning_vgg.explain.atlas import check_score
from lightning_vgg.fileio import save_figure, write_json
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


def local_log_dir(trainer: pl.Trainer) -> str | None:
    """``trainer.log_dir`` without its broadcast, for code that only rank 0 runs.

    ``Trainer.log_dir`` is a collective under DDP (it broadcasts rank 0's directory):
    called on rank 0 alone, the other ranks never join and the run hangs. On rank 0
    this is the same directory.
    """
    logger = trainer.logger
    if logger is None:
        return trainer.default_root_dir
    if isinstance(logger, (TensorBoardLogger, CSVLogger)):
        return logger.log_dir
    return logger.save_dir


def gather_to_all(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order; ``[obj]`` in a single process.

    A collective under DDP: every rank must call it, at the same point. Objects are
    pickled, so shares of different lengths (a test split that does not divide by the
    number of ranks) gather as they are, with no padding to strip.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_dir_of(trainer: pl.Trainer) -> Path | None:
    """The run directory: where the checkpoint came from, else the logger's directory."""
    ckpt = trainer.ckpt_path
    if ckpt:
        p = Path(ckpt).resolve()
        if p.parent.name == "checkpoints":
            return p.parent.parent
    log_dir = local_log_dir(trainer)
    return Path(log_dir) if log_dir else None


#: Keys of the image counts ``test`` records beside its metrics.
COUNT_KEYS = ("test/n_images", "test/n_skipped")
_EVAL_SPLIT = {"validate": "validation", "test": "test", "predict": "test"}


def _requested_images(trainer: pl.Trainer, stage: str) -> int | None:
    """Images this rank's loader asks for in the current ``stage`` run: the batches
    Lightning will draw (``limit_*_batches``, ``fast_dev_run``), counted from its
    batch sampler. ``None`` when the loader has no batch sampler to count."""
    import itertools
    import math

    loader = {
        "validate": trainer.val_dataloaders,
        "test": trainer.test_dataloaders,
        "predict": trainer.predict_dataloaders,
    }[stage]
    limits = {
        "validate": trainer.num_val_batches,
        "test": trainer.num_test_batches,
        "predict": trainer.num_predict_batches,
    }[stage]
    if isinstance(loader, (list, tuple)):
        if len(loader) != 1:
            return None
        loader = loader[0]
    sampler = getattr(loader, "batch_sampler", None)
    limit = limits[0] if limits else math.inf
    if sampler is None:
        return None
    stop = None if math.isinf(limit) else int(limit)
    return sum(len(batch) for batch in itertools.islice(iter(sampler), stop))


def count_eval_images(trainer: pl.Trainer, stage: str, used: int) -> tuple[int, int]:
    """``(used, skipped)`` images of a ``validate``/``test``/``predict`` run, all ranks.

    ``used`` is this rank's count of images that reached the model; the loader's
    batch sampler says how many were asked for, and the difference could not be
    read (each was skipped with a warning). A collective under DDP: every rank calls
    it at the same point.

    Raises:
        UserError: No image could be read, or more than ``data.max_missing_fraction``
            of them could not, so the result would not be the split's; the caller
            has written nothing yet and earlier results stay as they were.
    """
    asked = _requested_images(trainer, stage)
    counts = torch.tensor(
        [used, -1 if asked is None else asked],
        dtype=torch.long,
        device=trainer.strategy.root_device,
    )
    if trainer.world_size > 1:
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
    total_used, total_asked = (int(v) for v in counts.tolist())
    known = asked is not None
    skipped = max(0, total_asked - total_used) if known else 0
    dm = trainer.datamodule
    limit = float(getattr(getattr(dm, "hparams", {}), "max_missing_fraction", 0.01))
    split = _EVAL_SPLIT[stage]
    cause = (
        "the warnings above name the files; were the images or the data cache "
        "(data.cache_dir) deleted or moved since split.csv was written?"
    )
    if total_used == 0:
        of = f" of the {total_asked}" if known else ""
        raise UserError(
            f"{stage}: none{of} {split} images could be read, so there is no result and "
            f"nothing was written; {cause}"
        )
    if known and total_asked and skipped / total_asked > limit:
        raise UserError(
            f"{stage}: {skipped} of {total_asked} {split} images "
            f"({skipped / total_asked:.1%}) could not be read, more than "
            f"data.max_missing_fraction={limit:g}; nothing was written; {cause} "
            "Raise data.max_missing_fraction to accept a result on the other images"
        )
    return total_used, skipped


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


class _ProbeCallback(Callback):
    """Shared plumbing of the visualisation callbacks: fixed probes, when and where.

    The probe images (``per_class`` cats and dogs from the validation split) are
    chosen once and kept, so every epoch's figures show the same photos. Work is
    bounded: one forward (and one backward for Grad-CAM) on ``2 * per_class``
    images, plus the figures, every ``every_n_epochs`` epochs and at the end of fit
    and test.
    """

    kind = "probe"

    def __init__(
        self, every_n_epochs: int = 10, per_class: int = 2, log_to_logger: bool = True
    ) -> None:
        if every_n_epochs < 1 or per_class < 1:
            raise UserError(
                f"{type(self).__name__}: every_n_epochs and per_class must be at least 1"
            )
        self.every_n_epochs = every_n_epochs
        self.per_class = per_class
        self.log_to_logger = log_to_logger
        self._probe: tuple[torch.Tensor, torch.Tensor, list[str]] | None = None

    def _probes(self, trainer: pl.Trainer) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
        if self._probe is None:
            dm = trainer.datamodule
            if dm is None or not hasattr(dm, "probe_batch"):
                return None
            split = "val" if any(r[2] == "val" for r in (dm.rows or [])) else "test"
            self._probe = dm.probe_batch(self.per_class, split=split)
        return self._probe

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        probes = self._probes(trainer)
        if probes is None:
            return
        # fast_dev_run swaps in a logger without a directory: use the root dir then
        out = Path(local_log_dir(trainer) or trainer.default_root_dir) / "visualizations" / tag
        figures = self.figures(pl_module, *probes)
        logger = trainer.logger
        experiment = getattr(logger, "experiment", None) if self.log_to_logger else None
        for name, fig in figures:
            if experiment is not None and hasattr(experiment, "add_figure"):
                experiment.add_figure(
                    f"{self.kind}/{name}", fig, global_step=trainer.global_step, close=False
                )
            save_figure(fig, out / f"{self.kind}_{name}.png")

    def figures(
        self, pl_module: pl.LightningModule, x: torch.Tensor, y: torch.Tensor, paths: list[str]
    ) -> list[tuple[str, Any]]:
        """The (name, Figure) pairs to write; computed by explain/."""
        raise NotImplementedError

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module, f"epoch_{trainer.current_epoch:03d}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module, "fit_end")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module, "test_end")


class FeatureMapCallback(_ProbeCallback):
    """Feature maps of every conv layer for the fixed probe images (the seed's grids).

    Args:
        every_n_epochs: Draw after every n-th training epoch (and at fit/test end).
        per_class: Probe cats and dogs from the validation split.
        max_channels: Channels per layer grid.
        stage: ``post`` (after ReLU, the seed's) or ``pre`` activation.
        log_to_logger: Also send figures to TensorBoard when it is the logger.
    """

    kind = "features"

    def __init__(
        self,
        every_n_epochs: int = 10,
        per_class: int = 1,
        max_channels: int = 32,
        stage: Literal["post", "pre"] = "post",
        log_to_logger: bool = True,
    ) -> None:
        super().__init__(every_n_epochs, per_class, log_to_logger)
        self.max_channels = max_channels
        self.stage = stage

    def figures(
        self, pl_module: pl.LightningModule, x: torch.Tensor, y: torch.Tensor, paths: list[str]
    ) -> list[tuple[str, Any]]:
        from lightning_vgg.explain.probes import feature_figures

        return feature_figures(pl_module, x, y, paths, self.stage, self.max_channels)


class GradCAMCallback(_ProbeCallback):
    """Grad-CAM of every conv layer, dog and cat score, for the fixed probe images.

    Args:
        every_n_epochs: Draw after every n-th training epoch (and at fit/test end).
        per_class: Probe cats and dogs from the validation split.
        normalize: ``shared`` (one scale across layers: weak evidence looks weak)
            or ``per_map``.
        log_to_logger: Also send figures to TensorBoard when it is the logger.
        score: What Grad-CAM differentiates: ``logit`` (``±logit``) or
            ``probability`` (``P(dog)`` / ``1 - P(dog)``, the seed's); see
            :func:`~lightning_vgg.explain.atlas.compute_atlas`. Named in the titles.
    """

    kind = "gradcam"

    def __init__(
        self,
        every_n_epochs: int = 10,
        per_class: int = 2,
        normalize: Literal["shared", "per_map"] = "shared",
        log_to_logger: bool = True,
        score: Literal["logit", "probability"] = "logit",
    ) -> None:
        super().__init__(every_n_epochs, per_class, log_to_logger)
        self.normalize = normalize
        self.score = check_score(score)

    def figures(
        self, pl_module: pl.LightningModule, x: torch.Tensor, y: torch.Tensor, paths: list[str]
    ) -> list[tuple[str, Any]]:
        from lightning_vgg.explain.probes import gradcam_figures

        return gradcam_figures(pl_module, x, y, paths, self.normalize, self.score)


class MisclassificationGallery(Callback):
    """After ``test``: the k most confident wrong predictions per class, with Grad-CAM.

    Collects every test image's logit, then draws one figure per true class with
    the Grad-CAM of the *predicted* class at ``layer`` (where the model looked to
    make its mistake), and lists them in ``misclassified.json``. Written to the run
    directory of the checkpoint under test. Under DDP every rank tests its share of
    the split; the shares are gathered and rank 0 ranks and draws all of them. The
    images are reloaded through the data module's
    :class:`~lightning_vgg.data.preprocess.Preprocess`, the test loader's own
    preprocessing, so the overlays explain the very inputs that were misclassified.

    Args:
        k: Images per class.
        layer: Conv layer of the overlays (Keras name).
        score: What Grad-CAM differentiates: ``logit`` (``±logit`` of the predicted
            class) or ``probability`` (its probability, as the seed). Each overlay
            is scaled to its own maximum, so this only changes maps whose
            ``p(1-p)`` underflows to 0 (saturated predictions: all-zero maps).
    """

    def __init__(
        self,
        k: int = 8,
        layer: str = "block5_conv3",
        score: Literal["logit", "probability"] = "logit",
    ) -> None:
        self.k = k
        self.layer = layer
        self.score = check_score(score)
        self._logits: list[torch.Tensor] = []
        self._keys: list[torch.Tensor] = []

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._logits, self._keys = [], []

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if isinstance(outputs, dict) and "keys" in outputs:
            self._logits.append(outputs["logits"].float().cpu())
            self._keys.append(outputs["keys"].cpu())

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mine = (
            (torch.cat(self._logits), torch.cat(self._keys))
            if self._logits
            else (torch.empty(0), torch.empty(0, dtype=torch.long))
        )
        shares = gather_to_all(mine)  # every rank, before any rank may return
        dm = trainer.datamodule
        if not trainer.is_global_zero or dm is None or not hasattr(dm, "split_rows"):
            return
        logits = torch.cat([s[0] for s in shares])
        keys = torch.cat([s[1] for s in shares])
        if not len(keys):
            return
        from lightning_vgg.explain.gallery import confident_mistakes, mistakes_figure

        rows = dm.split_rows("test")
        labels = torch.tensor([rows[int(k)][1] for k in keys])
        run_dir = run_dir_of(trainer) or Path(local_log_dir(trainer) or ".")
        listing: dict[str, list[dict[str, Any]]] = {}
        for cls, (cname, found) in enumerate(confident_mistakes(logits, labels, self.k).items()):
            paths = [rows[int(keys[m.index])][0] for m in found]
            listing[cname] = [
                {"image": p, "prob_dog": m.prob_dog, "confidence": m.confidence}
                for p, m in zip(paths, found, strict=True)
            ]
            x = dm.probe_from_paths(paths)[0] if paths else None
            fig = mistakes_figure(pl_module, x, paths, found, cls, self.layer, self.score)
            save_figure(fig, run_dir / f"misclassified_{cname}.png")
        write_json(
            run_dir / "misclassified.json",
            {"layer": self.layer, "k": self.k, "score": self.score, **listing},
        )

    def _score_name(self, pred: int) -> str:
        """The differentiated score of the predicted class ``pred`` (cat 0, dog 1)."""
        from lightning_vgg.explain.gallery import score_name

        return score_name(self.score, pred)


class PredictionCSV(BasePredictionWriter):
    """Writes ``predictions.csv`` (path, label, prob_dog, pred) after ``predict``.

    The file goes to the run directory of the checkpoint, next to ``split.csv``, one
    row per test image in split order. Under DDP each rank predicts its own share;
    the shares are gathered and rank 0 writes them all. When no image, or more than
    ``data.max_missing_fraction`` of them, could be read, nothing is written and the
    command fails (:func:`count_eval_images`).
    """

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Any,
        batch_indices: Any,
    ) -> None:
        mine = [
            (int(k), float(p))
            for batch in predictions
            if batch and "keys" in batch
            for k, p in zip(batch["keys"].tolist(), batch["prob_dog"].tolist(), strict=True)
        ]
        # refuses (on every rank) when too few images could be read: no file is written
        used = sum(len(batch["prob_dog"]) for batch in predictions if batch)
        _, skipped = count_eval_images(trainer, "predict", used)
        shares = gather_to_all(mine)  # every rank, before any rank may return
        dm = trainer.datamodule
        if not trainer.is_global_zero or dm is None or not hasattr(dm, "split_rows"):
            return
        from lightning_vgg.fileio import write_csv

        rows = dm.split_rows("test")
        out = []
        for k, p in sorted(pair for share in shares for pair in share):
            path, label, _ = rows[k]
            out.append((path, label, f"{p:.6f}", int(p >= 0.5)))
        run_dir = run_dir_of(trainer) or Path(local_log_dir(trainer) or ".")
        write_csv(run_dir / "predictions.csv", ("path", "label", "prob_dog", "pred"), out)
        unread = f" ({skipped} unreadable images skipped)" if skipped else ""
        rank_zero_info(f"{len(out)} predictions written to {run_dir / 'predictions.csv'}{unread}")


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
