"""Issue 6: what survives a kill, a NaN, a full disk, a dropped download and odd paths.

Every fit here is the quick config shrunk to seconds (32 px, 40/20/20 images, two
training batches per epoch that cross the Keras stream's passes, no figure callbacks,
one CPU thread). One uninterrupted three-epoch run is the reference that the killed,
resumed and repeated runs must reproduce bit for bit: batches are a pure function of
(seed, epoch) and augmentation of (seed, draw key), so a run resumed at an epoch
boundary is the same run.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from lightning_vgg.checkpointing import AtomicCheckpointIO
from lightning_vgg.cli import main
from lightning_vgg.data import archives
from lightning_vgg.data.datamodule import CatsDogsDataModule
from lightning_vgg.data.sources import find_images, resolve_source
from lightning_vgg.errors import UserError
from lightning_vgg.fileio import write_json
from lightning_vgg.models.module import VGGClassifier
from tests.conftest import ROOT, pick_images

QUICK = str(ROOT / "configs" / "quick.yaml")
TINY = [
    "--data.image_size=32",
    "--data.split_sizes=[40, 20, 20]",
    "--data.batch_size=16",  # 3 batches per pass (16, 16, 8) ...
    "--data.train_steps_per_epoch=2",  # ... so epochs start mid-pass
    "--data.eval_batch_size=8",
    "--data.val_steps_per_epoch=2",  # a shuffled val stream, as in the seed
    "--data.num_workers=0",
    "--data.scan_workers=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.callbacks=[]",  # the figure callbacks cost seconds and prove nothing here
]
STEPS_PER_EPOCH = 2
EPOCHS = 3


class Killed(BaseException):
    """Stands in for SIGKILL where the test must stay in-process."""


def fit_args(
    save_dir: Path, cache: Path, *extra: str, source: Path | str | None = None
) -> list[str]:
    src = [f"--data.source={source}"] if source is not None else []
    return [
        "fit",
        "--config",
        QUICK,
        *src,
        f"--data.cache_dir={cache}",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        *TINY,
        *extra,
    ]


def only_run(save_dir: Path) -> Path:
    """The one run directory under ``save_dir``: resuming must not open another."""
    runs = sorted((save_dir / "quick").glob("version_*"))
    assert [r.name for r in runs] == ["version_0"]
    return runs[0]


def metric_rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = load(a)["state_dict"], load(b)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.tmp")) + sorted(folder.rglob("*.partial"))


def fake_fsync(
    monkeypatch: pytest.MonkeyPatch, on_checkpoint: Callable[[int, str], None]
) -> list[str]:
    """Route ``os.fsync`` of temporary checkpoint files through ``on_checkpoint``.

    ``atomic_open`` fsyncs every file just before renaming it into place, so this is
    the moment a save is "halfway": the bytes are in the temporary file, the final
    name not yet replaced. Returns the names seen, in order.
    """
    real = os.fsync
    seen: list[str] = []

    def fsync(fd: int) -> None:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if re.fullmatch(r"\.(best|last)\.ckpt\..+\.tmp", name):
            seen.append(name)
            on_checkpoint(fd, name)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


needs_proc = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="identifies open files through /proc"
)


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One thread: on a shared 2-core box, two OpenMP threads run 3-5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, mini_zip: Path) -> Path:
    """A folder whose ``cache/`` all fits share: one extraction, one scan, same paths."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def reference(work: Path, mini_zip: Path) -> Path:
    """An uninterrupted run: the run every other one must reproduce."""
    main(
        fit_args(
            work / "reference", work / "cache", f"--trainer.max_epochs={EPOCHS}", source=mini_zip
        )
    )
    run = only_run(work / "reference")
    rows = metric_rows(run)
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))
    assert [int(r["step"]) for r in rows] == [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    return run


def test_same_seed_gives_identical_runs(reference: Path, work: Path, mini_zip: Path) -> None:
    main(
        fit_args(work / "again", work / "cache", f"--trainer.max_epochs={EPOCHS}", source=mini_zip)
    )
    run = only_run(work / "again")
    assert (run / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    assert (run / "split.csv").read_bytes() == (reference / "split.csv").read_bytes()
    assert same_weights(run / "checkpoints" / "best.ckpt", reference / "checkpoints" / "best.ckpt")
    assert same_weights(run / "checkpoints" / "last.ckpt", reference / "checkpoints" / "last.ckpt")


def test_resume_at_epoch_boundary_is_exact(
    reference: Path, work: Path, mini_zip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save = work / "resumed"
    main(fit_args(save, work / "cache", "--trainer.max_epochs=1", source=mini_zip))
    ckpts = only_run(save) / "checkpoints"
    assert [int(r["epoch"]) for r in metric_rows(only_run(save))] == [0]
    assert (load(ckpts / "last.ckpt")["epoch"], load(ckpts / "last.ckpt")["global_step"]) == (0, 2)
    capsys.readouterr()
    main(
        fit_args(
            save,
            work / "cache",
            f"--trainer.max_epochs={EPOCHS}",
            "--ckpt_path=last",
            source=mini_zip,
        )
    )
    assert f"resuming from {ckpts / 'last.ckpt'}" in capsys.readouterr().err
    run = only_run(save)  # continued in the same run directory
    assert (run / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    assert (run / "split.csv").read_bytes() == (reference / "split.csv").read_bytes()
    ref = reference / "checkpoints"
    assert same_weights(ckpts / "best.ckpt", ref / "best.ckpt")  # best-so-far survived too
    assert same_weights(run / "checkpoints" / "last.ckpt", reference / "checkpoints" / "last.ckpt")


class SlowFromEpoch(Callback):
    """Test-only: slows training from ``epoch`` on, so a SIGKILL lands mid-epoch."""

    def __init__(self, epoch: int = 2, seconds: float = 1.0) -> None:
        self.epoch, self.seconds = epoch, seconds

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.current_epoch >= self.epoch:
            time.sleep(self.seconds)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_training_then_resume(reference: Path, work: Path, mini_zip: Path) -> None:
    save = work / "killed"
    args = fit_args(save, work / "cache", f"--trainer.max_epochs={EPOCHS}", source=mini_zip)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",  # as this process (one_thread): same numbers, bit for bit
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lightning_vgg",
            *args,
            f"--trainer.callbacks+={__name__}.SlowFromEpoch",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    last = save / "quick" / "version_0" / "checkpoints" / "last.ckpt"
    deadline, seen_mtime, epoch = time.monotonic() + 240, None, -1
    try:
        while epoch < 1:
            if proc.poll() is not None:
                pytest.fail(proc.stderr.read().decode(errors="replace")[-3000:])
            assert time.monotonic() < deadline, "no checkpoint of epoch 1 in time"
            time.sleep(0.05)
            if last.is_file() and last.stat().st_mtime_ns != seen_mtime:
                seen_mtime = last.stat().st_mtime_ns
                epoch = load(last)["epoch"]  # whole by construction: saves are renames
        proc.send_signal(signal.SIGKILL)  # during epoch 2, slowed down by SlowFromEpoch
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()

    run = only_run(save)
    assert load(last)["epoch"] == 1
    assert [int(r["epoch"]) for r in metric_rows(run)] == [0, 1]

    main(
        fit_args(
            save,
            work / "cache",
            f"--trainer.max_epochs={EPOCHS}",
            "--ckpt_path=last",
            source=mini_zip,
        )
    )
    run = only_run(save)
    rows = metric_rows(run)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]  # no gap, no duplicate
    assert [int(r["step"]) for r in rows] == [2, 4, 6]  # the step counter continued
    assert (run / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    assert same_weights(run / "checkpoints" / "last.ckpt", reference / "checkpoints" / "last.ckpt")
    assert not leftovers(save)


# --------------------------------------------------------------------------- checkpoints


def test_last_ckpt_is_the_latest_epoch_even_when_val_acc_does_not_improve(
    work: Path, mini_zip: Path
) -> None:
    """Lightning 2.6's ``save_last`` rewrites last.ckpt only when best.ckpt improves."""
    save = work / "not-improving"
    stale_best = ["--checkpoint.monitor=step", "--checkpoint.mode=min"]  # epoch 0 stays best
    main(fit_args(save, work / "cache", "--trainer.max_epochs=2", *stale_best, source=mini_zip))
    ckpts = only_run(save) / "checkpoints"
    assert load(ckpts / "best.ckpt")["epoch"] == 0
    last = load(ckpts / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (1, 2 * STEPS_PER_EPOCH)


@needs_proc
def test_checkpoint_save_killed_halfway_keeps_the_previous_one(
    work: Path, mini_zip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save = work / "halfway"
    main(fit_args(save, work / "cache", "--trainer.max_epochs=1", source=mini_zip))
    ckpts = only_run(save) / "checkpoints"
    before = {name: digest(ckpts / name) for name in ("best.ckpt", "last.ckpt")}

    def die_halfway(fd: int, name: str) -> None:
        os.ftruncate(fd, os.fstat(fd).st_size // 2)  # only half the bytes made it
        # This is what a kill now would leave: the old files, whole and unchanged.
        for final, sha in before.items():
            assert digest(ckpts / final) == sha
            assert load(ckpts / final)["epoch"] == 0
        assert (ckpts / name).stat().st_size > 0  # the half file is under its own name
        raise Killed

    with monkeypatch.context() as patch:
        seen = fake_fsync(patch, die_halfway)
        with pytest.raises(Killed):
            main(
                fit_args(
                    save,
                    work / "cache",
                    "--trainer.max_epochs=2",
                    "--ckpt_path=last",
                    source=mini_zip,
                )
            )
    assert seen, "the epoch-1 checkpoint was never written"
    assert {name: digest(ckpts / name) for name in before} == before
    assert not leftovers(save)  # an exception cleans up after itself

    # A real kill cannot clean up: its half file stays. It must not be loaded, and the
    # next save removes it (a seed-size checkpoint is 1 GB of debris).
    debris = ckpts / ".last.ckpt.k1ll3d.tmp"
    debris.write_bytes((ckpts / "last.ckpt").read_bytes()[:1000])
    main(
        fit_args(
            save,
            work / "cache",
            "--trainer.max_epochs=2",
            "--ckpt_path=last",
            source=mini_zip,
        )
    )
    assert [int(r["epoch"]) for r in metric_rows(only_run(save))] == [0, 1]
    assert load(ckpts / "last.ckpt")["epoch"] == 1
    assert not debris.exists() and not leftovers(save)


@needs_proc
def test_full_disk_is_one_error_and_keeps_the_checkpoints(
    work: Path, mini_zip: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    save = work / "full"
    saves: list[str] = []

    def disk_full_after_epoch_0(fd: int, name: str) -> None:
        saves.append(name)
        if len(saves) > 2:  # epoch 0 wrote best.ckpt and last.ckpt
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    fake_fsync(monkeypatch, disk_full_after_epoch_0)
    with pytest.raises(SystemExit) as exc:
        main(fit_args(save, work / "cache", "--trainer.max_epochs=2", source=mini_zip))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"error: cannot write .*(best|last)\.ckpt: No space left on device", err), err
    assert "Traceback" not in err
    ckpts = only_run(save) / "checkpoints"
    assert load(ckpts / "last.ckpt")["epoch"] == 0 and load(ckpts / "best.ckpt")["epoch"] == 0
    assert not leftovers(save)


def test_local_checkpoints_do_not_detour_through_the_temp_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsspec would stage each checkpoint in $TMPDIR: a second copy, on another disk."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))
    target = tmp_path / "ckpts" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(3)}, target)
    assert torch.equal(load(target)["w"], torch.arange(3))
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask, "a mode like any other result file"


@pytest.mark.parametrize("room", [0, 100_000])
def test_disk_full_while_streaming_a_checkpoint_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, room: int
) -> None:
    """Checkpoints stream straight into their temporary file (no second copy in
    memory); a write that fails midway, where torch would only say ``unexpected pos``,
    is still reported as the OSError, naming the file, and leaves the old one whole."""
    from lightning_vgg import checkpointing

    target = tmp_path / "ckpts" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(3)}, target)
    before = digest(target)
    real_open = checkpointing.atomic_open

    class FillsUp:
        def __init__(self, handle: Any) -> None:
            self.handle, self.written = handle, 0

        def write(self, data: Any) -> int:
            if self.written + len(memoryview(data).cast("B")) > room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(memoryview(data).cast("B"))
            return self.handle.write(data)

        def flush(self) -> None:
            self.handle.flush()

    @contextlib.contextmanager
    def filling_open(path: Any, mode: str = "w", **kwargs: Any) -> Iterator[Any]:
        with real_open(path, mode, **kwargs) as handle:
            yield FillsUp(handle)

    monkeypatch.setattr(checkpointing, "atomic_open", filling_open)
    with pytest.raises(UserError) as info:
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1 << 20)}, target)
    assert str(info.value) == f"cannot write {target}: No space left on device"
    assert digest(target) == before
    assert not leftovers(tmp_path)


