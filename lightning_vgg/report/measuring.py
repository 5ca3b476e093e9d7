"""Every per-layer measure of one model on one image set, as typed results.

:func:`measure_model` runs the model batch by batch on its device and returns a
:class:`ModelMeasures`: feature-map health (:class:`LayerFeatures`), Grad-CAM focus
(:class:`LayerCam`), deletion/insertion faithfulness (:class:`Faithfulness`) and the
parameter-randomisation sanity check (:class:`Sanity`). The arithmetic of each measure
lives in :mod:`lightning_vgg.explain.measures`; this module only streams batches
through it and pools the results, so the report and ``explain`` can never disagree
on what a measure means.

Grad-CAM in the measures explains each image's **predicted** class (what the model
decided, the usual choice for faithfulness: deletion then removes the evidence for
the decision actually taken).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_vgg.explain.atlas import Atlas, Score, compute_atlas
from lightning_vgg.explain.faithfulness import (
    BaselineKind,
    deletion_insertion,
    random_deletion_insertion,
    rise_steps,
)
from lightning_vgg.explain.hooks import Tap
from lightning_vgg.explain.measures import (
    cam_entropy,
    dead_channel_fraction,
    dead_channel_fraction_per_image,
    hoyer_sparsity,
    sparsity,
    spatial_contrast,
    top_mass_share,
)
from lightning_vgg.explain.normalize import upsample
from lightning_vgg.explain.sanity import randomized_copy, spearman_rank_correlation

__all__ = [
    "STAGE",
    "TARGET",
    "TOP_Q",
    "AucSummary",
    "CompareSettings",
    "Curves",
    "Faithfulness",
    "FeatureStats",
    "LayerCam",
    "LayerFeatures",
    "MeanStd",
    "MeasureOptions",
    "ModelMeasures",
    "Sanity",
    "measure_model",
]

#: Grad-CAM target in the measures (see the module docstring).
TARGET = "pred"
#: Feature maps are taken after the ReLU, as Keras's conv layers output them.
STAGE: Tap = "post"
#: Fraction of pixels in the Grad-CAM "top mass" measure.
TOP_Q = 0.10
#: How the deletion/insertion areas are computed, recorded with the numbers.
AUC_RULE = "trapezoid rule over the fraction of pixels, [0, 1]"


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class MeanStd:
    """Mean and population std of a per-image quantity."""

    mean: float
    std: float

    @classmethod
    def of(cls, values: Tensor) -> MeanStd:
        """Summarise ``values`` in float64 (a single value has std 0)."""
        v = values.double()
        return cls(float(v.mean()), float(v.std(correction=0)) if v.numel() > 1 else 0.0)


@dataclass(frozen=True)
class LayerFeatures:
    """Feature-map health of one layer (the keys of ``feature_map_measures``)."""

    dead_channel_fraction: float
    dead_channel_fraction_per_image: float
    spatial_contrast: float
    sparsity: float
    hoyer_sparsity: float


@dataclass(frozen=True)
class LayerCam:
    """Focus of one layer's Grad-CAM of the predicted class, averaged over images."""

    cam_entropy: float
    top_mass_share: float
    zero_map_fraction: float


@dataclass(frozen=True)
class Sanity:
    """Spearman correlation of one layer's maps with those of a re-initialised copy."""

    spearman_mean: float
    spearman_std: float


@dataclass(frozen=True)
class AucSummary:
    """Deletion and insertion areas of one pixel order, on the probability and the logit."""

    deletion_auc: MeanStd
    insertion_auc: MeanStd
    deletion_auc_logit: MeanStd
    insertion_auc_logit: MeanStd

    @classmethod
    def of(cls, di: Mapping[str, Tensor]) -> AucSummary:
        """Mean ± std over images of each area in a deletion/insertion result."""
        return cls(*(MeanStd.of(di[f.name].cpu()) for f in fields(cls)))


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


# --------------------------------------------------------------------------- streaming


