"""Archives from the network or the disk: https-only downloads, pinned digests, size caps, one-time extraction.

A download is streamed into a ``.part`` file, checked (whole zip, size cap, sha256
when one is pinned) and renamed into the cache; an extraction is written to a
temporary sibling and renamed when complete. Nothing half-done is ever used, and
nothing here falls back from https to http.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

from lightning_vgg.errors import UserError

_MARKER = ".complete"
_STALE_PARTIAL_S = 3600.0

# Download behaviour; module-level so tests (and impatient users) can shrink them.
DOWNLOAD_RETRIES = 3
RETRY_DELAY_S = 2.0
SOCKET_TIMEOUT_S = 60.0
_CHUNK_BYTES = 1 << 20

#: Size caps (MiB) on a download and on what an archive unpacks to: the official
#: archive is 787 MiB and unpacks to about the same; a zip bomb is refused before
#: it fills the disk. ``data.max_download_mb`` / ``data.max_extract_mb`` change them.
MAX_DOWNLOAD_MB = 2048
MAX_EXTRACT_MB = 8192
MAX_ARCHIVE_MEMBERS = 200_000

#: Pinned sha256 digests of known archives, by URL. A download whose URL is listed (or
#: whose ``data.sha256`` is given) must match, else it is refused and nothing is cached.
#: The official Microsoft archive's digest (824,887,076 bytes) is the one TensorFlow
#: Datasets pins and checks for the same URL (tensorflow-datasets 4.9.10,
#: ``tensorflow_datasets/url_checksums/cats_vs_dogs.txt``); this project's machines cannot
#: reach the URL to hash it themselves.
KNOWN_SHA256: dict[str, str] = {
    "https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/"
    "kagglecatsanddogs_5340.zip": "b7974bd00a84a99921f36ee4403f089853777b5ae8d151c76a86e64900334af9",
}


def short_hash(text: str, n: int = 12) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def normalise_sha256(value: str | None) -> str | None:
    if value is None:
        return None
    digest = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise UserError(f"data.sha256 must be 64 hexadecimal digits, got {value!r}")
    return digest


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _download_reason(exc: BaseException | None) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


class _IncompleteDownload(Exception):
    """The transfer ended early: the connection dropped and the body was cut short."""


class _RefusedDownload(Exception):
    """A download that retrying cannot fix: too large, not a zip, wrong digest, downgraded."""


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never from https to plain http.

    torchvision's ``download_url`` retried a failed https download over plain http,
    where anyone on the path can swap the archive; urllib's own redirect handling
    would follow an https -> http redirect the same way.
    """

    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> Any:
        if req.full_url.lower().startswith("https:") and not newurl.lower().startswith("https:"):
            raise _RefusedDownload(f"the server redirected from https to {newurl}; refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _is_whole_zip(path: Path) -> bool:
    """A zip's directory is at its very end, so a cut-short download never passes."""
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _fetch(url: str, partial: Path, max_bytes: int) -> tuple[str, str]:
    """Stream ``url`` into ``partial`` within ``max_bytes``; return its (sha256, md5)."""
    opener = urllib.request.build_opener(_NoDowngrade())
    request = urllib.request.Request(url, headers={"User-Agent": "lightning-vgg"})
    sha, md5 = hashlib.sha256(), hashlib.md5()
    total = 0
    with opener.open(request, timeout=SOCKET_TIMEOUT_S) as response:
        announced = response.headers.get("Content-Length")
        if announced is not None and int(announced) > max_bytes:
            raise _RefusedDownload(
                f"the server announces {int(announced) / 2**20:.0f} MiB, over the "
                f"{max_bytes / 2**20:.0f} MiB cap (data.max_download_mb)"
            )
        with partial.open("wb") as handle:
            while chunk := response.read(_CHUNK_BYTES):
                if total == 0 and not chunk.startswith(b"PK"):
                    raise _RefusedDownload(
                        f"the response is not a zip archive (it starts with {chunk[:16]!r})"
                    )
                total += len(chunk)
                if total > max_bytes:
                    raise _RefusedDownload(
                        f"the download passed the {max_bytes / 2**20:.0f} MiB cap "
                        "(data.max_download_mb)"
                    )
                sha.update(chunk)
                md5.update(chunk)
                handle.write(chunk)
    if announced is not None and total != int(announced):
        raise _IncompleteDownload(f"the download ended early ({total} of {announced} bytes)")
    if not _is_whole_zip(partial):
        raise _IncompleteDownload(
            f"the download ended early or is not a zip archive ({total} bytes)"
        )
    return sha.hexdigest(), md5.hexdigest()


def download(url: str, downloads: Path, md5: str | None, sha256: str | None, max_mb: float) -> Path:
    """Download ``url`` once into the cache, retrying transient failures.

    The file is fetched under a ``.part`` name and renamed when complete and
    verified, so an interrupted or refused download is never mistaken for a
    finished one. https never falls back to http; a plain ``http://`` URL is
    fetched only because the user named it, with a warning.
    """
    if url.lower().startswith("http:"):
        warnings.warn(
            f"{url} is plain http: anyone on the network path can alter the archive; "
            "use https, or pin its digest with data.sha256",
            UserWarning,
            stacklevel=3,
        )
    elif sha256 is None:
        warnings.warn(
            f"no sha256 is pinned for {url}; it is checked only as a whole zip. Pin it "
            "with data.sha256 (the digest is printed once the download completes)",
            UserWarning,
            stacklevel=3,
        )
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or "download"
    if not name.lower().endswith(".zip"):
        name += ".zip"
    folder = downloads / short_hash(url)  # same file name from two URLs must not collide
    target = folder / name
    if target.is_file() and _is_whole_zip(target) and _cached_matches(target, md5, sha256):
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create download folder {folder}: {exc.strerror or exc}") from exc
    partial = folder / f".{name}.part"
    max_bytes = int(max_mb * 2**20)
    error: BaseException | None = None
    try:
        for attempt in range(DOWNLOAD_RETRIES + 1):
            if attempt:
                time.sleep(RETRY_DELAY_S * 2 ** (attempt - 1))
            partial.unlink(missing_ok=True)
            try:
                got_sha, got_md5 = _fetch(url, partial, max_bytes)
            except urllib.error.HTTPError as exc:
                error = exc
                if 400 <= exc.code < 500:
                    break  # a wrong URL stays wrong
                continue
            except (OSError, ValueError, http.client.HTTPException, _IncompleteDownload) as exc:
                error = exc
                continue
            if sha256 is not None and got_sha != sha256:
                raise _RefusedDownload(f"its sha256 is {got_sha}, not the pinned {sha256}")
            if md5 is not None and got_md5 != md5:
                error = _RefusedDownload(f"the file's md5 is not {md5}")
                continue  # a corrupted transfer: try again
            os.replace(partial, target)
            if sha256 is None:
                print(f"downloaded {url}: sha256 {got_sha}", file=sys.stderr)
            return target
    except _RefusedDownload as exc:
        error = exc
    finally:
        partial.unlink(missing_ok=True)
    raise UserError(
        f"could not download {url}: {_download_reason(error)}; "
        "pass a local directory or zip with --data.source instead"
    )


def _cached_matches(path: Path, md5: str | None, sha256: str | None) -> bool:
    if sha256 is not None and _file_sha256(path) != sha256:
        return False
    if md5 is not None:
        h = hashlib.md5()
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK_BYTES):
                h.update(chunk)
        return h.hexdigest() == md5
    return True


