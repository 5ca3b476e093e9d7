"""DDP: two gloo processes on the CPU train exactly like one process with the same global batch.

``data.batch_size`` is the global batch: ``KerasBatchSampler`` cuts the same global
batch on every rank and each rank keeps its slice, so k ranks see exactly the images
of a single-process run. What else has to hold for the numbers to match:

* the loss: DDP averages gradients over ranks, the global mean only for equal
  shards; the module scales each rank's loss by ``k / global count`` (the short last
  batch of a pass splits unevenly, and here 101 training images in batches of 20
  leave a last batch of one image, so rank 1 even gets an empty batch);
* BatchNorm: without synchronisation each rank normalises with the mean and variance
  of its own half batch, which is a different function of the images (different
  activations, gradients and running statistics: rank 0's half-batch statistics are
  broadcast as the buffers), so the runs drift apart from the first step. With
  ``trainer.sync_batchnorm: true`` BatchNorm uses the statistics of the global batch,
  as the single process does. PyTorch's ``SyncBatchNorm`` only runs on GPUs, so on the
  CPU this test swaps in :class:`GlobalBatchNorm2d`, the same computation written
  with autograd-aware all-reduces (``--trainer.plugins``), and the GPU test below
  uses the real ``sync_batchnorm``;
* the metrics: torchmetrics states are summed over ranks at epoch end, so val/acc
  is over the whole val split, not rank 0's half.

What is left is the order of floating-point sums (all-reduce, per-half convolutions),
a few 1e-7 relative per step, so the comparison allows a small tolerance.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import yaml
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.plugins.layer_sync import LayerSync
from torch import nn

from lightning_vgg.cli import main
from lightning_vgg.data.datamodule import CatsDogsDataModule
from lightning_vgg.data.sampler import KerasBatchSampler
from lightning_vgg.errors import UserError
from lightning_vgg.models.module import VGGClassifier
from tests.conftest import ROOT

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

#: 101 training images in global batches of 20: passes of 5 full batches and one of a
#: single image, which leaves rank 1 with an empty batch; 41 val images likewise.
TINY = [
    "--data.image_size=32",
    "--data.split_sizes=[101, 41, 40]",
    "--data.batch_size=20",
    "--data.train_steps_per_epoch=null",
    "--data.val_steps_per_epoch=null",
    "--data.num_workers=0",
    "--data.scan_workers=1",
    "--model.width=0.0625",
    # The seed's lr. quick.yaml's 0.01 makes these 12 steps chaotic enough to grow a
    # 1e-8 rounding difference about 30x per step (1e-3 in the weights at the end).
    "--model.lr=0.001",
    "--trainer.max_epochs=2",
    "--trainer.callbacks=[]",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
METRICS = ("train/loss", "train/acc", "val/loss", "val/acc")


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over the global batch of all ranks: ``SyncBatchNorm`` for the CPU.

    Same numbers as ``nn.BatchNorm2d`` on the concatenated batch (biased variance to
    normalise, unbiased for the running variance), with autograd-aware all-reduces
    so that gradients flow across ranks as in ``SyncBatchNorm``. Ranks with an empty
    batch contribute nothing.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        count = x.new_tensor([x.numel() / c])
        with warnings.catch_warnings():  # deprecated, but the only autograd-aware all_reduce
            warnings.simplefilter("ignore", FutureWarning)
            total = all_reduce(torch.cat([x.sum((0, 2, 3)), count]))
            n = total[c]
            mean = total[:c] / n
            centred = x - mean[None, :, None, None]
            var = all_reduce((centred * centred).sum((0, 2, 3))) / n
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        with torch.no_grad():
            m = self.momentum
            self.num_batches_tracked.add_(1)
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var * n / (n - 1))
        return y


class CpuSyncBatchNorm(LayerSync):
    """Lightning plugin: what ``sync_batchnorm=True`` does, with :class:`GlobalBatchNorm2d`."""

    def apply(self, model: nn.Module) -> nn.Module:
        for m in model.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = GlobalBatchNorm2d
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        for m in model.modules():
            if type(m) is GlobalBatchNorm2d:
                m.__class__ = nn.BatchNorm2d
        return model


# ------------------------------------------------------------------ fast checks
def test_every_rank_gets_the_same_number_of_batches_covering_each_global_batch() -> None:
    """Short last batches split as evenly as they can; fewer images than ranks leave empties."""
    kw = {"n": 23, "batch_size": 8, "steps": 7, "seed": 4}
    full = KerasBatchSampler(**kw)
    full.set_epoch(1)
    ranks = [KerasBatchSampler(**kw, num_replicas=4, rank=r) for r in range(4)]
    for s in ranks:
        s.set_epoch(1)
    per_rank = [list(s) for s in ranks]
    assert {len(b) for b in per_rank} == {len(full)}
    for step, g in enumerate(full):
        shards = [b[step] for b in per_rank]
        assert sorted(d for s in shards for d in s) == sorted(g)
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1
    # the pass of 23 ends with a batch of 7, then 8, 8, 7, ...: 7 over 4 ranks is 2,2,2,1
    tiny = [KerasBatchSampler(n=9, batch_size=8, steps=2, num_replicas=4, rank=r) for r in range(4)]
    assert [[len(b) for b in s] for s in tiny] == [[2, 1], [2, 0], [2, 0], [2, 0]]


def test_global_batch_must_divide_over_the_ranks() -> None:
    dm = CatsDogsDataModule(source="unused", batch_size=20)
    dm._check_world_size(4)
    with pytest.raises(UserError, match=r"data.batch_size=20 .* 3 processes"):
        dm._check_world_size(3)


def test_ddp_config_is_the_seed_recipe_with_ddp(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(ROOT / "configs" / "ddp.yaml"), "--print_config"])
    assert exc.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    seed = yaml.safe_load((ROOT / "configs" / "seed.yaml").read_text())
    t = cfg["trainer"]
    assert (t["strategy"], t["sync_batchnorm"], t["use_distributed_sampler"]) == (
        "ddp",
        True,
        False,
    )
    for key in ("batch_size", "train_steps_per_epoch", "val_steps_per_epoch", "split_sizes"):
        assert cfg["data"][key] == seed["data"][key], key
    assert cfg["model"]["lr"] == seed["model"]["lr"]


# ------------------------------------------------------------------ end to end
def _cli(
    tmp: Path,
    sub: str,
    name: str,
    source: Path,
    *extra: str,
    timeout: float = 120,
    expect: int = 0,
) -> str:
    """``lightning-vgg SUB`` in a fresh interpreter, as a user (or torchrun) starts it;
    checks its exit status against ``expect`` and returns its stderr."""
    save = tmp / "runs"
    cmd = [
        sys.executable,
        "-m",
        "lightning_vgg",
        sub,
        "--config",
        str(ROOT / "configs" / "quick.yaml"),
        f"--data.source={source}",
        f"--data.cache_dir={tmp / 'cache'}",
        f"--trainer.logger.init_args.save_dir={save}",
        f"--trainer.logger.init_args.name={name}",
        *TINY,
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(var, None)
    # its own session, so that a hung run's ranks (rank 0 starts the others) go together
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(
            f"{name}: {sub} did not finish in {timeout:.0f} s; under DDP that is usually a "
            f"collective (e.g. trainer.log_dir) reached by rank 0 only\n{err[-4000:]}"
        )
    assert proc.returncode == expect, f"{name} {sub} exited {proc.returncode}:\n{err[-4000:]}"
    return err


def _fit(tmp: Path, name: str, source: Path, *extra: str, timeout: float = 120) -> Path:
    """``fit`` in a fresh interpreter; returns the run directory."""
    _cli(tmp, "fit", name, source, *extra, timeout=timeout)
    runs = sorted((tmp / "runs" / name).glob("version_*"))
    assert len(runs) == 1, runs
    return runs[0]


def _metrics(run: Path) -> list[dict[str, float]]:
    with (run / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["state_dict"]


def _val_accuracy(run: Path) -> float:
    """Accuracy of the final weights on every image of the run's val split."""
    last = run / "checkpoints" / "last.ckpt"
    model = VGGClassifier.load_from_checkpoint(last, map_location="cpu").eval()
    dm = CatsDogsDataModule(
        split_file=str(run / "split.csv"),
        image_size=32,
        resize="bilinear",
        augment_backend="fast",
        val_steps_per_epoch=None,
        num_workers=0,
    )
    right = total = 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            x, y, _ = dm.on_after_batch_transfer(batch, 0)
            right += int(((model(x) >= 0).long() == y).sum())
            total += len(y)
    assert total == 41
    return right / total


