"""A run's records: the fit's and the test's wall times kept apart, ``summary.md``'s
formats, stale test outputs moved aside when a fit trains on, and ``history.png``
redrawn at most every ``history_every_s`` seconds."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lightning_vgg.callbacks import run as run_module
from lightning_vgg.callbacks.run import TEST_OUTPUTS, RunArtifacts, retire_test_outputs
from lightning_vgg.cli import main
from lightning_vgg.errors import UserError
from lightning_vgg.report.history import (
    SEED_RESULTS,
    SUMMARY_KEYS,
    fit_wall_time,
    has_test_results,
    summary_markdown,
)
from lightning_vgg.report.runs import read_run
from tests.conftest import ROOT

QUICK = str(ROOT / "configs" / "quick.yaml")
TINY = [
    "--data.image_size=32",
    "--data.split_sizes=[40, 20, 20]",
    "--data.batch_size=16",
    "--data.train_steps_per_epoch=2",
    "--data.eval_batch_size=8",
    "--data.val_steps_per_epoch=2",
    "--data.num_workers=0",
    "--data.scan_workers=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.callbacks=[]",
]
STEPS_PER_EPOCH = 2


# --------------------------------------------------------------------------- summary.md


def _table(md: str) -> dict[str, list[str]]:
    """``summary.md``'s table as ``row label -> cells after the label``."""
    rows = [ln.strip().strip("|").split("|") for ln in md.splitlines() if ln.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def _info(md: str) -> dict[str, str]:
    """The ``- key: value`` lines under the table."""
    return dict(ln[2:].split(": ", 1) for ln in md.splitlines() if ln.startswith("- "))


OURS = {
    "max_train_acc": 0.81254,
    "min_train_loss": 0.43216,
    "max_val_acc": 0.875,
    "min_val_loss": 0.3456,
    "test_acc": 0.83333,
    "test_loss": 0.37891,
    "test_n_images": 200,
    "test_n_skipped": 0,
}


def test_summary_md_shows_accuracies_as_percents_and_losses_as_numbers() -> None:
    md = summary_markdown({"metrics": OURS, "epochs": 130}, "good")
    table = _table(md)
    ours = {label: cells[0] for label, cells in table.items()}
    seed = {label: cells[1] for label, cells in table.items()}
    assert ours == {
        "Max train accuracy": "81.25%",
        "Min train loss": "0.4322",
        "Max val accuracy": "87.50%",
        "Min val loss": "0.3456",
        "Test accuracy": "83.33%",
        "Test loss": "0.3789",
    }
    # the seed's column in the same formats, from the same fractions
    for key, label in SUMMARY_KEYS.items():
        want = SEED_RESULTS["good"][key]
        shown = f"{want:.2%}" if key.endswith("_acc") else f"{want:.4f}"
        assert seed[label] == shown, key
    assert seed["Test accuracy"] == "95.05%" and seed["Max val accuracy"] == "97.00%"
    assert _info(md)["epochs"].startswith("130 (numbered 0–129")


def test_summary_md_states_fit_and_test_times_and_the_tested_checkpoint() -> None:
    summary = {
        "config": "seed",
        "epochs": 2,
        "device": "cpu (x86_64, 2 threads)",
        "fit_wall_time_s": 837.25,
        "test_wall_time_s": 4.5,
        "test_device": "NVIDIA H200",
        "test_checkpoint": {"path": "/r/checkpoints/best.ckpt", "epoch": 1, "global_step": 4},
        "metrics": OURS,
    }
    info = _info(summary_markdown(summary, None))
    assert info["fit wall time"] == "837.2 s (14.0 min)"
    assert info["test wall time"] == "4.5 s"
    assert info["tested checkpoint"] == (
        "`/r/checkpoints/best.ckpt`, saved after epoch 1 (0-based), training step 4"
    )
    assert info["test images"] == "200"
    assert info["test device"] == "NVIDIA H200"
    assert info["epochs"].startswith("2 (numbered 0–1")
    # before any test: no test lines, the table's test rows empty
    fit_only = {k: v for k, v in summary.items() if not k.startswith("test_")}
    fit_only["metrics"] = {k: v for k, v in OURS.items() if not k.startswith("test_")}
    md = summary_markdown(fit_only, None)
    assert not any(k.startswith("test") for k in _info(md))
    assert _table(md)["Test accuracy"] == ["—"]


def test_old_summaries_wall_time_reads_as_the_fits() -> None:
    old = {"config": "seed", "epochs": 3, "wall_time_s": 61.0, "metrics": {}}
    assert fit_wall_time(old) == 61.0
    assert fit_wall_time({**old, "fit_wall_time_s": 70.0}) == 70.0  # the new key wins
    assert fit_wall_time({"metrics": {}}) is None
    assert _info(summary_markdown(old, None))["fit wall time"] == "61.0 s"
    assert not has_test_results(old)
    assert has_test_results({**old, "metrics": {"test_acc": 0.5}})
    assert has_test_results({**old, "checkpoint": "x.ckpt"})  # older test summaries


# --------------------------------------------------------------------------- stale tests


def _fill(folder: Path, names: list[str]) -> dict[str, bytes]:
    out = {}
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        data = f"{name} {len(out)}".encode()
        (folder / name).write_bytes(data)
        out[name] = data
    return out


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_retire_moves_exactly_the_tests_outputs_and_never_overwrites(tmp_path: Path) -> None:
    run = tmp_path / "version_0"
    fit_files = _fill(
        run,
        [
            "metrics.csv",
            "history.png",
            "config.yaml",
            "split.csv",
            "predictions.csv",  # predict's, not test's
            "test_metrics.json.bak",  # a user's, with a name close to test's
            "misclassified_cat.png.keep",
            "visualizations/fit_end/gradcam_block5_conv3.png",
            "checkpoints/best.ckpt",
        ],
    )
    test_files = _fill(
        run,
        [
            "test_metrics.json",
            "misclassified.json",
            "misclassified_cat.png",
            "misclassified_dog.png",
            "visualizations/test_end/gradcam_block5_conv3.png",
        ],
    )
    summary = {"config": "q", "fit_wall_time_s": 3.0, "metrics": {"test_acc": 0.5}}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "summary.md").write_text("| Test accuracy | 50.00% |")
    with_summary = {
        **test_files,
        "summary.json": (run / "summary.json").read_bytes(),
        "summary.md": (run / "summary.md").read_bytes(),
    }

    moved, into = retire_test_outputs(run)
    assert into == run / "stale_test"
    assert sorted(moved) == sorted(
        [n for n in with_summary if not n.startswith("visualizations")]
        + ["visualizations/test_end"]
    )
    assert _tree(into) == with_summary, "moved whole, bytes unchanged"
    left = {k: v for k, v in _tree(run).items() if not k.startswith("stale_test/")}
    assert left == fit_files, "the fit's and the user's files stay where they were"

    # tested and resumed again: the second batch goes beside the first, not over it
    second = _fill(run, ["test_metrics.json", "misclassified_dog.png"])
    moved, into = retire_test_outputs(run)
    assert into == run / "stale_test" / "2" and sorted(moved) == sorted(second)
    assert _tree(into) == second
    assert _tree(run / "stale_test")["test_metrics.json"] == test_files["test_metrics.json"]
    assert retire_test_outputs(run) == ([], None), "nothing left to move"


