"""The prediction writer: predictions.csv for the test split, gathered from every rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info

from lightning_vgg.callbacks.ranks import gather_to_all, local_log_dir, run_dir_of
from lightning_vgg.data.counting import count_eval_images


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
