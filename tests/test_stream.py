"""Keras's batch stream under a real Lightning fit: every epoch continues it, resume included.

Lightning advances samplers only through ``dataloader.sampler`` and
``dataloader.batch_sampler.sampler``. A batch sampler that is not reached that way
replays epoch 0 forever: the same images with the same augmentation draws. These
tests record the draw keys (one per stream position) that reach the model in a real
``Trainer.fit`` and compare them with the stream itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from lightning_vgg.data.datamodule import CatsDogsDataModule
from lightning_vgg.data.sampler import KerasBatchSampler
from lightning_vgg.models.module import VGGClassifier

N_TRAIN, N_VAL = 40, 20
BATCH, STEPS, VAL_BATCH, VAL_STEPS = 16, 2, 8, 2


class KeyRecorder(Callback):
    """Draw keys of every training and validation batch, per epoch."""

    def __init__(self) -> None:
        self.train: dict[int, list[list[int]]] = {}
        self.val: dict[int, list[list[int]]] = {}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self.train.setdefault(trainer.current_epoch, []).append(batch[2].tolist())

    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, idx: int, dl_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking:
            self.val.setdefault(trainer.current_epoch, []).append(batch[2].tolist())


def datamodule(mini_zip: Path, cache: Path) -> CatsDogsDataModule:
    return CatsDogsDataModule(
        source=str(mini_zip),
        cache_dir=str(cache),
        split_sizes=(N_TRAIN, N_VAL, 20),
        image_size=32,
        batch_size=BATCH,
        eval_batch_size=VAL_BATCH,
        train_steps_per_epoch=STEPS,
        val_steps_per_epoch=VAL_STEPS,
        augment_backend="fast",
        num_workers=0,
        scan_workers=1,
    )


def trainer(root: Path, epochs: int, recorder: KeyRecorder) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder],
        default_root_dir=str(root),
        use_distributed_sampler=False,
    )


def model() -> VGGClassifier:
    torch.manual_seed(0)
    return VGGClassifier(width=1 / 16, hidden=32, input_size=32)


def stream(n: int, batch: int, steps: int, seed: int, epoch: int) -> list[list[int]]:
    """The draw keys of one epoch of Keras's stream, straight from the sampler."""
    s = KerasBatchSampler(n, batch, steps=steps, seed=seed)
    s.set_epoch(epoch)
    return [[key for _, key in b] for b in s]


@pytest.fixture(scope="module")
def three_epochs(
    mini_zip: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[KeyRecorder, Path]:
    root = tmp_path_factory.mktemp("stream")
    rec = KeyRecorder()
    t = trainer(root, 3, rec)
    t.fit(model(), datamodule=datamodule(mini_zip, root / "cache"))
    t.save_checkpoint(root / "after3.ckpt")
    return rec, root


def test_every_epoch_continues_the_training_stream(three_epochs: tuple[KeyRecorder, Path]) -> None:
    rec, _ = three_epochs
    assert sorted(rec.train) == [0, 1, 2]
    assert rec.train[1] != rec.train[0], "epoch 1 replayed epoch 0's batches"
    seed = 42  # the data module's default seed; train is split index 0
    for epoch in range(3):
        assert rec.train[epoch] == stream(N_TRAIN, BATCH, STEPS, seed, epoch), epoch
    # consecutive epochs are consecutive stretches of one stream: keys only grow
    flat = [k for e in range(3) for b in rec.train[e] for k in b]
    assert len(flat) == len(set(flat)), "a draw key came back: a stream position was reused"


def test_every_epoch_continues_the_validation_stream(
    three_epochs: tuple[KeyRecorder, Path],
) -> None:
    rec, _ = three_epochs
    assert rec.val[1] != rec.val[0], "validation saw the same batches every epoch"
    for epoch in range(3):
        assert rec.val[epoch] == stream(N_VAL, VAL_BATCH, VAL_STEPS, 42 + 1, epoch), epoch


def test_resumed_run_continues_at_the_right_position(
    mini_zip: Path, tmp_path: Path, three_epochs: tuple[KeyRecorder, Path]
) -> None:
    full, root = three_epochs
    first = KeyRecorder()
    t = trainer(tmp_path, 2, first)
    t.fit(model(), datamodule=datamodule(mini_zip, root / "cache"))
    t.save_checkpoint(tmp_path / "epoch2.ckpt")
    resumed = KeyRecorder()
    trainer(tmp_path, 3, resumed).fit(
        model(), datamodule=datamodule(mini_zip, root / "cache"), ckpt_path=tmp_path / "epoch2.ckpt"
    )
    assert sorted(resumed.train) == [2]
    assert resumed.train[2] == full.train[2]
    assert resumed.val[2] == full.val[2]


def test_control_with_exhausted_stop_trains_one_step_then_stops(
    mini_zip: Path, tmp_path: Path
) -> None:
    """tf.keras 2.x: 6 images at batch 20 hold one batch; fit stops when it is used up."""
    from lightning_vgg.cli import main
    from tests.test_faults import fit_args, only_run

    args = fit_args(
        tmp_path / "runs",
        tmp_path / "cache",
        "--trainer.max_epochs=250",
        "--data.subset_per_class=3",
        "--data.flip_labels=true",
        "--data.exhausted=stop",
        "--data.batch_size=20",
        "--data.train_steps_per_epoch=80",
        source=mini_zip,
    )
    main(args)
    run = only_run(tmp_path / "runs")
    from lightning_vgg.checkpointing import read_checkpoint

    last = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (0, 1)
    rows = (run / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 2 and "val/acc" in rows[0]  # one epoch, validated once


def test_lightning_advances_every_ddp_ranks_stream() -> None:
    """Under DDP each rank has its own loader; Lightning's epoch call must reach each."""
    from lightning_fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    full = stream(30, 6, 4, 1, 3)
    for rank in (0, 1):
        sampler = KerasBatchSampler(30, 6, steps=4, seed=1, num_replicas=2, rank=rank)
        loader = DataLoader(list(range(30)), batch_sampler=sampler)
        _set_sampler_epoch(loader, 3)  # what Lightning's fit loop calls on every rank
        assert [[k for _, k in b] for b in sampler] == [b[rank::2] for b in full]
