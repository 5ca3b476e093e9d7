"""The misclassification gallery: the most confident mistakes per class and their Grad-CAM figure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from lightning_vgg.explain.atlas import Score, compute_atlas
from lightning_vgg.explain.normalize import normalize_per_map, upsample
from lightning_vgg.explain.plots import gallery_figure, overlay_label
from lightning_vgg.labels import CLASS_NAMES

__all__ = ["Mistake", "confident_mistakes", "mistakes_figure", "predicted_class_cams", "score_name"]


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
    """Each image's Grad-CAM of its predicted class at ``layer``, upsampled to the image and
    scaled to its own maximum: ``(N, H, W)`` in ``[0, 1]`` on the CPU."""
    atlas = compute_atlas(
        model, images, target="pred", layers=[layer], activations=False, score=score
    )
    cam = upsample(atlas.cams[layer], (int(images.shape[-2]), int(images.shape[-1])))
    return normalize_per_map(cam)[0][:, 0].cpu()


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
) -> Figure:
    """One true class's gallery: the mistaken images with the Grad-CAM of what they were
    called (where the model looked to make its mistake).

    Args:
        model: The classifier that made the mistakes.
        images: ``(N, 3, H, W)`` model inputs of ``paths``, ``None`` when there are none.
        paths: The images' files, for the captions.
        mistakes: What :func:`confident_mistakes` found for ``true_class``, in order.
        true_class: cat 0, dog 1.
        layer: Conv layer of the overlays (Keras name).
        score: What Grad-CAM differentiates.
    """
    maps01 = captions = None
    if images is not None and len(paths):
        maps01 = predicted_class_cams(model, images, layer, score)
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
    )
