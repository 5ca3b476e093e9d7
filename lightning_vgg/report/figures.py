"""Figures of the reports: runs' learning curves and per-layer measures on shared axes.

Like :mod:`lightning_vgg.explain.plots`, every function returns a Figure on the Agg
canvas (no pyplot), to be saved with :func:`lightning_vgg.fileio.save_figure`. Runs are
given as ``name -> data`` mappings in display order; each run keeps one colour in all
figures (the first is blue, the second orange). Missing values (``None``) leave gaps
rather than being drawn as zeros.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from lightning_vgg.fileio import save_figure
from lightning_vgg.report.html import finite_or_none

if TYPE_CHECKING:
    from lightning_vgg.report.results import Cascade, Curves

#: ``run name -> layer -> measure -> (lo, hi)``: 95 % intervals drawn as bands.
Bands = Mapping[str, Mapping[str, Mapping[str, "tuple[float, float] | None"]]]

#: Saves a figure under a report's ``figures/`` by file name; returns the link to it.
SaveFigure = Callable[[Figure, str], str]

#: Colours of the runs, in order (matplotlib's first two defaults, then more).
RUN_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_saver(figdir: Path) -> SaveFigure:
    """A :data:`SaveFigure` writing into ``figdir`` (the report's ``figures/``)."""

    def save(figure: Figure, name: str) -> str:
        save_figure(figure, figdir / name)
        return f"figures/{name}"

    return save


#: The one epoch convention of every figure: 0-based, as metrics.csv, the checkpoints
#: and visualizations/epoch_XXX count.
EPOCH_LABEL = "epoch (0-based, as in metrics.csv)"
#: Line style of each stage's curve.
STAGE_STYLES = (("train", "-"), ("val", "--"))


def learning_curves(
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    chosen: Mapping[str, int | None] | None = None,
    title: str = "",
) -> Figure:
    """Accuracy and loss against epoch, train solid and validation dashed.

    One function serves a run's own ``history.png`` and the comparison's, so both
    keep the seed's axes and the epoch convention. With one run the two stages are
    told apart by colour too (train blue, val orange) and labelled ``train acc``;
    with several, each run keeps its colour in every figure and lines are labelled
    ``good train``.

    Args:
        runs: ``run name -> metrics.csv rows`` (as
            :func:`lightning_vgg.report.history.read_metrics_csv` returns them).
        chosen: ``run name -> epoch`` (0-based, as in metrics.csv) of the checkpoint
            being compared, drawn as a dotted vertical line in the run's colour.
        title: Added to each panel's title (``Accuracy — <title>``).
    """
    single = len(runs) == 1
    fig = _figure(11, 4) if single else _figure(12, 4.2)
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, ("acc", "loss"), strict=True):
        for i, (name, rows) in enumerate(runs.items()):
            for j, (stage, style) in enumerate(STAGE_STYLES):
                key = f"{stage}/{kind}"
                pts = [
                    (int(r["epoch"]), float(r[key]))
                    for r in rows
                    if "epoch" in r and finite_or_none(r.get(key)) is not None
                ]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(
                        xs,
                        ys,
                        style,
                        color=RUN_COLOURS[j if single else i % len(RUN_COLOURS)],
                        label=f"{stage} {kind}" if single else f"{name} {stage}",
                        marker="." if len(pts) < 30 else None,
                    )
        for i, name in enumerate(runs):
            epoch = (chosen or {}).get(name)
            if epoch is not None:
                ax.axvline(
                    epoch,
                    color=RUN_COLOURS[i % len(RUN_COLOURS)],
                    linestyle=":",
                    linewidth=1.5,
                    label=f"{name} checkpoint (epoch {epoch})",
                )
        ax.set_xlabel(EPOCH_LABEL)
        lo, hi = ax.get_xlim()
        if ax.lines and hi - lo < 3:  # too few epochs for integer ticks: widen to whole ones
            first = max(0, round(lo))  # epochs start at 0: no tick at -1
            ax.set_xlim(first - 0.5, first + 2.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if kind == "acc":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylabel("accuracy" if kind == "acc" else "loss (binary cross-entropy)")
        ax.set_title(f"{'Accuracy' if kind == 'acc' else 'Loss'}{' — ' + title if title else ''}")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=None if single else 8)
        else:
            ax.text(0.5, 0.5, "no metrics", transform=ax.transAxes, ha="center")
    return fig


