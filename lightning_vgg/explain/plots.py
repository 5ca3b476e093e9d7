"""Matplotlib figures for the atlas: feature-map grids, Grad-CAM overlays, per-image atlases.

Every function returns a :class:`~matplotlib.figure.Figure` built on the Agg canvas
directly (not through ``pyplot``), so nothing depends on the process's backend or
display and no global figure registry grows while thousands of figures are drawn; save
each with :func:`lightning_vgg.fileio.save_figure` (atomic, and it closes the figure).

Inputs may be torch tensors (any device) or NumPy arrays. Maps handed to the overlay
functions are already in ``[0, 1]`` (see :mod:`lightning_vgg.explain.normalize` for the
per-map and shared normalisations); these functions never rescale them, so a weak map
stays faint, and an all-zero map is flagged in text rather than drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_vgg.labels import CLASS_NAMES

__all__ = [
    "OVERLAY_ALPHA",
    "atlas_comparison",
    "atlas_figure",
    "draw_overlay",
    "feature_comparison",
    "feature_map_grid",
    "feature_overview",
    "gradcam_overlay",
    "minmax",
    "overlay_label",
]

#: Largest side (px) of one channel in a feature-map grid; larger maps are averaged down.
GRID_CELL_MAX = 112
#: Opacity of the jet heat map over the photo.
OVERLAY_ALPHA = 0.45
#: Text drawn instead of a heat map when the map is all zero.
ZERO_FLAG = "all-zero map"


def _np(x: Any) -> np.ndarray:
    """A float NumPy copy of a tensor or array (detached, on the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").float().numpy()
    return np.asarray(x, dtype=np.float32)


def _figure(width: float, height: float, constrained: bool = True) -> Figure:
    """A pyplot-free figure on the Agg canvas; constrained layout keeps titles tight."""
    fig = Figure(figsize=(width, height), layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def minmax(channel: Any) -> np.ndarray:
    """Min-max scale one channel to ``[0, 1]`` for display; a constant channel gives zeros.

    Per-channel scaling shows each channel's pattern (as the seed did); a constant
    channel (typically dead after ReLU) has no pattern, and dividing by its zero
    range would turn rounding noise into one, so it is drawn flat instead.
    """
    a = _np(channel)
    lo, hi = float(np.min(a)), float(np.max(a))
    span = hi - lo
    # Relative to the magnitude: float32 rounding of a constant is ~1e-7 of it.
    if not np.isfinite(span) or span == 0 or span <= 1e-6 * max(abs(hi), abs(lo)):
        return np.zeros_like(a)
    return (a - lo) / span


def _image_hwc(image: Any) -> np.ndarray:
    """``(3, H, W)`` or ``(H, W, 3)`` in ``[0, 1]`` to ``(H, W, 3)`` clipped to ``[0, 1]``."""
    a = _np(image)
    if a.ndim != 3:
        raise ValueError(f"image must have 3 dims, got shape {a.shape}")
    if a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.clip(a, 0.0, 1.0)


def _map_hw(map01: Any, size: tuple[int, int]) -> np.ndarray:
    """A ``(H, W)`` map, resized bilinearly to ``size`` if it is smaller/larger."""
    m = _np(map01)
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


def draw_overlay(
    ax: Axes,
    image: Any,
    map01: Any | None,
    label: str | None = None,
    zero: bool | None = None,
    alpha: float = OVERLAY_ALPHA,
    fontsize: float = 8,
) -> None:
    """Draw ``image`` with a jet heat map of ``map01`` on top, on one axis.

    Args:
        ax: Target axis (its ticks are removed).
        image: ``(3, H, W)`` or ``(H, W, 3)`` in ``[0, 1]``.
        map01: ``(H, W)`` (or ``(1, h, w)``, resized to the image) with values in
            ``[0, 1]``, drawn with fixed limits 0..1 so faint evidence stays faint.
            ``None`` draws the plain image.
        label: Title of the axis.
        zero: Whether the map is all zero (e.g. ``normalize_per_map``'s flag); ``None``
            infers it from the map. A zero map draws the plain image and the text
            "all-zero map" instead of a meaningless uniform (or noisy) colour.
        alpha: Heat-map opacity.
        fontsize: Title and flag font size.
    """
    img = _image_hwc(image)
    ax.imshow(img, interpolation="bilinear")
    if map01 is not None:
        m = _map_hw(map01, img.shape[:2])
        is_zero = bool(zero) if zero is not None else not bool(np.nanmax(m) > 0)
        if is_zero:
            ax.text(
                0.5,
                0.5,
                ZERO_FLAG,
                transform=ax.transAxes,
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white",
                bbox={"facecolor": "black", "alpha": 0.6, "pad": 2, "edgecolor": "none"},
            )
        else:
            ax.imshow(m, cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear")
    if label:
        ax.set_title(label, fontsize=fontsize)
    ax.set_xticks([])
    ax.set_yticks([])


def gradcam_overlay(image: Any, map01: Any, title: str, zero: bool | None = None) -> Figure:
    """One image with its Grad-CAM overlay: the photo, the overlay, and the map alone.

    Args:
        image: ``(3, H, W)`` in ``[0, 1]``.
        map01: ``(H, W)`` in ``[0, 1]``.
        title: Figure title (e.g. the layer name and :func:`overlay_label`).
        zero: All-zero flag (inferred when ``None``); see :func:`draw_overlay`.
    """
    fig = _figure(9.0, 3.4)
    axes = fig.subplots(1, 3)
    draw_overlay(axes[0], image, None, "image")
    draw_overlay(axes[1], image, map01, "Grad-CAM", zero=zero)
    m = _map_hw(map01, _image_hwc(image).shape[:2])
    axes[2].imshow(m, cmap="jet", vmin=0.0, vmax=1.0)
    axes[2].set_title("map", fontsize=8)
    axes[2].set_xticks([])
    axes[2].set_yticks([])
    fig.suptitle(title, fontsize=10)
    return fig


def block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Average ``(C, h, w)`` over ``k x k`` blocks (edge rows/columns past a multiple of
    ``k`` are dropped): an area filter for shrinking maps before display."""
    if k <= 1:
        return a
    c, h, w = a.shape
    hk, wk = max(1, h // k), max(1, w // k)
    kh, kw = min(k, h), min(k, w)
    return a[:, : hk * kh, : wk * kw].reshape(c, hk, kh, wk, kw).mean(axis=(2, 4))


def tile_channels(a: np.ndarray, cols: int, cell: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile ``(C, h, w)`` channels, each min-max scaled, into one mosaic (NaN gaps).

    One ``imshow`` of a mosaic renders far faster than one axis per channel, which
    matters when ``explain`` draws 13 grids for every image.

    Args:
        a: Channels to tile.
        cols: Channels per mosaic row.
        cell: Side each channel is scaled to (nearest); ``None`` keeps ``h, w``.
        pad: Gap between channels, drawn in the background colour.
    """
    c, h, w = a.shape
    if cell is not None and (h, w) != (cell, cell):
        ri = (np.arange(cell) * h // cell).clip(0, h - 1)
        ci = (np.arange(cell) * w // cell).clip(0, w - 1)
        a = a[:, ri][:, :, ci]
        h = w = cell
    rows = math.ceil(c / cols)
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad), np.nan, dtype=np.float32)
    for i in range(c):
        r, k = divmod(i, cols)
        out[r * (h + pad) : r * (h + pad) + h, k * (w + pad) : k * (w + pad) + w] = minmax(a[i])
    return out


def _mosaic_axis(ax: Axes, mosaic: np.ndarray) -> None:
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    ax.imshow(mosaic, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_frame_on(False)


def feature_map_grid(act: Any, name: str, max_channels: int = 64) -> Figure:
    """The first ``max_channels`` channels of one layer as a square-ish grid.

    Each channel is min-max scaled on its own (:func:`minmax`), so patterns show
    whatever their magnitude, and a constant (dead) channel is drawn flat. The title
    is the layer name and the full map shape, e.g. ``block3_conv2  (256, 56, 56)``,
    plus how many channels are shown when not all.

    Args:
        act: ``(C, h, w)`` feature maps of one image.
        name: Layer name for the title.
        max_channels: Most channels drawn.
    """
    a = _np(act)
    if a.ndim != 3:
        raise ValueError(f"act must be (C, h, w), got shape {a.shape}")
    if max_channels < 1:
        raise ValueError(f"max_channels must be at least 1, got {max_channels}")
    c = a.shape[0]
    n = min(c, max_channels)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    shown = a[:n]
    if max(shown.shape[1:]) > GRID_CELL_MAX:
        # A cell is drawn about 1.3 in = 130 px wide: average down to that size here
        # (area filter, no aliasing) instead of letting the renderer resample a mosaic
        # several times larger than the figure.
        shown = block_mean(shown, math.ceil(max(shown.shape[1:]) / GRID_CELL_MAX))
    cell = max(shown.shape[1], 24)
    fig = _figure(max(3.0, 1.3 * cols), 1.3 * rows + 0.5)
    _mosaic_axis(fig.add_subplot(), tile_channels(shown, cols, cell=cell, pad=max(1, cell // 12)))
    title = f"{name}  {tuple(int(s) for s in a.shape)}"
    if n < c:
        title += f"  (first {n} of {c} channels)"
    fig.suptitle(title, fontsize=11)
    return fig


def feature_overview(acts: Mapping[str, Any], n: int = 8) -> Figure:
    """The first ``n`` channels of every layer, one row per layer (the depth at a glance).

    Args:
        acts: ``name -> (C, h, w)`` for one image, in network order.
        n: Channels per row.
    """
    if not acts:
        raise ValueError("feature_overview needs at least one layer")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rows = len(acts)
    fig = _figure(1.2 * n + 1.6, 1.2 * rows + 0.4)
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    cell = 48
    for ax, (name, act) in zip(axes, acts.items(), strict=True):
        a = _np(act)
        if a.ndim != 3:
            raise ValueError(f"{name}: act must be (C, h, w), got shape {a.shape}")
        _mosaic_axis(ax, tile_channels(a[:n], n, cell=cell, pad=3))
        ax.set_ylabel(
            f"{name}\n{tuple(int(s) for s in a.shape)}",
            rotation=0,
            ha="right",
            va="center",
            fontsize=8,
        )
    fig.suptitle(f"first {n} channels of each layer", fontsize=11)
    return fig


def atlas_figure(
    image: Any,
    maps_dog: Mapping[str, Any],
    maps_cat: Mapping[str, Any],
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
    zero_dog = zero_dog or {}
    zero_cat = zero_cat or {}
    cols = len(names)
    fig = _figure(1.55 * (cols + 1.6), 3.8, constrained=False)
    # Column 1 is a spacer that keeps the row labels off the image.
    grid = fig.add_gridspec(
        2, cols + 2, width_ratios=[1.4, 0.2] + [1.0] * cols, wspace=0.05, hspace=0.15
    )
    draw_overlay(fig.add_subplot(grid[:, 0]), image, None, "image")
    for j, name in enumerate(names):
        ax_d = fig.add_subplot(grid[0, j + 2])
        ax_c = fig.add_subplot(grid[1, j + 2])
        draw_overlay(ax_d, image, maps_dog[name], name, zero=zero_dog.get(name), fontsize=7)
        draw_overlay(ax_c, image, maps_cat[name], None, zero=zero_cat.get(name), fontsize=7)
        if j == 0:
            ax_d.set_ylabel("dog", fontsize=9)
            ax_c.set_ylabel("cat", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def gallery_figure(
    images: Any, maps01: Any, labels: list[str], title: str, cols: int = 4
) -> Figure:
    """A grid of images with their Grad-CAM overlays (the misclassification gallery).

    Args:
        images: ``(N, 3, H, W)`` in ``[0, 1]``.
        maps01: ``(N, H, W)`` in ``[0, 1]``, or ``None`` entries for plain images.
        labels: One caption per image (e.g. :func:`overlay_label` plus the file name).
        title: Figure title.
        cols: Images per row.
    """
    n = len(labels)
    if n == 0:
        fig = _figure(6, 1.2)
        fig.suptitle(title, fontsize=11)
        fig.text(0.5, 0.4, "no misclassified images", ha="center", va="center")
        return fig
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = _figure(2.6 * cols, 2.7 * rows + 0.4)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        if i < n:
            draw_overlay(
                ax, images[i], None if maps01 is None else maps01[i], labels[i], fontsize=7
            )
        else:
            ax.set_axis_off()
    fig.suptitle(title, fontsize=11)
    return fig


def feature_comparison(
    acts_by_model: Mapping[str, Mapping[str, Any]],
    image: Any | None = None,
    n: int = 8,
    title: str = "",
) -> Figure:
    """The first ``n`` channels of every layer for several models, layer beside layer.

    One row per layer, one column per model (e.g. good | broken), each cell a strip
    of ``n`` channels min-max scaled on their own (:func:`minmax`; a dead channel is
    drawn flat, in the colormap's darkest colour). With ``image`` the first row shows
    the input once per column.

    Args:
        acts_by_model: ``model name -> (layer -> (C, h, w))`` for one image; every
            model must have the same layers, in network order.
        image: ``(3, H, W)`` in ``[0, 1]``, drawn on top; ``None`` leaves it out.
        n: Channels per layer and model.
        title: Figure title.
    """
    models = list(acts_by_model)
    if not models:
        raise ValueError("feature_comparison needs at least one model")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    layers = list(acts_by_model[models[0]])
    if not layers:
        raise ValueError("feature_comparison needs at least one layer")
    for m in models[1:]:
        if list(acts_by_model[m]) != layers:
            raise ValueError(f"model {m!r} has layers {list(acts_by_model[m])}, not {layers}")
    rows = len(layers) + (image is not None)
    cols = len(models)
    fig = _figure(cols * (0.75 * n + 0.4) + 1.6, 0.8 * rows + 0.7)
    axes = fig.subplots(rows, cols, squeeze=False)
    offset = 0
    if image is not None:
        for j, m in enumerate(models):
            ax = axes[0, j]
            ax.imshow(_image_hwc(image), interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
            ax.set_title(m, fontsize=10)
        axes[0, 0].set_ylabel("input", rotation=0, ha="right", va="center", fontsize=8)
        offset = 1
    for i, layer in enumerate(layers):
        for j, m in enumerate(models):
            a = _np(acts_by_model[m][layer])
            if a.ndim != 3:
                raise ValueError(f"{m}/{layer}: act must be (C, h, w), got shape {a.shape}")
            ax = axes[i + offset, j]
            _mosaic_axis(ax, tile_channels(a[:n], n, cell=32, pad=2))
            if i == 0 and image is None:
                ax.set_title(m, fontsize=10)
            if j == 0:
                ax.set_ylabel(
                    f"{layer}\n{tuple(int(s) for s in a.shape)}",
                    rotation=0,
                    ha="right",
                    va="center",
                    fontsize=7,
                )
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def atlas_comparison(
    image: Any,
    rows: Mapping[str, tuple[Mapping[str, Any], Mapping[str, bool]]],
    title: str = "",
    colorbar_label: str | None = None,
) -> Figure:
    """Grad-CAM of every layer for several (model, class) rows of one image, one scale.

    The image sits at the left; each row is one model's map for one class (e.g.
    ``good: dog``), one column per layer in network order. Maps are drawn as given
    (``[0, 1]``, fixed colour limits), so on maps normalised by one shared scale a
    weak model's weak evidence looks weak. All-zero maps are flagged in text.

    Args:
        image: ``(3, H, W)`` in ``[0, 1]``.
        rows: ``row label -> (layer -> (H, W) map in [0, 1], layer -> all-zero flag)``;
            every row must have the same layers.
        title: Figure title.
        colorbar_label: When given, a 0..1 colour bar with this label (e.g. the shared
            scale in physical units) is drawn at the right.
    """
    labels = list(rows)
    if not labels:
        raise ValueError("atlas_comparison needs at least one row")
    layers = list(rows[labels[0]][0])
    if not layers:
        raise ValueError("atlas_comparison needs at least one layer")
    for lab in labels[1:]:
        if list(rows[lab][0]) != layers:
            raise ValueError(f"row {lab!r} has layers {list(rows[lab][0])}, not {layers}")
    n_rows, cols = len(labels), len(layers)
    extra = 0.35 if colorbar_label else 0.0
    fig = _figure(1.3 * (cols + 1.8) + extra * 3, 1.35 * n_rows + 0.9, constrained=False)
    ratios = [1.4, 0.35] + [1.0] * cols + ([0.12] if colorbar_label else [])
    grid = fig.add_gridspec(
        n_rows, len(ratios), width_ratios=ratios, wspace=0.05, hspace=0.12, top=0.86
    )
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
    if colorbar_label:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        cax = fig.add_subplot(grid[:, -1])
        fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap="jet"), cax=cax)
        cax.set_ylabel(colorbar_label, fontsize=8)
        cax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
