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

Every measure that exists per image keeps its per-image values (:class:`PerImage`)
and a bootstrap 95 % interval of its mean (:class:`~lightning_vgg.report.stats.Estimate`,
seeded with the measuring seed); the set-wide dead-channel fraction is not a per-image
quantity and has no interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_vgg.explain.atlas import Atlas, compute_atlas
from lightning_vgg.explain.faithfulness import (
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
    spatial_contrast_per_image,
    top_mass_share,
)
from lightning_vgg.explain.normalize import upsample
from lightning_vgg.explain.sanity import (
    cascading_randomization,
    randomized_copy,
    spearman_rank_correlation,
)
from lightning_vgg.report.results import (
    CAM_PER_IMAGE,
    FEATURE_PER_IMAGE,
    AucSummary,
    Cascade,
    CompareSettings,
    CurvePair,
    Curves,
    Faithfulness,
    LayerCam,
    LayerFeatures,
    MeanStd,
    MeasureOptions,
    ModelMeasures,
    PerImage,
    Sanity,
)
from lightning_vgg.report.stats import estimate, mean_pairwise_correlation

__all__ = [
    "STAGE",
    "TARGET",
    "TOP_Q",
    "AucSummary",
    "Cascade",
    "CompareSettings",
    "Curves",
    "Faithfulness",
    "FeatureStats",
    "LayerCam",
    "LayerFeatures",
    "MeanStd",
    "MeasureOptions",
    "ModelMeasures",
    "PerImage",
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
        self.values: dict[str, list[float]] = {k: [] for k in FEATURE_PER_IMAGE}

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
        self.values["dead_channel_fraction_per_image"] += dead.tolist()
        self.values["spatial_contrast"] += spatial_contrast_per_image(a).tolist()
        self.values["sparsity"] += (a == 0).flatten(1).double().mean(1).tolist()
        self.values["hoyer_sparsity"] += _hoyer_per_image(a).tolist()

    def result(self, seed: int = 0) -> LayerFeatures:
        """The pooled measures, with each per-image measure's interval (``seed``)."""
        if self.peak is None:
            raise ValueError("FeatureStats.result() before any update()")
        return LayerFeatures(
            dead_channel_fraction=dead_channel_fraction(self.peak),
            dead_channel_fraction_per_image=self.dead_per_image / self.images,
            spatial_contrast=self.contrast_sum / max(self.live, 1),
            sparsity=self.zeros / self.total,
            hoyer_sparsity=self.hoyer_sum / self.hoyer_n if self.hoyer_n else 1.0,
            per_image={k: estimate(v, seed) for k, v in self.values.items()},
        )


def _hoyer_per_image(a: Tensor) -> Tensor:
    """Hoyer sparsity of each image's code (``nan`` for an all-zero image), float64."""
    flat = a.flatten(1).abs().double()
    root = flat.shape[1] ** 0.5
    l2 = flat.norm(dim=1)
    h = (root - flat.sum(1) / l2.clamp_min(1e-300)) / max(root - 1, 1e-12)
    return torch.where(l2 > 0, h.clamp(0.0, 1.0), torch.nan)


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
    last_cams: list[Tensor] = field(default_factory=list)
    cascade_steps: list[str] = field(default_factory=list)
    cascade: list[Tensor] = field(default_factory=list)
    cascade_baseline: list[Tensor] = field(default_factory=list)

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
        self.last_cams.append(atlas.cams[self.layers[-1]].detach().flatten(1).cpu())

    def per_image(self) -> PerImage:
        """The per-image values, concatenated over batches."""

        def cat(parts: list[Tensor]) -> list[float]:
            return torch.cat(parts).double().tolist()

        last = _cat_di(self.di[self.layers[-1]])
        rnd = _cat_di(self.random_di)
        cascade = torch.cat(self.cascade, dim=1).double()
        return PerImage(
            features={layer: self.features[layer].values for layer in self.layers},
            gradcam={
                layer: {
                    "cam_entropy": cat(self.entropy[layer]),
                    "top_mass_share": cat(self.top[layer]),
                    "zero_map_fraction": cat(self.zero[layer]),
                }
                for layer in self.layers
            },
            sanity={layer: cat(self.rho[layer]) for layer in self.layers},
            faithfulness={
                "deletion_auc": last["deletion_auc"].double().tolist(),
                "insertion_auc": last["insertion_auc"].double().tolist(),
                "random_deletion_auc": rnd["deletion_auc"].double().tolist(),
                "random_insertion_auc": rnd["insertion_auc"].double().tolist(),
            },
            cascade={step: cascade[k].tolist() for k, step in enumerate(self.cascade_steps)},
            cascade_baseline=cat(self.cascade_baseline),
        )

    def result(self, opts: MeasureOptions, steps: int) -> ModelMeasures:
        """The pooled measures of every batch added, with bootstrap intervals."""
        layers, seed, per = self.layers, opts.seed, self.per_image()
        random_di = _cat_di(self.random_di)
        per_layer = {layer: _cat_di(parts) for layer, parts in self.di.items()}
        faithfulness = Faithfulness(
            layer=layers[-1],
            target=TARGET,
            score=opts.score,
            deletion_baseline=opts.deletion_baseline,
            insertion_baseline=opts.insertion_baseline,
            steps=steps,
            gradcam={layer: AucSummary.of(di, seed) for layer, di in per_layer.items()},
            random=AucSummary.of(random_di, seed),
            curves=Curves(
                fractions=[float(v) for v in random_di["fractions"]],
                gradcam=CurvePair.of(per_layer[layers[-1]]),
                random=CurvePair.of(random_di),
            ),
        )
        sanity = {layer: estimate(per.sanity[layer], seed) for layer in layers}
        cams = {
            layer: {k: estimate(v, seed) for k, v in per.gradcam[layer].items()} for layer in layers
        }
        return ModelMeasures(
            layers=layers,
            prob_dog=torch.cat(self.probs).tolist(),
            features={layer: self.features[layer].result(seed) for layer in layers},
            gradcam={
                layer: LayerCam(
                    *(cams[layer][k].mean for k in CAM_PER_IMAGE), per_image=cams[layer]
                )
                for layer in layers
            },
            sanity={layer: Sanity(e.mean, e.std, e.ci95, e.n) for layer, e in sanity.items()},
            faithfulness=faithfulness,
            cascade=Cascade(
                layer=layers[-1],
                steps=list(self.cascade_steps),
                rho=[estimate(per.cascade[step], seed) for step in self.cascade_steps],
                baseline=estimate(per.cascade_baseline, seed),
            ),
            cam_similarity=mean_pairwise_correlation(torch.cat(self.last_cams).double().numpy()),
            per_image=per,
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
    rand2 = randomized_copy(model, opts.seed + 1)  # the random-vs-random baseline
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
        last = parts.layers[-1]
        other = compute_atlas(
            rand2, x, target=sign, activations=False, layers=[last], score=opts.score
        )
        parts.cascade_baseline.append(
            spearman_rank_correlation(ratlas.cams[last], other.cams[last]).cpu()
        )
        parts.cascade_steps, rho = cascading_randomization(
            model, x, sign, last, opts.seed, opts.score
        )
        parts.cascade.append(rho)
        del ratlas, other
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
    del rand, rand2
    return parts.result(opts, steps)
