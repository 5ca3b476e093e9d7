"""The typed results of measuring one model: what :mod:`~lightning_vgg.report.measuring`
hands to the sections, the findings and ``measures.json``.

Per-image measures carry their mean, std and bootstrap 95 % interval
(:class:`~lightning_vgg.report.stats.Estimate`); :class:`PerImage` keeps the values
behind them, so the two models can be compared image by image (paired).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from torch import Tensor

from lightning_vgg.explain.atlas import Score
from lightning_vgg.explain.faithfulness import BaselineKind
from lightning_vgg.report.stats import Estimate, estimate

# --------------------------------------------------------------------------- results


#: Mean, std and bootstrap interval of a per-image quantity (the former name).
MeanStd = Estimate

#: Per-image feature measures with an interval (``dead_channel_fraction`` is set-wide).
FEATURE_PER_IMAGE = (
    "dead_channel_fraction_per_image",
    "spatial_contrast",
    "sparsity",
    "hoyer_sparsity",
)
#: Per-image Grad-CAM focus measures.
CAM_PER_IMAGE = ("cam_entropy", "top_mass_share", "zero_map_fraction")


@dataclass(frozen=True)
class LayerFeatures:
    """Feature-map health of one layer (the keys of ``feature_map_measures``).

    ``per_image`` holds the mean over images of each per-image measure with its
    bootstrap interval; ``spatial_contrast`` above pools every live channel of every
    image, so it differs slightly from the per-image mean (each image weighted alike).
    """

    dead_channel_fraction: float
    dead_channel_fraction_per_image: float
    spatial_contrast: float
    sparsity: float
    hoyer_sparsity: float
    per_image: dict[str, Estimate] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerCam:
    """Focus of one layer's Grad-CAM of the predicted class, averaged over images."""

    cam_entropy: float
    top_mass_share: float
    zero_map_fraction: float
    per_image: dict[str, Estimate] = field(default_factory=dict)


@dataclass(frozen=True)
class Sanity:
    """Spearman correlation of one layer's maps with those of a re-initialised copy."""

    spearman_mean: float
    spearman_std: float
    ci95: tuple[float, float] | None = None
    n: int = 0


@dataclass(frozen=True)
class Cascade:
    """Cascading randomisation of ``layer``'s Grad-CAM (Adebayo et al. 2018).

    ``rho[k]``: ρ between the trained model's map and the map after re-initialising
    ``steps[: k + 1]``; ``baseline``: ρ between two independently re-initialised
    copies (the floor a map of an untrained network reaches).
    """

    layer: str
    steps: list[str]
    rho: list[Estimate]
    baseline: Estimate


@dataclass(frozen=True)
class PerImage:
    """Every per-image value behind the means, images in the order measured.

    ``features``/``gradcam``: ``layer -> measure -> values`` (``hoyer_sparsity`` is
    ``nan`` for an all-zero image); ``sanity``: ``layer -> ρ``; ``faithfulness``:
    ``deletion_auc``/``insertion_auc`` of the last layer's Grad-CAM and
    ``random_deletion_auc``/``random_insertion_auc``; ``cascade``: ``step -> ρ``.
    """

    features: dict[str, dict[str, list[float]]]
    gradcam: dict[str, dict[str, list[float]]]
    sanity: dict[str, list[float]]
    faithfulness: dict[str, list[float]]
    cascade: dict[str, list[float]]
    cascade_baseline: list[float]


@dataclass(frozen=True)
class AucSummary:
    """Deletion and insertion areas of one pixel order, on the probability and the logit."""

    deletion_auc: MeanStd
    insertion_auc: MeanStd
    deletion_auc_logit: MeanStd
    insertion_auc_logit: MeanStd

    @classmethod
    def of(cls, di: Mapping[str, Tensor], seed: int = 0) -> AucSummary:
        """Mean ± std and bootstrap interval over images of each area."""
        return cls(*(estimate(di[f.name].double().cpu().numpy(), seed) for f in fields(cls)))


@dataclass(frozen=True)
class CurvePair:
    """Mean deletion and insertion curves (probability of the explained class)."""

    deletion: list[float]
    insertion: list[float]

    @classmethod
    def of(cls, di: Mapping[str, Tensor]) -> CurvePair:
        """The curves averaged over images."""
        return cls(
            deletion=di["deletion_prob"].double().mean(0).tolist(),
            insertion=di["insertion_prob"].double().mean(0).tolist(),
        )


@dataclass(frozen=True)
class Curves:
    """The last layer's Grad-CAM curves beside the random order's, on one x axis."""

    fractions: list[float]
    gradcam: CurvePair
    random: CurvePair


@dataclass(frozen=True)
class Faithfulness:
    """Deletion/insertion of the explained layers against random pixel orders."""

    layer: str
    target: str
    score: str
    deletion_baseline: str
    insertion_baseline: str
    steps: int
    gradcam: dict[str, AucSummary]
    random: AucSummary
    curves: Curves

    @property
    def baseline(self) -> str:
        """Both baselines in words, for titles."""
        return f"deletion → {self.deletion_baseline}, insertion → {self.insertion_baseline}"


@dataclass(frozen=True)
class ModelMeasures:
    """Every measure of one model on one image set; layers in network order."""

    layers: list[str]
    prob_dog: list[float]
    features: dict[str, LayerFeatures]
    gradcam: dict[str, LayerCam]
    sanity: dict[str, Sanity]
    faithfulness: Faithfulness
    cascade: Cascade
    #: Mean pairwise correlation of the last layer's Grad-CAMs over the images
    #: (:func:`~lightning_vgg.report.stats.mean_pairwise_correlation`): near 1, the
    #: same map for every image.
    cam_similarity: float
    per_image: PerImage

    def accuracy(self, labels: Tensor) -> float:
        """Share of the images whose thresholded ``P(dog)`` matches ``labels``."""
        pred = torch.tensor(self.prob_dog) >= 0.5
        return float((pred.long() == labels).double().mean())


@dataclass(frozen=True)
class MeasureOptions:
    """How the measures are taken (the ``compare`` options that change numbers).

    ``deletion_steps=None`` is RISE's one step per 224 pixels (:func:`rise_steps`).
    ``faithfulness_layers`` runs deletion/insertion for the last conv layer only or
    for every layer (13 times the cost). ``score`` picks what Grad-CAM
    differentiates; the focus measures, rank correlations and pixel orders are
    invariant to the per-image factor ``p(1-p)`` that tells ``logit`` and
    ``probability`` apart, except where it underflows to 0 (all-zero maps).
    """

    batch_size: int = 25
    deletion_steps: int | None = None
    deletion_baseline: BaselineKind = "zero"
    insertion_baseline: BaselineKind = "blur"
    seed: int = 0
    faithfulness_layers: Literal["last", "all"] = "last"
    score: Score = "logit"


@dataclass(frozen=True)
class CompareSettings:
    """The comparison's settings that its report and ``measures.json`` record."""

    n_per_class: int
    show_per_class: int
    input_size: int
    device: torch.device
    measure: MeasureOptions
