"""Issue 11: bad input fails early with one ``error:`` line, and evaluation never lies.

Bad numbers are refused while parsing (and by the constructors), jsonargparse's union
dumps shrink to one line, the top-level help lists every command, evaluation needs a
checkpoint, counts the images it used and refuses results on too few, and a file name
that is not UTF-8 no longer blocks the data scan.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest

from lightning_vgg import __version__
from lightning_vgg.checks import describe_range
from lightning_vgg.cli import COMMANDS, main
from lightning_vgg.data.datamodule import CatsDogsDataModule
from lightning_vgg.data.sources import UnreadableImagesWarning, find_images, index_source
from lightning_vgg.data.split import make_split, write_split_csv
from lightning_vgg.errors import UserError
from lightning_vgg.models.module import VGGClassifier
from lightning_vgg.parse_errors import one_line
from lightning_vgg.training import require_checkpoint
from tests.conftest import ROOT, pick_images

QUICK = str(ROOT / "configs" / "quick.yaml")


def fails(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI, expect exit 2 and exactly one ``error:`` line; return that line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


# ------------------------------------------------------------------ 1. bad numbers
@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("data.batch_size", "-5", "an integer > 0"),
        ("data.image_size", "0", "an integer > 0"),
        ("data.num_workers", "-1", "an integer >= 0"),
        ("data.eval_batch_size", "0", "an integer > 0"),
        ("data.train_steps_per_epoch", "0", "an integer > 0"),
        ("data.val_steps_per_epoch", "0", "an integer > 0"),
        ("data.scan_workers", "-1", "an integer >= 0"),
        ("data.rescale", "0", "a number > 0"),
        ("data.rotation_range", "-1", "a number >= 0"),
        ("data.max_missing_fraction", "1.5", "a number in [0, 1]"),
        ("model.width", "0", "a number > 0"),
        ("model.lr", "-1", "a number > 0"),
        ("model.bn_momentum", "0", "a number in (0, 1]"),
        ("model.dropout", "1", "a number in [0, 1)"),
        ("model.warmup_pct", "1", "a number in (0, 1)"),
        ("model.hidden", "0", "an integer > 0"),
    ],
)
def test_bad_number_is_refused_while_parsing(
    capsys: pytest.CaptureFixture[str], option: str, value: str, expected: str
) -> None:
    # a source that does not exist: the value is refused before anything looks at it
    line = fails(
        capsys, ["fit", "--config", QUICK, "--data.source=/nonexistent", f"--{option}", value]
    )
    assert line == f"error: {option} must be {expected}, got {value}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": -5}, "data.batch_size must be an integer > 0, got -5"),
        ({"eval_batch_size": 0}, "data.eval_batch_size must be an integer > 0, got 0"),
        ({"train_steps_per_epoch": 0}, "data.train_steps_per_epoch must be"),
        ({"prefetch_factor": -2}, "data.prefetch_factor must be"),
        ({"subset_per_class": 0}, "data.subset_per_class must be"),
        ({"shear_range": -0.1}, "data.shear_range must be"),
        ({"zoom_range": -0.2}, "data.zoom_range must be"),
        ({"num_workers": 1.5}, "data.num_workers must be"),
    ],
)
def test_datamodule_checks_plain_python_calls(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CatsDogsDataModule(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 0}, "model.width must be a number > 0, got 0"),
        ({"bn_eps": 0}, "model.bn_eps must be"),
        ({"bn_momentum": 1.5}, "model.bn_momentum must be"),
        ({"dropout": -0.1}, "model.dropout must be"),
        ({"label_smoothing": 1.0}, "model.label_smoothing must be"),
        ({"momentum": -0.9}, "model.momentum must be"),
        ({"weight_decay": -1e-4}, "model.weight_decay must be"),
        ({"warmup_pct": 0.0}, "model.warmup_pct must be"),
    ],
)
def test_model_checks_plain_python_calls(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        VGGClassifier(**kwargs)


def test_none_eval_batch_size_means_batch_size() -> None:
    dm = CatsDogsDataModule(batch_size=7, eval_batch_size=None, num_workers=0)
    dm.rows = [(f"{i}.jpg", i % 2, s) for s in ("train", "val", "test") for i in range(10)]
    assert dm.val_dataloader().batch_sampler.batch_size == 7
    dm = CatsDogsDataModule(batch_size=7, eval_batch_size=3, num_workers=0)
    dm.rows = [(f"{i}.jpg", i % 2, s) for s in ("train", "val", "test") for i in range(10)]
    assert dm.test_dataloader().batch_sampler.batch_size == 3


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["explain", "--batch_size", "0"], "--batch_size must be an integer > 0, got 0"),
        (["explain", "--n", "0"], "--n must be an integer > 0, got 0"),
        (["explain", "--workers", "-1"], "--workers must be an integer >= 0, got -1"),
        (["explain", "--max_channels", "0"], "--max_channels must be an integer > 0, got 0"),
        (["compare", "--n_per_class", "0"], "--n_per_class must be an integer > 0, got 0"),
    ],
)
def test_function_commands_refuse_bad_numbers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], line: str
) -> None:
    ckpt = str(tmp_path / "missing.ckpt")
    where = [f"--ckpt_path={ckpt}"] if argv[0] == "explain" else [f"--good={ckpt}", f"--bad={ckpt}"]
    assert fails(capsys, [*argv, *where, f"--out={tmp_path / 'out'}"]) == f"error: {line}"
    assert not (tmp_path / "out").exists()


def test_describe_range_names_the_interval() -> None:
    from lightning_vgg.checks import NonNegativeInt, UnitIntervalToOne

    assert describe_range(NonNegativeInt) == "an integer >= 0"
    assert describe_range(UnitIntervalToOne) == "a number in (0, 1]"


# --------------------------------------------------------- 2. one line, not a dump
def test_callback_option_typo_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "fit",
        "--config",
        QUICK,
        "--trainer.callbacks+=lightning_vgg.callbacks.GradCAMCallback",
        "--trainer.callbacks.every_n_epochz=2",
    ]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: trainer.callbacks: Option 'every_n_epochz' is not accepted "
        "(lightning_vgg.callbacks.GradCAMCallback)",
        "(see: lightning-vgg fit --help)",
    ]


def test_callback_typo_in_yaml_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cfg = tmp_path / "typo.yaml"
    cfg.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning_vgg.callbacks.FeatureMapCallback\n"
        "      init_args:\n        max_chanels: 4\n"
    )
    line = fails(capsys, ["fit", "--config", QUICK, "--config", str(cfg)])
    assert "max_chanels" in line and "FeatureMapCallback" in line


def test_one_line_keeps_single_line_messages_and_picks_the_deepest() -> None:
    assert one_line("unrecognized arguments: --x") == "unrecognized arguments: --x"
    dump = (
        'Parser key "data.eval_batch_size":\n'
        "  Does not validate against any of the Union subtypes\n"
        "  Subtypes: [<class 'int'>, <class 'NoneType'>]\n"
        "  Errors:\n"
        "    - Expected a <class 'int'>\n"
        "    - Expected a <class 'NoneType'>\n"
        "  Given value type: <class 'str'>\n"
        "  Given value: abc"
    )
    assert one_line(dump) == "data.eval_batch_size: Expected a <class 'int'>; given: abc"


# ------------------------------------------------------ 3. help, typos, version
def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--help"])
    out = capsys.readouterr().out
    listed = [ln.split()[0] for ln in out.splitlines() if ln.startswith("  ")]
    assert listed == list(COMMANDS)
    assert set(COMMANDS) == {
        "fit",
        "validate",
        "test",
        "predict",
        "explain",
        "compare",
        "experiment",
    }


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "explain" in captured.out and "error: a command is needed" in captured.err


@pytest.mark.parametrize(
    ("typo", "meant"), [("explian", "explain"), ("tset", "test"), ("fitt", "fit")]
)
def test_command_typo_suggests_the_command(
    capsys: pytest.CaptureFixture[str], typo: str, meant: str
) -> None:
    line = fails(capsys, [typo])
    assert f"unknown command '{typo}'; did you mean '{meant}'?" in line
    assert "experiment" in line  # the list names all seven


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--version"])
    assert capsys.readouterr().out == f"lightning-vgg {__version__}\n"
    assert __version__ == "0.1.0" or __version__[0].isdigit()


def test_command_help_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--help"])
    assert exc.value.code == 0
    assert "--ckpt_path" in capsys.readouterr().out


# ------------------------------------------------------- 4. evaluation needs a ckpt
@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_evaluation_without_checkpoint_is_refused(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # the missing source shows that nothing was scanned: the checkpoint check comes first
    line = fails(capsys, [command, "--config", QUICK, "--data.source=/nonexistent"])
    assert line.startswith(f"error: {command} needs --ckpt_path (a checkpoint written by fit)")
    assert "--allow_untrained true" in line


def test_allow_untrained_is_accepted_and_stripped(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # past the check, LightningCLI runs and reports the missing source (not the flag)
    save = tmp_path / "runs"
    line = fails(
        capsys,
        [
            "test",
            "--config",
            QUICK,
            "--data.source=/nonexistent",
            f"--trainer.logger.init_args.save_dir={save}",
            "--allow_untrained",
            "true",
        ],
    )
    assert "nonexistent" in line and "allow_untrained" not in line
    # the run folder it claimed stayed empty, so it is gone: no gap in version numbers
    assert list((save / "quick").iterdir()) == []
    assert require_checkpoint("test", ["--allow_untrained=true", "--x=1"]) == ["--x=1"]
    assert require_checkpoint("test", ["--allow_untrained", "--x=1"]) == ["--x=1"]
    with pytest.raises(UserError, match="test needs --ckpt_path"):
        require_checkpoint("test", ["--allow_untrained", "false"])
    with pytest.raises(UserError, match="test needs --ckpt_path"):
        require_checkpoint("test", ["--ckpt_path", "null"])
    assert require_checkpoint("test", ["--ckpt_path", "a.ckpt"]) == ["--ckpt_path", "a.ckpt"]
    assert require_checkpoint("test", ["--help"]) == ["--help"]


def test_checkpoint_in_config_file_counts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"ckpt_path: {tmp_path / 'gone.ckpt'}\n")
    assert require_checkpoint("test", ["-c", str(cfg)]) == ["-c", str(cfg)]
    # the check passes, so LightningCLI reports the checkpoint itself
    line = fails(capsys, ["test", "--config", QUICK, f"--config={cfg}"])
    assert line == f"error: checkpoint not found: {tmp_path / 'gone.ckpt'}"
    cfg.write_text("ckpt_path: null\n")
    with pytest.raises(UserError, match="needs --ckpt_path"):
        require_checkpoint("test", ["--ckpt_path=x.ckpt", "--config", str(cfg)])


# --------------------------------------------------- 6. names that are not UTF-8
def test_non_utf8_file_name_is_skipped_with_one_warning(mini_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src" / "PetImages"
    for cls, files in pick_images(mini_dir, 6).items():
        (src / cls).mkdir(parents=True)
        for f in files:
            shutil.copy(f, src / cls / f.name)
    bad = os.path.join(os.fsencode(src / "Cat"), b"\xff\xfe.jpg")
    try:
        shutil.copy(pick_images(mini_dir, 1)["Cat"][0], bad)
    except OSError as exc:  # filesystems that insist on UTF-8 names
        pytest.skip(f"cannot create a non-UTF-8 file name here: {exc}")
    with pytest.warns(
        UnreadableImagesWarning, match=r"skipping 1 file.*b'PetImages/Cat/\\xff\\xfe\.jpg'"
    ):
        items = find_images(tmp_path / "src")
    assert len(items) == 12 and all(p.isascii() for p, _ in items)
    # the whole scan and split.csv now go through (the UnicodeEncodeError of issue 11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImagesWarning)
        root, good = index_source(tmp_path / "src", tmp_path / "cache", workers=0)
    rows = make_split(good, (6, 3, 3), seed=0)
    write_split_csv(tmp_path / "split.csv", [(str(root / p), lab, s) for p, lab, s in rows])
    assert len(list(csv.DictReader((tmp_path / "split.csv").open(encoding="utf-8")))) == 12


# ------------------------------------------------ 5. counts, and no empty results
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


@pytest.mark.slow
def test_evaluation_counts_images_and_refuses_too_few(
    mini_zip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        *TINY,
    ]
    main(["fit", "--config", QUICK, f"--data.source={mini_zip}", *common, "--trainer.max_epochs=1"])
    (run,) = (tmp_path / "runs" / "quick").glob("version_*")
    ckpt = run / "checkpoints" / "last.ckpt"

    def evaluate(command: str, *extra: str) -> None:
        main([command, "--config", QUICK, f"--ckpt_path={ckpt}", *common, *extra])

    evaluate("test")
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["test/n_images"] == 20 and metrics["test/n_skipped"] == 0
    summary = json.loads((run / "summary.json").read_text())["metrics"]
    assert summary["test_n_images"] == 20 and summary["test_n_skipped"] == 0

    split = list(csv.DictReader((run / "split.csv").open()))
    test_paths = [Path(r["path"]) for r in split if r["split"] == "test"]
    test_paths[0].unlink()  # 1 of 20 (5 %) is more than the default 1 %
    kept = {
        n: (run / n).read_bytes()
        for n in ("test_metrics.json", "summary.json", "misclassified.json")
    }
    capsys.readouterr()
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        line = fails(capsys, ["test", "--config", QUICK, f"--ckpt_path={ckpt}", *common])
    assert "test: 1 of 20 test images (5.0%) could not be read" in line
    assert "data.max_missing_fraction=0.01" in line
    assert {n: (run / n).read_bytes() for n in kept} == kept, "earlier results kept"

    with pytest.warns(UserWarning, match="skipping unreadable image"):
        evaluate("test", "--data.max_missing_fraction=0.1")
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["test/n_images"] == 19 and metrics["test/n_skipped"] == 1

    for p in test_paths[1:]:  # the data cache is gone
        p.unlink()
    kept = {n: (run / n).read_bytes() for n in kept}
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        line = fails(capsys, ["test", "--config", QUICK, f"--ckpt_path={ckpt}", *common])
    assert "test: none of the 20 test images could be read" in line
    assert {n: (run / n).read_bytes() for n in kept} == kept
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        line = fails(capsys, ["predict", "--config", QUICK, f"--ckpt_path={ckpt}", *common])
    assert "predict: none of the 20 test images could be read" in line
    assert not (run / "predictions.csv").exists()

    for r in split:
        if r["split"] == "val":
            Path(r["path"]).unlink()
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        line = fails(capsys, ["validate", "--config", QUICK, f"--ckpt_path={ckpt}", *common])
    assert "validate: none of the 16 validation images could be read" in line
