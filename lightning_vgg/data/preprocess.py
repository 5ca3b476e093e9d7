"""What the model sees: one preprocessing definition for test, predict, explain and compare.

A checkpoint written by ``fit`` records the data module's hyperparameters
(``datamodule_hyper_parameters``: ``image_size``, ``resize``, ``rescale``,
``augment_backend``...). :class:`Preprocess` reads them back, and its :meth:`~Preprocess.load`
goes through :func:`~lightning_vgg.data.dataset.load_eval_image`, the function the
evaluation dataset itself uses, then rescales exactly as
:meth:`~lightning_vgg.data.datamodule.CatsDogsDataModule.on_after_batch_transfer` does.
So ``explain``, ``compare``, the visualisation callbacks' probe images and the
misclassification gallery feed the network the same tensor as ``test`` and ``predict``,
bit for bit (for the CPU decoders; ``gpu_decode`` decodes with nvJPEG on the device,
which only agrees to JPEG rounding).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_vgg.data.dataset import AugmentBackend, ResizeMode, load_eval_image

__all__ = ["DEFAULT_RESCALE", "DEFAULT_RESIZE", "Preprocess"]

#: Keras's ``flow_from_directory`` resize, the data module's default.
DEFAULT_RESIZE: ResizeMode = "nearest"
#: The seed's ``ImageDataGenerator(rescale=1./255)``, the data module's default.
DEFAULT_RESCALE = 1.0 / 255.0

_RESIZES = ("nearest", "bilinear", "antialias")
_BACKENDS = ("keras", "fast", "gpu")


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes the model's evaluation input.

    Attributes:
        image_size: Square side ``S``.
        resize: ``nearest`` (Keras), ``bilinear`` or ``antialias`` (PIL Lanczos).
        rescale: Factor applied to the uint8 pixels (1/255 in the seed). There is no
            other normalisation in this project (no mean/std).
        backend: The data module's ``augment_backend``, which also picks the
            evaluation decoder: ``fast`` decodes and resizes with OpenCV where that
            is PIL-exact, the others with PIL. Kept so that ``explain`` reproduces
            the test loader's pixels exactly, not just to rounding.
    """

    image_size: int
    resize: ResizeMode = DEFAULT_RESIZE
    rescale: float = DEFAULT_RESCALE
    backend: AugmentBackend = "keras"

    def __post_init__(self) -> None:
        if self.resize not in _RESIZES:
            raise ValueError(f"resize must be one of {', '.join(_RESIZES)}, got {self.resize!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(_BACKENDS)}, got {self.backend!r}")
        if int(self.image_size) < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")

    @classmethod
    def from_hparams(
        cls,
        hparams: Mapping[str, Any] | None,
        image_size: int | None = None,
        source: str = "the checkpoint",
    ) -> Preprocess:
        """The preprocessing a data module with these hyperparameters evaluates with.

        Args:
            hparams: ``CatsDogsDataModule`` hyperparameters (a checkpoint's
                ``datamodule_hyper_parameters``, or ``datamodule.hparams``). Missing
                or empty: the documented defaults (``nearest``, ``1/255``), with a
                warning, since the model may have been trained otherwise.
            image_size: The model's input side; wins over ``hparams["image_size"]``
                (a network only accepts its own size), with a warning if they differ.
            source: Named in the warnings.

        Raises:
            ValueError: No image size anywhere, or an unknown resize/backend.
        """
        hp = dict(hparams or {})
        if not hp:
            warnings.warn(
                f"{source} records no data settings (datamodule_hyper_parameters); "
                f"assuming resize={DEFAULT_RESIZE}, rescale=1/255",
                stacklevel=2,
            )
        size = hp.get("image_size")
        if image_size is not None:
            if size is not None and int(size) != int(image_size):
                warnings.warn(
                    f"{source} was evaluated at {int(size)} px but the model takes "
                    f"{int(image_size)} px; using {int(image_size)}",
                    stacklevel=2,
                )
            size = image_size
        if size is None:
            raise ValueError(f"{source} gives no image size")
        if hp.get("gpu_decode"):
            warnings.warn(
                f"{source} decoded its test images on the device (gpu_decode, nvJPEG, nearest "
                "resize); decoding here on the CPU agrees only to JPEG rounding",
                stacklevel=2,
            )
        return cls(
            image_size=int(size),
            resize=str(hp.get("resize", DEFAULT_RESIZE)),  # type: ignore[arg-type]
            rescale=float(hp.get("rescale", DEFAULT_RESCALE)),
            backend=str(hp.get("augment_backend", "keras")),  # type: ignore[arg-type]
        )

    def with_resize(self, resize: ResizeMode | None) -> Preprocess:
        """A copy with another resize mode (``None`` keeps this one)."""
        if resize is None or resize == self.resize:
            return self
        return Preprocess(self.image_size, resize, self.rescale, self.backend)

    def load_uint8(self, path: str | Path) -> torch.Tensor:
        """Decoded and resized, not rescaled: ``(3, S, S)`` uint8 (possibly a view).

        Raises:
            ImageDecodeError: The file cannot be decoded.
        """
        return load_eval_image(path, self.image_size, self.resize, self.backend)

    def load(self, path: str | Path) -> torch.Tensor:
        """The model input for one file: ``(3, S, S)`` float32, contiguous.

        The same arithmetic as the data module after transfer: float32, then times
        ``rescale`` (a multiplication, not a division by 255, which can differ in the
        last bit).

        Raises:
            ImageDecodeError: The file cannot be decoded.
        """
        x = self.load_uint8(path).to(torch.float32, memory_format=torch.contiguous_format)
        return x.mul_(self.rescale)

    def load_batch(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """:meth:`load` of every file, stacked to ``(N, 3, S, S)``."""
        return torch.stack([self.load(p) for p in paths])

    def describe(self) -> dict[str, Any]:
        """The settings as plain JSON values (for ``explain.json``, ``measures.json``)."""
        return {
            "image_size": self.image_size,
            "resize": self.resize,
            "rescale": self.rescale,
            "backend": self.backend,
        }
