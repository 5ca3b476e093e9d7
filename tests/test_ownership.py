"""One run, one owner: atomic run folders, a lock for a fit's life, resumes that cannot corrupt a run."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_vgg.cli import main
from lightning_vgg.errors import UserError
from lightning_vgg.runlock import RunLock, claim_new_version
from tests.conftest import ROOT
from tests.test_faults import fit_args, only_run


def _claim(root: str, queue: mp.Queue) -> None:
    queue.put(claim_new_version(Path(root)).name)


def test_concurrent_claims_get_distinct_folders(tmp_path: Path) -> None:
    (tmp_path / "version_0").mkdir()  # an older run
    ctx = mp.get_context("fork")
    queue: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(str(tmp_path), queue)) for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    names = sorted(queue.get(timeout=5) for _ in procs)
    assert len(set(names)) == 8 and "version_0" not in names


HOLD = """
import sys, time
from pathlib import Path
from lightning_vgg.runlock import RunLock
lock = RunLock(Path(sys.argv[1]), "fit --config held.yaml").acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def hold_lock(folder: Path, seconds: float = 60.0) -> subprocess.Popen[str]:
    """Another process that holds ``folder``'s lock until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_run_folder_is_refused_with_its_holder(tmp_path: Path) -> None:
    proc = hold_lock(tmp_path)
    try:
        with pytest.raises(UserError, match=rf"in use by process {proc.pid} .*held.yaml"):
            RunLock(tmp_path, "second").acquire()
    finally:
        proc.kill()
        proc.wait()
    # the kernel dropped the dead holder's lock: no stale lock to clean up by hand
    with RunLock(tmp_path, "third"):
        pass


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def one_epoch(mini_zip: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A finished one-epoch run; returns (save_dir, run folder)."""
    save = tmp_path / "runs"
    main(fit_args(save, tmp_path / "cache", "--trainer.max_epochs=1", source=mini_zip))
    return save, only_run(save)


def files_of(run: Path) -> dict[str, str]:
    files = (p for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock")
    return {str(p.relative_to(run)): digest(p) for p in files}


def refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_resume_of_a_running_fit_is_refused(
    one_epoch: tuple[Path, Path], mini_zip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save, run = one_epoch
    before = files_of(run)
    proc = hold_lock(run)
    try:
        args = fit_args(save, tmp_path / "cache", "--trainer.max_epochs=2", "--ckpt_path=last")
        line = refused([*args, f"--data.source={mini_zip}"], capsys)
    finally:
        proc.kill()
        proc.wait()
    assert f"{run} is in use by process {proc.pid}" in line
    assert files_of(run) == before


def test_resume_with_another_split_is_refused(
    one_epoch: tuple[Path, Path], mini_zip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save, run = one_epoch
    before = files_of(run)
    args = fit_args(
        save, tmp_path / "cache", "--trainer.max_epochs=2", "--ckpt_path=last", "--data.seed=7"
    )
    line = refused([*args, f"--data.source={mini_zip}"], capsys)
    assert "seed=42 in the checkpoint but 7 now" in line
    assert files_of(run) == before  # split.csv and config.yaml untouched


def test_resume_with_another_architecture_keeps_the_config(
    one_epoch: tuple[Path, Path], mini_zip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save, run = one_epoch
    before = files_of(run)
    args = fit_args(
        save, tmp_path / "cache", "--trainer.max_epochs=2", "--ckpt_path=last", "--model.width=0.25"
    )
    line = refused([*args, f"--data.source={mini_zip}"], capsys)
    assert "another architecture" in line and "width" in line
    assert files_of(run) == before


def test_truncated_last_checkpoint_is_one_error(
    one_epoch: tuple[Path, Path], mini_zip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save, run = one_epoch
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:5000])
    args = fit_args(save, tmp_path / "cache", "--trainer.max_epochs=2", "--ckpt_path=last")
    line = refused([*args, f"--data.source={mini_zip}"], capsys)
    assert f"cannot read checkpoint {last}" in line


def test_split_csv_of_a_run_is_never_rewritten_with_another_split(
    one_epoch: tuple[Path, Path], mini_zip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Even past the settings check (a checkpoint without data hparams), split.csv decides."""
    save, run = one_epoch
    split = run / "split.csv"
    before = digest(split)
    lines = split.read_text(encoding="utf-8").splitlines()
    split.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n", encoding="utf-8")
    edited = digest(split)
    args = fit_args(save, tmp_path / "cache", "--trainer.max_epochs=2", "--ckpt_path=last")
    line = refused([*args, f"--data.source={mini_zip}"], capsys)
    assert "holds another split" in line
    assert digest(split) == edited != before


@pytest.mark.slow
def test_fits_started_together_get_their_own_folders(mini_zip: Path, tmp_path: Path) -> None:
    save = tmp_path / "runs"
    code = "import sys; from lightning_vgg.cli import main; main(sys.argv[1:])"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                code,
                *fit_args(save, tmp_path / "cache", "--trainer.max_epochs=1", f"--data.seed={s}"),
                f"--data.source={mini_zip}",
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for s in (1, 2, 3)
    ]
    t0 = time.monotonic()
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    runs = sorted((save / "quick").glob("version_*"))
    assert [r.name for r in runs] == ["version_0", "version_1", "version_2"], time.monotonic() - t0
    import yaml

    seeds = set()
    for run in runs:
        seed = yaml.safe_load((run / "config.yaml").read_text())["data"]["seed"]
        from lightning_vgg.checkpointing import read_checkpoint

        ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
        assert ckpt["datamodule_hyper_parameters"]["seed"] == seed  # config and weights agree
        seeds.add(seed)
    assert seeds == {1, 2, 3}
