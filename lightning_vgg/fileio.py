"""Atomic file writing: results appear complete or not at all."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from lightning_vgg.errors import UserError

#: The process's umask, once read (see :func:`_umask`); tests may set it directly.
_UMASK: int | None = None
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask, read on first use and kept.

    ``os.umask`` can only be read by setting it, so the read sets 0 and puts the old
    value back; the lock keeps two threads from reading each other's 0, and the
    read happens once, not at import and not per file.
    """
    global _UMASK
    with _UMASK_LOCK:
        if _UMASK is None:
            current = os.umask(0)
            os.umask(current)
            _UMASK = current
        return _UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    Writing beside the target keeps the rename on one file system, so it is atomic:
    a reader (or a later run) sees the old file or the new one, never half of one.
    On any exception the temporary file is removed and the target is untouched.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise UserError(f"cannot write to {target.parent}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes 0600 files; give results the usual umask-based mode.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {target}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` when closed cleanly."""
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
        kwargs.setdefault("newline", "" if path.__str__().endswith(".csv") else None)
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=False, allow_nan=False)
        handle.write("\n")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` as UTF-8, atomically."""
    with atomic_open(path) as handle:
        handle.write(text)


def write_csv(
    path: str | os.PathLike[str], header: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """Write a CSV with a header row, atomically."""
    with atomic_open(path) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


#: zlib level of saved PNGs (1 = fastest; matplotlib's default is 6).
PNG_COMPRESS_LEVEL = 1


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 100) -> Path:
    """Save a matplotlib figure atomically and close it.

    Rendering and PNG compression dominate ``explain`` (41 figures per image), so
    figures with a layout engine (already tight) skip ``bbox_inches="tight"``, which
    renders the figure twice, and PNGs use zlib level 1: several times faster to
    encode than the default 6, for files about a quarter larger.

    Returns:
        The final path, so callers can list what they wrote.
    """
    import matplotlib.pyplot as plt

    target = Path(path)
    fmt = target.suffix.lstrip(".").lower() or "png"
    extra: dict[str, Any] = {}
    if fig.get_layout_engine() is None:
        extra["bbox_inches"] = "tight"
    if fmt == "png":
        extra["pil_kwargs"] = {"compress_level": PNG_COMPRESS_LEVEL}
    try:
        with atomic_path(target) as tmp:
            fig.savefig(tmp, dpi=dpi, format=fmt, **extra)
    finally:
        plt.close(fig)
    return target


# --------------------------------------------------------------------------- output folders

#: The file that marks a folder as written by this tool and lists what it wrote there.
MANIFEST = ".lightning_vgg-manifest.json"
TOOL = "lightning-vgg"


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of an output folder, or ``None`` if it has none (or not ours).

    Only safe entries survive in ``files``: relative POSIX paths without ``..``, so
    a hand-edited manifest can never point outside its folder.
    """
    try:
        with open(Path(folder) / MANIFEST, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("tool") != TOOL:
        return None
    files = data.get("files")
    data["files"] = sorted({f for f in files if _safe_rel(f)} if isinstance(files, list) else set())
    return data


def _safe_rel(rel: Any) -> bool:
    if not isinstance(rel, str) or not rel or rel == MANIFEST or "\\" in rel or "\0" in rel:
        return False
    parts = rel.split("/")
    return not rel.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _holds(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_output_location(
    path: str | os.PathLike[str], protected: Sequence[str | os.PathLike[str]] = ()
) -> None:
    """Refuse output folders that could hold a user's own files or this command's inputs.

    Refused: the current directory (``--out .``) or one of its ancestors, the home
    directory or one of its ancestors (so the filesystem root), something that is not
    a folder, and any folder equal to or an ancestor of a ``protected`` path (the
    checkpoint, its run folder, the data, the images read). A folder inside one of
    them is fine.

    Raises:
        UserError: Naming the folder and why.
    """
    given = Path(path)
    where = given.resolve()
    if where == Path(where.anchor):
        raise UserError(f"refusing to write into {given}: it is the filesystem root")
    places = [(Path.cwd().resolve(), "the current directory")]
    with contextlib.suppress(RuntimeError, KeyError):
        places.append((Path.home().resolve(), "your home directory"))
    for place, what in places:
        if _holds(where, place):
            kind = "is" if where == place else "holds"
            raise UserError(
                f"refusing to write into {given}: it {kind} {what} ({place}); "
                "give --out a folder of its own, e.g. --out results"
            )
    inputs = [(raw, Path(raw).resolve()) for raw in protected]
    hit = next((raw for raw, p in inputs if where == p), None)
    kind = "is" if hit is not None else "holds"
    hit = hit if hit is not None else next((raw for raw, p in inputs if _holds(where, p)), None)
    if hit is not None:
        raise UserError(
            f"refusing to write into {given}: it {kind} {hit}, an input of this command; "
            "give --out a folder of its own"
        )
    if os.path.lexists(where) and not where.is_dir():
        raise UserError(f"--out {given} exists and is not a folder")


def check_output_dir(
    path: str | os.PathLike[str],
    protected: Sequence[str | os.PathLike[str]] = (),
    overwrite: bool = False,
    command: str | None = None,
    writes: Sequence[str] = (),
) -> None:
    """Refuse, before any work, an output folder the command must not write into.

    Besides :func:`check_output_location`: without ``overwrite`` the folder must not
    exist, be empty, or hold only files this tool listed in its manifest (then
    earlier results of the same ``command`` are replaced). ``overwrite`` allows a
    folder with other files, or another command's results: the files of the
    previous manifest are replaced or removed, everything else is kept. Even then a
    file of ``writes`` (names the command always writes) that the tool did not write
    is refused, since it would be replaced.

    Raises:
        UserError: Naming the folder and the ``--overwrite`` flag.
    """
    check_output_location(path, protected)
    given, where = Path(path), Path(path).resolve()
    if not where.is_dir():
        return
    manifest = read_manifest(where)
    owned = set(manifest["files"]) if manifest else set()
    if overwrite:
        clash = [n for n in writes if n not in owned and os.path.lexists(where / n)]
        if clash:
            raise UserError(
                f"output folder {given} already holds {', '.join(clash)}, not written by "
                f"{TOOL}; even with --overwrite only files listed in its {MANIFEST} are "
                "replaced: move them away or choose another --out"
            )
        return
    foreign = _first_foreign(where, owned)
    if foreign is not None and manifest is None:
        raise UserError(
            f"output folder {given} is not empty and was not written by {TOOL} (it has no "
            f"{MANIFEST}; e.g. {foreign}): choose a new or empty folder, or pass "
            f"--overwrite true to add the results to it (files {TOOL} did not write are "
            "never replaced or deleted)"
        )
    if foreign is not None:
        raise UserError(
            f"output folder {given} holds files {TOOL} did not write there (e.g. {foreign}): "
            "pass --overwrite true to replace its earlier results and keep those files, "
            "or choose another --out"
        )
    earlier = manifest.get("command") if manifest else None
    if command is not None and earlier not in (None, command):
        raise UserError(
            f"output folder {given} holds the results of `{TOOL} {earlier}`; pass "
            f"--overwrite true to replace them with this {command}, or choose another --out"
        )


def _first_foreign(folder: Path, owned: set[str]) -> str | None:
    """The first file (or link) under ``folder`` that is neither owned nor the manifest."""
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        for name in sorted(files) + sorted(d for d in dirs if os.path.islink(Path(root) / d)):
            rel = (base / name).as_posix()
            if rel != MANIFEST and rel not in owned:
                return rel
        dirs.sort()
    return None


@contextlib.contextmanager
def output_dir(path: str | os.PathLike[str], command: str) -> Iterator[Path]:
    """Build an output folder's files beside ``path``, then move them in with a manifest.

    The files are written into a staging folder beside ``path`` (removed on any
    error, leaving ``path`` as it was). When the block ends cleanly, a new folder is
    renamed into place whole, manifest included. Into an existing folder the files
    move one by one, following the manifest (:data:`MANIFEST`): first a manifest
    marked incomplete that lists the old and new files (so an interrupted move can
    be finished by a rerun), the old top-level files (``explain.json``,
    ``report.html``) are removed, the new files move in deepest first so the
    top-level ones arrive last, the previous run's other files are removed, and a
    complete manifest of the new files is written last. Files the tool did not list
    are never replaced or deleted: a new file whose place one of them holds is
    refused before anything moves. Folders and files follow the umask.

    Commands call :func:`check_output_dir` before their work; only
    :func:`check_output_location` is repeated here, so a file that appears in the
    folder during a long run (a file manager's ``.DS_Store``) does not throw the
    work away: it is simply kept.

    Args:
        path: The output folder.
        command: The subcommand, recorded in the manifest.

    Raises:
        UserError: The folder is refused, cannot be written, or a file the tool did
            not write stands where a new one goes.
    """
    check_output_location(path)
    given = Path(path)
    target = given.resolve()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(
            tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        )
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
    except OSError as exc:
        raise UserError(f"cannot write to {target.parent}: {exc.strerror or exc}") from exc
    moving = False
    try:
        yield stage
        files = sorted(
            p.relative_to(stage).as_posix()
            for p in stage.rglob("*")
            if p.is_file() or p.is_symlink()
        )
        record = {"tool": TOOL, "command": command, "complete": True, "files": files}
        if not os.path.lexists(target):
            write_json(stage / MANIFEST, record)
            try:
                os.rename(stage, target)
                return
            except OSError:  # created meanwhile: move the files in instead
                (stage / MANIFEST).unlink()
        moving = True
        _move_in(stage, target, files, record)
    except OSError as exc:
        state = f"; {given} is incomplete: run the command again" if moving else ""
        raise UserError(f"cannot write {given}: {exc.strerror or exc}{state}") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _move_in(stage: Path, target: Path, files: list[str], record: dict[str, Any]) -> None:
    """Move staged ``files`` into the existing folder ``target`` (see :func:`output_dir`)."""
    old = read_manifest(target)
    owned = set(old["files"]) if old else set()
    obstacles: set[str] = set()  # owned files where a new file needs a folder
    clash: list[str] = []
    for rel in files:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            sub = "/".join(parts[:i])
            p = target / sub
            if not os.path.lexists(p):
                break
            if os.path.islink(p) or not p.is_dir():
                if sub in owned:
                    obstacles.add(sub)
                else:
                    clash.append(sub)
                break
        p = target / rel
        if os.path.lexists(p) and (rel not in owned or (p.is_dir() and not p.is_symlink())):
            clash.append(rel)
    if clash:
        listed = ", ".join(sorted(set(clash))[:5]) + (" ..." if len(set(clash)) > 5 else "")
        raise UserError(
            f"cannot write {target}: {listed} there {'is' if len(clash) == 1 else 'are'} not "
            f"listed in its {MANIFEST} and would be replaced; --overwrite never replaces such "
            "files: move them away or choose another --out"
        )
    new = set(files)
    write_json(target / MANIFEST, {**record, "complete": False, "files": sorted(owned | new)})
    for rel in sorted(obstacles | {f for f in owned if "/" not in f}):
        _remove_owned(target, rel)
    for rel in sorted(files, key=lambda f: (-f.count("/"), f)):
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / rel, target / rel)
    for rel in sorted(owned - new):
        _remove_owned(target, rel)
    write_json(target / MANIFEST, record)


def _remove_owned(target: Path, rel: str) -> None:
    """Delete a file the manifest lists, never through a link, then its emptied folders."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        if os.path.islink(target / "/".join(parts[:i])):
            return
    p = target / rel
    if not os.path.lexists(p) or (p.is_dir() and not p.is_symlink()):
        return
    p.unlink()
    for i in range(len(parts) - 1, 0, -1):
        try:
            (target / "/".join(parts[:i])).rmdir()
        except OSError:
            break
