"""End to end through the CLI: fit then test with the quick config, checking every output."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_vgg.cli import main
from tests.conftest import ROOT, pick_images

FAST = [
    "--trainer.max_epochs=2",
    "--data.image_size=32",
    "--data.split_sizes=[120, 40, 40]",
    "--data.num_workers=0",
    "--data.scan_workers=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def run_dir_of(save_dir: Path, name: str = "quick") -> Path:
    dirs = sorted((save_dir / name).glob("version_*"))
    assert dirs, f"no run directory under {save_dir / name}"
    return dirs[-1]


def fit(source: Path | str, save_dir: Path, cache: Path, *extra: str) -> Path:
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "quick.yaml"),
            f"--data.source={source}",
            f"--data.cache_dir={cache}",
            f"--trainer.logger.init_args.save_dir={save_dir}",
            *FAST,
            *extra,
        ]
    )
    return run_dir_of(save_dir)


@pytest.mark.slow
def test_fit_then_test_writes_every_output(mini_zip: Path, tmp_path: Path) -> None:
    run = fit(mini_zip, tmp_path / "runs", tmp_path / "cache")
    for name in (
        "metrics.csv",
        "history.png",
        "summary.json",
        "summary.md",
        "split.csv",
        "config.yaml",
    ):
        assert (run / name).is_file(), name
    best, last = run / "checkpoints" / "best.ckpt", run / "checkpoints" / "last.ckpt"
    assert best.is_file() and last.is_file()
    assert not list(run.rglob("*.tmp")), "no temporary files left behind"

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for r in rows:
        for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
            assert 0.0 <= float(r[key]) < 10.0
    split = list(csv.DictReader((run / "split.csv").open()))
    counts = {s: sum(r["split"] == s for r in split) for s in ("train", "val", "test")}
    assert counts == {"train": 120, "val": 40, "test": 40}
    assert all(Path(r["path"]).is_file() for r in split)
    with Image.open(run / "history.png") as im:
        assert im.size[0] > 300

    summary = json.loads((run / "summary.json").read_text())
    m = summary["metrics"]
    assert m["max_val_acc"] == pytest.approx(max(float(r["val/acc"]) for r in rows))
    assert m["min_train_loss"] == pytest.approx(min(float(r["train/loss"]) for r in rows))
    assert m["test_acc"] is None

    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["input_size"] == 32  # linked from data.image_size

    main(
        [
            "test",
            "--config",
            str(ROOT / "configs" / "quick.yaml"),
            f"--ckpt_path={best}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            *FAST,
        ]
    )
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["metrics"]["test_acc"] <= 1.0
    assert summary["metrics"]["max_val_acc"] == m["max_val_acc"], "training history kept"
    test_metrics = json.loads((run / "test_metrics.json").read_text())
    assert test_metrics["test/acc"] == summary["metrics"]["test_acc"]
    assert "Test accuracy" in (run / "summary.md").read_text()

    main(
        ["predict", "--config", str(ROOT / "configs" / "quick.yaml"), f"--ckpt_path={best}", *FAST]
    )
    preds = list(csv.DictReader((run / "predictions.csv").open()))
    assert len(preds) == 40 and {r["path"] for r in preds} == {
        r["path"] for r in split if r["split"] == "test"
    }
    acc = sum(int(r["pred"]) == int(r["label"]) for r in preds) / len(preds)
    assert acc == pytest.approx(test_metrics["test/acc"], abs=1e-6), "predict agrees with test"


@pytest.mark.slow
def test_fit_on_kaggle_layout_folder(mini_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "kaggle" / "train"
    src.mkdir(parents=True)
    for cls, files in pick_images(mini_dir, 40).items():
        for i, f in enumerate(files):
            shutil.copy(f, src / f"{cls.lower()}.{i}.jpg")
    run = fit(
        tmp_path / "kaggle",
        tmp_path / "runs",
        tmp_path / "cache",
        "--trainer.max_epochs=1",
        "--data.split_sizes=[40, 20, 20]",
    )
    split = list(csv.DictReader((run / "split.csv").open()))
    assert len(split) == 80
    assert all(
        int(r["label"]) == (1 if Path(r["path"]).name.startswith("dog.") else 0) for r in split
    )


def test_bad_source_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        fit(tmp_path / "does-not-exist", tmp_path / "runs", tmp_path / "cache")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "does-not-exist" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


def test_one_class_dataset_is_refused(
    mini_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "only_cats" / "cats"
    src.mkdir(parents=True)
    for f in pick_images(mini_dir, 5)["Cat"]:
        shutil.copy(f, src / f.name)
    with pytest.raises(SystemExit):
        fit(tmp_path / "only_cats", tmp_path / "runs", tmp_path / "cache")
    assert "one class" in capsys.readouterr().err


def test_config_typo_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(ROOT / "configs" / "quick.yaml"), "--model.widht=0.5"])
    assert exc.value.code != 0
    assert "widht" in capsys.readouterr().err


def test_python_m_entry_point_matches_script() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lightning_vgg", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "fit" in out and "test" in out and "lightning-vgg" in out
