"""How many images an evaluation used and skipped; refuses results on too few of them."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from lightning_vgg.errors import UserError

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