def _compare(single: Path, ddp: Path, atol: float) -> dict[str, float]:
    """Assert DDP == single process; return the largest differences seen."""
    assert (ddp / "split.csv").read_bytes() == (single / "split.csv").read_bytes()
    a, b = _metrics(single), _metrics(ddp)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [6.0, 12.0], "same steps per epoch"
    diffs = {k: max(abs(x[k] - y[k]) for x, y in zip(a, b, strict=True)) for k in METRICS}
    wa, wb = _weights(single), _weights(ddp)
    assert wa.keys() == wb.keys()
    diffs["weights"] = max(
        float((wa[k].double() - wb[k].double()).abs().max())
        for k in wa
        if wa[k].is_floating_point()
    )
    for k in wa:
        if wa[k].is_floating_point():
            torch.testing.assert_close(wb[k], wa[k], atol=atol, rtol=atol, msg=k)
        else:
            assert torch.equal(wa[k], wb[k]), k  # num_batches_tracked: same number of steps
    for k in ("train/loss", "val/loss"):
        assert diffs[k] < atol, (k, diffs)
    for k in ("train/acc", "val/acc"):  # accuracies are counts: equal unless a logit sits at 0
        assert diffs[k] < 1e-6, (k, diffs)
    # val/acc was reduced over both ranks: it is the accuracy on the whole val split
    assert b[-1]["val/acc"] == pytest.approx(_val_accuracy(ddp), abs=1e-6)
    assert a[-1]["val/acc"] == pytest.approx(_val_accuracy(single), abs=1e-6)
    return diffs