class FeatureStats:
    """Feature-map measures of one layer, accumulated batch by batch.

    Gives the same numbers as
    :func:`~lightning_vgg.explain.measures.feature_map_measures` on all images at
    once, without holding every image's activations (block1 of a full VGG16 at 224 px
    is 12 MB per image). Each batch goes through the same functions; what is kept is
    what pools them exactly: the per-channel peaks (the set-wide dead fraction is
    :func:`dead_channel_fraction` of the peaks), and each pooled mean with its count.
    The counts come from :func:`dead_channel_fraction_per_image`: for post-ReLU
    (non-negative) activations a channel map is live, and an image's code non-zero,
    exactly when it is not silent.
    """

    def __init__(self) -> None:
        self.peak: Tensor | None = None
        self.images = 0
        self.dead_per_image = 0.0
        self.contrast_sum = 0.0
        self.live = 0
        self.zeros = 0
        self.total = 0
        self.hoyer_sum = 0.0
        self.hoyer_n = 0

    def update(self, acts: Tensor) -> None:
        """Add a batch ``(N, C, h, w)`` of post-ReLU activations."""
        a = acts.detach().float()
        n, channels = a.shape[:2]
        peak = a.abs().amax(dim=(0, 2, 3), keepdim=True)
        self.peak = peak if self.peak is None else torch.maximum(self.peak, peak)
        dead = dead_channel_fraction_per_image(a)
        silent = (dead * channels).round()  # channels silent on each image, as counts
        live = int(n * channels - silent.sum())
        nonzero = int((silent < channels).sum())
        self.images += n
        self.dead_per_image += float(dead.sum())
        self.contrast_sum += spatial_contrast(a) * live
        self.live += live
        # sparsity() is a float32 mean; rounded back it is the exact count of zeros.
        self.zeros += round(sparsity(a) * a.numel())
        self.total += a.numel()
        self.hoyer_sum += hoyer_sparsity(a) * nonzero
        self.hoyer_n += nonzero

    def result(self) -> LayerFeatures:
        """The pooled measures."""
        if self.peak is None:
            raise ValueError("FeatureStats.result() before any update()")
        return LayerFeatures(
            dead_channel_fraction=dead_channel_fraction(self.peak),
            dead_channel_fraction_per_image=self.dead_per_image / self.images,
            spatial_contrast=self.contrast_sum / max(self.live, 1),
            sparsity=self.zeros / self.total,
            hoyer_sparsity=self.hoyer_sum / self.hoyer_n if self.hoyer_n else 1.0,
        )