def test_retire_keeps_a_fit_only_summary_in_place(tmp_path: Path) -> None:
    run = tmp_path / "version_0"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"metrics": {"test_acc": None}}))
    _fill(run, ["test_metrics.json"])
    moved, _ = retire_test_outputs(run)
    assert moved == ["test_metrics.json"] and (run / "summary.json").is_file()


# --------------------------------------------------------------------------- history.png


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _trainer(log_dir: Path) -> Any:
    return SimpleNamespace(
        logger=SimpleNamespace(name="quick", log_dir=str(log_dir), save_dir=str(log_dir)),
        default_root_dir=str(log_dir),
        is_global_zero=True,
        fast_dev_run=False,
        sanity_checking=False,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        current_epoch=0,
        global_step=0,
        callback_metrics={},
        optimizers=[],
        ckpt_path=None,
    )


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    c = Clock()
    monkeypatch.setattr(run_module.time, "monotonic", c)
    yield c


def _epochs(
    cb: RunArtifacts, trainer: Any, clock: Clock, times: list[float], run: Path
) -> list[bool]:
    """Run epochs ending at ``times``; return after which ones history.png was redrawn."""
    drawn = []
    for epoch, t in enumerate(times):
        clock.now = 1000.0 + t
        trainer.current_epoch, trainer.global_step = epoch, 2 * (epoch + 1)
        trainer.callback_metrics = {"train/acc": torch.tensor(0.5), "val/acc": torch.tensor(0.6)}
        (run / "history.png").unlink(missing_ok=True)
        cb.on_train_epoch_end(trainer, None)
        drawn.append((run / "history.png").exists())
        rows = (run / "metrics.csv").read_text().splitlines()
        assert len(rows) == epoch + 2, "metrics.csv is written after every epoch"
        assert json.loads((run / "summary.json").read_text())["epochs"] == epoch + 1
    return drawn


