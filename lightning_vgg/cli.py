"""Command line: parses the command and dispatches it (fit, validate, test, predict and the rest).

The work happens elsewhere: :mod:`lightning_vgg.training` runs fit/validate/test/predict,
the other commands are functions whose typed arguments become flags. This module only
turns :class:`~lightning_vgg.errors.UserError` into ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lightning_vgg.errors import UserError
from lightning_vgg.parse_errors import OptionsError
from lightning_vgg.training import run_lightning


def function_command(
    fn: Callable[..., Any], name: str, multi: dict[str, str] | None = None
) -> Callable[[list[str]], None]:
    """A subcommand whose flags are ``fn``'s typed, documented arguments (jsonargparse).

    Options that do not parse raise :class:`~lightning_vgg.parse_errors.OptionsError`.

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
        try:
            cfg = parser.parse_args(argv)
        except argparse.ArgumentError as exc:
            # jsonargparse's message names the bad key; its usage dump would bury it.
            raise OptionsError(str(exc), name, flag_prefix="--") from exc
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
        run_lightning(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if isinstance(exc, OptionsError):
            print(exc.see_also, file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
