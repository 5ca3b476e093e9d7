"""A shared checkpoint must never run code: every command that takes one refuses a booby-trap.

A pickle can call any function while it loads. Each test builds a real (tiny) checkpoint
with one extra object whose ``__reduce__`` would create a marker file, hands it to a
command, and asserts one ``error:`` line, exit 2, and no marker.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lightning_vgg.checkpointing import read_checkpoint
from lightning_vgg.cli import main
from lightning_vgg.errors import UserError
from lightning_vgg.models.module import VGGClassifier
from tests.conftest import ROOT

QUICK = str(ROOT / "configs" / "quick.yaml")


class Payload:
    """Unpickling this object runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch '{self.marker}'",))


def booby_trapped(folder: Path, where: str) -> tuple[Path, Path]:
    """A tiny checkpoint of this project with a payload in ``where``; and the marker path."""
    marker = folder / "PAYLOAD_RAN"
    model = VGGClassifier(width=1 / 16, hidden=16, input_size=32)
    hp = dict(model.hparams)
    ckpt: dict[str, object] = {
        "state_dict": model.state_dict(),
        "hyper_parameters": hp,
        "epoch": 0,
        "global_step": 0,
    }
    if where == "hyper_parameters":
        hp["note"] = Payload(marker)
    else:
        ckpt[where] = Payload(marker)
    run = folder / "runs" / "quick" / "version_0" / "checkpoints"
    run.mkdir(parents=True)
    path = run / "best.ckpt"
    torch.save(ckpt, path)
    return path, marker


@pytest.mark.parametrize("where", ["hyper_parameters", "callbacks"])
def test_read_checkpoint_refuses_and_runs_nothing(tmp_path: Path, where: str) -> None:
    path, marker = booby_trapped(tmp_path, where)
    with pytest.raises(UserError, match=r"refusing checkpoint .*nothing in it ran"):
        read_checkpoint(path)
    assert not marker.exists()


def test_a_clean_checkpoint_still_loads(tmp_path: Path) -> None:
    model = VGGClassifier(width=1 / 16, hidden=16, input_size=32)
    path = tmp_path / "clean.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    assert read_checkpoint(path)["hyper_parameters"]["width"] == 1 / 16


def command_args(command: str, ckpt: Path, tmp_path: Path, image: Path) -> list[str]:
    lightning = [
        "--config",
        QUICK,
        f"--ckpt_path={ckpt}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--data.image_size=32",
        "--data.num_workers=0",
    ]
    if command in ("fit", "validate", "test", "predict"):
        return [command, *lightning]
    if command == "explain":
        return [
            "explain",
            f"--ckpt_path={ckpt}",
            f"--out={tmp_path / 'explained'}",
            "--images",
            str(image),
        ]
    other = tmp_path / "other" / "best.ckpt"  # compare refuses one checkpoint given twice
    other.parent.mkdir(exist_ok=True)
    other.write_bytes(ckpt.read_bytes())
    return ["compare", f"--good={ckpt}", f"--bad={other}", f"--out={tmp_path / 'report'}"]


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict", "explain", "compare"])
def test_every_command_refuses_a_booby_trapped_checkpoint(
    command: str, tmp_path: Path, cat_photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, marker = booby_trapped(tmp_path, "hyper_parameters")
    with pytest.raises(SystemExit) as exit_info:
        main(command_args(command, ckpt, tmp_path, cat_photo))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert not marker.exists(), f"{command} ran the checkpoint's payload"
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "refusing checkpoint" in lines[0], err
    assert "Traceback" not in err
