"""Command line: LightningCLI (fit/validate/test/predict) plus explain, compare and experiment."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
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
from lightning_vgg.checks import RANGE_TYPES, describe_range
from lightning_vgg.data.datamodule import CatsDogsDataModule
from lightning_vgg.errors import UserError
from lightning_vgg.models.module import VGGClassifier
from lightning_vgg.runlock import RunLock, claim_new_version, command_line


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
        try:
            super().__init__(*args, **kwargs)
        finally:
            if self.run_lock is not None:
                self.run_lock.release()

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
            largs.version = claim_new_version(root).name
        run_dir = root / (
            largs.version if isinstance(largs.version, str) else f"version_{largs.version}"
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_lock = RunLock(run_dir, command_line()).acquire()

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last``, then check the checkpoint before anything uses it.

        Runs before LightningCLI adopts the checkpoint's hyperparameters (which would
        silently override a different ``--model.*``) and before any file is written:
        a checkpoint of another architecture, one that cannot be read, or a resume
        whose split settings differ from the run's stops here with one ``error:``.
        """
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
        super()._parse_ckpt_path()

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


#: Every command, with the line ``lightning-vgg --help`` shows for it.
COMMANDS: dict[str, str] = {
    "fit": "train a model; writes checkpoints, metrics.csv, history.png and summary.{json,md}",
    "validate": "evaluate a checkpoint (--ckpt_path) on the validation split",
    "test": "evaluate a checkpoint (--ckpt_path) on the test split; writes test_metrics.json",
    "predict": "write predictions.csv for the test split from a checkpoint (--ckpt_path)",
    "explain": "feature maps and Grad-CAM of every layer for some images, from a checkpoint",
    "compare": "compare a good and a broken checkpoint layer by layer in one report",
    "experiment": "train the seed model and the control, test both and compare them",
}
#: Commands that evaluate a checkpoint and refuse to run without one.
EVAL_COMMANDS = ("validate", "test", "predict")
#: The opt-in for evaluating untrained weights; main() strips it before LightningCLI.
ALLOW_UNTRAINED = "--allow_untrained"
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def version() -> str:
    """The installed package's version, else ``lightning_vgg.__version__``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("lightning_vgg")
    except PackageNotFoundError:
        import lightning_vgg

        return lightning_vgg.__version__


def top_level_help() -> str:
    """``lightning-vgg --help``: every command with one line each."""
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
    return (
        "usage: lightning-vgg [-h] [--version] COMMAND [options]\n\n"
        "The Keras VGG16-BN Cats-vs-Dogs experiment, rebuilt in PyTorch Lightning.\n\n"
        f"commands:\n{rows}\n\n"
        "`lightning-vgg COMMAND --help` lists a command's options.\n"
    )


def _unknown_command(name: str) -> UserError:
    close = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return UserError(
        f"unknown command '{name}'{hint} (commands: {', '.join(COMMANDS)}; "
        "see: lightning-vgg --help)"
    )


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


# jsonargparse's union/subclass dumps: lines that explain the structure, not the problem
_NOISE = re.compile(
    r"(Does not validate against any of the Union subtypes|Subtypes: .*|Errors:"
    r"|Given value type: .*|Given value: .*|Expected a <class 'NoneType'>"
    r"|Not a valid subclass of .*|Subclass types expect one of:|a (class path|dict) .*)"
)


def one_line(message: str, flag_prefix: str = "") -> str:
    """jsonargparse's (often multi-line) parse error as its most specific sentence.

    ``Parser key "K":`` plus a dump of every union member's failure becomes
    ``K: <the deepest message>`` (with the class_path it concerns); a value outside
    a range type becomes ``K must be <range>, got <value>``. ``flag_prefix`` goes
    before ``K`` (``--`` for the function commands, whose keys are bare names).
    """
    lines = [ln.rstrip() for ln in str(message).splitlines() if ln.strip()]
    if len(lines) <= 1:
        return " ".join(lines)
    head = re.fullmatch(r'Parser key "(.+)":', lines[0].strip())
    key = flag_prefix + head.group(1) if head else None
    body = lines[1:] if head else lines
    given = None
    for ln in body:
        if ln.strip().startswith("Given value: "):
            given = ln.strip()[len("Given value: ") :]
    for ln in body:
        m = re.search(r"Not of type (\w+): (.*)", ln)
        if m and m.group(1) in RANGE_TYPES:
            bad = re.match(r"(.*?) ?does not conform|invalid literal .*: (.+)$", m.group(2))
            value = given if given is not None else (bad and (bad.group(1) or bad.group(2)))
            text = f"must be {describe_range(RANGE_TYPES[m.group(1)])}"
            text += f", got {value}" if value else f" ({m.group(2)})"
            return f"{key} {text}" if key else text
    leaves: list[tuple[int, str, str | None]] = []
    context: tuple[int, str] | None = None
    for ln in body:
        indent = len(ln) - len(ln.lstrip())
        text = ln.strip().removeprefix("- ")
        if context is not None and indent <= context[0]:
            context = None
        cp = re.fullmatch(r"Problem with given class_path '(.+)':", text)
        if cp:
            context = (indent, cp.group(1))
        elif not text.endswith(":") and not _NOISE.fullmatch(text):
            leaves.append((indent, text, context[1] if context else None))
    if not leaves:
        return " ".join(ln.strip() for ln in lines)
    _, text, where = max(leaves, key=lambda leaf: leaf[0])  # the first of the deepest
    if where:
        text += f" ({where})"
    elif given and given not in text and len(given) <= 80:
        text += f"; given: {given}"
    return f"{key}: {text}" if key else text


def main(args: Sequence[str] | None = None) -> None:
    """The one entry point, used by ``lightning-vgg``, ``python -m`` and the tests.

    User errors (bad paths, data, checkpoints, options) print one ``error:`` line and
    exit 2; ``--help`` lists the commands, ``--version`` prints the version.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(top_level_help(), end="")
        if not argv:
            print("error: a command is needed", file=sys.stderr)
            raise SystemExit(2)
        return
    if argv[0] == "--version":
        print(f"lightning-vgg {version()}")
        return
    try:
        if argv[0] in EXTRA_COMMANDS:
            EXTRA_COMMANDS[argv[0]](argv[1:])
            return
        if not argv[0].startswith("-") and argv[0] not in COMMANDS:
            raise _unknown_command(argv[0])
        if argv[0] in EVAL_COMMANDS:
            rest = require_checkpoint(argv[0], argv[1:])
            if rest != argv[1:]:
                argv, args = [argv[0], *rest], argv
        run_lightning(None if args is None else argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except argparse.ArgumentError as exc:
        # jsonargparse's message names the bad key; its usage dump would bury it.
        command = argv[0] if argv and not argv[0].startswith("-") else ""
        prefix = "--" if command in EXTRA_COMMANDS else ""
        print(f"error: {one_line(str(exc), prefix)}", file=sys.stderr)
        print(f"(see: lightning-vgg {command} --help)".replace("  ", " "), file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
