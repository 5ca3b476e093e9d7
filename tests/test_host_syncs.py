"""No host read of a device value per training or validation step (a GPU sync each).

On a GPU every ``bool(t)``, ``t.item()``, ``t.tolist()`` or ``torch.unique`` of a
device tensor makes the CPU wait until the GPU has finished all queued work, so the
next batch cannot be prepared while this one computes. Each training and validation
step used to hold six or seven: two in ``MeanMetric``'s NaN check, four in
``BinaryAccuracy``'s argument checks and one in ``FiniteLossGuard``. These tests
count the calls that would sync, on the CPU, with a ``TorchFunctionMode``.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torchmetrics import MeanMetric

from lightning_vgg.callbacks import FiniteLossGuard
from lightning_vgg.errors import UserError
from lightning_vgg.models.module import NanDroppingMean, VGGClassifier

#: Tensor calls that copy a value to the host (``unique``/``nonzero``: the output size).
HOST_READS = {
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "item",
    "tolist",
    "numpy",
    "unique",
    "_unique2",
    "nonzero",
    "masked_select",
}


class HostReads(TorchFunctionMode):
    """Counts the tensor calls in :data:`HOST_READS`, and boolean-mask indexing."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.calls[name] += 1
        elif name == "__getitem__" and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                self.calls["bool-mask index"] += 1
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------- the module


def test_training_and_validation_steps_read_nothing_back_to_the_host() -> None:
    torch.manual_seed(0)
    module = VGGClassifier(width=1 / 16, input_size=32, hidden=64)
    x, y = torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 1, 0, 1, 1])
    with warnings.catch_warnings():  # self.log() warns: there is no trainer here
        warnings.simplefilter("ignore")
        with HostReads() as reads:
            for _ in range(2):
                module.training_step((x, y), 0)
                module.validation_step((x, y), 0)
    assert not reads.calls, dict(reads.calls)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_no_cuda_sync_in_a_training_or_validation_step() -> None:
    """The same on a GPU, with CUDA's own detector of synchronising calls."""
    torch.manual_seed(0)
    module = VGGClassifier(width=1 / 16, input_size=32, hidden=64).cuda()
    x = torch.rand(6, 3, 32, 32, device="cuda")
    y = torch.tensor([0, 1, 1, 0, 1, 1], device="cuda")
    guard = FiniteLossGuard()
    trainer = stub_trainer(Path("."), steps_per_epoch=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for check in (False, True):  # the first round warms cuDNN and the allocator up
            if check:
                torch.cuda.set_sync_debug_mode("error")
            try:
                loss = module.training_step((x, y), 0)
                loss.backward()
                guard.on_train_batch_end(trainer, module, {"loss": loss}, None, 0)
                with torch.no_grad():
                    module.validation_step((x, y), 0)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    guard.check(trainer)  # the one read, here: all finite
    torch.cuda.synchronize()


def test_step_metrics_keep_their_values() -> None:
    """The accuracy without its argument checks and the sync-free mean give the
    numbers of ``BinaryAccuracy()`` and ``MeanMetric()``."""
    from torchmetrics.classification import BinaryAccuracy

    torch.manual_seed(1)
    module = VGGClassifier(width=1 / 16, input_size=32, hidden=64).eval()
    acc, mean = BinaryAccuracy(), MeanMetric()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in (5, 7, 1):
            x, y = torch.rand(n, 3, 32, 32), torch.randint(0, 2, (n,))
            module.validation_step((x, y), 0)
            with torch.no_grad():
                logits = module(x)
            acc.update((logits >= 0).long(), y)
            mean.update(
                torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, y.float(), reduction="none"
                )
            )
    assert torch.equal(module.metrics["val_acc"].compute(), acc.compute())
    assert torch.equal(module.metrics["val_loss"].compute(), mean.compute())


def test_nan_dropping_mean_is_mean_metric_bit_for_bit() -> None:
    torch.manual_seed(2)
    ours, theirs = NanDroppingMean(), MeanMetric()
    for n in (20, 20, 7, 0, 13):
        values = torch.randn(n).exp()
        ours.update(values)
        theirs.update(values)
    assert torch.equal(ours.compute(), theirs.compute())
    assert ours.mean_value.dtype == theirs.mean_value.dtype == torch.float32


