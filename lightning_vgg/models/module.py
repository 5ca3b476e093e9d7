"""The LightningModule that trains and evaluates :class:`~lightning_vgg.models.vgg.VGG16`."""

from __future__ import annotations

from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

from lightning_vgg.checks import (
    NonNegativeFloat,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    UnitIntervalFromZero,
    UnitIntervalToOne,
    check_ranges,
)
from lightning_vgg.models.vgg import VGG16, BatchNormMode, InitMode

Batch = tuple[torch.Tensor, torch.Tensor]


class NanDroppingMean(MeanMetric):
    """``MeanMetric()`` (NaN values left out of the mean, with a warning) without its
    host syncs.

    torchmetrics' NaN check asks ``if nans.any()`` on every update, which on a GPU
    waits for the step's kernels to finish, twice per training and validation step.
    Here a NaN gets weight 0 on the device, so the mean is the same (bit for bit when
    there is none), and the NaNs are counted in a state: the warning comes once per
    epoch, at ``compute``, instead of at the update.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(nan_strategy="disable", **kwargs)
        self.add_state("nan_count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor) -> None:  # type: ignore[override]
        """Add the values of ``value`` (any shape) to the mean, NaNs excepted."""
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value, dtype=self.dtype, device=self.device)
        value = value.to(self.dtype)
        if value.numel() == 0:
            return
        nans = torch.isnan(value)
        # MeanMetric adds (value * 1.0).sum() and ones.sum(): the same numbers
        self.mean_value += torch.where(nans, 0.0, value).sum()
        self.weight += (~nans).sum().to(self.weight.dtype)
        self.nan_count += nans.sum()

    def compute(self) -> torch.Tensor:
        """The mean of the values seen (one host sync, for the NaN warning)."""
        if self.nan_count > 0:
            rank_zero_warn(
                f"left {int(self.nan_count)} NaN value(s) out of a mean", category=UserWarning
            )
        return super().compute()


class VGGClassifier(pl.LightningModule):
    """VGG16(-BN) with one logit: BCE-with-logits loss, SGD as in the seed by default.

    Every constructor argument is saved as a hyperparameter, so a checkpoint alone
    rebuilds the network (``explain`` and ``compare`` rely on that).

    The optimizer and schedule are chosen by plain ``optimizer``/``scheduler`` names
    in :meth:`configure_optimizers`, not by LightningCLI's ``OptimizerCallable`` /
    ``LRSchedulerCallable``. Those would replace the keys ``model.optimizer: sgd``,
    ``model.lr``, ``model.momentum``... with class paths, so every config and every
    saved checkpoint's hyperparameters would change meaning (or stop loading); and
    the one-cycle and cosine schedules need ``trainer.estimated_stepping_batches``,
    known only once the trainer is attached, which a callable built from the config
    cannot be given. The weight-decay split (none for biases and BatchNorm) is also
    done here, for either optimizer.

    Args:
        width: Channel multiplier (1.0 is VGG16; 1/16 for tests).
        batch_norm: ``every_conv`` (default), ``per_block`` (the seed's literal
            model) or ``none``.
        bn_momentum: BatchNorm momentum in PyTorch's convention; 0.01 is Keras's 0.99.
        bn_eps: BatchNorm epsilon; 1e-3 is Keras's default.
        hidden: Dense width before scaling by ``width``.
        dropout: Dropout in the head; the seed has none.
        input_size: Square input side; must match the data's ``image_size``.
        inplace_relu: In-place ReLUs, as torchvision.
        init: ``keras`` (he_normal, the seed) or ``torchvision``.
        optimizer: ``sgd`` (the seed) or ``adamw``.
        lr: Peak learning rate.
        momentum: SGD momentum.
        nesterov: Nesterov momentum for SGD.
        weight_decay: L2 (SGD) or decoupled (AdamW) weight decay.
        scheduler: ``none`` (the seed), ``onecycle`` or ``cosine``; both step per batch.
        warmup_pct: Share of steps spent warming up under ``onecycle``/``cosine``.
        label_smoothing: Targets become ``y*(1-s) + s/2``; 0 in the seed.
        channels_last: Use NHWC memory format (faster convs on tensor cores).
    """

    def __init__(
        self,
        width: PositiveFloat = 1.0,
        batch_norm: BatchNormMode = "every_conv",
        bn_momentum: UnitIntervalToOne = 0.01,
        bn_eps: PositiveFloat = 1e-3,
        hidden: PositiveInt = 4096,
        dropout: UnitIntervalFromZero = 0.0,
        input_size: PositiveInt = 224,
        inplace_relu: bool = True,
        init: InitMode = "keras",
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: PositiveFloat = 1e-3,
        momentum: NonNegativeFloat = 0.9,
        nesterov: bool = False,
        weight_decay: NonNegativeFloat = 0.0,
        scheduler: Literal["none", "onecycle", "cosine"] = "none",
        warmup_pct: OpenUnitInterval = 0.1,
        label_smoothing: UnitIntervalFromZero = 0.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        # the CLI checks these while parsing; a direct Python call gets the same message
        check_ranges("model", VGGClassifier.__init__, locals())
        self.save_hyperparameters()
        self.net = VGG16(
            width=width,
            batch_norm=batch_norm,
            bn_momentum=bn_momentum,
            bn_eps=bn_eps,
            hidden=hidden,
            dropout=dropout,
            input_size=input_size,
            inplace_relu=inplace_relu,
            init=init,
        )
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        # No metric reads a value back to the host per step (a GPU sync each). Labels
        # are 0/1 by construction (lightning_vgg.labels; split.csv's are checked when
        # read) and so are the predictions, so BinaryAccuracy's per-update check of
        # both (torch.unique, twice) cannot fail; NanDroppingMean is MeanMetric
        # without the syncs of its NaN check.
        self.metrics = torch.nn.ModuleDict(
            {
                f"{split}_{kind}": (
                    BinaryAccuracy(validate_args=False) if kind == "acc" else NanDroppingMean()
                )
                for split in ("train", "val", "test")
                for kind in ("acc", "loss")
            }
        )
        self._eval_images = 0  # images that reached val/test steps in this epoch (this rank)
        self._logged: set[str] = set()  # splits whose metrics were logged in this epoch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(N,)``; apply ``sigmoid`` for P(dog)."""
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def _step(self, batch: Batch, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Loss and logits of one batch of ``split`` (``train``/``val``/``test``: the
        metrics' prefix, not Lightning's stage names ``fit``/``validate``/``test``)."""
        if batch is None:  # every image of the batch failed to load (already warned)
            return None
        x, y = batch[0], batch[1]
        logits = self(x)
        target = y.float()
        s = self.hparams.label_smoothing if split == "train" else 0.0
        if s > 0:
            target = target * (1 - s) + 0.5 * s
        losses = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
        n = y.shape[0]
        loss = self._batch_loss(losses) if split == "train" else losses.mean()
        loss_metric = self.metrics[f"{split}_loss"]
        acc_metric = self.metrics[f"{split}_acc"]
        if split != "train":
            self._eval_images += n
        if n > 0:  # a DDP rank can hold no image of a short last batch
            # per-image values: the epoch mean is sample-weighted, over all ranks
            loss_metric.update(losses.detach())
            # P(dog) >= 0.5 means dog, as in the seed; logit >= 0 is the same test.
            acc_metric.update((logits.detach() >= 0).long(), y.long())
        if split not in self._logged:
            # Once per epoch is enough: Lightning keeps the logged metric objects, and
            # computes and resets them at the epoch's end, over all of the epoch's
            # updates. Each self.log call moves the metric to the device again (~0.5 ms
            # of CPU), twice per step.
            self._logged.add(split)
            self.log(
                f"{split}/loss",
                loss_metric,
                on_step=False,
                on_epoch=True,
                prog_bar=True,
                batch_size=n,
            )
            self.log(
                f"{split}/acc",
                acc_metric,
                on_step=False,
                on_epoch=True,
                prog_bar=True,
                batch_size=n,
            )
        return loss, logits.detach()

    def _batch_loss(self, losses: torch.Tensor) -> torch.Tensor:
        """The mean loss of the global batch, as this rank's share of it.

        DDP averages gradients over the k ranks, which is the global mean only when
        every rank holds the same number of images. A short last batch (or images
        that failed to load) splits unevenly, so each rank returns
        ``sum(own losses) * k / global count``: the ranks' average is then exactly
        the single-process mean. One process returns the plain mean.
        """
        trainer = self._attached_trainer()
        world = trainer.world_size if trainer is not None else 1
        if world == 1:
            return losses.mean()
        count = torch.tensor(float(losses.numel()), device=losses.device)
        total = trainer.strategy.reduce(count, reduce_op="sum")
        return losses.sum() * world / total.clamp_min(1.0)

    def _attached_trainer(self) -> pl.Trainer | None:
        """The trainer running this module; ``None`` when a test or script calls a step
        directly (the public ``trainer`` property raises then)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        """One SGD step on an augmented batch (skipped if no image of it loaded)."""
        out = self._step(batch, "train")
        return None if out is None else out[0]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Accumulate val loss/accuracy (epoch means, sample-weighted like Keras)."""
        self._step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor] | None:
        """Accumulate test loss/accuracy; return per-image logits for the gallery."""
        out = self._step(batch, "test")
        if out is None:
            return None
        result = {"logits": out[1], "y": batch[1]}
        if len(batch) > 2:
            result["keys"] = batch[2]
        return result

    def on_train_epoch_start(self) -> None:
        self._logged.discard("train")

    def on_validation_epoch_start(self) -> None:
        self._eval_images = 0
        self._logged.discard("val")

    def on_test_epoch_start(self) -> None:
        self._eval_images = 0
        self._logged.discard("test")

    def on_validation_epoch_end(self) -> None:
        """``validate`` only (not fit's validation): count the images, refuse too few."""
        trainer = self._attached_trainer()
        if trainer is not None and trainer.state.fn == "validate":
            self._log_image_counts("validate", "val")

    def on_test_epoch_end(self) -> None:
        """Log ``test/n_images`` and ``test/n_skipped``, or refuse a result on too few
        images (before any callback writes a file)."""
        self._log_image_counts("test", "test")

    def _log_image_counts(self, stage: str, prefix: str) -> None:
        from lightning_vgg.data.counting import count_eval_images

        used, skipped = count_eval_images(self.trainer, stage, self._eval_images)
        # already summed over ranks: every rank logs the same numbers (a mean of equals)
        for name, value in (("n_images", used), ("n_skipped", skipped)):
            self.log(f"{prefix}/{name}", float(value), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Probabilities of 'dog' and the 0/1 prediction for each image."""
        if batch is None:  # no image of the batch could be read
            return None
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        prob = torch.sigmoid(self(x).float())
        out = {"prob_dog": prob, "pred": (prob >= 0.5).long()}
        if isinstance(batch, (tuple, list)) and len(batch) > 2:
            out["keys"] = batch[2]  # row of each image in the test split
        return out

    def configure_optimizers(self) -> Any:
        """SGD(lr, momentum) as in the seed, or AdamW; optional per-step schedule."""
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov
            )
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr)
        if hp.scheduler == "none":
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        if hp.scheduler == "onecycle":
            sched: Any = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=hp.lr, total_steps=total, pct_start=hp.warmup_pct
            )
        else:
            warm = max(1, int(total * hp.warmup_pct))
            sched = torch.optim.lr_scheduler.SequentialLR(
                opt,
                [
                    torch.optim.lr_scheduler.LinearLR(opt, 1e-3, 1.0, warm),
                    torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, total - warm)),
                ],
                milestones=[warm],
            )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
