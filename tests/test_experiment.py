"""``experiment`` end to end at toy scale: the seed's control, its last checkpoint, and a report that says which."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_vgg.checkpointing import read_checkpoint
from lightning_vgg.cli import main
from tests.conftest import ROOT


@pytest.mark.slow
def test_experiment_quick_compares_the_seeds_one_step_control(
    mini_zip: Path, tmp_path: Path
) -> None:
    tiny = [
        "--trainer.max_epochs=2",
        "--trainer.callbacks=[]",
        f"--data.source={mini_zip}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.image_size=32",
        "--data.split_sizes=[120, 40, 40]",
        "--data.num_workers=0",
        "--data.scan_workers=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    out = tmp_path / "exp"
    main(
        [
            "experiment",
            "--config",
            str(ROOT / "configs" / "experiment_quick.yaml"),
            f"--out={out}",
            f"--overrides={json.dumps(tiny)}",
            "--n_per_class=2",
            "--deletion_steps=2",
            "--device=cpu",
        ]
    )
    bad_run = next((out / "runs" / "bad").glob("version_*"))
    good_run = next((out / "runs" / "good").glob("version_*"))
    # the seed's control: one batch of 6 images, one step, then tf.keras 2.x stops fit
    last = read_checkpoint(bad_run / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (0, 1)
    assert len((bad_run / "metrics.csv").read_text().splitlines()) == 2
    # the report names each compared checkpoint: the good run's best, the control's last
    report = (out / "report" / "report.md").read_text(encoding="utf-8")
    setup = next(line for line in report.splitlines() if line.startswith("| checkpoint"))
    assert str(bad_run / "checkpoints" / "last.ckpt") in setup
    assert str(good_run / "checkpoints" / "best.ckpt") in setup
    assert "saved after epoch 0 (0-based, as in metrics.csv), training step 1" in setup
    measures = json.loads((out / "report" / "measures.json").read_text())
    assert measures["bad"]["checkpoint"].endswith("last.ckpt")
    assert (measures["bad"]["checkpoint_epoch"], measures["bad"]["checkpoint_step"]) == (0, 1)