def _remove_stale_partials(extracted: Path, name: str) -> None:
    """Reclaim space from extractions that crashed (a concurrent one is recent, so kept)."""
    for partial in extracted.glob(f".{name}.*.partial"):
        with contextlib.suppress(OSError):
            if time.time() - partial.stat().st_mtime > _STALE_PARTIAL_S:
                shutil.rmtree(partial, ignore_errors=True)


def _check_archive_size(archive: zipfile.ZipFile, zip_path: Path, max_mb: float) -> None:
    """Refuse a zip bomb before writing: the members' declared sizes bound the output.

    zipfile stops every member at its declared size (and checks its CRC), so the
    sum of declared sizes is what extraction can write at most.
    """
    members = archive.infolist()
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise UserError(
            f"{zip_path} holds {len(members):,} entries, over the {MAX_ARCHIVE_MEMBERS:,} accepted"
        )
    total = sum(m.file_size for m in members)
    if total > max_mb * 2**20:
        raise UserError(
            f"{zip_path} unpacks to {total / 2**20:,.0f} MiB, over the {max_mb:,.0f} MiB cap "
            "(data.max_extract_mb); raise the cap if the archive is genuine"
        )


def extract_zip(
    zip_path: Path, extracted: Path, max_mb: float = MAX_EXTRACT_MB, sha256: str | None = None
) -> Path:
    """Extract a zip once into the cache; reuse it while the zip is unchanged.

    The folder name hashes the zip's path, size and mtime, so an edited or replaced
    zip gets a fresh extraction. Extraction goes to a temporary sibling that gets
    the ``.complete`` marker before it is renamed into place, so the final folder
    appears whole or not at all; one without the marker is not trusted and redone.
    """
    try:
        stat = zip_path.stat()
    except OSError as exc:
        raise UserError(f"cannot read data source {zip_path}: {exc.strerror or exc}") from exc
    key = short_hash(f"{zip_path}|{stat.st_size}|{stat.st_mtime_ns}")
    dest = extracted / f"{zip_path.stem}-{key}"
    if (dest / _MARKER).is_file():
        return dest
    if not zipfile.is_zipfile(zip_path):
        raise UserError(f"not a valid zip archive: {zip_path}")
    if sha256 is not None and (got := _file_sha256(zip_path)) != sha256:
        raise UserError(f"{zip_path} has sha256 {got}, not the pinned {sha256} (data.sha256)")
    try:
        with zipfile.ZipFile(zip_path) as archive:
            _check_archive_size(archive, zip_path, max_mb)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"not a valid zip archive: {zip_path} ({exc})") from exc
    try:
        extracted.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)  # left half-done by an older or interrupted run
        _remove_stale_partials(extracted, dest.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=extracted))
        tmp.chmod(0o755)  # mkdtemp's 0o700 would hide a shared cache from other users
    except OSError as exc:
        raise UserError(f"cannot write to cache folder {extracted}: {exc.strerror or exc}") from exc
    try:
        # torchvision's extract_archive does exactly this, but only for a lower-case
        # ".zip" suffix; zipfile also keeps members from escaping the target folder.
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(tmp)
        (tmp / _MARKER).write_text(f"{zip_path}\n", encoding="utf-8")
        tmp.rename(dest)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if (dest / _MARKER).is_file():
            return dest  # a concurrent run finished the same extraction first
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UserError(f"could not extract {zip_path}: {reason}") from exc
    return dest
