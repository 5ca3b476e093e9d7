"""Command line: LightningCLI (fit/validate/test/predict) plus explain, compare and experiment."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from lightning_vgg.callbacks import (
    FiniteLossGuard,
    MisclassificationGallery,
    PredictionCSV,
    RunArtifacts,
)
from lightning_vgg.checkpointing import (
    AtomicCheckpointIO,
    check_architecture,
    find_last_checkpoint,
    read_checkpoint,
    run_dir_of_checkpoint,
)
from lightning_vgg.data.datamodule import CatsDogsDataModule
from lightning_vgg.errors import UserError
from lightning_vgg.models.module import VGGClassifier


def function_command(
    fn: Callable[..., Any], name: str, multi: dict[str, str] | None = None
) -> Callable[[list[str]], None]:
    """A subcommand whose flags are ``fn``'s typed, documented arguments (jsonargparse).

    Args:
        fn: The function; its signature and docstring become the flags and help.
        name: Subcommand name, for ``--help``.
        multi: ``{argument: help}`` for list arguments given as ``--arg A B C``.
    """
    many = multi or {}

    def run(argv: list[str]) -> None:
        from jsonargparse import ArgumentParser

        parser = ArgumentParser(
            prog=f"lightning-vgg {name}", exit_on_error=False, default_env=False
        )
        parser.add_argument("--config", action="config", help="YAML file with these options")
        parser.add_function_arguments(fn, as_group=False, skip=set(many))
        for arg, text in many.items():
            parser.add_argument(f"--{arg}", nargs="+", default=None, help=text, metavar="PATH")
        cfg = parser.parse_args(argv)
        kwargs = {k: v for k, v in cfg.items() if k != "config" and not k.startswith("__")}
        fn(**kwargs)

    return run


def _explain(argv: list[str]) -> None:
    from lightning_vgg.explain.run import run_explain

    function_command(run_explain, "explain", {"images": "image files or folders"})(argv)


def _compare(argv: list[str]) -> None:
    from lightning_vgg.report.compare import run_compare

    function_command(run_compare, "compare")(argv)


def _experiment(argv: list[str]) -> None:
    from lightning_vgg.report.experiment import run_experiment

    function_command(run_experiment, "experiment")(argv)


#: Subcommands that are not LightningCLI's; each maps to ``fn(argv) -> None``.
EXTRA_COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "explain": _explain,
    "compare": _compare,
    "experiment": _experiment,
}


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` after every validation: what ``--ckpt_path last`` resumes from."""

    def __init__(self, every_n_epochs: int = 1) -> None:
        super().__init__(
            filename="last",
            monitor=None,
            save_top_k=1,
            every_n_epochs=every_n_epochs,
            enable_version_counter=False,
            # after RunArtifacts has recorded the epoch, so its state is saved too
            save_on_train_epoch_end=True,
        )


class FitConfigSaver(SaveConfigCallback):
    """Saves ``config.yaml`` for ``fit`` only, overwriting it when a run resumes."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


class VGGLightningCLI(LightningCLI):
    """LightningCLI with the project's defaults, links and run-directory handling."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.image_size", "model.input_size")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(RunArtifacts, "artifacts")
        parser.add_lightning_class_args(FiniteLossGuard, "finite_guard")
        parser.add_lightning_class_args(MisclassificationGallery, "gallery")
        parser.add_lightning_class_args(PredictionCSV, "predictions")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
                # ModelCheckpoint's save_last only copies when a top-k file is saved;
                # LastCheckpoint writes last.ckpt after every epoch instead.
                "checkpoint.save_last": False,
                "checkpoint.save_on_train_epoch_end": True,
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.enable_version_counter": False,
                "trainer.logger": {
                    "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "default"},
                },
                # KerasBatchSampler shards batches across ranks itself.
                "trainer.use_distributed_sampler": False,
            }
        )

    def _logger_args(self) -> Any:
        cfg = self.config[self.subcommand]
        logger = cfg.trainer.logger
        if logger is None or isinstance(logger, bool) or not hasattr(logger, "init_args"):
            return None
        return logger.init_args

    def before_instantiate_classes(self) -> None:
        """Resolve ``--ckpt_path last`` and point test/validate at the fit run."""
        cfg = self.config[self.subcommand]
        ckpt = cfg.get("ckpt_path")
        largs = self._logger_args()
        if self.subcommand == "fit" and ckpt == "last" and largs is not None:
            last = find_last_checkpoint(largs.save_dir, largs.name)
            if last is None:
                warnings.warn(
                    f"no last.ckpt under {Path(largs.save_dir) / largs.name}; starting a new run",
                    stacklevel=1,
                )
                cfg.ckpt_path = None
            else:
                cfg.ckpt_path = str(last)
                largs.version = run_dir_of_checkpoint(last).name
                print(f"resuming from {last}", file=sys.stderr)
        elif self.subcommand in ("test", "validate", "predict") and ckpt not in (
            None,
            "last",
            "best",
        ):
            ckpt_file = Path(ckpt)
            if not ckpt_file.is_file():
                raise UserError(f"checkpoint not found: {ckpt_file}")
            run_dir = run_dir_of_checkpoint(ckpt_file)
            split = run_dir / "split.csv"
            if cfg.data.split_file is None and split.is_file():
                cfg.data.split_file = str(split)
            if largs is not None and ckpt_file.parent.name == "checkpoints":
                largs.save_dir = str(run_dir.parent.parent)
                largs.name = run_dir.parent.name
                largs.version = run_dir.name
        self._check_output_folder()

    def _parse_ckpt_path(self) -> None:
        """Refuse a checkpoint of another architecture before LightningCLI adopts its hparams.

        LightningCLI overwrites ``--model.*`` with the checkpoint's hyperparameters,
        which would silently ignore a mismatch the user asked for.
        """
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and Path(str(ckpt)).is_file():
            hp = read_checkpoint(ckpt).get("hyper_parameters", {})
            check_architecture(hp, self.config[sub].model, ckpt)
        super()._parse_ckpt_path()

    def _check_output_folder(self) -> None:
        largs = self._logger_args()
        if largs is None:
            return
        folder = Path(largs.save_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise UserError(
                f"cannot write to the output folder {folder}: {exc.strerror or exc}"
            ) from exc

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Add atomic checkpoint writes unless the user configured their own IO."""
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins")
        if not plugins:
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        return super().instantiate_trainer(**kwargs)


def run_lightning(args: Sequence[str] | None) -> VGGLightningCLI:
    """Run a LightningCLI subcommand (fit, validate, test, predict)."""
    # main() passes args on purpose (tests, experiment); Lightning warns when sys.argv
    # also holds arguments, which is expected here.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return VGGLightningCLI(
        VGGClassifier,
        CatsDogsDataModule,
        seed_everything_default=42,
        save_config_callback=FitConfigSaver,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
        parser_kwargs={"prog": "lightning-vgg", "default_env": False, "exit_on_error": False},
        auto_configure_optimizers=False,
    )


def main(args: Sequence[str] | None = None) -> None:
    """The one entry point, used by ``lightning-vgg``, ``python -m`` and the tests.

    User errors (bad paths, data, checkpoints) print one ``error:`` line and exit 2.
    """
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            EXTRA_COMMANDS[argv[0]](argv[1:])
        else:
            run_lightning(None if args is None else argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except argparse.ArgumentError as exc:
        # jsonargparse's message names the bad key; its usage dump would bury it.
        command = argv[0] if argv and not argv[0].startswith("-") else ""
        print(f"error: {exc}", file=sys.stderr)
        print(f"(see: lightning-vgg {command} --help)".replace("  ", " "), file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