@pytest.mark.slow
@needs_gloo
def test_ddp_on_two_cpu_processes_matches_one_process(mini_zip: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    single = _fit(tmp_path, "single", mini_zip)
    ddp = _fit(
        tmp_path,
        "ddp",
        mini_zip,
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--trainer.plugins=tests.test_ddp.CpuSyncBatchNorm",
    )
    diffs = _compare(single, ddp, atol=1e-4)
    print(f"DDP vs one process, max abs differences: {diffs} ({time.monotonic() - t0:.0f} s)")


class NanOnRankOne(Callback):
    """Rank 1's training loss of global step 7 reads NaN for the callbacks after this
    one (the finite-loss guard among them); rank 0's stays finite."""

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_rank == 1 and trainer.global_step == 8:  # the step just taken: 7
            outputs["loss"] = torch.tensor(float("nan"))


@pytest.mark.slow
@needs_gloo
def test_ddp_nan_loss_on_one_rank_stops_every_rank_at_that_step(
    mini_zip: Path, tmp_path: Path
) -> None:
    """The guard reads the losses only now and then (no GPU sync per step); under DDP
    every rank must still stop together, naming the same step, and not hang."""
    err = _cli(
        tmp_path,
        "fit",
        "nan",
        mini_zip,
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--trainer.callbacks+=tests.test_ddp.NanOnRankOne",
        expect=2,
    )
    where = r"at epoch 1, step 7 \(batch 1\); training stopped and "
    assert re.search(rf"error: training loss became nan {where}", err), err
    assert re.search(
        rf"error: training loss became non-finite on another rank {where}the last", err
    ), err
    (run,) = (tmp_path / "runs" / "nan").glob("version_*")
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (0, 6)


@pytest.mark.slow
@needs_gloo
def test_ddp_test_and_predict_cover_every_rank(mini_zip: Path, tmp_path: Path) -> None:
    """Two ranks each test half of the split; the outputs are the whole split's.

    ``predictions.csv`` and ``misclassified.json`` come out of a 2-process run
    exactly as out of a single process on the same checkpoint: every test image
    once, in split order, not only rank 0's half.
    """
    run = _fit(tmp_path, "run", mini_zip, "--trainer.max_epochs=1")
    ckpt = f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    two = ("--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu")
    outputs = {}
    for label, extra in (("single", ()), ("ddp", two)):
        _cli(tmp_path, "test", f"test-{label}", mini_zip, ckpt, *extra)
        _cli(tmp_path, "predict", f"predict-{label}", mini_zip, ckpt, *extra)
        outputs[label] = {
            "predictions": list(csv.DictReader((run / "predictions.csv").open())),
            "misclassified": json.loads((run / "misclassified.json").read_text()),
            "test": json.loads((run / "test_metrics.json").read_text()),
        }
        (run / "predictions.csv").unlink()
        (run / "misclassified.json").unlink()
    single, ddp = outputs["single"], outputs["ddp"]
    test_paths = [r[0] for r in csv.reader((run / "split.csv").open()) if r[-1] == "test"]
    assert [r["path"] for r in single["predictions"]] == test_paths  # 40 images, split order
    assert [r["path"] for r in ddp["predictions"]] == test_paths
    for a, b in zip(single["predictions"], ddp["predictions"], strict=True):
        assert float(a["prob_dog"]) == pytest.approx(float(b["prob_dog"]), abs=1e-5)
    assert [m["image"] for c in ("cat", "dog") for m in ddp["misclassified"][c]] == [
        m["image"] for c in ("cat", "dog") for m in single["misclassified"][c]
    ]
    k = single["misclassified"]["k"]
    for cls, cname in enumerate(("cat", "dog")):  # the gallery picks from all 40 images
        wrong = sum(r["label"] == str(cls) != r["pred"] for r in single["predictions"])
        assert len(ddp["misclassified"][cname]) == min(k, wrong), cname
    wrong = sum(r["label"] != r["pred"] for r in single["predictions"])
    assert single["test"]["test/acc"] == pytest.approx(1 - wrong / len(test_paths), abs=1e-6)
    assert ddp["test"]["test/acc"] == pytest.approx(single["test"]["test/acc"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.device_count() >= 2), reason="needs 2 GPUs"
)
def test_ddp_with_sync_batchnorm_on_two_gpus_matches_one_gpu(
    mini_zip: Path, tmp_path: Path
) -> None:
    gpu = ["--trainer.accelerator=gpu", "--trainer.precision=32-true"]
    single = _fit(tmp_path, "single", mini_zip, *gpu, "--trainer.devices=1")
    ddp = _fit(
        tmp_path,
        "ddp",
        mini_zip,
        *gpu,
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.sync_batchnorm=true",
    )
    # cuDNN picks algorithms per batch shape and sums in other orders: a looser bound
    _compare(single, ddp, atol=2e-3)
