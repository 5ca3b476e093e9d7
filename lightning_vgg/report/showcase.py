"""The few images the report draws: both models' feature maps and Grad-CAM, on one scale.

Computed before any section is written, so the sections only draw what they are
given. Both models' maps are normalised by one shared scale (the 99th percentile of
every non-zero map shown, both models, both classes): weak evidence then looks weak
beside strong evidence, across layers and across the two models.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_vgg.explain.atlas import Score
from lightning_vgg.explain.maps import ImageMaps, image_maps, normalize_maps
from lightning_vgg.explain.normalize import shared_scale
from lightning_vgg.labels import CLASS_NAMES
from lightning_vgg.report.measuring import STAGE
from lightning_vgg.report.runs import TestImages

__all__ = ["Showcase", "Shown", "compute_showcase"]


@dataclass
class Shown:
    """One drawn image: where it comes from and each model's maps of it."""

    #: File-name part of its figures: ``00_cat_<image stem>``.
    stem: str
    #: The image's file name, for captions.
    name: str
    label: int
    maps: dict[str, ImageMaps]

    @property
    def cls(self) -> str:
        """The true class's name."""
        return CLASS_NAMES[self.label]


@dataclass
class Showcase:
    """The drawn images and the one Grad-CAM scale they share (score units per pixel)."""

    scale: float
    images: list[Shown]


def _stem(path: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", Path(path).stem)[:40]


def compute_showcase(
    models: Mapping[str, torch.nn.Module],
    images: TestImages,
    show: Sequence[int],
    device: torch.device,
    score: Score,
) -> Showcase | None:
    """Feature maps and both classes' Grad-CAM of the images at ``show``, every model.

    Returns:
        ``None`` when no image is to be drawn.
    """
    if not show:
        return None
    x = images.images[list(show)].to(device)
    labels = [int(images.labels[i]) for i in show]
    names = [Path(images.paths[i]).name for i in show]
    maps = {
        n: image_maps(m, x, names, labels, tap=STAGE, keep_activations=True, score=score)
        for n, m in models.items()
    }
    scale = shared_scale(
        [
            d
            for per_model in maps.values()
            for m in per_model
            for c in m.classes.values()
            for d in c.density.values()
        ]
    )
    for per_model in maps.values():
        normalize_maps(per_model, "shared", scale)
    shown = [
        Shown(
            stem=f"{k:02d}_{CLASS_NAMES[labels[k]]}_{_stem(images.paths[i])}",
            name=names[k],
            label=labels[k],
            maps={n: per_model[k] for n, per_model in maps.items()},
        )
        for k, i in enumerate(show)
    ]
    return Showcase(scale=scale, images=shown)
