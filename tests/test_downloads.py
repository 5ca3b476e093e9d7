"""Downloads and archives that cannot be trusted: no http fallback, pinned digests, size caps."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import shutil
import threading
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lightning_vgg.data import archives, sources
from lightning_vgg.data.sources import resolve_source
from lightning_vgg.errors import UserError
from tests.conftest import pick_images


@pytest.fixture
def pets_zip(mini_dir: Path, tmp_path: Path) -> bytes:
    """A small Microsoft-layout zip (4 cats, 4 dogs), as bytes."""
    src = tmp_path / "src"
    for cls, photos in pick_images(mini_dir, 4).items():
        (src / "PetImages" / cls).mkdir(parents=True)
        for p in photos:
            shutil.copyfile(p, src / "PetImages" / cls / p.name)
    return Path(shutil.make_archive(str(tmp_path / "pets"), "zip", src)).read_bytes()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, dict[str, Any]]]:
    """A loopback HTTP server whose one file, status and headers the test sets."""
    monkeypatch.setattr(archives, "RETRY_DELAY_S", 0.0)
    monkeypatch.setattr(archives, "DOWNLOAD_RETRIES", 2)
    state: dict[str, Any] = {"body": b"", "gets": 0, "length": True, "sent": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["gets"] += 1
            body = state["body"]
            self.send_response(200)
            if state["length"]:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):  # the client may hang up early: that's the point
                for i in range(0, len(body), 1 << 16):
                    self.wfile.write(body[i : i + (1 << 16)])
                    state["sent"] = i + (1 << 16)
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{httpd.server_address[1]}", state
    finally:
        httpd.shutdown()
        httpd.server_close()


def nothing_cached(cache: Path) -> bool:
    files = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    return not files


def test_https_failure_never_falls_back_to_http(
    server: tuple[str, dict[str, Any]], pets_zip: bytes, tmp_path: Path
) -> None:
    """torchvision's download_url retried over http://, where the archive can be swapped."""
    host, state = server
    state["body"] = pets_zip
    with pytest.raises(UserError, match=f"could not download https://{host}/pets.zip"):
        resolve_source(f"https://{host}/pets.zip", tmp_path / "cache")
    assert state["gets"] == 0, "the plain-http server was asked for the archive"
    assert nothing_cached(tmp_path / "cache")


def test_a_redirect_from_https_to_http_is_refused() -> None:
    handler = archives._NoDowngrade()
    req = urllib.request.Request("https://example.org/pets.zip")
    with pytest.raises(archives._RefusedDownload, match="from https to http://"):
        handler.redirect_request(req, None, 302, "Found", {}, "http://example.org/pets.zip")
    same = handler.redirect_request(req, None, 302, "Found", {}, "https://mirror.org/pets.zip")
    assert same.full_url == "https://mirror.org/pets.zip"


def test_pinned_sha256_is_checked(
    server: tuple[str, dict[str, Any]], pets_zip: bytes, tmp_path: Path
) -> None:
    host, state = server
    state["body"] = pets_zip
    url = f"http://{host}/pets.zip"
    wrong = "0" * 64
    with pytest.raises(UserError, match=f"its sha256 is [0-9a-f]{{64}}, not the pinned {wrong}"):
        resolve_source(url, tmp_path / "cache", sha256=wrong)
    assert state["gets"] == 1, "a wrong digest is not retried"
    assert nothing_cached(tmp_path / "cache")
    right = hashlib.sha256(pets_zip).hexdigest()
    root = resolve_source(url, tmp_path / "cache", sha256=right.upper())
    assert (root / "PetImages" / "Cat").is_dir()


def test_known_digest_of_a_url_is_enforced(
    server: tuple[str, dict[str, Any]],
    pets_zip: bytes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host, state = server
    state["body"] = pets_zip
    url = f"http://{host}/official.zip"
    monkeypatch.setitem(archives.KNOWN_SHA256, url, "1" * 64)
    with pytest.raises(UserError, match="not the pinned 1111"):
        resolve_source(url, tmp_path / "cache")


def test_a_large_non_zip_response_is_refused_at_once(
    server: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """A 1 GiB error page used to be downloaded four times before the error."""
    host, state = server
    state["body"] = b"<html>" + b"x" * (64 << 20)
    with pytest.raises(UserError, match="not a zip archive"):
        resolve_source(f"http://{host}/pets.zip", tmp_path / "cache")
    assert state["gets"] == 1
    assert state["sent"] < 32 << 20, "the client should hang up after the first chunk"
    assert nothing_cached(tmp_path / "cache")


@pytest.mark.parametrize("announced", [True, False])
def test_download_size_cap(
    server: tuple[str, dict[str, Any]], pets_zip: bytes, tmp_path: Path, announced: bool
) -> None:
    host, state = server
    state["body"] = pets_zip + b"\0" * (3 << 20)  # a zip with trailing bytes, over 2 MiB
    state["length"] = announced
    with pytest.raises(UserError, match=r"MiB cap \(data.max_download_mb\)"):
        resolve_source(f"http://{host}/pets.zip", tmp_path / "cache", max_download_mb=2)
    assert state["gets"] == 1
    assert nothing_cached(tmp_path / "cache")


def zip_bomb(path: Path, mib: int) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("PetImages/Cat/1.jpg", b"\0" * (mib << 20))
    return path


def test_an_archive_that_unpacks_past_the_cap_is_refused(tmp_path: Path) -> None:
    bomb = zip_bomb(tmp_path / "bomb.zip", 40)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(UserError, match=r"unpacks to 40 MiB, over the 8 MiB cap"):
        resolve_source(bomb, tmp_path / "cache", max_extract_mb=8)
    assert nothing_cached(tmp_path / "cache")


def test_local_zip_is_checked_against_data_sha256(tmp_path: Path, pets_zip: bytes) -> None:
    archive = tmp_path / "pets.zip"
    archive.write_bytes(pets_zip)
    with pytest.raises(UserError, match="not the pinned"):
        resolve_source(archive, tmp_path / "cache", sha256="2" * 64)
    with pytest.raises(UserError, match="64 hexadecimal digits"):
        resolve_source(archive, tmp_path / "cache", sha256="abc")
    root = resolve_source(archive, tmp_path / "cache", sha256=hashlib.sha256(pets_zip).hexdigest())
    assert (root / "PetImages" / "Dog").is_dir()


def test_the_default_download_is_pinned() -> None:
    """The official archive is checked against a pinned digest, not only as a whole zip."""
    digest = archives.KNOWN_SHA256[sources.DEFAULT_URL]
    assert archives.normalise_sha256(digest) == digest
