"""Training orchestration: LightningCLI (fit/validate/test/predict) with the project's rules.

:func:`run_lightning` is the API for running those commands from Python (the CLI and
``experiment`` use it): it takes LightningCLI-style arguments (``--config`` YAML files
plus ``--key=value`` overrides) and raises :class:`~lightning_vgg.errors.UserError`
for anything a user can fix; only ``lightning_vgg.cli.main`` turns that into an exit.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from lightning_vgg.callbacks import (
    FiniteLossGuard,
    MisclassificationGallery,
    PredictionCSV,
    RunArtifacts,
    StopWhenDataRunsOut,
)
from lightning_vgg.checkpointing import (
    AtomicCheckpointIO,
    check_architecture,
    check_split_settings,
    find_last_checkpoint,
    read_checkpoint,
    run_dir_of_checkpoint,
)
from lightning_vgg.data.datamodule import CatsDogsDataModule
from lightning_vgg.errors import UserError
from lightning_vgg.models.module import VGGClassifier
from lightning_vgg.parse_errors import OptionsError
from lightning_vgg.runlock import RunLock, claim_new_version, command_line, forget_if_empty

#: Commands that evaluate a checkpoint and refuse to run without one.
EVAL_COMMANDS = ("validate", "test", "predict")
#: The opt-in for evaluating untrained weights; stripped before LightningCLI sees it.
ALLOW_UNTRAINED = "--allow_untrained"
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


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
    """Saves ``config.yaml`` for ``fit`` only, once training starts.

    Writing at ``on_train_start`` (after the checkpoint of a resume has loaded into
    the model) means a resume that fails to load leaves the run's config as it was.
    A successful resume overwrites it with the config it continued under.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Nothing yet: see ``on_train_start``."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().setup(trainer, pl_module, "fit")


#: Data settings that decide the pixels a model sees at evaluation.
PREPROCESS_KEYS = ("image_size", "resize", "rescale", "augment_backend")


def adopt_preprocessing(ckpt_data: Any, data: Any, path: str) -> None:
    """Evaluate a checkpoint on the pixels it was trained on, as ``explain`` does.

    ``validate``/``test``/``predict`` build their data module from the config; a
    checkpoint trained with ``resize: bilinear`` and tested under a config saying
    ``nearest`` would score other pixels than ``explain`` explains. LightningCLI
    adopts the checkpoint's model hyperparameters the same way.
    """
    if not isinstance(ckpt_data, dict):
        return
    changed = []
    for key in PREPROCESS_KEYS:
        if key in ckpt_data and key in data and data[key] != ckpt_data[key]:
            changed.append(f"{key}={ckpt_data[key]!r} (config: {data[key]!r})")
            data[key] = ckpt_data[key]
    if changed:
        warnings.warn(
            f"evaluating {path} with the preprocessing it was trained with: " + ", ".join(changed),
            UserWarning,
            stacklevel=2,
        )


class VGGLightningCLI(LightningCLI):
    """LightningCLI with the project's defaults, links and run-directory handling."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.image_size", "model.input_size")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(RunArtifacts, "artifacts")
        parser.add_lightning_class_args(FiniteLossGuard, "finite_guard")
        parser.add_lightning_class_args(StopWhenDataRunsOut, "data_runs_out")
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
        return self._logger_args_of(self.config[self.subcommand])

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.run_lock: RunLock | None = None
        self._resume_dir: Path | None = None
        self._claimed: Path | None = None
        try:
            super().__init__(*args, **kwargs)
        finally:
            if self.run_lock is not None:
                self.run_lock.release()
            forget_if_empty(self._claimed)

    def before_instantiate_classes(self) -> None:
        """Point test/validate/predict at the fit run; claim and lock the run folder."""
        cfg = self.config[self.subcommand]
        ckpt = cfg.get("ckpt_path")
        largs = self._logger_args()
        if self.subcommand == "fit" and self._resume_dir is not None and largs is not None:
            largs.version = self._resume_dir.name
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
        self._own_run_folder(largs)

    def _own_run_folder(self, largs: Any) -> None:
        """Claim a fresh ``version_N`` atomically and hold its lock until this command ends.

        Only the process of global rank 0 claims and locks: under DDP the other
        ranks write nothing there, and Lightning broadcasts rank 0's folder to them.
        """
        fast_dev_run = self.config[self.subcommand].trainer.get("fast_dev_run")
        if largs is None or fast_dev_run or rank_zero_only.rank != 0:
            return  # fast_dev_run: Lightning swaps the logger for a dummy that writes nothing
        root = Path(largs.save_dir) / str(largs.name or "default")
        if largs.version is None:
            self._claimed = claim_new_version(root)
            largs.version = self._claimed.name
        run_dir = root / (
            largs.version if isinstance(largs.version, str) else f"version_{largs.version}"
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_lock = RunLock(run_dir, command_line()).acquire()

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then resolve ``--ckpt_path last`` and check the checkpoint before use.

        This public hook is the last one before LightningCLI adopts the checkpoint's
        hyperparameters (its private ``_parse_ckpt_path``, which would silently
        override a different ``--model.*``); ``before_instantiate_classes`` runs after
        that adoption, when the user's ``--model.*`` can no longer be compared with the
        checkpoint. It also runs before any file is written: a checkpoint of another
        architecture, one that cannot be read, or a resume whose split settings differ
        from the run's stops here with one ``error:``.
        """
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        if sub == "fit" and cfg.get("ckpt_path") == "last":
            self._resolve_last(cfg)
        ckpt = cfg.get("ckpt_path")
        if ckpt and Path(str(ckpt)).is_file():
            raw = read_checkpoint(ckpt)
            check_architecture(raw.get("hyper_parameters", {}), cfg.model, ckpt)
            if sub == "fit":
                check_split_settings(raw.get("datamodule_hyper_parameters"), cfg.data, ckpt)
            else:
                adopt_preprocessing(raw.get("datamodule_hyper_parameters"), cfg.data, ckpt)

    def _resolve_last(self, cfg: Any) -> None:
        largs = self._logger_args_of(cfg)
        last = None if largs is None else find_last_checkpoint(largs.save_dir, largs.name)
        if last is None:
            where = "the run" if largs is None else Path(largs.save_dir) / str(largs.name)
            warnings.warn(f"no last.ckpt under {where}; starting a new run", stacklevel=1)
            cfg.ckpt_path = None
            return
        cfg.ckpt_path = str(last)
        self._resume_dir = run_dir_of_checkpoint(last)
        print(f"resuming from {last}", file=sys.stderr)

    @staticmethod
    def _logger_args_of(cfg: Any) -> Any:
        logger = cfg.trainer.logger
        if logger is None or isinstance(logger, bool) or not hasattr(logger, "init_args"):
            return None
        return logger.init_args

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
        trainer = self.config_init[self.subcommand].get("trainer")
        if not (trainer is not None and trainer.get("plugins")):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        return super().instantiate_trainer(**kwargs)


