"""Image decoding: load any image file as a fully decoded RGB PIL image, or say why not.

Where processes are spawned (macOS, Windows) the scan's workers import this module,
so it stays cheap to import: PIL and the standard library only, no torch.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Far above any real photo (the Microsoft set tops out near 500x500), far below
# what would exhaust memory when a worker decodes it.
MAX_PIXELS = 50_000_000


class ImageDecodeError(Exception):
    """An image file that cannot be decoded; carries the file and a short reason.

    The scan collects ``reason`` for its one summary warning, so it stays short
    ("empty file", "truncated"), while ``str()`` names the file for direct callers.
    """

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"cannot decode image {name}: {reason}")
        self.name = name
        self.reason = reason


def _reason(exc: BaseException) -> str:
    """Turn PIL's zoo of exceptions into a short, stable reason."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return f"too many pixels (over {MAX_PIXELS:,})"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "truncated" in text.lower():
        return "truncated"
    if isinstance(exc, OSError) and exc.strerror:
        return f"unreadable ({exc.strerror})"
    return f"corrupt ({text})"


def load_rgb(source: str | os.PathLike[str] | bytes) -> Image.Image:
    """Open and fully decode an image, converted to RGB the way Keras' ``load_img`` does.

    Decoding everything up front (``load()``) is what catches truncated JPEGs: PIL
    opens them lazily and would otherwise fail, or silently pad with grey, only
    when a training batch touches the pixels. Every mode (grayscale, palette,
    CMYK, RGBA, 16-bit) goes through plain ``convert("RGB")``, matching Keras: alpha
    is dropped rather than composited, 16-bit values are clipped rather than scaled,
    and EXIF orientation is ignored. The format is sniffed from the content, so a
    PNG named ``.jpg`` loads fine.

    Args:
        source: A file path, or the encoded bytes of an image.

    Returns:
        A decoded image in mode ``RGB``, detached from any open file.

    Raises:
        ImageDecodeError: The file is empty, unreadable, not an image, corrupt,
            truncated or larger than ``MAX_PIXELS``.
    """
    # Relies on PIL's ImageFile.LOAD_TRUNCATED_IMAGES staying False (its default).
    if isinstance(source, bytes | bytearray):
        name, stream = "<bytes>", io.BytesIO(source)
        empty = len(source) == 0
    else:
        name, stream = os.fspath(source), None
        try:
            empty = Path(name).stat().st_size == 0
        except OSError as exc:
            raise ImageDecodeError(name, f"unreadable ({exc.strerror or exc})") from exc
    if empty:
        raise ImageDecodeError(name, "empty file")
    try:
        with warnings.catch_warnings():
            # A bomb warning means PIL's own limit was passed: treat it as an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Broken EXIF blocks are common in the real data and do not affect pixels.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")
            warnings.filterwarnings("ignore", message="Palette images with Transparency")
            with Image.open(stream if stream is not None else name) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageDecodeError(
                        name, f"too many pixels ({img.width}x{img.height} > {MAX_PIXELS:,})"
                    )
                img.load()
                return img.convert("RGB")
    except ImageDecodeError:
        raise
    except Exception as exc:  # PIL raises many types for bad data; all mean "unusable"
        raise ImageDecodeError(name, _reason(exc)) from exc


def check_files(paths: Sequence[str]) -> list[str | None]:
    """Try to decode each file; the reason it failed, or None where it loaded.

    Module-level and picklable so a process pool can run it on chunks of files
    without shipping decoded pixels back.
    """
    reasons: list[str | None] = []
    for path in paths:
        try:
            load_rgb(path).close()
        except ImageDecodeError as exc:
            reasons.append(exc.reason)
        else:
            reasons.append(None)
    return reasons
