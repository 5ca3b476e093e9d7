"""lightning_vgg: the Keras VGG16-BN Cats-vs-Dogs experiment, rebuilt in PyTorch Lightning."""

from importlib.metadata import PackageNotFoundError, version

from lightning_vgg.errors import UserError

__all__ = ["UserError"]
try:  # the installed distribution's version, so it cannot drift from pyproject.toml
    __version__ = version("lightning_vgg")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"
del PackageNotFoundError, version
