"""Data sources: turn a directory, zip or URL into a local list of labelled, decodable images.

The pipeline is ``resolve_source`` (directory, zip or URL to a local folder),
``find_images`` (folder layout to ``(relative path, label)`` pairs) and
``scan_images`` (decode each file once, cache the verdicts, drop the bad ones);
``index_source`` runs all three.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import PIL
from tqdm import tqdm

from lightning_vgg.data import archives, decode
from lightning_vgg.data.decode import IMAGE_SUFFIXES
from lightning_vgg.errors import UserError
from lightning_vgg.fileio import atomic_open
from lightning_vgg.labels import CLASS_NAMES, label_from_folder, label_from_name

DEFAULT_URL = (
    "https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/"
    "kagglecatsanddogs_5340.zip"
)

MAX_DEPTH = 3  # folders this far below the root are searched for a layout
# macOS zip debris and Kaggle's unlabelled test set are never training data.
_SKIP_DIRS = {"__macosx", "test1"}
_SCAN_VERSION = 1
_CHUNK = 128  # files per pool task: big enough to amortise pickling, small for a smooth bar
_LIST_LIMIT = 20

_KINDS = "a data source must be a directory of images, a .zip archive or an http(s) URL of one"
_LAYOUTS = (
    "PetImages/Cat/*.jpg + PetImages/Dog/*.jpg (Microsoft download); "
    "a flat folder of cat.<n>.jpg + dog.<n>.jpg (Kaggle train/); "
    f"class folders cat(s)/ + dog(s)/ up to {MAX_DEPTH + 1} levels down"
)


class UnreadableImagesWarning(UserWarning):
    """Some candidate images could not be decoded and were left out."""


def default_cache_dir() -> Path:
    """Where extracted archives, downloads and scan results are kept between runs."""
    env = os.environ.get("LIGHTNING_VGG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_vgg"


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


# --------------------------------------------------------------------------- resolving


def resolve_source(
    source: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    md5: str | None = None,
    sha256: str | None = None,
    max_download_mb: float = archives.MAX_DOWNLOAD_MB,
    max_extract_mb: float = archives.MAX_EXTRACT_MB,
) -> Path:
    """Make any accepted data source available as a local directory.

    Zips and downloads are unpacked once into the cache and reused, so pointing the
    CLI at the same archive twice costs nothing the second time.

    Args:
        source: A directory, a ``.zip`` file, or an http(s) URL of a zip.
        cache_dir: Where downloads and extractions go; ``default_cache_dir()`` if None.
        md5: Expected md5 of a downloaded file; not checked if None.
        sha256: Expected sha256 of the archive (downloaded or local zip). Without
            it, a URL listed in ``KNOWN_SHA256`` is checked against its pinned digest.
        max_download_mb: Refuse a download larger than this.
        max_extract_mb: Refuse an archive that unpacks to more than this.

    Returns:
        The root directory to search for images.

    Raises:
        UserError: The source is missing, empty, unreadable, not a valid zip, of an
            unsupported kind, or could not be downloaded.
    """
    text = os.fspath(source)
    cache = _cache_root(cache_dir)
    scheme = urllib.parse.urlsplit(text).scheme.lower() if "://" in text else ""
    digest = archives.normalise_sha256(sha256)
    if scheme in ("http", "https"):
        digest = digest or archives.KNOWN_SHA256.get(text)
        archive = archives.download(text, cache / "downloads", md5, digest, max_download_mb)
        return archives.extract_zip(archive, cache / "extracted", max_extract_mb)
    if scheme:
        raise UserError(f"unsupported data source {text}: {_KINDS}")
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"data source not found: {path}")
    if path.is_dir():
        return _checked_dir(path.resolve())
    if path.suffix.lower() == ".zip":
        return archives.extract_zip(path.resolve(), cache / "extracted", max_extract_mb, digest)
    raise UserError(f"unsupported data source {path}: {_KINDS}")


def _checked_dir(path: Path) -> Path:
    """Fail now, with the path in the message, rather than later with 'no images'."""
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"data source is not readable: {path}")
    try:
        empty = next(path.iterdir(), None) is None
    except OSError as exc:
        raise UserError(f"cannot read data source {path}: {exc.strerror or exc}") from exc
    if empty:
        raise UserError(f"data source is an empty directory: {path}")
    return path


# --------------------------------------------------------------------------- finding


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _skip_dir(name: str) -> bool:
    return name.startswith(".") or name.lower() in _SKIP_DIRS


def _images_below(folder: str) -> Iterator[str]:
    """Every image file in a class folder, at any depth (Keras also recurses)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _skip_dir(d))
        for name in filenames:
            if _is_image_name(name):
                yield os.path.join(dirpath, name)