def test_history_png_redrawn_at_most_every_history_every_s(tmp_path: Path, clock: Clock) -> None:
    run = tmp_path / "run"
    run.mkdir()
    cb, trainer = RunArtifacts(history_every_s=30.0), _trainer(run)
    cb.on_fit_start(trainer, None)
    drawn = _epochs(cb, trainer, clock, [1, 10, 20, 31.5, 40, 61.5, 62], run)
    assert drawn == [True, False, False, True, False, True, False]
    (run / "history.png").unlink(missing_ok=True)
    cb.on_fit_end(trainer, None)
    assert (run / "history.png").read_bytes().startswith(b"\x89PNG"), "always at fit end"


def test_history_every_s_zero_redraws_every_epoch(tmp_path: Path, clock: Clock) -> None:
    run = tmp_path / "run"
    run.mkdir()
    cb, trainer = RunArtifacts(history_every_s=0), _trainer(run)
    cb.on_fit_start(trainer, None)
    assert _epochs(cb, trainer, clock, [1, 1, 1], run) == [True, True, True]


def test_a_failing_fit_redraws_history_png(tmp_path: Path, clock: Clock) -> None:
    run = tmp_path / "run"
    run.mkdir()
    cb, trainer = RunArtifacts(), _trainer(run)
    cb.on_fit_start(trainer, None)
    assert _epochs(cb, trainer, clock, [1, 2], run) == [True, False]
    (run / "history.png").unlink(missing_ok=True)
    cb.on_exception(trainer, None, RuntimeError("training loss became nan"))
    assert (run / "history.png").is_file()


def test_history_every_s_must_not_be_negative() -> None:
    with pytest.raises(UserError, match="history_every_s"):
        RunArtifacts(history_every_s=-1)
    with pytest.raises(UserError, match="history_every_s"):
        RunArtifacts(history_every_s=float("nan"))


# --------------------------------------------------------------------------- end to end


def _cli(command: str, save: Path, cache: Path, *extra: str, source: Path | None = None) -> None:
    src = [f"--data.source={source}"] if source is not None else []
    main(
        [
            command,
            "--config",
            QUICK,
            *src,
            f"--data.cache_dir={cache}",
            f"--trainer.logger.init_args.save_dir={save}",
            *TINY,
            *extra,
        ]
    )


def _summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text(encoding="utf-8"))


@pytest.fixture
def lightning_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Lightning's own logger does not propagate to the root: listen to it directly."""
    logger = logging.getLogger("pytorch_lightning")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="pytorch_lightning")
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


