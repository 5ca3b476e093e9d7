"""One run folder, one owner: claim a fresh ``version_N`` atomically and lock it for a fit's life.

TensorBoard's logger picks ``version_N`` by listing the folder, so two fits started
together took the same number and wrote into one folder (one run's checkpoints
beside another run's ``split.csv``). Here a fresh run claims its folder with
``mkdir`` (which fails if the folder exists, atomically, on every local file system)
and every fit, fresh or resumed, holds an exclusive ``flock`` on ``.lock`` inside
it until it ends. The kernel drops the lock when the process dies, so a killed run
never leaves a stale lock behind; the file's text only says who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import IO

from lightning_vgg.errors import UserError

LOCK_NAME = ".lock"
_VERSION = re.compile(r"version_(\d+)$")


def claim_new_version(root: Path) -> Path:
    """Create and return the next free ``root/version_N``; never one another process made."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write to the output folder {root}: {exc.strerror or exc}") from exc
    taken = [int(m.group(1)) for p in root.iterdir() if (m := _VERSION.match(p.name))]
    n = max(taken, default=-1) + 1
    while True:
        folder = root / f"version_{n}"
        try:
            folder.mkdir()
        except FileExistsError:
            n += 1  # another fit claimed it between our listing and our mkdir
            continue
        except OSError as exc:
            raise UserError(
                f"cannot create the run folder {folder}: {exc.strerror or exc}"
            ) from exc
        return folder


def forget_if_empty(folder: Path | None) -> None:
    """Remove a run folder this process claimed if the command wrote nothing into it.

    A command that fails before training (a missing data source, say) would otherwise
    leave an empty ``version_N`` behind, and the next fit would skip its number. Only
    the folder and our own ``.lock`` go; any other file keeps the folder.
    """
    if folder is None or not folder.is_dir():
        return
    with contextlib.suppress(OSError):
        if {p.name for p in folder.iterdir()} <= {LOCK_NAME}:
            (folder / LOCK_NAME).unlink(missing_ok=True)
            folder.rmdir()


class RunLock:
    """An exclusive, process-lifetime lock on a run folder.

    Args:
        run_dir: The run folder (``runs/<name>/version_N``).
        command: What holds it, for the message a second fit prints.
    """

    def __init__(self, run_dir: Path, command: str) -> None:
        self.run_dir = run_dir
        self.command = command
        self._handle: IO[str] | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise ``UserError`` naming the process that holds it."""
        path = self.run_dir / LOCK_NAME
        try:
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the run's life)
        except OSError as exc:
            raise UserError(
                f"cannot lock the run folder {self.run_dir}: {exc.strerror or exc}"
            ) from exc
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _describe(handle.read())
            handle.close()
            raise UserError(
                f"run folder {self.run_dir} is in use by {holder}; wait for it to finish, "
                "or train into another run name (--trainer.logger.init_args.name)"
            ) from None
        handle.seek(0)
        handle.truncate()
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        handle.write(json.dumps(info) + "\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        """Drop the lock (the file stays; its text is stale but harmless)."""
        if self._handle is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(text: str) -> str:
    try:
        info = json.loads(text.strip().splitlines()[-1])
        return f"process {info['pid']} on {info['host']} ({info['command']}, since {info['since']})"
    except (ValueError, IndexError, KeyError, TypeError):
        return "another process"


def command_line() -> str:
    """This process's command, for the lock file."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]
