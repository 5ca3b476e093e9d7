"""The training-time probe figures: feature maps and Grad-CAM atlases of a few fixed images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from torch import Tensor, nn

from lightning_vgg.explain.atlas import Score, compute_atlas
from lightning_vgg.explain.feature_plots import feature_map_grid, feature_overview
from lightning_vgg.explain.hooks import Tap
from lightning_vgg.explain.maps import Normalize, image_maps, normalize_maps, title_of
from lightning_vgg.explain.plots import atlas_figure
from lightning_vgg.labels import CLASS_NAMES

__all__ = ["feature_figures", "gradcam_figures"]


def _stem(i: int, label: int | None, path: str) -> str:
    """``cat0_<file stem>``: a probe's class, position and file, for figure names."""
    return f"{CLASS_NAMES[0] if label == 0 else CLASS_NAMES[1]}{i}_{Path(path).stem}"


def feature_figures(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    paths: Sequence[str],
    tap: Tap = "post",
    max_channels: int = 32,
) -> list[tuple[str, Figure]]:
    """Per probe image, the overview of all layers and one channel grid per layer.

    Returns:
        ``(name, figure)`` pairs: ``<stem>_overview`` and ``<stem>_<layer>``.
    """
    atlas = compute_atlas(model, images, tap=tap, cams=False)
    figs: list[tuple[str, Figure]] = []
    for i, path in enumerate(paths):
        stem = _stem(i, int(labels[i]), path)
        acts = {k: v[i] for k, v in atlas.activations.items()}
        figs.append((f"{stem}_overview", feature_overview(acts)))
        figs += [(f"{stem}_{k}", feature_map_grid(v, k, max_channels)) for k, v in acts.items()]
    return figs


def gradcam_figures(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    paths: Sequence[str],
    normalize: Normalize = "shared",
    score: Score = "logit",
) -> list[tuple[str, Figure]]:
    """Per probe image, the atlas of both classes' Grad-CAM at every layer.

    Returns:
        ``(name, figure)`` pairs named ``<stem>_atlas``.
    """
    names = [Path(p).name for p in paths]
    maps = image_maps(
        model, images, names, [int(v) for v in labels], keep_activations=False, score=score
    )
    scale = normalize_maps(maps, normalize)
    figs: list[tuple[str, Figure]] = []
    for i, m in enumerate(maps):
        dog, cat = m.classes["dog"], m.classes["cat"]
        fig = atlas_figure(
            m.image, dog.normalized, cat.normalized, scale, dog.zero, cat.zero, title=title_of(m)
        )
        figs.append((f"{_stem(i, m.label, paths[i])}_atlas", fig))
    return figs
