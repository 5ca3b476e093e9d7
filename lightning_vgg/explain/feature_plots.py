"""Matplotlib figures of feature maps: one layer's channel grid, every layer's first channels, models side by side.

Every channel is min-max scaled on its own, so a channel's pattern shows whatever its
magnitude; that is stated on every figure, with a colour bar running from "channel
min" to "channel max". A channel that is constant (dead after its ReLU, or
saturated) has no pattern: it is drawn flat grey, never stretched rounding noise.
Channels are numbered: a grid's row label plus its column label is the channel's
index in the layer; a strip's column label is the index.

Figures are built on the Agg canvas directly (see :mod:`lightning_vgg.explain.plots`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from lightning_vgg.explain.plots import figure_agg, image_hwc, to_numpy

__all__ = [
    "CHANNEL_NOTE",
    "FLAT",
    "block_mean",
    "feature_comparison",
    "feature_map_grid",
    "feature_overview",
    "minmax",
    "tile_channels",
]

#: Largest side (px) of one channel in a feature-map grid; larger maps are averaged down.
GRID_CELL_MAX = 112
#: Mosaic value of a constant channel: below the colour range, drawn in :data:`FLAT_COLOUR`.
FLAT = -1.0
FLAT_COLOUR = "#9a9a9a"
#: What every feature-map figure says about its colours.
CHANNEL_NOTE = "each channel min–max scaled on its own; grey = constant channel (no pattern)"


def minmax(channel: Any) -> np.ndarray:
    """Min-max scale one channel to ``[0, 1]``; a constant channel gives :data:`FLAT`.

    A constant channel (typically dead after ReLU) has no pattern, and dividing by its
    zero range would turn rounding noise into one, so it is marked instead.
    """
    a = to_numpy(channel)
    lo, hi = float(np.min(a)), float(np.max(a))
    span = hi - lo
    # Relative to the magnitude: float32 rounding of a constant is ~1e-7 of it.
    if not np.isfinite(span) or span == 0 or span <= 1e-6 * max(abs(hi), abs(lo)):
        return np.full_like(a, FLAT)
    return (a - lo) / span


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


def _cmap() -> matplotlib.colors.Colormap:
    return matplotlib.colormaps["viridis"].with_extremes(bad="white", under=FLAT_COLOUR)


def _mosaic_axis(ax: Axes, mosaic: np.ndarray) -> None:
    ax.imshow(mosaic, cmap=_cmap(), vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_frame_on(False)


def _number_cells(ax: Axes, cols: int, rows: int, cell: int, pad: int, fontsize: float) -> None:
    """Channel numbers as tick labels: columns ``0..cols-1`` on top, row starts at the left."""
    step = cell + pad
    ax.set_xticks([k * step + (cell - 1) / 2 for k in range(cols)], [str(k) for k in range(cols)])
    ax.set_yticks(
        [r * step + (cell - 1) / 2 for r in range(rows)], [str(r * cols) for r in range(rows)]
    )
    ax.tick_params(
        length=0,
        labelsize=fontsize,
        pad=1,
        top=True,
        labeltop=True,
        bottom=False,
        labelbottom=False,
    )


def _channel_colorbar(fig: Figure, ax: Axes | list[Axes], fontsize: float = 7) -> None:
    """The shared colour bar of per-channel scaling, with the grey "constant" end."""
    bar = fig.colorbar(
        ScalarMappable(Normalize(0.0, 1.0), cmap=_cmap()),
        ax=ax,
        extend="min",
        extendfrac=0.08,
        shrink=0.8,
        aspect=30,
        pad=0.01,
    )
    bar.set_ticks([0.0, 1.0], labels=["channel min", "channel max"])
    bar.ax.tick_params(labelsize=fontsize)
    # the triangle below the bar is the "under" colour: say what it means beside it
    bar.ax.text(1.4, -0.05, "constant", transform=bar.ax.transAxes, va="center", fontsize=fontsize)


def feature_map_grid(act: Any, name: str, max_channels: int = 64) -> Figure:
    """The first ``max_channels`` channels of one layer as a square-ish, numbered grid.

    The title is the layer name and the full map shape, e.g. ``block3_conv2  (256, 56,
    56)``, plus how many channels are shown when not all, and how channels are scaled.

    Args:
        act: ``(C, h, w)`` feature maps of one image.
        name: Layer name for the title.
        max_channels: Most channels drawn.
    """
    a = to_numpy(act)
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
    pad = max(1, cell // 12)
    fig = figure_agg(max(4.4, 1.3 * cols + 1.4), 1.3 * rows + 1.0)
    ax = fig.add_subplot()
    _mosaic_axis(ax, tile_channels(shown, cols, cell=cell, pad=pad))
    _number_cells(ax, cols, rows, cell, pad, fontsize=7 if cols > 4 else 8)
    _channel_colorbar(fig, ax)
    title = f"{name}  {tuple(int(s) for s in a.shape)}"
    if n < c:
        title += f"  (first {n} of {c} channels)"
    note = CHANNEL_NOTE.replace("; ", ";\n")
    fig.suptitle(f"{title}\n{note}; channel = row + column", fontsize=8)
    return fig


def _strip_label(ax: Axes, name: str, shape: tuple[int, ...], fontsize: float) -> None:
    ax.set_ylabel(f"{name}\n{shape}", rotation=0, ha="right", va="center", fontsize=fontsize)


def _number_strip(ax: Axes, n: int, cell: int, pad: int, fontsize: float) -> None:
    """Channel indices ``0..n-1`` under a strip's cells."""
    step = cell + pad
    ax.set_xticks([k * step + (cell - 1) / 2 for k in range(n)], [str(k) for k in range(n)])
    ax.tick_params(length=0, labelsize=fontsize, pad=1)


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
    fig = figure_agg(1.2 * n + 2.4, 1.2 * rows + 0.8)
    axes = list(fig.subplots(rows, 1, squeeze=False)[:, 0])
    cell, pad = 48, 3
    for ax, (name, act) in zip(axes, acts.items(), strict=True):
        a = to_numpy(act)
        if a.ndim != 3:
            raise ValueError(f"{name}: act must be (C, h, w), got shape {a.shape}")
        _mosaic_axis(ax, tile_channels(a[:n], n, cell=cell, pad=pad))
        _strip_label(ax, name, tuple(int(s) for s in a.shape), 8)
    _number_strip(axes[-1], n, cell, pad, 7)
    axes[-1].set_xlabel("channel", fontsize=8)
    _channel_colorbar(fig, axes)
    fig.suptitle(f"first {n} channels of each layer\n{CHANNEL_NOTE}", fontsize=10)
    return fig


