"""Per-image Grad-CAM of both classes, every layer: computed in one pass, normalized, saved as numbers.

:func:`image_maps` turns one :func:`~lightning_vgg.explain.atlas.compute_atlas` pass
over a batch into an :class:`ImageMaps` per image, with a :class:`ClassMaps` per class
(keyed by the class names of :data:`lightning_vgg.labels.CLASS_NAMES`);
:func:`normalize_maps` fills their displayable maps; :func:`write_maps` saves the numbers
behind the figures and :func:`captum_agreement` checks them against Captum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lightning_vgg.explain.atlas import Atlas, Score, captum_gradcam, compute_atlas, score_label
from lightning_vgg.explain.hooks import Tap
from lightning_vgg.explain.normalize import normalize_per_map, to_density
from lightning_vgg.explain.plots import overlay_label
from lightning_vgg.explain.scales import CamScale, density_unit
from lightning_vgg.fileio import atomic_path
from lightning_vgg.labels import CLASS_NAMES

__all__ = [
    "CLASS_SIGNS",
    "ClassMaps",
    "ImageMaps",
    "Normalize",
    "captum_agreement",
    "image_maps",
    "normalize_maps",
    "signed_maps",
    "title_of",
    "write_maps",
]

#: Grad-CAM display scale (see :mod:`lightning_vgg.explain.scales`): ``shared`` is the
#: absolute scale.
Normalize = Literal["per_map", "shared", "per_layer"]

#: The explained classes in output order (dog first, as every file and figure lists
#: them) and the sign of the logit that is each one's score: ``+logit`` is dog.
CLASS_SIGNS: dict[str, float] = {CLASS_NAMES[1]: 1.0, CLASS_NAMES[0]: -1.0}


@dataclass
class ClassMaps:
    """One class's Grad-CAM of one image, per layer (Keras name), on the CPU.

    Attributes:
        raw: ``(h, w)`` at the layer's own resolution, in the score's units.
        density: ``(H, W)`` evidence per input pixel (:func:`to_density`).
        normalized: ``(H, W)`` in ``[0, 1]`` for display; filled by :func:`normalize_maps`.
        zero: Whether the map holds no evidence at all; filled with ``normalized``.
    """

    raw: dict[str, Tensor] = field(default_factory=dict)
    density: dict[str, Tensor] = field(default_factory=dict)
    normalized: dict[str, Tensor] = field(default_factory=dict)
    zero: dict[str, bool] = field(default_factory=dict)


@dataclass
class ImageMaps:
    """Everything drawn for one image, on the CPU."""

    name: str
    image: Tensor
    prob_dog: float
    label: int | None
    logit: float = float("nan")
    activations: dict[str, Tensor] = field(default_factory=dict)
    classes: dict[str, ClassMaps] = field(
        default_factory=lambda: {cls: ClassMaps() for cls in CLASS_SIGNS}
    )
    score: Score = "logit"


def signed_maps(atlas: Atlas) -> dict[str, dict[str, Tensor]]:
    """Both classes' Grad-CAM from one pass, ``class -> layer -> (N, 1, h, w)``.

    The cat score is minus the dog logit and Grad-CAM is linear in the score before
    its ReLU, so the cat map is ``ReLU(-signed_dog)``: one backward pass serves both
    classes. With ``score="probability"`` the atlas's signed maps are already scaled
    by each image's ``p(1-p) >= 0``, and the same identity gives ``P(dog)``'s and
    ``P(cat) = 1 - P(dog)``'s maps (``d(1-p) = -dp``).
    """
    out: dict[str, dict[str, Tensor]] = {cls: {} for cls in CLASS_SIGNS}
    for name, signed in atlas.cams_signed.items():
        dog_signed = signed * atlas.target_sign.view(-1, 1, 1, 1).to(signed.dtype)
        for cls, sign in CLASS_SIGNS.items():
            out[cls][name] = torch.relu(dog_signed if sign > 0 else -dog_signed)
    return out


def image_maps(
    model: torch.nn.Module,
    images: Tensor,
    names: Sequence[str],
    labels: Sequence[int | None],
    tap: Tap = "post",
    keep_activations: bool = True,
    score: Score = "logit",
) -> list[ImageMaps]:
    """Feature maps and both classes' Grad-CAM (raw and as densities) for a batch, one pass.

    ``tap`` is :func:`~lightning_vgg.explain.atlas.compute_atlas`'s. ``score``: differentiate ``±logit`` or
    ``P(dog)`` / ``P(cat)`` (see :func:`~lightning_vgg.explain.atlas.compute_atlas`).
    """
    atlas = compute_atlas(
        model, images, target="dog", tap=tap, activations=keep_activations, score=score
    )
    per_class = signed_maps(atlas)
    size = (int(images.shape[-2]), int(images.shape[-1]))
    out = []
    for i, name in enumerate(names):
        im = ImageMaps(
            name=name,
            image=images[i].cpu(),
            prob_dog=float(atlas.probs[i]),
            label=labels[i],
            logit=float(atlas.logits[i]),
            score=score,
        )
        for layer in atlas.layer_names:
            for cls, maps in im.classes.items():
                cam = per_class[cls][layer]
                maps.raw[layer] = cam[i, 0].cpu()
                maps.density[layer] = to_density(cam[i : i + 1], size)[0, 0].cpu()
            if keep_activations:
                im.activations[layer] = atlas.activations[layer][i].cpu()
        out.append(im)
    return out


def normalize_maps(
    maps: Sequence[ImageMaps], normalize: Normalize, scale: CamScale | None = None
) -> CamScale:
    """Fill every class's displayable ``normalized`` maps in [0, 1] and their zero flags.

    ``per_map`` stretches each map to its own maximum (what CAM libraries do);
    ``shared`` divides every map by one absolute scale (a high quantile of all maps
    given, or ``scale``) so weak evidence looks weak across layers and checkpoints;
    ``per_layer`` gives each layer its own scale, shared by all the maps given.
    The zero flag is the map's own (no positive value at all), whatever the scale.

    Returns:
        The scale used, for the figures' titles and colour bars.
    """
    if scale is None:
        kind = {"per_map": "per_map", "shared": "absolute", "per_layer": "per_layer"}[normalize]
        unit = density_unit(maps[0].score) if maps else "logit"
        pairs = [(k, d) for m in maps for c in m.classes.values() for k, d in c.density.items()]
        across = "all layers and classes" if kind == "absolute" else "the images and classes"
        if len(maps) == 1:
            across = across.replace("the images and classes", "both classes")
        scale = CamScale.fit(kind, pairs, unit, across)  # type: ignore[arg-type]
    for m in maps:
        for c in m.classes.values():
            for layer, d in c.density.items():
                c.zero[layer] = bool(normalize_per_map(d[None, None])[1][0])
                c.normalized[layer] = scale.normalize(layer, d)
    return scale


def title_of(m: ImageMaps) -> str:
    """File name, prediction, probability, true label and the differentiated score."""
    return f"{m.name}   {overlay_label(m.prob_dog, m.label)}   Grad-CAM of {score_label(m.score)}"


def write_maps(m: ImageMaps, path: Path) -> Path:
    """The numbers behind the figures, for checking them against another implementation.

    One ``.npz`` with the exact model input (``input``, ``(3, S, S)`` float32), the
    ``logit``, the ``score`` mode and, per layer, the raw Grad-CAM of each class at
    the layer's own resolution in the score's units (``gradcam_dog.<layer>``,
    ``gradcam_cat.<layer>``): what Captum's ``LayerGradCam`` returns for the score
    ``+logit`` / ``-logit`` (``score="logit"``) or ``sigmoid(logit)`` /
    ``1 - sigmoid(logit)`` (``score="probability"``) with ``relu_attributions=True``,
    before any upsampling or normalization.
    """
    arrays: dict[str, np.ndarray] = {
        "input": m.image.numpy().astype(np.float32),
        "logit": np.float32(m.logit),
        "score": np.array(m.score),
    }
    for cls, c in m.classes.items():
        for layer, cam in c.raw.items():
            arrays[f"gradcam_{cls}.{layer}"] = cam.numpy().astype(np.float32)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return path


def captum_agreement(
    model: torch.nn.Module, images: Tensor, maps: Sequence[ImageMaps], tap: Tap
) -> dict[str, float]:
    """Per layer, the largest relative difference between our maps and Captum's.

    Runs Captum's ``LayerGradCam`` once per layer and class (26 forward and backward
    passes for a batch) on the same input and score (the maps' ``score``), and
    compares it with the one-pass maps in ``maps``: ``max |ours - captum| / max
    |captum|`` over the batch, the worse of the two classes. A layer where Captum's
    map is all zero scores 0 if ours is all zero too, else infinity.
    """
    worst: dict[str, float] = {}
    with torch.enable_grad():
        for layer in maps[0].classes["dog"].raw:
            diffs = []
            for cls, sign in CLASS_SIGNS.items():
                ref = captum_gradcam(model, images, layer, sign, tap=tap, score=maps[0].score)
                ref = ref[:, 0].cpu().double()
                ours = torch.stack([m.classes[cls].raw[layer] for m in maps]).double()
                peak = float(ref.abs().max())
                err = float((ours - ref).abs().max())
                diffs.append(err / peak if peak > 0 else (0.0 if err == 0 else float("inf")))
            worst[layer] = max(diffs)
    return worst
