"""The finite-loss guard: training stops at the first NaN or infinite loss, without a host sync per step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from lightning_vgg.callbacks.ranks import local_log_dir
from lightning_vgg.errors import UserError

__all__ = ["FiniteLossGuard"]


class FiniteLossGuard(Callback):
    """Stops training loudly at the first NaN or infinite training loss.

    ``EarlyStopping(check_finite=True)`` stops quietly at the end of an epoch; this
    raises with the epoch, step and batch of the first non-finite loss before
    anything saves or evaluates the broken weights, so ``last.ckpt`` stays the last
    good state.

    Reading a loss on the host makes the CPU wait for the GPU to finish the step, a
    stall per step. So each step only queues a device-side ``isfinite`` test, and the
    guard reads the queued results (one wait) every ``check_every_n_steps`` steps and
    always before the weights are used: after a batch at which a checkpoint callback
    may save mid-epoch, after the last batch of an epoch (before its validation and
    epoch-end callbacks), at validation start, epoch end, every checkpoint save and
    the end of training. Steps run after the bad one change only the weights in
    memory, which are no longer saved; the error names the first bad step.

    Args:
        check_every_n_steps: Read the queued tests at least this often; 1 reads
            every step's loss at once (a GPU sync per step).
    """

    def __init__(self, check_every_n_steps: int = 100) -> None:
        if isinstance(check_every_n_steps, bool) or check_every_n_steps < 1:
            raise UserError(
                f"finite_guard.check_every_n_steps must be at least 1, got {check_every_n_steps}"
            )
        self.check_every_n_steps = int(check_every_n_steps)
        self._step = 0
        #: (all finite?, loss, epoch, step, batch) of each batch not yet looked at; the
        #: first two are None for a batch that was skipped (no image of it loaded)
        self._pending: list[tuple[torch.Tensor | None, torch.Tensor | None, int, int, int]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pending = []

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
        finite = None  # None: a batch with no readable image, skipped
        if loss is not None:
            loss = loss.detach()
            finite = torch.isfinite(loss).all()  # queued on the device: no sync here
        self._pending.append((finite, loss, trainer.current_epoch, self._step, batch_idx))
        if (
            len(self._pending) >= self.check_every_n_steps
            or _is_last_batch(trainer)
            or _checkpoint_may_save_now(trainer)
        ):
            self.check(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.check(trainer)  # a full save from anywhere; raising here writes no file

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._pending = []

    def check(self, trainer: pl.Trainer) -> None:
        """Read the queued tests (one host sync); raise at the first non-finite loss.

        Raises:
            UserError: A loss since the last check was NaN or infinite (on any rank).
        """
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        tests = [p[0] for p in pending if p[0] is not None]
        results = iter(torch.stack(tests).tolist() if tests else [])  # the one host sync
        flags = [True if p[0] is None else next(results) for p in pending]
        first = next((i for i, ok in enumerate(flags) if not ok), len(pending))
        # every DDP rank must stop together, at the same step, or the others wait forever;
        # all ranks run the same batches and check after the same ones, so the queues
        # line up and the earliest bad batch of any rank is the one reported
        if trainer.world_size > 1:
            found = torch.tensor(float(first), device=trainer.strategy.root_device)
            first = int(trainer.strategy.reduce(found, reduce_op="min").item())
        if first >= len(pending):
            return
        _, loss, epoch, step, batch_idx = pending[first]
        # under DDP this rank's own loss of that step may be fine (or absent)
        value = "non-finite on another rank" if flags[first] else float(loss.float().mean())
        ckpt_dir = Path(local_log_dir(trainer) or ".") / "checkpoints"
        kept = ckpt_dir / "last.ckpt"
        where = (
            f"the last good checkpoint is {kept}"
            if kept.exists()
            else "no checkpoint had been written yet"
        )
        raise UserError(
            f"training loss became {value} at epoch {epoch}, "
            f"step {step} (batch {batch_idx}); training stopped and {where}"
        )


def _is_last_batch(trainer: pl.Trainer) -> bool:
    """Whether the training batch that just ran was the epoch's last (Lightning knows
    it before the batch runs: its data fetcher looks one batch ahead)."""
    loop = getattr(trainer.fit_loop, "epoch_loop", None)
    progress = getattr(loop, "batch_progress", None)
    return bool(getattr(progress, "is_last_batch", True))


def _checkpoint_may_save_now(trainer: pl.Trainer) -> bool:
    """Whether a checkpoint callback may save at the end of this training batch
    (``every_n_train_steps`` due now, or any ``train_time_interval``)."""
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "_train_time_interval", None) is not None:
            return True
        every = getattr(cb, "_every_n_train_steps", 0) or 0
        if every >= 1 and trainer.global_step % every == 0:
            return True
    return False
