"""The images the report draws: both models' feature maps and Grad-CAM, and their mistakes.

Computed before any section is written, so the sections only draw what they are
given. Grad-CAM is drawn on scales shared by both models (never stretched per map,
which would make a model with almost no evidence look as hot as a good one):

* ``absolute``: one scale for every layer, both models, both classes (the 99th
  percentile of every non-zero map shown): weak evidence looks weak, across layers
  and models; deep layers, whose evidence is spread thin, can look dark;
* ``per_layer``: one scale per layer, shared by both models and both classes: deep
  layers stay readable, and within a column the two models stay comparable.

The misclassification galleries are drawn from the measured images, the two models'
mistakes on one scale (the last conv layer's, shared by both models).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lightning_vgg.explain.atlas import Score
from lightning_vgg.explain.gallery import confident_mistakes, gallery_maps, predicted_class_cams
from lightning_vgg.explain.maps import ImageMaps, image_maps, normalize_maps
from lightning_vgg.explain.scales import CamScale, ScaleKind, density_unit
from lightning_vgg.labels import CLASS_NAMES
from lightning_vgg.report.measuring import STAGE
from lightning_vgg.report.runs import TestImages

__all__ = [
    "VIEWS",
    "Gallery",
    "Showcase",
    "Shown",
    "compute_galleries",
    "compute_showcase",
    "figure_scales",
]


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


#: The Grad-CAM views of the report's atlas figures, in the order drawn.
VIEWS: tuple[ScaleKind, ...] = ("absolute", "per_layer")
#: Mistakes drawn per model and true class in the report's galleries.
GALLERY_K = 4


@dataclass
class Showcase:
    """The drawn images and the Grad-CAM scales they share, one per view of :data:`VIEWS`."""

    scales: dict[str, CamScale]
    images: list[Shown]

    def rows(self, shown: Shown, view: str) -> dict[str, tuple[dict[str, Tensor], dict[str, bool]]]:
        """``"good: dog" -> (layer -> map in [0, 1] on the view's scale, layer -> all-zero)``."""
        scale = self.scales[view]
        return {
            f"{n}: {cls}": (
                {k: scale.normalize(k, d) for k, d in m.classes[cls].density.items()},
                m.classes[cls].zero,
            )
            for n, m in shown.maps.items()
            for cls in ("dog", "cat")
        }


@dataclass
class Gallery:
    """One model's most confident mistakes on one true class, drawn on ``scale``."""

    model: str
    true_class: int
    layer: str
    images: Tensor
    names: list[str]
    prob_dog: list[float]
    maps: Tensor
    scale: CamScale
    #: How many measured images of the class the mistakes were picked from.
    among: int


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
    pairs = [
        (k, d)
        for per_model in maps.values()
        for m in per_model
        for c in m.classes.values()
        for k, d in c.density.items()
    ]
    across = {
        "absolute": "all layers, both models and classes",
        "per_layer": "both models and classes",
    }
    scales = {v: CamScale.fit(v, pairs, density_unit(score), across[v]) for v in VIEWS}
    for per_model in maps.values():
        normalize_maps(per_model, "shared", scales["absolute"])
    shown = [
        Shown(
            stem=f"{k:02d}_{CLASS_NAMES[labels[k]]}_{_stem(images.paths[i])}",
            name=names[k],
            label=labels[k],
            maps={n: per_model[k] for n, per_model in maps.items()},
        )
        for k, i in enumerate(show)
    ]
    return Showcase(scales=scales, images=shown)


def compute_galleries(
    models: Mapping[str, torch.nn.Module],
    images: TestImages,
    prob_dog: Mapping[str, Sequence[float]],
    layer: str,
    device: torch.device,
    score: Score,
    k: int = GALLERY_K,
) -> list[Gallery]:
    """Each model's ``k`` most confident mistakes per true class among the measured images,
    with the Grad-CAM of the class it predicted at ``layer``, both models on one scale."""
    found: list[tuple[str, int, list[int], list[float], Tensor]] = []
    for name, model in models.items():
        probs = torch.tensor(prob_dog[name], dtype=torch.float64)
        mistakes = confident_mistakes(torch.logit(probs), images.labels.long(), k)
        for cls, cname in enumerate(CLASS_NAMES):
            idx = [m.index for m in mistakes[cname]]
            dens = (
                predicted_class_cams(model, images.images[idx].to(device), layer, score)
                if idx
                else torch.empty(0)
            )
            found.append((name, cls, idx, [m.prob_dog for m in mistakes[cname]], dens))
    pairs = [(layer, d) for *_, dens in found for d in dens]
    scale = CamScale.fit("absolute", pairs, density_unit(score), "both models' mistakes")
    counts = images.counts()
    return [
        Gallery(
            model=name,
            true_class=cls,
            layer=layer,
            images=images.images[idx],
            names=[Path(images.paths[i]).name for i in idx],
            prob_dog=probs,
            maps=gallery_maps(dens, layer, scale) if idx else torch.empty(0),
            scale=scale,
            among=counts[cls],
        )
        for name, cls, idx, probs, dens in found
    ]


def figure_scales(showcase: Showcase | None, galleries: Sequence[Gallery]) -> dict[str, object]:
    """``measures.json``'s record of the figures' Grad-CAM scales (what each colour means)."""
    out: dict[str, object] = {}
    if showcase is not None:
        out["gradcam"] = {view: scale.as_json() for view, scale in showcase.scales.items()}
    if galleries:
        out["misclassified"] = {"layer": galleries[0].layer, **galleries[0].scale.as_json()}
    return out