def feature_comparison(
    acts_by_model: Mapping[str, Mapping[str, Any]],
    image: Any | None = None,
    n: int = 8,
    title: str = "",
) -> Figure:
    """The first ``n`` channels of every layer for several models, layer beside layer.

    One row per layer, one column per model (e.g. good | broken), each cell a strip
    of ``n`` numbered channels, each min-max scaled on its own (:func:`minmax`; a
    constant channel is grey). With ``image`` the first row shows the input once per
    column.

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
    fig = figure_agg(cols * (0.75 * n + 0.4) + 2.6, 0.8 * rows + 1.1)
    axes = fig.subplots(rows, cols, squeeze=False)
    offset = 0
    if image is not None:
        for j, m in enumerate(models):
            ax = axes[0, j]
            ax.imshow(image_hwc(image), interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
            ax.set_title(m, fontsize=10)
        axes[0, 0].set_ylabel("input", rotation=0, ha="right", va="center", fontsize=8)
        offset = 1
    cell, pad = 32, 2
    for i, layer in enumerate(layers):
        for j, m in enumerate(models):
            a = to_numpy(acts_by_model[m][layer])
            if a.ndim != 3:
                raise ValueError(f"{m}/{layer}: act must be (C, h, w), got shape {a.shape}")
            ax = axes[i + offset, j]
            _mosaic_axis(ax, tile_channels(a[:n], n, cell=cell, pad=pad))
            if i == 0 and image is None:
                ax.set_title(m, fontsize=10)
            if j == 0:
                _strip_label(ax, layer, tuple(int(s) for s in a.shape), 7)
    for j in range(cols):
        _number_strip(axes[-1, j], n, cell, pad, 6)
        axes[-1, j].set_xlabel("channel", fontsize=7)
    _channel_colorbar(fig, list(axes[offset:].ravel()))
    fig.suptitle(f"{title}\n{CHANNEL_NOTE}" if title else CHANNEL_NOTE, fontsize=10)
    return fig