def _top_level(root: Path, limit: int = 10) -> str:
    try:
        names = sorted(e.name + ("/" if e.is_dir() else "") for e in os.scandir(root))
    except OSError:
        return "(unreadable)"
    if not names:
        return "(nothing)"
    more = f", ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _require_both_classes(items: Sequence[tuple[str, int]], root: Path, when: str = "") -> None:
    counts = [sum(1 for _, label in items if label == i) for i in range(len(CLASS_NAMES))]
    if all(counts):
        return
    found = ", ".join(f"{n} {name}" for n, name in zip(counts, CLASS_NAMES, strict=True))
    if not any(counts):
        raise UserError(f"no usable images{when} in {root}")
    raise UserError(f"only one class found ({found} images){when} in {root}")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def find_images(root: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """Find every labelled image under ``root``, whichever common layout it uses.

    Users get the data from Microsoft (``PetImages/Cat``), Kaggle (``train/cat.0.jpg``)
    or tutorials (``train/cats``), often wrapped in an extra folder, so all three are
    recognised up to a few levels down and everything labelled is collected; the
    train/val/test split is made later from the union. Only files with an image
    suffix are candidates: ``Thumbs.db`` and friends are not errors, just not images.
    Files whose names are not valid UTF-8 are left out, with one warning naming them.

    Args:
        root: The folder from ``resolve_source``.

    Returns:
        Sorted ``(relative posix path, label)`` pairs, with cat = 0 and dog = 1.

    Raises:
        UserError: No layout matched, or only one class has images.
    """
    root = Path(root)
    found: dict[str, int] = {}
    queue: deque[tuple[str, int]] = deque([(os.fspath(root), 0)])
    while queue:
        folder, depth = queue.popleft()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue  # an unreadable subfolder is not worth failing the whole search
        for entry in entries:
            if entry.is_dir():
                if _skip_dir(entry.name):
                    continue
                label = label_from_folder(entry.name)
                if label is not None:
                    for path in _images_below(entry.path):
                        found.setdefault(Path(os.path.relpath(path, root)).as_posix(), label)
                elif depth < MAX_DEPTH:
                    queue.append((entry.path, depth + 1))
            elif _is_image_name(entry.name) and (label := label_from_name(entry.name)) is not None:
                found.setdefault(Path(os.path.relpath(entry.path, root)).as_posix(), label)
    # A name that is not valid UTF-8 (Python keeps its bytes as surrogates) cannot be
    # written to split.csv or the scan cache: leave such files out, with one warning.
    undecodable = [p for p in found if not _is_utf8(p)]
    if undecodable:
        for p in undecodable:
            del found[p]
        more = len(undecodable) - _LIST_LIMIT
        names = ", ".join(repr(os.fsencode(p)) for p in undecodable[:_LIST_LIMIT])
        warnings.warn(
            f"skipping {len(undecodable)} file(s) under {root} whose names are not valid "
            f"UTF-8 (rename them to use them): {names}"
            + (f", ... and {more} more" if more > 0 else ""),
            UnreadableImagesWarning,
            stacklevel=2,
        )
    if not found:
        raise UserError(
            f"no labelled images found in {root}; accepted layouts: {_LAYOUTS}; "
            f"found at the top level: {_top_level(root)}"
        )
    items = sorted(found.items())
    _require_both_classes(items, root)
    return items


# --------------------------------------------------------------------------- scanning


def _scan_cache_file(cache_dir: Path, root: Path) -> Path:
    return cache_dir / "scans" / f"{archives.short_hash(os.fspath(root.resolve()), 16)}.json"


def _scan_header(root: Path) -> dict[str, object]:
    """What a cached verdict depends on besides the file itself."""
    return {
        "version": _SCAN_VERSION,
        "root": os.fspath(root.resolve()),
        "pillow": PIL.__version__,  # a new decoder may judge files differently
        "max_pixels": decode.MAX_PIXELS,
    }


def _read_scan_cache(path: Path, root: Path) -> dict[str, list]:
    """Earlier verdicts by relative path; anything unreadable or foreign is ignored."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if all(data.get(key) == value for key, value in _scan_header(root).items()):
            return dict(data["files"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    return {}


def _decode_all(
    root: Path, rels: Sequence[str], workers: int, progress: bool
) -> dict[str, str | None]:
    """Decode files, in worker processes when it pays; the failure reason per file."""
    paths = [os.fspath(root / rel) for rel in rels]
    chunks = [range(i, min(i + _CHUNK, len(paths))) for i in range(0, len(paths), _CHUNK)]
    reasons: dict[str, str | None] = {}

    def record(chunk: range, verdicts: Sequence[str | None]) -> None:
        for i, reason in zip(chunk, verdicts, strict=True):
            reasons[rels[i]] = reason
        bar.update(len(chunk))

    with tqdm(total=len(paths), desc="checking images", unit="img", disable=not progress) as bar:
        if workers > 1 and len(chunks) > 1:
            # The platform's default start method, as torch's DataLoader uses: fork on
            # Linux works from notebooks, stdin and unguarded scripts, where spawn fails.
            try:
                with ProcessPoolExecutor(workers) as pool:
                    futures = {
                        pool.submit(decode.check_files, [paths[i] for i in c]): c for c in chunks
                    }
                    for future in as_completed(futures):
                        record(futures[future], future.result())
            except BrokenProcessPool as exc:
                warnings.warn(
                    f"image check workers failed ({exc}); checking the rest in this process",
                    stacklevel=3,
                )
        for chunk in chunks:  # everything, or whatever a broken pool left undone
            if rels[chunk[0]] not in reasons:
                record(chunk, decode.check_files([paths[i] for i in chunk]))
    return reasons


def _skipped_message(root: Path, bad: Sequence[str], reasons: dict[str, str | None]) -> str:
    shown = ", ".join(f"{rel} ({reasons[rel]})" for rel in bad[:_LIST_LIMIT])
    more = f", ... and {len(bad) - _LIST_LIMIT} more" if len(bad) > _LIST_LIMIT else ""
    return f"skipped {len(bad)} unreadable image(s) in {root}: {shown}{more}"


def scan_images(
    root: str | os.PathLike[str],
    items: Sequence[tuple[str, int]],
    cache_dir: str | os.PathLike[str] | None,
    workers: int = 2,
    progress: bool = True,
) -> tuple[list[tuple[str, int]], list[str]]:
    """Decode every candidate once and drop the ones that fail.

    The real download holds empty, truncated and non-image files; finding them here,
    up front, keeps a training run from dying (or silently skipping) mid-epoch.
    Verdicts are cached per file under ``cache_dir/scans/`` keyed by size and mtime,
    so a rerun on unchanged data decodes nothing and an edit re-decodes only the
    files that changed.

    Args:
        root: The folder the relative paths in ``items`` start from.
        items: ``(relative path, label)`` pairs, as from ``find_images``.
        cache_dir: Cache root; None disables the scan cache.
        workers: Decoding processes; 1 decodes in this process.
        progress: Show a tqdm bar.

    Returns:
        The usable items (input order kept) and the sorted relative paths of the bad ones.

    Warns:
        UnreadableImagesWarning: Once, naming the skipped files and why, if any.
    """
    root = Path(root)
    signatures: dict[str, tuple[int, int] | None] = {}
    for rel, _ in items:
        try:
            st = os.stat(root / rel)
            signatures[rel] = (st.st_size, st.st_mtime_ns)
        except OSError:
            signatures[rel] = None  # decoding will report why
    cache_file = _scan_cache_file(Path(cache_dir), root) if cache_dir is not None else None
    known = _read_scan_cache(cache_file, root) if cache_file is not None else {}

    reasons: dict[str, str | None] = {}
    todo: list[str] = []
    for rel, sig in signatures.items():
        entry = known.get(rel)  # [size, mtime_ns, reason or None]
        usable = sig is not None and isinstance(entry, list) and len(entry) == 3
        if usable and entry[:2] == list(sig):
            reasons[rel] = entry[2]
        else:
            todo.append(rel)
    if todo:
        reasons.update(_decode_all(root, todo, workers, progress))

    if cache_file is not None and (todo or known.keys() != signatures.keys()):
        files = {rel: [*sig, reasons[rel]] for rel, sig in signatures.items() if sig is not None}
        record = {**_scan_header(root), "files": files}
        try:
            with atomic_open(cache_file) as handle:
                json.dump(record, handle, separators=(",", ":"))
        except UserError as exc:  # the cache only saves time; the scan itself succeeded
            warnings.warn(f"scan cache not saved: {exc}", stacklevel=2)

    bad = sorted(rel for rel, reason in reasons.items() if reason is not None)
    if bad:
        warnings.warn(_skipped_message(root, bad, reasons), UnreadableImagesWarning, stacklevel=2)
    good = [(rel, label) for rel, label in items if reasons[rel] is None]
    return good, bad


def index_source(
    source: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int = 2,
    md5: str | None = None,
    progress: bool = True,
    sha256: str | None = None,
    max_download_mb: float = archives.MAX_DOWNLOAD_MB,
    max_extract_mb: float = archives.MAX_EXTRACT_MB,
) -> tuple[Path, list[tuple[str, int]]]:
    """Resolve, find and scan in one call: what the datamodule needs from a source.

    Returns:
        The local root and its usable ``(relative path, label)`` pairs, sorted.

    Raises:
        UserError: From any step, or if decoding left a class with no images.
    """
    cache = _cache_root(cache_dir)
    root = resolve_source(source, cache, md5, sha256, max_download_mb, max_extract_mb)
    good, _ = scan_images(root, find_images(root), cache, workers, progress)
    _require_both_classes(good, root, " after skipping unreadable files")
    return root, good
