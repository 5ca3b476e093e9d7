"""VGG16 (configuration D) with optional BatchNorm, as a plain ``nn.Module``.

The layer names follow torchvision (``features``/``classifier``) so module paths are
stable, and :func:`conv_units` maps Keras's layer names (``block1_conv1`` ...) onto
them for the explanation tools.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Literal

import torch
from torch import nn

#: VGG16 configuration "D": output channels per conv, "M" for a 2x2 max-pool.
CFG_D: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip

BatchNormMode = Literal["every_conv", "per_block", "none"]
InitMode = Literal["keras", "torchvision"]

#: std of a unit normal truncated to [-2, 2]; Keras divides by it so the truncated
#: distribution keeps the requested std.
_TRUNC_STD = 0.87962566103423978


def keras_conv_names() -> list[str]:
    """The 13 conv layer names Keras's VGG16 uses, in order."""
    names: list[str] = []
    block, idx = 1, 0
    for v in CFG_D:
        if v == "M":
            block, idx = block + 1, 0
        else:
            idx += 1
            names.append(f"block{block}_conv{idx}")
    return names


def he_normal_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keras ``he_normal``: truncated normal whose std is ``sqrt(2 / fan_in)``.

    Keras samples N(0, s/0.8796) truncated at two of those stds, so the result has
    std ``s``; PyTorch's ``kaiming_normal_`` is untruncated, which matters for the
    exact-seed reproduction.
    """
    fan_in = weight[0].numel()
    std = math.sqrt(2.0 / fan_in) / _TRUNC_STD
    return nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std, generator=generator)


class VGG16(nn.Module):
    """VGG16 for one-logit binary classification.

    Args:
        width: Channel multiplier for every conv and hidden dense layer. ``1.0`` is
            the real VGG16; ``1/16`` builds the same 13-conv topology for fast tests.
        batch_norm: ``every_conv`` puts conv-BN-ReLU like torchvision's ``vgg16_bn``;
            ``per_block`` is the seed's literal Keras model, one BN between each
            block's last conv(+ReLU) and its max-pool; ``none`` is plain VGG16.
        bn_momentum: PyTorch convention (weight of the new batch). Keras's default
            momentum 0.99 is 0.01 here.
        bn_eps: BatchNorm epsilon; Keras's default is 1e-3 (PyTorch's is 1e-5).
        hidden: Width of the two dense layers before scaling by ``width``.
        dropout: Dropout after each hidden dense layer; the seed has none.
        input_size: Square input side; the flatten size depends on it as in Keras.
        inplace_relu: Use in-place ReLUs (saves memory, as torchvision does).
        init: ``keras`` (he_normal convs, glorot_uniform dense, zero biases) or
            ``torchvision`` (kaiming normal fan_out convs, N(0, 0.01) dense).
        num_outputs: Logits out; 1 for the sigmoid head.
    """

    def __init__(
        self,
        width: float = 1.0,
        batch_norm: BatchNormMode = "every_conv",
        bn_momentum: float = 0.01,
        bn_eps: float = 1e-3,
        hidden: int = 4096,
        dropout: float = 0.0,
        input_size: int = 224,
        inplace_relu: bool = True,
        init: InitMode = "keras",
        num_outputs: int = 1,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        if input_size < 32 or input_size % 32:
            raise ValueError(
                f"input_size must be a multiple of 32 and at least 32, got {input_size}"
            )
        if batch_norm not in ("every_conv", "per_block", "none"):
            raise ValueError(
                f"batch_norm must be every_conv, per_block or none, got {batch_norm!r}"
            )
        self.input_size = input_size
        self.batch_norm = batch_norm

        layers: list[nn.Module] = []
        in_ch = 3
        for i, v in enumerate(CFG_D):
            if v == "M":
                if batch_norm == "per_block":
                    layers.append(nn.BatchNorm2d(in_ch, eps=bn_eps, momentum=bn_momentum))
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out_ch = max(1, round(int(v) * width))
            layers.append(nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1))
            if batch_norm == "every_conv":
                layers.append(nn.BatchNorm2d(out_ch, eps=bn_eps, momentum=bn_momentum))
            layers.append(nn.ReLU(inplace=inplace_relu))
            in_ch = out_ch
            del i
        self.features = nn.Sequential(*layers)

        spatial = input_size // 32
        hid = max(1, round(hidden * width))
        head: list[nn.Module] = [
            nn.Flatten(),
            nn.Linear(in_ch * spatial * spatial, hid),
            nn.ReLU(inplace=inplace_relu),
        ]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head += [nn.Linear(hid, hid), nn.ReLU(inplace=inplace_relu)]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(hid, num_outputs))
        self.classifier = nn.Sequential(*head)
        self.reset_parameters(init)

    def reset_parameters(self, init: InitMode = "keras") -> None:
        """Initialise weights the Keras way (the seed) or the torchvision way."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if init == "keras":
                    he_normal_(m.weight)
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                if init == "keras":
                    nn.init.xavier_uniform_(m.weight)
                else:
                    nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
                m.reset_running_stats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(N,)`` for one output, else ``(N, num_outputs)``."""
        logits = self.classifier(self.features(x))
        return logits.squeeze(1) if logits.shape[1] == 1 else logits


def conv_units(
    model: VGG16, stage: Literal["post", "pre", "conv"] = "post"
) -> OrderedDict[str, nn.Module]:
    """Map Keras conv names to the module whose output is that conv's feature map.

    Args:
        model: The network.
        stage: ``post`` is after the ReLU (what Keras's ``Conv2D(activation='relu')``
            outputs, the seed's feature maps); ``pre`` is the input to the ReLU (after
            BN in ``every_conv`` mode); ``conv`` is the raw convolution.
    """
    names = keras_conv_names()
    mods = list(model.features)
    out: OrderedDict[str, nn.Module] = OrderedDict()
    k = 0
    for i, m in enumerate(mods):
        if not isinstance(m, nn.Conv2d):
            continue
        relu_idx = next(j for j in range(i + 1, len(mods)) if isinstance(mods[j], nn.ReLU))
        if stage == "conv":
            out[names[k]] = m
        elif stage == "pre":
            out[names[k]] = mods[relu_idx - 1]
        else:
            out[names[k]] = mods[relu_idx]
        k += 1
    return out
