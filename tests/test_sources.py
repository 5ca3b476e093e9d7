"""Tests for decoding, resolving, finding and scanning image sources, built from real JPEGs."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import re
import shutil
import threading
import warnings
import zipfile
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from lightning_vgg.data import archives, decode, sources
from lightning_vgg.data.decode import ImageDecodeError, load_rgb
from lightning_vgg.data.sources import (
    UnreadableImagesWarning,
    default_cache_dir,
    find_images,
    index_source,
    resolve_source,
    scan_images,
)
from lightning_vgg.errors import UserError
from tests.conftest import pick_images


def _counts(items: list[tuple[str, int]]) -> tuple[int, int]:
    return sum(1 for _, label in items if label == 0), sum(1 for _, label in items if label == 1)


def _scan_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, UnreadableImagesWarning)]


@pytest.fixture(autouse=True)
def _fast_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep failing downloads from sleeping between retries."""
    monkeypatch.setattr(archives, "DOWNLOAD_RETRIES", 1)
    monkeypatch.setattr(archives, "RETRY_DELAY_S", 0.0)


@pytest.fixture
def small_dir(tmp_path: Path, mini_dir: Path) -> Path:
    """A Microsoft-layout folder of 4 cats and 4 dogs."""
    root = tmp_path / "small"
    for cls, photos in pick_images(mini_dir, 4).items():
        (root / "PetImages" / cls).mkdir(parents=True)
        for photo in photos:
            shutil.copyfile(photo, root / "PetImages" / cls / photo.name)
    return root


# Broken files: relative path -> the reason the scan must report.
BROKEN = {
    "PetImages/Cat/666.jpg": "empty file",
    "PetImages/Cat/truncated.jpg": "truncated",
    "PetImages/Dog/random.jpg": "not an image",
    "PetImages/Dog/notes.jpg": "not an image",
}
# Unusual but valid files: relative path -> the mode they were saved in.
CONVERTED = {
    "PetImages/Cat/gray.jpg": "L",
    "PetImages/Dog/cmyk.jpg": "CMYK",
    "PetImages/Cat/rgba.png": "RGBA",
    "PetImages/Dog/png_named.jpg": "P",
}