def _cat_di(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    keys = [k for k in parts[0] if k != "fractions"]
    out = {k: torch.cat([p[k].cpu() for p in parts]) for k in keys}
    out["fractions"] = parts[0]["fractions"].cpu()
    return out


@dataclass
class _Parts:
    """What the batches leave behind until the measures are summarised."""

    layers: list[str] = field(default_factory=list)
    probs: list[Tensor] = field(default_factory=list)
    features: dict[str, FeatureStats] = field(default_factory=dict)
    entropy: dict[str, list[Tensor]] = field(default_factory=dict)
    top: dict[str, list[Tensor]] = field(default_factory=dict)
    zero: dict[str, list[Tensor]] = field(default_factory=dict)
    rho: dict[str, list[Tensor]] = field(default_factory=dict)
    di: dict[str, list[dict[str, Tensor]]] = field(default_factory=dict)
    random_di: list[dict[str, Tensor]] = field(default_factory=list)

    def add_maps(self, atlas: Atlas, randomised: Atlas) -> None:
        """Feature maps, Grad-CAM focus and the sanity correlation of one batch."""
        self.layers = atlas.layer_names
        self.probs.append(atlas.probs.cpu())
        for layer in self.layers:
            self.features.setdefault(layer, FeatureStats()).update(atlas.activations[layer])
            cam = atlas.cams[layer]
            ent, zero = cam_entropy(cam, return_zero_mask=True)
            self.entropy.setdefault(layer, []).append(ent.cpu())
            self.top.setdefault(layer, []).append(top_mass_share(cam, TOP_Q).cpu())
            self.zero.setdefault(layer, []).append(zero.cpu())
            rho = spearman_rank_correlation(cam, randomised.cams[layer])
            self.rho.setdefault(layer, []).append(rho.cpu())

    def result(self, opts: MeasureOptions, steps: int) -> ModelMeasures:
        """The pooled measures of every batch added."""

        def mean(parts: list[Tensor]) -> float:
            return float(torch.cat(parts).double().mean())

        layers = self.layers
        random_di = _cat_di(self.random_di)
        per_layer = {layer: _cat_di(parts) for layer, parts in self.di.items()}
        faithfulness = Faithfulness(
            layer=layers[-1],
            target=TARGET,
            score=opts.score,
            deletion_baseline=opts.deletion_baseline,
            insertion_baseline=opts.insertion_baseline,
            steps=steps,
            gradcam={layer: AucSummary.of(di) for layer, di in per_layer.items()},
            random=AucSummary.of(random_di),
            curves=Curves(
                fractions=[float(v) for v in random_di["fractions"]],
                gradcam=CurvePair.of(per_layer[layers[-1]]),
                random=CurvePair.of(random_di),
            ),
        )
        sanity = {layer: MeanStd.of(torch.cat(self.rho[layer])) for layer in layers}
        return ModelMeasures(
            layers=layers,
            prob_dog=torch.cat(self.probs).tolist(),
            features={layer: self.features[layer].result() for layer in layers},
            gradcam={
                layer: LayerCam(
                    mean(self.entropy[layer]), mean(self.top[layer]), mean(self.zero[layer])
                )
                for layer in layers
            },
            sanity={layer: Sanity(s.mean, s.std) for layer, s in sanity.items()},
            faithfulness=faithfulness,
        )


def measure_model(
    model: torch.nn.Module, images: Tensor, opts: MeasureOptions, desc: str = ""
) -> ModelMeasures:
    """Every measure of one model on one image set, batch by batch, on its device.

    Args:
        model: The trained network (eval mode, on its device).
        images: ``(N, 3, S, S)`` model inputs on the CPU.
        opts: How to measure (batch size, deletion/insertion settings, seed of the
            randomised copy and of the random pixel orders, Grad-CAM score).
        desc: Progress bar label.
    """
    device = next(model.parameters()).device
    rand = randomized_copy(model, opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)  # same random orders for every model
    size = tuple(images.shape[-2:])
    steps = rise_steps(*size) if opts.deletion_steps is None else opts.deletion_steps
    di_options = {
        "steps": steps,
        "deletion_baseline": opts.deletion_baseline,
        "insertion_baseline": opts.insertion_baseline,
        "batch_size": 4 * opts.batch_size,
    }
    parts = _Parts()
    bar = tqdm(total=images.shape[0], desc=desc or "measuring", unit="img", leave=False)
    for start in range(0, images.shape[0], opts.batch_size):
        x = images[start : start + opts.batch_size].to(device)
        atlas = compute_atlas(
            model, x, target=TARGET, tap=STAGE, activations=True, score=opts.score
        )
        sign = atlas.target_sign
        ratlas = compute_atlas(rand, x, target=sign, tap=STAGE, activations=False, score=opts.score)
        parts.add_maps(atlas, ratlas)
        del ratlas
        explained = parts.layers if opts.faithfulness_layers == "all" else parts.layers[-1:]
        for layer in explained:
            saliency = upsample(atlas.cams[layer], size)[:, 0]
            di = deletion_insertion(model, x, saliency, sign, **di_options)
            parts.di.setdefault(layer, []).append(dict(di))
        rdi = random_deletion_insertion(model, x, sign, generator=gen, **di_options)
        parts.random_di.append(dict(rdi))
        del atlas
        bar.update(x.shape[0])
    bar.close()
    del rand
    return parts.result(opts, steps)
