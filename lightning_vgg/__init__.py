"""lightning_vgg: the Keras VGG16-BN Cats-vs-Dogs experiment, rebuilt in PyTorch Lightning."""

from lightning_vgg.errors import UserError

__all__ = ["UserError"]
__version__ = "0.1.0"
