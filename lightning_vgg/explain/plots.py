"""Matplotlib figures of Grad-CAM: overlays, per-image atlases, galleries and model-beside-model atlases.

Every function returns a :class:`~matplotlib.figure.Figure` built on the Agg canvas
directly (not through ``pyplot``), so nothing depends on the process's backend or
display and no global figure registry grows while thousands of figures are drawn; save
each with :func:`lightning_vgg.fileio.save_figure` (atomic, and it closes the figure).

Inputs may be torch tensors (any device) or NumPy arrays. Maps handed to these
functions are already in ``[0, 1]`` on a :class:`~lightning_vgg.explain.scales.CamScale`,
which every figure names in its title and draws as a colour bar with its unit; they
are never rescaled here, so a weak map stays faint. An all-zero map (no evidence at
all) is drawn in the colour scale's darkest colour and marked "all-zero map".
Feature-map figures are in :mod:`lightning_vgg.explain.feature_plots`.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from lightning_vgg.explain.scales import CamScale
from lightning_vgg.labels import CLASS_NAMES

__all__ = [
    "CAM_CMAP",
    "OVERLAY_ALPHA",
    "ZERO_FLAG",
    "atlas_comparison",
    "atlas_figure",
    "draw_overlay",
    "figure_agg",
    "gallery_figure",
    "gradcam_overlay",
    "image_hwc",
    "overlay_label",
    "to_numpy",
]

#: Colour map of every Grad-CAM figure (its darkest colour is "no evidence").
CAM_CMAP = "jet"
#: Opacity of the heat map over the photo.
OVERLAY_ALPHA = 0.45
#: The mark on a map that holds no evidence at all.
ZERO_FLAG = "all-zero map"


def to_numpy(x: Any) -> np.ndarray:
    """A float NumPy copy of a tensor or array (detached, on the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").float().numpy()
    return np.asarray(x, dtype=np.float32)


def figure_agg(width: float, height: float, constrained: bool = True) -> Figure:
    """A pyplot-free figure on the Agg canvas; constrained layout keeps titles tight."""
    fig = Figure(figsize=(width, height), layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def image_hwc(image: Any) -> np.ndarray:
    """``(3, H, W)`` or ``(H, W, 3)`` in ``[0, 1]`` to ``(H, W, 3)`` clipped to ``[0, 1]``."""
    a = to_numpy(image)
    if a.ndim != 3:
        raise ValueError(f"image must have 3 dims, got shape {a.shape}")
    if a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.clip(a, 0.0, 1.0)


def _map_hw(map01: Any, size: tuple[int, int]) -> np.ndarray:
    """A ``(H, W)`` map, resized bilinearly to ``size`` if it is smaller/larger."""
    m = to_numpy(map01)
    m = m.reshape(m.shape[-2:])
    if m.shape != size:
        import torch

        from lightning_vgg.explain.normalize import upsample

        m = upsample(torch.from_numpy(np.ascontiguousarray(m)), size).numpy()
    return m


def overlay_label(prob_dog: float, true_label: int | str | None = None) -> str:
    """Caption for an image: ``pred dog (p=0.93) | true cat``.

    ``p`` is the probability of the predicted class (``P(dog)`` for a dog prediction,
    ``1 - P(dog)`` for a cat one), so it always reads as the model's confidence.
    ``P(dog) >= 0.5`` means dog, as in training. Labels are cat=0, dog=1 (or the names).
    """
    p = float(prob_dog)
    pred = "dog" if p >= 0.5 else "cat"
    conf = p if pred == "dog" else 1.0 - p
    text = f"pred {pred} (p={conf:.2f})"
    if true_label is None:
        return text
    if isinstance(true_label, str):
        if true_label.lower() not in CLASS_NAMES:
            raise ValueError(f"true_label must be cat/dog or 0/1, got {true_label!r}")
        true = true_label.lower()
    else:
        idx = int(true_label)
        if idx not in (0, 1):
            raise ValueError(f"true_label must be 0 (cat) or 1 (dog), got {true_label!r}")
        true = CLASS_NAMES[idx]
    return f"{text} | true {true}"


def _no_ticks(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _flag_zero(ax: Axes, fontsize: float) -> None:
    """The "all-zero map" mark, centred on the axis."""
    ax.text(
        0.5,
        0.5,
        ZERO_FLAG,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=fontsize,
        color="white",
        bbox={"facecolor": "black", "alpha": 0.75, "pad": 2, "edgecolor": "white"},
    )


def draw_overlay(
    ax: Axes,
    image: Any,
    map01: Any | None,
    label: str | None = None,
    zero: bool | None = None,
    alpha: float = OVERLAY_ALPHA,
    fontsize: float = 8,
) -> None:
    """Draw ``image`` with a heat map of ``map01`` on top, on one axis.

    Args:
        ax: Target axis (its ticks are removed).
        image: ``(3, H, W)`` or ``(H, W, 3)`` in ``[0, 1]``.
        map01: ``(H, W)`` (or ``(1, h, w)``, resized to the image) with values in
            ``[0, 1]``, drawn with fixed limits 0..1 so faint evidence stays faint.
            ``None`` draws the plain image.
        label: Title of the axis.
        zero: Whether the map is all zero (e.g. ``normalize_per_map``'s flag); ``None``
            infers it from the map. A zero map is drawn as zeros (the darkest colour,
            so it never looks brighter than a weak map) and marked "all-zero map".
        alpha: Heat-map opacity.
        fontsize: Title and flag font size.
    """
    img = image_hwc(image)
    ax.imshow(img, interpolation="bilinear")
    if map01 is not None:
        m = _map_hw(map01, img.shape[:2])
        is_zero = bool(zero) if zero is not None else not bool(np.nanmax(m) > 0)
        if is_zero:
            m = np.zeros_like(m)
        ax.imshow(m, cmap=CAM_CMAP, alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear")
        if is_zero:
            _flag_zero(ax, fontsize)
    if label:
        ax.set_title(label, fontsize=fontsize)
    _no_ticks(ax)


def cam_colorbar(
    fig: Figure,
    scale: CamScale,
    cax: Axes | None = None,
    ax: Any = None,
    layer: str | None = None,
) -> None:
    """The colour bar of a Grad-CAM figure: ``scale``'s range and unit.

    On the absolute scale (and on a per-layer one in a figure of one ``layer``) its
    ticks are in the score's units per input pixel; otherwise they are fractions (of
    each map's maximum, or of each layer's scale).
    """
    bar = fig.colorbar(
        ScalarMappable(Normalize(0.0, scale.colorbar_max(layer)), cmap=CAM_CMAP),
        cax=cax,
        ax=None if cax is not None else ax,
        shrink=1.0 if cax is not None else 0.85,
        pad=0.01,
    )
    bar.set_label(scale.colorbar_label(layer), fontsize=7)
    bar.ax.tick_params(labelsize=7)
    # plain short numbers (no "1e-5" offset text floating above the bar)
    bar.formatter = FuncFormatter(lambda v, _: f"{v:.3g}")


def gradcam_overlay(
    image: Any,
    map01: Any,
    title: str,
    scale: CamScale,
    zero: bool | None = None,
    layer: str | None = None,
) -> Figure:
    """One image with its Grad-CAM: the photo, the overlay, and the map alone, with a colour bar.

    Args:
        image: ``(3, H, W)`` in ``[0, 1]``.
        map01: ``(H, W)`` in ``[0, 1]`` on ``scale``.
        title: Figure title (e.g. the layer name and :func:`overlay_label`).
        scale: How ``map01`` was scaled; stated in the title and the colour bar.
        zero: All-zero flag (inferred when ``None``); see :func:`draw_overlay`.
        layer: The map's layer: on a per-layer scale, its top value is stated.
    """
    fig = figure_agg(10.0, 3.6)
    axes = fig.subplots(1, 3)
    draw_overlay(axes[0], image, None, "image")
    draw_overlay(axes[1], image, map01, "Grad-CAM over the image", zero=zero)
    m = _map_hw(map01, image_hwc(image).shape[:2])
    is_zero = bool(zero) if zero is not None else not bool(np.nanmax(m) > 0)
    axes[2].imshow(np.zeros_like(m) if is_zero else m, cmap=CAM_CMAP, vmin=0.0, vmax=1.0)
    if is_zero:
        _flag_zero(axes[2], 8)
    axes[2].set_title("Grad-CAM alone", fontsize=8)
    _no_ticks(axes[2])
    cam_colorbar(fig, scale, ax=list(axes), layer=layer)
    fig.suptitle(f"{title}\n{scale.title(layer)}", fontsize=9)
    return fig


def _cam_grid(
    fig: Figure,
    image: Any,
    rows: Mapping[str, tuple[Mapping[str, Any], Mapping[str, bool]]],
    scale: CamScale,
    layout: Mapping[str, float],
) -> None:
    """The image at the left, one row per ``rows`` entry, one column per layer, a colour bar."""
    labels = list(rows)
    layers = list(rows[labels[0]][0])
    ratios = [1.4, 0.35] + [1.0] * len(layers) + [0.12]
    grid = fig.add_gridspec(len(labels), len(ratios), width_ratios=ratios, **layout)
    draw_overlay(fig.add_subplot(grid[:, 0]), image, None, "image")
    for i, lab in enumerate(labels):
        maps, zeros = rows[lab]
        for j, layer in enumerate(layers):
            ax = fig.add_subplot(grid[i, j + 2])
            draw_overlay(
                ax, image, maps[layer], layer if i == 0 else None, zero=zeros.get(layer), fontsize=7
            )
            if j == 0:
                ax.set_ylabel(lab, fontsize=8)
            if i == len(labels) - 1 and scale.column_note(layer):
                ax.set_xlabel(scale.column_note(layer), fontsize=6)
    cam_colorbar(fig, scale, cax=fig.add_subplot(grid[:, -1]))


def _check_rows(
    rows: Mapping[str, tuple[Mapping[str, Any], Mapping[str, bool]]], what: str
) -> None:
    labels = list(rows)
    if not labels:
        raise ValueError(f"{what} needs at least one row")
    layers = list(rows[labels[0]][0])
    if not layers:
        raise ValueError(f"{what} needs at least one layer")
    for lab in labels[1:]:
        if list(rows[lab][0]) != layers:
            raise ValueError(f"row {lab!r} has layers {list(rows[lab][0])}, not {layers}")


def atlas_figure(
    image: Any,
    maps_dog: Mapping[str, Any],
    maps_cat: Mapping[str, Any],
    scale: CamScale,
    zero_dog: Mapping[str, bool] | None = None,
    zero_cat: Mapping[str, bool] | None = None,
    title: str = "",
) -> Figure:
    """One image's Grad-CAM in every layer: the image at the left, then a dog row and a cat row.

    Columns follow ``maps_dog``'s order (network order), so the eye can follow the
    evidence from edges (block1) to object parts (block5).

    Args:
        image: ``(3, H, W)`` in ``[0, 1]``.
        maps_dog: ``name -> (H, W)`` in ``[0, 1]`` for the dog score.
        maps_cat: The same names for the cat score.
        scale: How the maps were scaled; stated in the title and the colour bar.
        zero_dog: ``name -> all-zero flag``; missing names are inferred.
        zero_cat: Likewise for the cat maps.
        title: Figure title (e.g. file name and :func:`overlay_label`).
    """
    names = list(maps_dog)
    if not names:
        raise ValueError("atlas_figure needs at least one layer")
    missing = [k for k in names if k not in maps_cat]
    if missing:
        raise ValueError(f"maps_cat lacks layers {missing}")
    rows = {"dog": (maps_dog, zero_dog or {}), "cat": (maps_cat, zero_cat or {})}
    fig = figure_agg(1.55 * (len(names) + 1.8), 4.1, constrained=False)
    _cam_grid(fig, image, rows, scale, {"wspace": 0.05, "hspace": 0.15, "top": 0.8})
    fig.suptitle(f"{title}\n{scale.title()}" if title else scale.title(), fontsize=10)
    return fig


def gallery_figure(
    images: Any, maps01: Any, labels: list[str], title: str, scale: CamScale, cols: int = 4
) -> Figure:
    """A grid of images with their Grad-CAM overlays (the misclassification gallery).

    Args:
        images: ``(N, 3, H, W)`` in ``[0, 1]``.
        maps01: ``(N, H, W)`` in ``[0, 1]`` on ``scale``, or ``None`` for plain images.
        labels: One caption per image (e.g. :func:`overlay_label` plus the file name).
        title: Figure title.
        scale: How the maps were scaled; stated in the title and the colour bar.
        cols: Images per row.
    """
    n = len(labels)
    if n == 0:
        fig = figure_agg(6, 1.2)
        fig.suptitle(title, fontsize=11)
        fig.text(0.5, 0.4, "no misclassified images", ha="center", va="center")
        return fig
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = figure_agg(2.6 * cols + 0.8, 2.7 * rows + 0.7)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        if i < n:
            draw_overlay(
                ax, images[i], None if maps01 is None else maps01[i], labels[i], fontsize=7
            )
        else:
            ax.set_axis_off()
    if maps01 is not None:
        cam_colorbar(fig, scale, ax=list(axes))
    width = int(11 * (2.6 * cols + 0.8))  # characters that fit at 10 pt
    lines = textwrap.wrap(title, width) + textwrap.wrap(scale.title(), width)
    fig.suptitle("\n".join(lines), fontsize=10)
    return fig


def atlas_comparison(
    image: Any,
    rows: Mapping[str, tuple[Mapping[str, Any], Mapping[str, bool]]],
    scale: CamScale,
    title: str = "",
) -> Figure:
    """Grad-CAM of every layer for several (model, class) rows of one image, one scale.

    The image sits at the left; each row is one model's map for one class (e.g.
    ``good: dog``), one column per layer in network order. Maps are drawn as given
    (``[0, 1]``, fixed colour limits): on an absolute or per-layer scale shared by
    the models a weak model's weak evidence looks weak. On the per-layer scale each
    column's top value is written under it.

    Args:
        image: ``(3, H, W)`` in ``[0, 1]``.
        rows: ``row label -> (layer -> (H, W) map in [0, 1], layer -> all-zero flag)``;
            every row must have the same layers.
        scale: How the maps were scaled; stated in the title and the colour bar.
        title: Figure title.
    """
    _check_rows(rows, "atlas_comparison")
    cols = len(rows[next(iter(rows))][0])
    fig = figure_agg(1.3 * (cols + 1.8) + 1.0, 1.35 * len(rows) + 1.2, constrained=False)
    _cam_grid(
        fig, image, rows, scale, {"wspace": 0.05, "hspace": 0.12, "top": 0.84, "bottom": 0.08}
    )
    fig.suptitle(f"{title}\n{scale.title()}" if title else scale.title(), fontsize=10)
    return fig
