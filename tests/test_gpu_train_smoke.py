"""benchmarks/gpu_train.py (issue 15's one-call GPU run) at toy size, on the CPU."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "benchmarks" / "gpu_train.py"


def load_driver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_train", DRIVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_join_parts_checks_the_sha256(tmp_path: Path) -> None:
    import hashlib

    driver = load_driver()
    data = bytes(range(256)) * 1000
    parts = []
    for i in range(3):
        part = tmp_path / f"x.zip.part-a{'abc'[i]}"
        part.write_bytes(data[i * 100_000 : (i + 1) * 100_000])
        parts.append(part)
    target = tmp_path / "x.zip"
    driver.join_parts(parts, target, hashlib.sha256(data).hexdigest())
    assert target.read_bytes() == data
    with pytest.raises(SystemExit, match="sha256"):
        driver.join_parts(parts[:2], tmp_path / "y.zip", hashlib.sha256(data).hexdigest())
    assert not (tmp_path / "y.zip").exists()
    assert not list(tmp_path.glob("*.joining"))


@pytest.mark.slow
def test_smoke_run_packs_every_result(tmp_path: Path, mini_zip: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--smoke", "--runs", "seed,control", "--data", str(mini_zip)]
    done = subprocess.run(
        [sys.executable, str(DRIVER), *args, "--out", str(out), "--work", str(work)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    # what the device returns: at most 8 plain files, names of letters, digits, . _ -
    files = sorted(p.name for p in out.iterdir())
    assert files == ["driver.log", "issue15-results.tar", "run_info.json"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    tar_path = out / "issue15-results.tar"
    assert tar_path.stat().st_size <= 16 * 2**20

    with tarfile.open(tar_path) as tar:
        names = set(tar.getnames())
        info = json.load(tar.extractfile("results/run_info.json"))  # type: ignore[arg-type]
        report = tar.extractfile("results/seed_vs_control/report.md").read().decode()  # type: ignore[union-attr]
    for run in ("seed", "control"):
        for name in (
            "summary.json",
            "summary.md",
            "metrics.csv",
            "history.png",
            "test_metrics.json",
            "misclassified_cat.png",
            "misclassified_dog.png",
        ):
            assert f"results/{run}/{name}" in names, (run, name, sorted(names))
    assert "results/seed_vs_control/measures.json" in names
    linked = load_driver().linked_figures_text(report)
    assert linked and all(f"results/seed_vs_control/{f}" in names for f in linked)

    assert info["status"] == "done"
    assert info["precision"] == "32-true" and info["test_precision"] == "32-true"
    assert 0 < info["wall_time_s"] < 400
    assert info["packs"] >= 3  # partial results were packed while the runs went on
    assert info["source"]["commit"]
    assert info["data"]["joined"] and info["data"]["sha256"]
    assert info["same_split"] is True
    assert info["runs"]["seed"]["epochs_done"] == 2
    assert info["runs"]["control"]["epochs_done"] == 1  # data.exhausted: stop, one step
    assert info["runs"]["seed"]["test_metrics"]["test/n_images"] == 200
    assert info["compare"]["rc"] == 0
    assert json.loads((out / "run_info.json").read_text()) == info

    log = (out / "driver.log").read_text()
    assert re.search(r"seed epoch 2/2 step 6 train_acc [\d.]+ val_acc [\d.]+ elapsed \d+ s", log)
    assert "control epoch 1/2 step 1" in log


def test_epoch_progress_prints_and_stops_before_the_deadline(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import time
    from types import SimpleNamespace

    import torch

    from lightning_vgg.callbacks import EpochProgress

    trainer = SimpleNamespace(
        sanity_checking=False,
        current_epoch=0,
        max_epochs=250,
        global_step=80,
        should_stop=False,
        is_global_zero=True,
        logger=SimpleNamespace(name="seed"),
        callback_metrics={"train/acc": torch.tensor(0.71), "val/acc": torch.tensor(0.69)},
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision),
    )
    cb = EpochProgress(stop_at=time.time() + 3600)
    cb.on_fit_start(trainer, None)  # type: ignore[arg-type]
    cb.on_train_epoch_end(trainer, None)  # type: ignore[arg-type]
    assert not trainer.should_stop
    assert re.fullmatch(
        r"seed epoch 1/250 step 80 train_acc 0\.7100 val_acc 0\.6900 elapsed \d+ s\n",
        capsys.readouterr().out,
    )
    cb.stop_at = time.time() - 1  # the next epoch would end after the deadline
    trainer.current_epoch, trainer.global_step = 11, 960
    cb.on_train_epoch_end(trainer, None)  # type: ignore[arg-type]
    assert trainer.should_stop
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("seed epoch 12/250 step 960 ")
    assert out[1] == "seed stopping after epoch 12: the deadline is near"
