"""``experiment`` end to end at toy scale: the seed's control, its last checkpoint, and a report that says which."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_vgg.checkpointing import read_checkpoint
from lightning_vgg.cli import main
from lightning_vgg.errors import UserError
from lightning_vgg.report.experiment import run_experiment
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


def test_experiment_from_python_raises_user_error_not_system_exit(tmp_path: Path) -> None:
    """Called from Python, a bad input is an exception the caller can handle, not an exit."""
    missing = tmp_path / "missing.yaml"
    with pytest.raises(UserError, match=r"missing\.yaml"):
        run_experiment(good_config=str(missing), bad_config=str(missing), out=str(tmp_path / "x"))
    assert not list((tmp_path / "x").rglob("*.ckpt"))


def test_experiment_cli_reports_the_runs_bad_option_as_before(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through ``main``, an option error of the inner fit still names fit's help."""
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "experiment",
                f"--good_config={ROOT / 'configs' / 'quick.yaml'}",
                f"--bad_config={ROOT / 'configs' / 'quick.yaml'}",
                f"--out={tmp_path / 'exp'}",
                '--overrides=["--trainer.max_epochz=1"]',
            ]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ") and "max_epochz" in err[0]
    assert err[-1] == "(see: lightning-vgg fit --help)"


def test_cpu_recipe_runs_a_few_batches(mini_zip: Path, tmp_path: Path) -> None:
    """configs/cpu.yaml as written (model, optimizer, one-cycle, channels_last, fast
    augmentation), on the mini archive for two batches: the recipe is exercised in CI
    without being trained there."""
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "cpu.yaml"),
            f"--data.source={mini_zip}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--data.split_sizes=[600, 200, 200]",
            "--data.num_workers=0",
            "--data.scan_workers=1",
            "--trainer.fast_dev_run=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        ]
    )
    assert not (tmp_path / "runs" / "cpu").exists() or not any(
        (tmp_path / "runs" / "cpu").iterdir()
    )