def test_streamed_checkpoint_has_the_bytes_of_one_serialised_in_memory(tmp_path: Path) -> None:
    checkpoint = {"state_dict": {"w": torch.randn(1000), "b": torch.arange(7)}, "epoch": 4}
    AtomicCheckpointIO().save_checkpoint(checkpoint, tmp_path / "a.ckpt")
    buffer = io.BytesIO()  # how checkpoints were written before they were streamed
    torch.save(checkpoint, buffer)
    assert (tmp_path / "a.ckpt").read_bytes() == buffer.getvalue()


@pytest.mark.parametrize("failure", ["EACCES", "ENOSPC"])
def test_unwritable_or_full_output_is_a_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """The results' own writer: one UserError naming the path, nothing half-written."""
    target = tmp_path / "run" / "summary.json"
    write_json(target, {"old": 1})
    code = getattr(errno, failure)

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code))

    # EACCES: the folder refuses new files (faked: root ignores chmod 0o500);
    # ENOSPC: the disk fills while writing (fsync is where it is reported at the latest).
    monkeypatch.setattr(*((tempfile, "mkstemp") if failure == "EACCES" else (os, "fsync")), fail)
    with pytest.raises(UserError, match=re.escape(os.strerror(code))) as info:
        write_json(target, {"new": 2})
    assert str(tmp_path / "run") in str(info.value)
    assert target.read_text(encoding="utf-8").startswith('{\n  "old": 1')
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def _unwritable(kind: str, tmp_path: Path) -> Path:
    if kind == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        return folder / "runs"
    (tmp_path / "a-file").write_text("x")
    return tmp_path / "a-file" / "runs"  # cannot be created, not even by root