@pytest.fixture
def messy_dir(small_dir: Path, cat_photo: Path) -> Path:
    """``small_dir`` plus the kinds of broken and odd files the real download has."""
    pet = small_dir / "PetImages"
    photo = Image.open(cat_photo).convert("RGB")
    data = cat_photo.read_bytes()
    (pet / "Cat" / "666.jpg").write_bytes(b"")
    (pet / "Cat" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (pet / "Dog" / "random.jpg").write_bytes(np.random.default_rng(0).bytes(4096))
    (pet / "Dog" / "notes.jpg").write_text("not a picture\n")
    (pet / "Cat" / "Thumbs.db").write_bytes(np.random.default_rng(1).bytes(4096))
    (pet / "Dog" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    photo.convert("L").save(pet / "Cat" / "gray.jpg", "JPEG")
    photo.convert("CMYK").save(pet / "Dog" / "cmyk.jpg", "JPEG")
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(pet / "Cat" / "rgba.png", "PNG")
    photo.convert("P").save(pet / "Dog" / "png_named.jpg", "PNG")
    return small_dir


# --------------------------------------------------------------------------- decode


@pytest.mark.parametrize("rel", sorted(CONVERTED))
def test_load_rgb_converts_odd_modes(messy_dir: Path, rel: str) -> None:
    with Image.open(messy_dir / rel) as raw:
        assert raw.mode == CONVERTED[rel]  # the fixture really made the odd file
        size = raw.size
    img = load_rgb(messy_dir / rel)
    assert (img.mode, img.size) == ("RGB", size)


def test_load_rgb_accepts_bytes_and_str(cat_photo: Path) -> None:
    from_bytes = load_rgb(cat_photo.read_bytes())
    from_str = load_rgb(str(cat_photo))
    assert from_bytes.mode == "RGB" and from_bytes.size == (180, 180)
    assert np.array_equal(np.asarray(from_bytes), np.asarray(from_str))


@pytest.mark.parametrize("rel", sorted(BROKEN))
def test_load_rgb_rejects_broken_files(messy_dir: Path, rel: str) -> None:
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # the truncation check depends on it
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(messy_dir / rel)
    assert info.value.reason == BROKEN[rel]
    assert str(messy_dir / rel) in str(info.value)


def test_load_rgb_rejects_empty_bytes_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="empty file"):
        load_rgb(b"")
    with pytest.raises(ImageDecodeError, match="unreadable"):
        load_rgb(tmp_path / "missing.jpg")


def test_load_rgb_refuses_too_many_pixels(monkeypatch: pytest.MonkeyPatch, cat_photo: Path) -> None:
    monkeypatch.setattr(decode, "MAX_PIXELS", 100 * 100)
    with pytest.raises(ImageDecodeError, match=r"too many pixels \(180x180"):
        load_rgb(cat_photo)


def test_load_rgb_turns_pil_bomb_warning_into_error(
    monkeypatch: pytest.MonkeyPatch, cat_photo: Path
) -> None:
    # Between PIL's limit and twice it PIL only warns; that must still fail.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 180 * 180 - 1)
    with pytest.raises(ImageDecodeError, match="too many pixels"):
        load_rgb(cat_photo)


# --------------------------------------------------------------------------- layouts


def test_microsoft_layout(mini_dir: Path) -> None:
    items = find_images(mini_dir)
    assert len(items) == 1000 and _counts(items) == (500, 500)
    assert items == sorted(items)
    assert all(
        rel.startswith("PetImages/Cat/" if label == 0 else "PetImages/Dog/") for rel, label in items
    )


def test_microsoft_layout_nested_with_mac_debris(tmp_path: Path, mini_dir: Path) -> None:
    pet = tmp_path / "kagglecatsanddogs_5340" / "PetImages"
    for cls, photos in pick_images(mini_dir, 3).items():
        (pet / cls).mkdir(parents=True)
        for photo in photos:
            shutil.copyfile(photo, pet / cls / photo.name)
            (pet / cls / f"._{photo.name}").write_bytes(b"\0\5\26\7")  # AppleDouble
    junk = tmp_path / "__MACOSX" / "kagglecatsanddogs_5340" / "PetImages" / "Cat"
    junk.mkdir(parents=True)
    (junk / "._1.jpg").write_bytes(b"\0\5\26\7")
    (tmp_path / "kagglecatsanddogs_5340" / "readme[1].txt").write_text("licence")
    items = find_images(tmp_path)
    assert _counts(items) == (3, 3)
    assert all(rel.startswith("kagglecatsanddogs_5340/PetImages/") for rel, _ in items)


def test_kaggle_flat_layout(tmp_path: Path, mini_dir: Path) -> None:
    train, test1 = tmp_path / "train", tmp_path / "test1"
    train.mkdir()
    test1.mkdir()
    photos = pick_images(mini_dir, 5)
    for i, photo in enumerate(photos["Cat"]):
        shutil.copyfile(photo, train / f"cat.{i}.jpg")
        shutil.copyfile(photo, test1 / f"{i + 1}.jpg")  # unlabelled test set: ignored
    for i, photo in enumerate(photos["Dog"]):
        name = f"Dog.{i}.JPG" if i == 0 else f"dog.{i}.jpg"  # case does not matter
        shutil.copyfile(photo, train / name)
    shutil.copyfile(photos["Dog"][0], test1 / "dog.99.jpg")  # even if labelled-looking
    (tmp_path / "sampleSubmission.csv").write_text("id,label\n")
    items = find_images(tmp_path)
    assert _counts(items) == (5, 5)
    assert ("train/cat.0.jpg", 0) in items and ("train/Dog.0.JPG", 1) in items
    assert not any(rel.startswith("test1/") for rel, _ in items)


@pytest.mark.parametrize(
    ("cat_dir", "dog_dir"),
    [("cats", "dogs"), ("Cat", "Dog"), ("train/cats", "train/dogs"), ("a/b/Cats", "a/b/Dogs")],
)
def test_class_folder_layouts(tmp_path: Path, mini_dir: Path, cat_dir: str, dog_dir: str) -> None:
    for folder, photos in zip((cat_dir, dog_dir), pick_images(mini_dir, 3).values(), strict=True):
        (tmp_path / folder).mkdir(parents=True)
        for photo in photos:
            shutil.copyfile(photo, tmp_path / folder / photo.name)
    (tmp_path / cat_dir / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    items = find_images(tmp_path)
    assert _counts(items) == (3, 3)
    assert {rel.rsplit("/", 1)[0] for rel, label in items if label == 0} == {cat_dir}


def test_class_folders_for_train_and_validation_are_merged(tmp_path: Path, mini_dir: Path) -> None:
    photos = pick_images(mini_dir, 4)
    for part, sl in (("train", slice(0, 3)), ("validation", slice(3, 4))):
        for cls, folder in (("Cat", "cats"), ("Dog", "dogs")):
            (tmp_path / part / folder).mkdir(parents=True)
            for photo in photos[cls][sl]:
                shutil.copyfile(photo, tmp_path / part / folder / photo.name)
    assert _counts(find_images(tmp_path)) == (4, 4)


def test_no_layout_names_what_was_found(tmp_path: Path, cat_photo: Path) -> None:
    (tmp_path / "photos").mkdir()
    shutil.copyfile(cat_photo, tmp_path / "photos" / "1.jpg")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="no labelled images found") as info:
        find_images(tmp_path)
    assert "PetImages/Cat" in str(info.value) and "notes.txt, photos/" in str(info.value)


def test_one_class_only(tmp_path: Path, mini_dir: Path) -> None:
    (tmp_path / "PetImages" / "Cat").mkdir(parents=True)
    (tmp_path / "PetImages" / "Dog").mkdir(parents=True)
    for photo in pick_images(mini_dir, 3)["Cat"]:
        shutil.copyfile(photo, tmp_path / "PetImages" / "Cat" / photo.name)
    with pytest.raises(UserError, match=r"only one class found \(3 cat, 0 dog images\) in "):
        find_images(tmp_path)


# --------------------------------------------------------------------------- resolving


def test_directory_source_is_itself(small_dir: Path, tmp_path: Path) -> None:
    assert resolve_source(small_dir, tmp_path / "cache") == small_dir.resolve()
    assert not (tmp_path / "cache").exists()  # a folder needs no cache


def test_zip_is_extracted_once(
    mini_zip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    root = resolve_source(mini_zip, cache)
    assert root.parent == cache / "extracted" and root.name.startswith("catsdogs-180px-mini-")
    assert (root / ".complete").is_file()
    assert _counts(find_images(root)) == (500, 500)

    def no_extract(*args: object, **kwargs: object) -> None:
        raise AssertionError("extracted again")

    with monkeypatch.context() as patch:
        patch.setattr(zipfile.ZipFile, "extractall", no_extract)
        assert resolve_source(str(mini_zip), cache) == root
    assert [p.name for p in root.parent.iterdir()] == [root.name]  # no temporary leftovers


def test_half_extracted_zip_is_redone(small_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "pets.zip"
    shutil.make_archive(str(archive.with_suffix("")), "zip", small_dir)
    cache = tmp_path / "cache"
    root = resolve_source(archive, cache)
    # Simulate an interrupted extraction: no marker, files missing, debris present.
    (root / ".complete").unlink()
    shutil.rmtree(root / "PetImages" / "Dog")
    (root / "debris.tmp").write_text("x")
    assert resolve_source(archive, cache) == root
    assert (root / ".complete").is_file() and not (root / "debris.tmp").exists()
    assert _counts(find_images(root)) == (4, 4)


def test_changed_zip_gets_a_fresh_extraction(small_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "pets.zip"
    shutil.make_archive(str(archive.with_suffix("")), "zip", small_dir)
    first = resolve_source(archive, tmp_path / "cache")
    os.utime(archive, ns=(0, 10**18))
    assert resolve_source(archive, tmp_path / "cache") != first


def test_index_source_on_zip(mini_zip: Path, tmp_path: Path) -> None:
    root, items = index_source(mini_zip, tmp_path / "cache", workers=1, progress=False)
    assert _counts(items) == (500, 500)
    assert (root / items[0][0]).is_file()


def _bad_source(kind: str, tmp: Path) -> str | Path:
    """Build one kind of unusable data source inside ``tmp``."""
    if kind == "missing":
        return tmp / "nope"
    if kind == "empty-dir":
        (tmp / "empty").mkdir()
        return tmp / "empty"
    if kind == "txt-file":
        (tmp / "a.txt").write_text("x")
        return tmp / "a.txt"
    if kind == "corrupt-zip":
        (tmp / "bad.zip").write_bytes(b"PK\3\4 not really a zip")
        return tmp / "bad.zip"
    return "ftp://example.com/cats.zip"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "data source not found: .*nope"),
        ("empty-dir", "data source is an empty directory: .*empty"),
        ("txt-file", r"unsupported data source .*a\.txt: a data source must be a directory"),
        ("corrupt-zip", r"not a valid zip archive: .*bad\.zip"),
        ("ftp-url", "unsupported data source ftp://example.com/cats.zip"),
    ],
)
def test_bad_sources(tmp_path: Path, kind: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        resolve_source(_bad_source(kind, tmp_path), tmp_path / "cache")


def test_truncated_zip_is_a_user_error(mini_zip: Path, tmp_path: Path) -> None:
    broken = tmp_path / "half.zip"
    broken.write_bytes(mini_zip.read_bytes()[:100_000])
    with pytest.raises(UserError, match=r"not a valid zip archive: .*half\.zip"):
        resolve_source(broken, tmp_path / "cache")


def test_unreachable_url(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/x.zip"
    with pytest.raises(UserError, match=f"could not download {re.escape(url)}: ") as info:
        resolve_source(url, tmp_path / "cache")
    assert "--data.source" in str(info.value)
    assert not list((tmp_path / "cache").rglob("*.part"))


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server over ``tmp_path/www``; yields its base URL and the GET log."""
    www = tmp_path / "www"
    www.mkdir()
    log: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            log.append(self.path)
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(www))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()


def test_url_is_downloaded_once_and_checked(
    small_dir: Path, tmp_path: Path, http_server: tuple[str, list[str]]
) -> None:
    base, log = http_server
    archive = Path(shutil.make_archive(str(tmp_path / "www" / "pets"), "zip", small_dir))
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    cache = tmp_path / "cache"

    with pytest.raises(UserError, match="md5 is not 0123"):
        resolve_source(f"{base}/pets.zip", cache, md5="0123")
    log.clear()
    root = resolve_source(f"{base}/pets.zip", cache, md5=md5)
    requests = len(log)  # torchvision opens the URL once to follow redirects, then fetches it
    assert requests and set(log) == {"/pets.zip"}
    assert _counts(find_images(root)) == (4, 4)
    assert resolve_source(f"{base}/pets.zip", cache, md5=md5) == root
    assert len(log) == requests  # not fetched again

    with pytest.raises(UserError, match=r"could not download .*/missing\.zip: HTTP 404"):
        resolve_source(f"{base}/missing.zip", cache)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIGHTNING_VGG_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LIGHTNING_VGG_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "lightning_vgg"


# --------------------------------------------------------------------------- scanning


@pytest.mark.parametrize("workers", [1, 2])
def test_broken_files_skipped_with_one_warning(
    messy_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    monkeypatch.setattr(sources, "_CHUNK", 4)  # several chunks, so the pool really runs
    items = find_images(messy_dir)
    assert not any(rel.endswith(("Thumbs.db", ".DS_Store")) for rel, _ in items)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        good, bad = scan_images(messy_dir, items, tmp_path / "cache", workers, progress=False)
    assert bad == sorted(BROKEN)
    assert {rel for rel, _ in good} == {rel for rel, _ in items} - set(BROKEN)
    assert set(CONVERTED) <= {rel for rel, _ in good}
    (message,) = _scan_warnings(record)
    assert message.startswith(f"skipped 4 unreadable image(s) in {messy_dir}: ")
    for rel, reason in BROKEN.items():
        assert f"{rel} ({reason})" in message
    assert "Thumbs.db" not in message


def test_broken_worker_pool_falls_back_to_this_process(
    messy_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class BrokenPool(ProcessPoolExecutor):
        def submit(self, *args: object, **kwargs: object) -> Future:
            raise BrokenProcessPool("simulated")

    monkeypatch.setattr(sources, "ProcessPoolExecutor", BrokenPool)
    monkeypatch.setattr(sources, "_CHUNK", 4)
    items = find_images(messy_dir)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, bad = scan_images(messy_dir, items, None, workers=2, progress=False)
    assert bad == sorted(BROKEN)
    assert any("checking the rest in this process" in str(w.message) for w in record)


def test_long_warning_is_shortened(small_dir: Path) -> None:
    for i in range(25):
        (small_dir / "PetImages" / "Cat" / f"empty{i:02d}.jpg").write_bytes(b"")
    items = find_images(small_dir)
    with pytest.warns(UnreadableImagesWarning) as record:
        good, bad = scan_images(small_dir, items, None, workers=1, progress=False)
    assert len(bad) == 25 and len(good) == 8
    (message,) = _scan_warnings(list(record))
    assert message.count("(empty file)") == 20 and message.endswith(", ... and 5 more")


def test_scan_cache_skips_unchanged_files(
    messy_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dog_photo: Path
) -> None:
    cache = tmp_path / "cache"
    items = find_images(messy_dir)
    with pytest.warns(UnreadableImagesWarning):
        first = scan_images(messy_dir, items, cache, workers=1, progress=False)
    assert len(list((cache / "scans").glob("*.json"))) == 1

    decoded: list[str] = []
    real = decode.load_rgb

    def counting(source: str) -> Image.Image:
        decoded.append(Path(source).relative_to(messy_dir).as_posix())
        return real(source)

    monkeypatch.setattr(decode, "load_rgb", counting)
    with pytest.warns(UnreadableImagesWarning):  # still told about the bad files
        assert scan_images(messy_dir, items, cache, workers=1, progress=False) == first
    assert decoded == []

    # A fixed file and a newly broken one are re-decoded; nothing else is.
    shutil.copyfile(dog_photo, messy_dir / "PetImages" / "Cat" / "666.jpg")
    victim = next(rel for rel, _ in items if rel.startswith("PetImages/Dog/") and rel not in BROKEN)
    (messy_dir / victim).write_bytes(b"")
    with pytest.warns(UnreadableImagesWarning) as record:
        _, bad = scan_images(messy_dir, items, cache, workers=1, progress=False)
    assert sorted(decoded) == sorted(["PetImages/Cat/666.jpg", victim])
    assert "PetImages/Cat/666.jpg" not in bad and victim in bad
    assert f"{victim} (empty file)" in _scan_warnings(list(record))[0]


def test_corrupt_scan_cache_is_ignored(small_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    items = find_images(small_dir)
    scan_images(small_dir, items, cache, workers=1, progress=False)
    (cache_file,) = (cache / "scans").glob("*.json")
    cache_file.write_text("{not json")
    good, bad = scan_images(small_dir, items, cache, workers=1, progress=False)
    assert (good, bad) == (items, [])


def test_index_source_fails_when_a_class_is_all_broken(tmp_path: Path, cat_photo: Path) -> None:
    (tmp_path / "data" / "cats").mkdir(parents=True)
    (tmp_path / "data" / "dogs").mkdir(parents=True)
    shutil.copyfile(cat_photo, tmp_path / "data" / "cats" / "1.jpg")
    (tmp_path / "data" / "dogs" / "1.jpg").write_bytes(b"")
    with (
        pytest.warns(UnreadableImagesWarning),
        pytest.raises(UserError, match=r"only one class found \(1 cat, 0 dog images\) after"),
    ):
        index_source(tmp_path / "data", tmp_path / "cache", workers=1, progress=False)


def test_png_bytes_in_memory_roundtrip() -> None:
    buffer = io.BytesIO()
    Image.new("LA", (7, 5), (10, 200)).save(buffer, "PNG")
    img = load_rgb(buffer.getvalue())
    assert img.mode == "RGB" and img.size == (7, 5) and img.getpixel((0, 0)) == (10, 10, 10)