def measures_by_layer(
    per_run: Mapping[str, Mapping[str, Mapping[str, float | None]]],
    panels: Sequence[tuple[str, str]],
    cols: int = 3,
    title: str = "",
    bands: Bands | None = None,
    percent: Collection[str] = (),
) -> Figure:
    """One panel per measure, the measure against layer depth, every run on one axis.

    Args:
        per_run: ``run name -> layer -> measure -> value`` (layers in network order,
            the same for every run).
        panels: ``(measure key, panel title)`` in display order.
        cols: Panels per row.
        title: Figure title.
        bands: Bootstrap 95 % intervals, shaded around each run's line where given.
        percent: Keys of fractions, drawn in percent from 0 (as the report's tables).
    """
    rows = math.ceil(len(panels) / cols)
    fig = _figure(4.3 * cols, 3.1 * rows + (0.4 if title else 0))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (key, label) in zip(axes, panels, strict=False):
        layers: list[str] = []
        for (name, table), colour in zip(per_run.items(), RUN_COLOURS, strict=False):
            layers = list(table)
            ys = [finite_or_none(table[layer].get(key)) for layer in layers]
            ax.plot(
                range(len(layers)),
                [math.nan if y is None else y for y in ys],
                "-o",
                color=colour,
                label=name,
                markersize=3,
            )
            ci = [(bands or {}).get(name, {}).get(layer, {}).get(key) for layer in layers]
            if any(c is not None for c in ci):
                lo = [math.nan if c is None else c[0] for c in ci]
                hi = [math.nan if c is None else c[1] for c in ci]
                ax.fill_between(range(len(layers)), lo, hi, color=colour, alpha=0.2, lw=0)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(
            [layer.replace("block", "b").replace("_conv", ".") for layer in layers],
            rotation=90,
            fontsize=7,
        )
        ax.set_title(label, fontsize=9)
        if key in percent:  # a share: no negative axis, percent as in the tables
            top = max(ax.get_ylim()[1], 0.01)
            ax.set_ylim(-0.02 * top, top)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def deletion_insertion_curves(curves: Mapping[str, Curves], layer: str, baseline: str) -> Figure:
    """Mean deletion and insertion curves of each run, Grad-CAM vs random order.

    Args:
        curves: ``run name -> mean probability curves`` of the Grad-CAM and the
            random pixel orders.
        layer: The conv layer whose Grad-CAM ordered the pixels (for the title).
        baseline: What removed pixels were replaced by, e.g. ``deletion → zero,
            insertion → blur`` (for the title).
    """
    fig = _figure(11, 4)
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, ("deletion", "insertion"), strict=True):
        for (name, c), colour in zip(curves.items(), RUN_COLOURS, strict=False):
            xs = c.fractions
            ax.plot(xs, getattr(c.gradcam, kind), "-", color=colour, label=f"{name}: Grad-CAM")
            ax.plot(xs, getattr(c.random, kind), ":", color=colour, label=f"{name}: random")
        ax.set_xlabel(f"fraction of pixels {'removed' if kind == 'deletion' else 'revealed'}")
        ax.set_ylabel("P(explained class)")
        ax.set_ylim(-0.02, 1.02)
        better = "lower" if kind == "deletion" else "higher"
        ax.set_title(f"{kind.capitalize()} ({better} area is better)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Faithfulness of {layer} Grad-CAM (baselines: {baseline})", fontsize=11)
    return fig


def cascade_curves(cascades: Mapping[str, Cascade]) -> Figure:
    """Cascading randomisation: ρ against the layers randomised, with 95 % bands.

    Each run's random-vs-random baseline (two independently re-initialised copies) is
    a horizontal dashed line in its colour, its interval shaded.
    """
    fig = _figure(11, 4.2)
    ax = fig.subplots()
    steps: list[str] = []
    for (name, c), colour in zip(cascades.items(), RUN_COLOURS, strict=False):
        steps = c.steps
        xs = range(len(steps))
        mean = [e.mean for e in c.rho]
        ax.plot(xs, mean, "-o", color=colour, markersize=3, label=f"{name}: trained vs randomised")
        lo = [math.nan if e.ci95 is None else e.ci95[0] for e in c.rho]
        hi = [math.nan if e.ci95 is None else e.ci95[1] for e in c.rho]
        ax.fill_between(xs, lo, hi, color=colour, alpha=0.2, lw=0)
        b = c.baseline
        ax.axhline(b.mean, color=colour, linestyle="--", lw=1, label=f"{name}: random vs random")
        if b.ci95 is not None:
            ax.axhspan(*b.ci95, color=colour, alpha=0.08, lw=0)
    ax.set_xticks(range(len(steps)))
    ax.set_xticklabels([f"+{s}" for s in steps], rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("layers re-initialised, from the top down (cumulative)")
    layer = next(iter(cascades.values())).layer if cascades else ""
    ax.set_ylabel(f"Spearman ρ of the {layer} Grad-CAM")
    ax.set_ylim(-1.02, 1.02)
    ax.axhline(0, color="black", lw=0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(
        "Cascading randomisation (Adebayo et al. 2018): mean ρ over images, 95% CI", fontsize=10
    )
    return fig
