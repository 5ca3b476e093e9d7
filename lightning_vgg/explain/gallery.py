"""The misclassification gallery: the most confident mistakes per class and their Grad-CAM figure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from lightning_vgg.explain.atlas import Score, compute_atlas
from lightning_vgg.explain.normalize import to_density
from lightning_vgg.explain.plots import gallery_figure, overlay_label
from lightning_vgg.explain.scales import CamScale, density_unit
from lightning_vgg.labels import CLASS_NAMES

__all__ = [
    "Mistake",
    "confident_mistakes",
    "gallery_maps",
    "mistakes_figure",
    "predicted_class_cams",
    "score_name",
]


@dataclass(frozen=True)
class Mistake:
    """One wrong prediction: its position among the logits ranked, ``P(dog)`` and the
    probability of the (wrong) predicted class."""

    index: int
    prob_dog: float
    confidence: float


def confident_mistakes(logits: Tensor, labels: Tensor, k: int) -> dict[str, list[Mistake]]:
    """Per true class (cat, dog), its ``k`` wrong predictions made with the most confidence.

    Args:
        logits: ``(N,)`` the model's logits; ``P(dog) = sigmoid(logit) >= 0.5`` is dog.
        labels: ``(N,)`` true labels, cat=0, dog=1.
        k: Mistakes kept per class.
    """
    prob = torch.sigmoid(logits)
    pred = (prob >= 0.5).long()
    conf = torch.where(pred == 1, prob, 1 - prob)
    out: dict[str, list[Mistake]] = {}
    for cls, name in enumerate(CLASS_NAMES):
        wrong = torch.nonzero((labels == cls) & (pred != cls)).flatten()
        top = wrong[torch.argsort(conf[wrong], descending=True)][:k]
        out[name] = [Mistake(i, float(prob[i]), float(conf[i])) for i in top.tolist()]
    return out


def predicted_class_cams(model: nn.Module, images: Tensor, layer: str, score: Score) -> Tensor:
    """Each image's Grad-CAM of its predicted class at ``layer`` as evidence per input
    pixel (:func:`~lightning_vgg.explain.normalize.to_density`): ``(N, H, W)`` on the CPU."""
    atlas = compute_atlas(
        model, images, target="pred", layers=[layer], activations=False, score=score
    )
    return to_density(atlas.cams[layer], (int(images.shape[-2]), int(images.shape[-1])))[:, 0].cpu()


def gallery_maps(densities: Tensor, layer: str, scale: CamScale) -> Tensor:
    """``(N, H, W)`` densities of ``layer`` as drawn on ``scale`` (an all-zero map stays
    all zero, so the figure flags it)."""
    return torch.stack([scale.normalize(layer, d) for d in densities])


def score_name(score: Score, pred: int) -> str:
    """The differentiated score of the predicted class ``pred`` (cat 0, dog 1)."""
    if score == "probability":
        return "P(dog)" if pred == 1 else "P(cat)"
    return "+logit" if pred == 1 else "−logit"


def mistakes_figure(
    model: nn.Module,
    images: Tensor | None,
    paths: Sequence[str],
    mistakes: Sequence[Mistake],
    true_class: int,
    layer: str,
    score: Score,
    scale: CamScale | None = None,
) -> Figure:
    """One true class's gallery: the mistaken images with the Grad-CAM of what they were
    called (where the model looked to make its mistake).

    The maps share one absolute scale, fitted to this gallery's maps unless ``scale``
    is given (the report passes one shared by both models); the colour bar is in the
    score's units per input pixel, so a model with little evidence does not look hot.

    Args:
        model: The classifier that made the mistakes.
        images: ``(N, 3, H, W)`` model inputs of ``paths``, ``None`` when there are none.
        paths: The images' files, for the captions.
        mistakes: What :func:`confident_mistakes` found for ``true_class``, in order.
        true_class: cat 0, dog 1.
        layer: Conv layer of the overlays (Keras name).
        score: What Grad-CAM differentiates.
        scale: The display scale; ``None`` fits an absolute one to these maps.
    """
    maps01 = captions = None
    if images is not None and len(paths):
        dens = predicted_class_cams(model, images, layer, score)
        if scale is None:
            scale = CamScale.fit(
                "absolute", [(layer, d) for d in dens], density_unit(score), "this figure's maps"
            )
        maps01 = gallery_maps(dens, layer, scale)
        images = images.cpu()
        captions = [
            f"{Path(p).name}\n{overlay_label(m.prob_dog, true_class)}"
            for p, m in zip(paths, mistakes, strict=True)
        ]
    called = CLASS_NAMES[1 - true_class]
    return gallery_figure(
        images if maps01 is not None else None,
        maps01,
        captions or [],
        f"true {CLASS_NAMES[true_class]}s most confidently called {called} "
        f"(Grad-CAM of {score_name(score, 1 - true_class)}, {layer})",
        scale or CamScale("per_map"),  # nothing drawn: the scale is not shown
    )