@pytest.mark.parametrize("kind", ["under-a-file", "read-only"])
def test_unwritable_save_dir_is_one_clear_error(
    kind: str, work: Path, mini_zip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save = _unwritable(kind, tmp_path)
    try:
        with pytest.raises(SystemExit) as exc:
            main(fit_args(save, work / "cache", "--trainer.max_epochs=1", source=mini_zip))
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"error: cannot write to the output folder {save}" in err, err
        assert "Traceback" not in err
    finally:
        if (tmp_path / "ro").exists():
            (tmp_path / "ro").chmod(0o700)


# --------------------------------------------------------------------------- NaN


def nan_at(monkeypatch: pytest.MonkeyPatch, epoch: int, batch: int) -> list[int]:
    """Make the training loss NaN at one batch; returns the global step it happened at."""
    real = VGGClassifier.training_step
    steps: list[int] = []

    def training_step(self: VGGClassifier, batch_: Any, batch_idx: int) -> torch.Tensor:
        loss = real(self, batch_, batch_idx)
        if (self.current_epoch, batch_idx) == (epoch, batch):
            steps.append(self.trainer.global_step)
            return loss * float("nan")
        return loss

    monkeypatch.setattr(VGGClassifier, "training_step", training_step)
    return steps


@pytest.mark.parametrize("batch", [1, 0])
def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_good_checkpoint(
    work: Path,
    mini_zip: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    batch: int,
) -> None:
    """Batch 0: the guard reads the losses only at the epoch's last batch (no GPU sync
    per step), yet names the first bad step, and nothing saved the NaN weights."""
    save = work / f"nan{batch}"
    steps = nan_at(monkeypatch, epoch=1, batch=batch)
    with pytest.raises(SystemExit) as exc:
        main(fit_args(save, work / "cache", "--trainer.max_epochs=3", source=mini_zip))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    want = rf"error: training loss became nan at epoch 1, step {steps[0]} \(batch {batch}\)"
    assert re.search(want, err), err
    assert "Traceback" not in err
    run = only_run(save)
    assert str(run / "checkpoints" / "last.ckpt") in err
    last = load(run / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (0, STEPS_PER_EPOCH)
    saved = sorted((run / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in saved] == ["best.ckpt", "last.ckpt"]
    for path in saved:
        ckpt = load(path)
        assert ckpt["epoch"] == 0, path
        assert all(
            torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
        ), path
    assert [int(r["epoch"]) for r in metric_rows(run)] == [0]
    assert not leftovers(save)


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def small_dir(tmp_path: Path, mini_dir: Path) -> Path:
    """A folder of 12 cats and 12 dogs, free to damage."""
    root = tmp_path / "small"
    for cls, photos in pick_images(mini_dir, 12).items():
        (root / "PetImages" / cls).mkdir(parents=True)
        for photo in photos:
            shutil.copyfile(photo, root / "PetImages" / cls / photo.name)
    return root


def test_image_broken_after_the_scan_is_skipped_with_a_warning(
    small_dir: Path, tmp_path: Path
) -> None:
    dm = CatsDogsDataModule(
        source=str(small_dir),
        cache_dir=str(tmp_path / "cache"),
        split_sizes=[16, 4, 4],
        image_size=32,
        batch_size=4,
        train_steps_per_epoch=None,
        augment_backend="fast",
        num_workers=0,
        scan_workers=1,
    )
    dm.setup("fit")  # scanned: every file decodes
    broken = Path(dm.split_rows("train")[0][0])
    broken.write_bytes(broken.read_bytes()[:300])  # then a file goes bad mid-run

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        batches = list(dm.train_dataloader())  # a whole epoch
    assert sum(len(b[1]) for b in batches) == 15  # everything but the broken file
    messages = [str(w.message) for w in record if str(broken) in str(w.message)]
    assert len(messages) == 1 and "skipping unreadable image" in messages[0]

    # A batch with nothing left becomes None, which Lightning's training loop skips.
    dm.hparams.batch_size = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(dm.train_dataloader())
    assert len(batches) == 16 and sum(b is None for b in batches) == 1


def test_eval_batch_with_no_readable_image_is_skipped() -> None:
    model = VGGClassifier(width=1 / 16, hidden=64, input_size=32)
    assert model.validation_step(None, 0) is None  # type: ignore[arg-type]
    assert model.test_step(None, 0) is None  # type: ignore[arg-type]


def test_predict_batch_with_no_readable_image_is_skipped() -> None:
    model = VGGClassifier(width=1 / 16, hidden=64, input_size=32)
    assert model.predict_step(None, 0) is None


@pytest.mark.parametrize(
    ("flag", "mismatch"),
    [
        pytest.param(
            "--model.width=0.25",
            "width=0.125 in the checkpoint but 0.25 in the config",
        ),
        ("--data.image_size=64", "input_size=32 in the checkpoint but 64 in the config"),
    ],
)
def test_checkpoint_of_another_architecture_is_refused(
    reference: Path,
    work: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flag: str,
    mismatch: str,
) -> None:
    best = tmp_path / "elsewhere" / "best.ckpt"  # a copy: a silent test run must not touch
    best.parent.mkdir()  # the reference's run directory
    shutil.copyfile(reference / "checkpoints" / "best.ckpt", best)
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "test",
                "--config",
                QUICK,
                f"--ckpt_path={best}",
                f"--data.cache_dir={work / 'cache'}",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
                *TINY,
                flag,
            ]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"error: checkpoint {best} is for another architecture: {mismatch}" in err, err
    assert "Traceback" not in err


@pytest.fixture
def flaky_server(tmp_path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Serves ``state['body']``; the first ``state['cut']`` GETs drop the connection mid-body.

    ``state['length']`` decides whether the cut responses announce a Content-Length
    (urllib then stops short silently) or are close-delimited (the cut looks like EOF).
    """
    state: dict[str, Any] = {"body": b"", "cut": 2, "length": True, "gets": 0, "cuts": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["gets"] += 1
            body: bytes = state["body"]
            cut = state["gets"] <= state["cut"]
            self.send_response(200)
            self.send_header("Content-Type", "application/zip")
            if state["length"] or not cut:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            # The client may hang up first: torchvision's redirect probe reads no body.
            with contextlib.suppress(OSError):
                self.wfile.write(body[: len(body) // 2] if cut else body)
            state["cuts"] += cut
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/pets.zip", state
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("length", "with_md5"), [(True, False), (False, False), (True, True)])
def test_dropped_download_is_retried_and_verified(
    small_dir: Path,
    tmp_path: Path,
    flaky_server: tuple[str, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    length: bool,
    with_md5: bool,
) -> None:
    monkeypatch.setattr(archives, "DOWNLOAD_RETRIES", 3)
    monkeypatch.setattr(archives, "RETRY_DELAY_S", 0.0)
    url, state = flaky_server
    state["body"] = Path(shutil.make_archive(str(tmp_path / "pets"), "zip", small_dir)).read_bytes()
    state["length"] = length
    md5 = hashlib.md5(state["body"]).hexdigest()

    root = resolve_source(url, tmp_path / "cache", md5=md5 if with_md5 else None)
    assert state["cuts"] == 2 and state["gets"] > 2  # cut twice, then fetched again
    assert (root / ".complete").is_file()
    assert [label for _, label in find_images(root)].count(0) == 12
    (download,) = (tmp_path / "cache" / "downloads").rglob("pets.zip")
    assert hashlib.md5(download.read_bytes()).hexdigest() == md5  # the whole file
    assert not list((tmp_path / "cache").rglob("*.part")) and not leftovers(tmp_path / "cache")


def test_download_that_always_breaks_off_is_one_clear_error(
    small_dir: Path,
    tmp_path: Path,
    flaky_server: tuple[str, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(archives, "DOWNLOAD_RETRIES", 1)
    monkeypatch.setattr(archives, "RETRY_DELAY_S", 0.0)
    url, state = flaky_server
    state["body"] = Path(shutil.make_archive(str(tmp_path / "pets"), "zip", small_dir)).read_bytes()
    state["cut"] = 99
    with pytest.raises(UserError, match=f"could not download {re.escape(url)}: .*ended early"):
        resolve_source(url, tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.zip*")), "nothing cached"


def test_cut_short_download_in_the_cache_is_fetched_again(
    small_dir: Path,
    tmp_path: Path,
    flaky_server: tuple[str, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A truncated file cached by an older version would fail every later run."""
    monkeypatch.setattr(archives, "RETRY_DELAY_S", 0.0)
    url, state = flaky_server
    state["body"] = Path(shutil.make_archive(str(tmp_path / "pets"), "zip", small_dir)).read_bytes()
    state["cut"] = 0
    folder = tmp_path / "cache" / "downloads" / archives.short_hash(url)
    folder.mkdir(parents=True)
    (folder / "pets.zip").write_bytes(state["body"][:1000])
    root = resolve_source(url, tmp_path / "cache")
    assert state["gets"] > 0 and (root / ".complete").is_file()
    assert (folder / "pets.zip").read_bytes() == state["body"]


@pytest.fixture(scope="module")
def odd_paths_run(mini_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fit then test with spaces, '&', '#' and non-ASCII in the source, cache and runs."""
    tmp = tmp_path_factory.mktemp("odd paths")
    src = tmp / "dåta set" / "Cats & Dogs"
    for cls, photos in pick_images(mini_dir, 20).items():
        (src / "PetImages" / cls).mkdir(parents=True)
        for photo in photos:
            shutil.copyfile(photo, src / "PetImages" / cls / f"{photo.stem} ü #1{photo.suffix}")
    save, cache = tmp / "rüns é x", tmp / "cache dir ñ"
    main(
        fit_args(
            save, cache, "--trainer.max_epochs=1", "--data.split_sizes=[20, 10, 10]", source=src
        )
    )
    run = only_run(save)
    main(
        [
            "test",
            "--config",
            QUICK,
            f"--ckpt_path={run / 'checkpoints' / 'best.ckpt'}",
            f"--data.cache_dir={cache}",
            *TINY,
        ]
    )
    return run


def test_paths_with_spaces_and_non_ascii_through_fit_and_test(odd_paths_run: Path) -> None:
    run = odd_paths_run
    split = list(csv.DictReader((run / "split.csv").open(encoding="utf-8", newline="")))
    assert len(split) == 40 and all(Path(r["path"]).is_file() for r in split)
    assert all("dåta set/Cats & Dogs" in r["path"] and " ü #1" in r["path"] for r in split)
    test_metrics = json.loads((run / "test_metrics.json").read_text(encoding="utf-8"))
    assert 0.0 <= test_metrics["test/acc"] <= 1.0
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    assert summary["metrics"]["test_acc"] == test_metrics["test/acc"]
    assert not leftovers(run.parent.parent)


def test_test_keeps_integer_epochs_in_metrics_csv(odd_paths_run: Path) -> None:
    rows = metric_rows(odd_paths_run)
    assert [(r["epoch"], r["step"]) for r in rows] == [("0", str(STEPS_PER_EPOCH))]