def run_lightning(args: Sequence[str] | None = None) -> VGGLightningCLI:
    """Run a LightningCLI command (fit, validate, test, predict) to its end.

    Args:
        args: The command and its options, as on the command line (``["fit",
            "--config", "configs/seed.yaml", "--trainer.max_epochs=2"]``); ``None``
            reads ``sys.argv[1:]``. ``validate``/``test``/``predict`` go through
            :func:`require_checkpoint` first.

    Returns:
        The finished CLI object (its ``trainer``, ``model`` and ``datamodule``).

    Raises:
        UserError: Anything the user can fix; options that do not parse raise its
            subclass :class:`~lightning_vgg.parse_errors.OptionsError`.
    """
    argv = list(sys.argv[1:] if args is None else args)
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    if command in EVAL_COMMANDS:
        argv = [command, *require_checkpoint(command, argv[1:])]
    # args are passed on purpose (tests, experiment); Lightning warns when sys.argv
    # also holds arguments, which is expected here.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        return VGGLightningCLI(
            VGGClassifier,
            CatsDogsDataModule,
            seed_everything_default=42,
            save_config_callback=FitConfigSaver,
            save_config_kwargs={"overwrite": True},
            args=argv,
            parser_kwargs={"prog": "lightning-vgg", "default_env": False, "exit_on_error": False},
            auto_configure_optimizers=False,
        )
    except argparse.ArgumentError as exc:
        # jsonargparse's message names the bad key; its usage dump would bury it.
        raise OptionsError(str(exc), command) from exc


def _ckpt_in_config(value: str) -> str | bool | None:
    """``ckpt_path`` of a ``--config`` file; False when the file says nothing about it,
    True when it cannot be read (LightningCLI then reports the problem itself)."""
    import yaml

    try:
        data = yaml.safe_load(Path(value).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return True
    if not isinstance(data, dict) or "ckpt_path" not in data:
        return False
    return None if data["ckpt_path"] is None else str(data["ckpt_path"])


def require_checkpoint(command: str, args: list[str]) -> list[str]:
    """Refuse ``validate``/``test``/``predict`` without a checkpoint, before any work.

    Without ``--ckpt_path`` (as a flag or a top-level key of a ``--config`` file) they
    would evaluate random weights and report chance accuracy as a result. The opt-in
    ``--allow_untrained [true|false]`` allows that; it is removed from the returned
    arguments, which go to LightningCLI.

    Raises:
        UserError: No checkpoint and no opt-in.
    """
    allow, kept, i = False, [], 0
    while i < len(args):
        arg = args[i]
        if arg == ALLOW_UNTRAINED:
            nxt = args[i + 1].lower() if i + 1 < len(args) else ""
            allow = _BOOLS.get(nxt, True)
            i += 2 if nxt in _BOOLS else 1
            continue
        if arg.startswith(ALLOW_UNTRAINED + "="):
            value = arg.split("=", 1)[1].lower()
            if value not in _BOOLS:
                raise UserError(f"{ALLOW_UNTRAINED} takes true or false, got {value!r}")
            allow = _BOOLS[value]
        else:
            kept.append(arg)
        i += 1
    if allow or any(a in ("-h", "--help") or a.startswith("--print_config") for a in kept):
        return kept
    ckpt: str | bool | None = None  # later flags and files override earlier ones
    for j, arg in enumerate(kept):
        name, eq, value = arg.partition("=")
        if not eq:
            value = kept[j + 1] if j + 1 < len(kept) else ""
        if name == "--ckpt_path":
            ckpt = value
        elif name in ("--config", "-c"):
            found = _ckpt_in_config(value)
            if found is not False:
                ckpt = found
    if ckpt is True or (isinstance(ckpt, str) and ckpt.strip().lower() not in ("", "null", "none")):
        return kept
    raise UserError(
        f"{command} needs --ckpt_path (a checkpoint written by fit); without one it would "
        f"evaluate untrained weights: pass {ALLOW_UNTRAINED} true to do that on purpose"
    )
