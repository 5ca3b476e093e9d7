"""The whole seed experiment in one call: fit and test the good and the broken model, then compare."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from lightning_vgg.checkpointing import find_last_checkpoint
from lightning_vgg.errors import UserError
from lightning_vgg.training import run_lightning

Checkpoint = Literal["best", "last"]


def _run_dir(save_dir: Path, name: str) -> Path:
    last = find_last_checkpoint(save_dir, name)
    if last is None:
        raise UserError(f"training wrote no checkpoint under {save_dir / name}")
    return last.parent.parent


def _fit_and_test(
    config: str, name: str, save_dir: Path, overrides: list[str], which: Checkpoint
) -> Path:
    """Fit one config into ``save_dir/name`` and test its ``best`` or ``last`` checkpoint.

    Raises:
        UserError: From either run (as :func:`~lightning_vgg.training.run_lightning`).
    """
    common = [
        f"--trainer.logger.init_args.save_dir={save_dir}",
        f"--trainer.logger.init_args.name={name}",
    ]
    run_lightning(["fit", "--config", config, *common, *overrides])
    run = _run_dir(save_dir, name)
    ckpt = run / "checkpoints" / f"{which}.ckpt"
    if not ckpt.is_file():  # no validation ran, so no best: the last one is all there is
        ckpt = run / "checkpoints" / "last.ckpt"
    test_overrides = [o for o in overrides if not o.startswith("--data.split_file")]
    run_lightning(["test", "--config", config, f"--ckpt_path={ckpt}", *common, *test_overrides])
    return ckpt


_DATA_KEYS = ("source", "split_file")


def _data_inputs(configs: list[str], overrides: list[str]) -> list[Path]:
    """The local data the runs read (sources, split files), from configs and overrides."""
    import yaml

    found: list[object] = []
    for config in configs:
        try:
            with open(config, encoding="utf-8") as handle:
                data = (yaml.safe_load(handle) or {}).get("data")
        except (OSError, yaml.YAMLError, AttributeError):
            continue  # fit reports it
        if isinstance(data, dict):
            data = data.get("init_args", data)
            found += [data.get(key) for key in _DATA_KEYS] if isinstance(data, dict) else []
    flags = {f"--data.{p}{key}" for key in _DATA_KEYS for p in ("", "init_args.")}
    for i, arg in enumerate(overrides):
        flag, eq, value = arg.partition("=")
        if flag in flags:
            found.append(value if eq else (overrides[i + 1] if i + 1 < len(overrides) else None))
    return [Path(f) for f in found if isinstance(f, str) and f and "://" not in f]


def run_experiment(
    good_config: str = "configs/seed.yaml",
    bad_config: str = "configs/control.yaml",
    overrides: list[str] | None = None,
    bad_overrides: list[str] | None = None,
    out: str = "runs/experiment",
    n_per_class: int = 100,
    show_per_class: int = 1,
    device: str = "auto",
    deletion_steps: int | None = None,
    deletion_baseline: Literal["zero", "blur", "gaussian", "mean"] = "zero",
    insertion_baseline: Literal["blur", "gaussian", "zero", "mean"] = "blur",
    faithfulness_layers: Literal["last", "all"] = "last",
    overwrite: bool = False,
    score: Literal["logit", "probability"] = "logit",
    baseline: Literal["blur", "gaussian", "zero", "mean"] | None = None,
    good_checkpoint: Checkpoint = "best",
    bad_checkpoint: Checkpoint = "last",
) -> Path:
    """Train the seed model and the flipped-label control, test both, compare them.

    The control is trained on the good run's own ``split.csv``, so both models are
    validated and tested on exactly the same images.

    Args:
        good_config: Config of the high-accuracy model (the seed).
        bad_config: Config of the low-accuracy control.
        overrides: CLI overrides applied to both runs, e.g.
            ``["--data.source=../shared/data/catsdogs-180px.zip"]``.
        bad_overrides: Overrides for the control only (e.g. the subset and label flip
            when ``bad_config`` is the same file as ``good_config``).
        out: Folder for both runs (``runs/good/``, ``runs/bad/``; new versions are
            added beside earlier ones) and the ``report/``, which is written as by
            ``compare --out``. Refused before training: the current directory, the home
            directory, and any folder that is or holds a config or the local data;
            also a ``report/`` that ``compare`` would refuse.
        n_per_class: Test images per class for the measures.
        show_per_class: Cats and dogs drawn in the report's figures.
        device: ``auto`` (GPU when there is one), ``cpu`` or ``cuda``.
        deletion_steps: Steps of the deletion/insertion curves; ``None``: RISE's one
            step per 224 pixels.
        deletion_baseline: What deleted pixels become (RISE: ``zero``).
        insertion_baseline: What insertion starts from (RISE: ``blur``).
        faithfulness_layers: Deletion/insertion for the ``last`` conv layer or ``all``.
        overwrite: Write the report into a ``report/`` holding other files, as
            ``compare --overwrite``: only the files of the previous report (listed
            in its manifest) are replaced or removed.
        score: What Grad-CAM differentiates: ``logit`` or ``probability`` (the seed's).
        baseline: Deprecated single baseline for both curves (see ``compare``).
        good_checkpoint: Which checkpoint of the good run is tested and compared:
            ``best`` by validation accuracy (default) or ``last``.
        bad_checkpoint: The same for the control. ``last`` by default: a control with
            flipped labels has a validation accuracy that is noise, so "best" would
            pick an arbitrary step (once the model after one step) while the curves
            shown are the last epoch's.

    Returns:
        The report folder.

    Raises:
        UserError: A bad config, override, input or output folder, from this function
            or from the runs it starts; never ``SystemExit``, so Python callers go on.
    """
    from lightning_vgg.fileio import check_output_dir, check_output_location
    from lightning_vgg.report.compare import REPORT_FILES, run_compare

    root = Path(out)
    inputs = [
        Path(good_config),
        Path(bad_config),
        *_data_inputs([good_config, bad_config], [*(overrides or []), *(bad_overrides or [])]),
    ]
    check_output_location(root, inputs)
    check_output_dir(root / "report", inputs, overwrite, "compare", REPORT_FILES)
    runs = root / "runs"
    shared = list(overrides or [])
    good = _fit_and_test(good_config, "good", runs, shared, good_checkpoint)
    split = good.parent.parent / "split.csv"
    bad = _fit_and_test(
        bad_config,
        "bad",
        runs,
        [*shared, *(bad_overrides or []), f"--data.split_file={split}"],
        bad_checkpoint,
    )
    return run_compare(
        good=str(good),
        bad=str(bad),
        out=str(root / "report"),
        n_per_class=n_per_class,
        show_per_class=show_per_class,
        device=device,
        deletion_steps=deletion_steps,
        deletion_baseline=deletion_baseline,
        insertion_baseline=insertion_baseline,
        faithfulness_layers=faithfulness_layers,
        score=score,
        baseline=baseline,
        overwrite=overwrite,
    )
