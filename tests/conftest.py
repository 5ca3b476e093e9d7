"""Shared fixtures: the real mini Cats-vs-Dogs archive from ../shared/data, extracted once."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIGHTNING_VGG_SHARED", ROOT.parent / "shared" / "data"))
MINI_ZIP = SHARED / "catsdogs-180px-mini.zip"
FULL_ZIP = SHARED / "catsdogs-180px.zip"


@pytest.fixture(scope="session")
def mini_zip() -> Path:
    """Path of the 1,000-image archive (Microsoft layout)."""
    if not MINI_ZIP.exists():
        pytest.skip(f"shared data not found at {MINI_ZIP}")
    return MINI_ZIP


@pytest.fixture(scope="session")
def mini_dir(mini_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mini archive extracted once per session; its root holds ``PetImages/``."""
    out = tmp_path_factory.mktemp("mini")
    with zipfile.ZipFile(mini_zip) as zf:
        zf.extractall(out)
    return out


@pytest.fixture(scope="session")
def cat_photo(mini_dir: Path) -> Path:
    """One real cat JPEG."""
    return sorted((mini_dir / "PetImages" / "Cat").glob("*.jpg"))[0]


@pytest.fixture(scope="session")
def dog_photo(mini_dir: Path) -> Path:
    """One real dog JPEG."""
    return sorted((mini_dir / "PetImages" / "Dog").glob("*.jpg"))[0]


def pick_images(mini_dir: Path, per_class: int) -> dict[str, list[Path]]:
    """The first ``per_class`` cat and dog JPEGs of the extracted archive, sorted."""
    return {
        cls: sorted((mini_dir / "PetImages" / cls).glob("*.jpg"))[:per_class]
        for cls in ("Cat", "Dog")
    }
