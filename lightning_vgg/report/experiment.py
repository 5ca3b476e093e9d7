"""The whole seed experiment in one call: fit and test the good and the broken model, then compare."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from lightning_vgg.checkpointing import find_last_checkpoint
from lightning_vgg.errors import UserError


def _run_dir(save_dir: Path, name: str) -> Path:
    last = find_last_checkpoint(save_dir, name)
    if last is None:
        raise UserError(f"training wrote no checkpoint under {save_dir / name}")
    return last.parent.parent


def _fit_and_test(config: str, name: str, save_dir: Path, overrides: list[str]) -> Path:
    """Fit one config into ``save_dir/name`` and test its best checkpoint."""
    from lightning_vgg.cli import main

    common = [
        f"--trainer.logger.init_args.save_dir={save_dir}",
        f"--trainer.logger.init_args.name={name}",
    ]
    main(["fit", "--config", config, *common, *overrides])
    run = _run_dir(save_dir, name)
    best = run / "checkpoints" / "best.ckpt"
    ckpt = best if best.is_file() else run / "checkpoints" / "last.ckpt"
    test_overrides = [o for o in overrides if not o.startswith("--data.split_file")]
    main(["test", "--config", config, f"--ckpt_path={ckpt}", *common, *test_overrides])
    return ckpt


def run_experiment(
    good_config: str = "configs/seed.yaml",
    bad_config: str = "configs/control.yaml",
    overrides: list[str] | None = None,
    bad_overrides: list[str] | None = None,
    out: str = "runs/experiment",
    n_per_class: int = 100,
    show_per_class: int = 1,
    device: str = "auto",
    deletion_steps: int = 16,
    baseline: Literal["blur", "zero", "mean"] = "blur",
    faithfulness_layers: Literal["last", "all"] = "last",
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
        out: Folder for both runs (``good/``, ``bad/``) and the ``report/``.
        n_per_class: Test images per class for the measures.
        show_per_class: Cats and dogs drawn in the report's figures.
        device: ``auto`` (GPU when there is one), ``cpu`` or ``cuda``.
        deletion_steps: Steps of the deletion/insertion curves.
        baseline: What deleted pixels become.
        faithfulness_layers: Deletion/insertion for the ``last`` conv layer or ``all``.

    Returns:
        The report folder.
    """
    from lightning_vgg.report.compare import run_compare

    root = Path(out)
    runs = root / "runs"
    shared = list(overrides or [])
    good = _fit_and_test(good_config, "good", runs, shared)
    split = good.parent.parent / "split.csv"
    bad = _fit_and_test(
        bad_config, "bad", runs, [*shared, *(bad_overrides or []), f"--data.split_file={split}"]
    )
    return run_compare(
        good=str(good),
        bad=str(bad),
        out=str(root / "report"),
        n_per_class=n_per_class,
        show_per_class=show_per_class,
        device=device,
        deletion_steps=deletion_steps,
        baseline=baseline,
        faithfulness_layers=faithfulness_layers,
    )