@pytest.mark.slow
def test_fit_test_resume_keeps_times_apart_and_moves_stale_test_results(
    mini_zip: Path, tmp_path: Path, lightning_log: pytest.LogCaptureFixture
) -> None:
    save, cache = tmp_path / "runs", tmp_path / "cache"
    _cli("fit", save, cache, "--trainer.max_epochs=1", source=mini_zip)
    (run,) = (save / "quick").glob("version_*")
    fit1 = _summary(run)
    assert fit1["fit_wall_time_s"] > 0 and "wall_time_s" not in fit1
    assert not has_test_results(fit1)

    # a summary from before the split: its wall_time_s is read as the fit's time
    legacy = {k: v for k, v in fit1.items() if k != "fit_wall_time_s"}
    legacy["wall_time_s"] = 1234.5
    (run / "summary.json").write_text(json.dumps(legacy), encoding="utf-8")

    best = run / "checkpoints" / "best.ckpt"
    _cli("test", save, cache, f"--ckpt_path={best}")
    tested = _summary(run)
    assert tested["fit_wall_time_s"] == 1234.5, "a test never changes the fit's time"
    assert "wall_time_s" not in tested
    assert 0 < tested["test_wall_time_s"] < 600
    assert tested["test_checkpoint"] == {
        "path": str(best.resolve()),
        "epoch": 0,
        "global_step": STEPS_PER_EPOCH,
    }
    test_metrics = json.loads((run / "test_metrics.json").read_text())
    assert tested["metrics"]["test_acc"] == test_metrics["test/acc"]
    md = (run / "summary.md").read_text()
    info = _info(md)
    assert info["fit wall time"] == "1234.5 s (20.6 min)"
    assert re.fullmatch(r"\d+\.\d s", info["test wall time"])
    assert "saved after epoch 0 (0-based), training step 2" in info["tested checkpoint"]
    assert info["epochs"].startswith("1 (numbered 0–0")
    test_outputs = {n: (run / n).read_bytes() for n in TEST_OUTPUTS if (run / n).is_file()}
    assert {"test_metrics.json", "misclassified.json"} <= set(test_outputs)
    tested_summary = {n: (run / n).read_bytes() for n in ("summary.json", "summary.md")}

    # the fit trains on: the test above no longer describes the run's weights
    lightning_log.clear()
    _cli("fit", save, cache, "--trainer.max_epochs=2", "--ckpt_path=last")
    stale = run / "stale_test"
    assert {n: (stale / n).read_bytes() for n in test_outputs} == test_outputs
    assert {n: (stale / n).read_bytes() for n in tested_summary} == tested_summary
    assert not any((run / n).exists() for n in TEST_OUTPUTS)
    resumed = _summary(run)
    assert not has_test_results(resumed) and resumed["metrics"]["test_acc"] is None
    assert resumed["epochs"] == 2
    # the resumed fit counts on from the checkpoint's time (the fit's, not a test's)
    assert resumed["fit_wall_time_s"] > fit1["fit_wall_time_s"]
    assert resumed["fit_wall_time_s"] < 1234.5
    assert "Test accuracy | —" in (run / "summary.md").read_text()
    records = {id(r): r for r in lightning_log.records}  # one record may reach two handlers
    lines = [r.getMessage() for r in records.values() if "stale_test" in r.getMessage()]
    assert len(lines) == 1 and "test_metrics.json" in lines[0], lines
    # the report reads no test numbers for the run any more
    assert not read_run("good", run / "checkpoints" / "last.ckpt").has_test

    # test the new weights, then a resume with nothing left to train: the test holds
    last = run / "checkpoints" / "last.ckpt"
    _cli("test", save, cache, f"--ckpt_path={last}")
    tested2 = _summary(run)
    assert tested2["fit_wall_time_s"] == resumed["fit_wall_time_s"]
    assert tested2["test_checkpoint"]["epoch"] == 1
    assert tested2["test_checkpoint"]["global_step"] == 2 * STEPS_PER_EPOCH
    info = read_run("good", last)
    assert info.has_test and info.test_checkpoint == tested2["test_checkpoint"]
    assert info.fit_wall_time_s == resumed["fit_wall_time_s"]
    assert info.test_wall_time_s == tested2["test_wall_time_s"]
    with pytest.warns(UserWarning, match="test results .* are of .*last.ckpt"):
        read_run("good", best)  # epoch 0's weights, but the numbers are epoch 1's
    _cli("fit", save, cache, "--trainer.max_epochs=2", "--ckpt_path=last")
    kept = _summary(run)
    assert (run / "test_metrics.json").is_file() and not (stale / "2").exists()
    assert kept["metrics"]["test_acc"] == tested2["metrics"]["test_acc"]
    assert kept["test_wall_time_s"] == tested2["test_wall_time_s"]
    assert kept["test_checkpoint"] == tested2["test_checkpoint"]