def test_nan_dropping_mean_leaves_nans_out_and_warns_at_compute() -> None:
    ours, theirs = NanDroppingMean(), MeanMetric()
    values = torch.tensor([1.0, float("nan"), 3.0, float("inf"), float("nan"), 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at the update
        ours.update(values[:3])
        ours.update(values[3:])
    with pytest.warns(UserWarning, match="Will be removed"):
        theirs.update(values[:3])
        theirs.update(values[3:])
    with pytest.warns(UserWarning, match=r"left 2 NaN value\(s\) out of a mean"):
        assert ours.compute() == theirs.compute() == float("inf")
    finite = NanDroppingMean()
    finite.update(torch.tensor([float("nan"), 1.0, 2.0]))
    with pytest.warns(UserWarning, match="left 1 NaN"):
        assert finite.compute() == pytest.approx(1.5)


def test_nan_dropping_mean_adds_no_checkpoint_keys() -> None:
    """Metric states are not saved: checkpoints of either version load in the other."""
    module = VGGClassifier(width=1 / 16, input_size=32, hidden=64)
    assert not [k for k in module.state_dict() if k.startswith("metrics.")]


# --------------------------------------------------------------------------- the guard


class StubCheckpoint:
    def __init__(self, every_n_train_steps: int = 0, train_time_interval: Any = None) -> None:
        self._every_n_train_steps = every_n_train_steps
        self._train_time_interval = train_time_interval


def stub_trainer(tmp_path: Path, steps_per_epoch: int, checkpoints: list[Any] | None = None) -> Any:
    progress = SimpleNamespace(is_last_batch=False)
    return SimpleNamespace(
        global_step=0,
        current_epoch=0,
        world_size=1,
        logger=None,
        default_root_dir=str(tmp_path),
        checkpoint_callbacks=checkpoints or [],
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
        steps_per_epoch=steps_per_epoch,
    )


def run_steps(
    guard: FiniteLossGuard, trainer: Any, losses: list[float | None], reads: HostReads
) -> list[int]:
    """Feed the losses as consecutive batches; returns the steps after which the guard
    read from the host. Raises what the guard raises."""
    read_after: list[int] = []
    for loss in losses:
        batch_idx = trainer.global_step % trainer.steps_per_epoch
        trainer.current_epoch = trainer.global_step // trainer.steps_per_epoch
        trainer.fit_loop.epoch_loop.batch_progress.is_last_batch = (
            batch_idx == trainer.steps_per_epoch - 1
        )
        guard.on_train_batch_start(trainer, None, None, batch_idx)
        trainer.global_step += 1  # the optimizer stepped
        before = sum(reads.calls.values())
        out = None if loss is None else {"loss": torch.tensor(loss, requires_grad=True) * 1.0}
        guard.on_train_batch_end(trainer, None, out, None, batch_idx)
        if sum(reads.calls.values()) > before:
            read_after.append(trainer.global_step)
    return read_after


def test_guard_reads_the_losses_every_n_steps_and_at_each_epoch_end(tmp_path: Path) -> None:
    guard = FiniteLossGuard(check_every_n_steps=3)
    trainer = stub_trainer(tmp_path, steps_per_epoch=8)
    with HostReads() as reads:
        read_after = run_steps(guard, trainer, [0.5] * 16, reads)
    assert read_after == [3, 6, 8, 11, 14, 16]
    assert set(reads.calls) == {"tolist"}


def test_guard_reads_before_a_checkpoint_may_save_mid_epoch(tmp_path: Path) -> None:
    guard = FiniteLossGuard(check_every_n_steps=50)
    trainer = stub_trainer(tmp_path, 100, [StubCheckpoint(), StubCheckpoint(every_n_train_steps=4)])
    with HostReads() as reads:
        assert run_steps(guard, trainer, [0.5] * 10, reads) == [4, 8]
    timed = stub_trainer(tmp_path, 100, [StubCheckpoint(train_time_interval=60.0)])
    with HostReads() as reads:
        assert run_steps(guard, timed, [0.5] * 3, reads) == [1, 2, 3]


@pytest.mark.parametrize("every", [1, 4, 50])
def test_guard_names_the_first_bad_step_however_late_it_looks(tmp_path: Path, every: int) -> None:
    guard = FiniteLossGuard(check_every_n_steps=every)
    trainer = stub_trainer(tmp_path, steps_per_epoch=5)
    losses: list[float | None] = [
        0.7,
        0.6,
        0.5,
        0.6,
        0.4,
        0.5,
        None,
        float("inf"),
        float("nan"),
        0.1,
    ]
    with HostReads() as reads, pytest.raises(UserError) as exc:
        run_steps(guard, trainer, losses, reads)
    assert str(exc.value) == (
        "training loss became inf at epoch 1, step 7 (batch 2); training stopped and "
        "no checkpoint had been written yet"
    )
    # it stops at its next look: at once, after its 4th step, or at the epoch's end
    assert trainer.global_step == {1: 8, 4: 9, 50: 10}[every]


def test_guard_looks_before_validation_epoch_end_and_any_save(tmp_path: Path) -> None:
    trainer = stub_trainer(tmp_path, steps_per_epoch=100)
    for hook in ("on_validation_start", "on_train_epoch_end", "on_train_end", "on_save_checkpoint"):
        guard = FiniteLossGuard()
        with HostReads() as reads:
            run_steps(guard, trainer, [0.3, float("nan"), 0.2], reads)
        args = (trainer, None, {}) if hook == "on_save_checkpoint" else (trainer, None)
        with pytest.raises(UserError, match=r"became nan at epoch 0, step \d+ \(batch 1\)"):
            getattr(guard, hook)(*args)
        trainer.global_step = 0
    quiet = FiniteLossGuard()
    with HostReads() as reads:
        quiet.on_validation_start(trainer, None)  # nothing queued: nothing read
    assert not reads.calls


def test_guard_rejects_a_check_interval_below_one() -> None:
    with pytest.raises(UserError, match="at least 1"):
        FiniteLossGuard(check_every_n_steps=0)
