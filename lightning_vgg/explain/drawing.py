"""Writing one image's explain files (figures and numbers), serially or in a drawing process pool."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import torch

from lightning_vgg.explain.atlas import score_label
from lightning_vgg.explain.feature_plots import feature_map_grid, feature_overview
from lightning_vgg.explain.maps import ImageMaps, title_of, write_maps
from lightning_vgg.explain.plots import atlas_figure, gradcam_overlay
from lightning_vgg.explain.scales import CamScale
from lightning_vgg.fileio import save_figure

__all__ = ["Done", "figure_pool", "write_image_files"]


def write_image_files(
    m: ImageMaps,
    out: Path,
    scale: CamScale,
    max_channels: int = 64,
    overview_n: int = 8,
    save_maps: bool = True,
) -> dict[str, Any]:
    """All files of one image: feature grids, overview, overlays, the atlas and the raw maps.

    ``scale`` is how ``m``'s maps were normalised (stated on every Grad-CAM figure).

    Returns:
        What was written, relative to ``out``: ``maps``, ``features`` (per layer),
        ``features_overview``, ``gradcam_dog`` / ``gradcam_cat`` (per layer), ``atlas``.
    """
    files: dict[str, Any] = {"features": {}, "gradcam_dog": {}, "gradcam_cat": {}}
    title = title_of(m)
    if save_maps:
        p = write_maps(m, out / "maps.npz")
        files["maps"] = p.relative_to(out).as_posix()
    for layer, act in m.activations.items():
        p = save_figure(
            feature_map_grid(act, layer, max_channels=max_channels),
            out / "features" / f"{layer}.png",
        )
        files["features"][layer] = p.relative_to(out).as_posix()
    if m.activations:
        p = save_figure(
            feature_overview(m.activations, n=overview_n), out / "features_overview.png"
        )
        files["features_overview"] = p.relative_to(out).as_posix()
    for cls, c in m.classes.items():
        for layer, map01 in c.normalized.items():
            fig = gradcam_overlay(
                m.image,
                map01,
                f"{layer}, Grad-CAM of {score_label(m.score, cls)} — {title}",
                scale,
                zero=c.zero[layer],
                layer=layer,
            )
            p = save_figure(fig, out / "gradcam" / f"{layer}_{cls}.png")
            files[f"gradcam_{cls}"][layer] = p.relative_to(out).as_posix()
    dog, cat = m.classes["dog"], m.classes["cat"]
    p = save_figure(
        atlas_figure(
            m.image, dog.normalized, cat.normalized, scale, dog.zero, cat.zero, title=title
        ),
        out / "atlas.png",
    )
    files["atlas"] = p.relative_to(out).as_posix()
    return files


class Done:
    """A finished job, so serial and pooled drawing share one code path."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def done(self) -> bool:
        return True

    def result(self) -> Any:
        return self.value


@contextlib.contextmanager
def figure_pool(workers: int) -> Iterator[Executor | None]:
    """A process pool for drawing, or ``None`` for serial drawing.

    Not plain ``fork``: the pool starts its processes at the first job, after the
    model has run, and a child forked from a process whose torch thread pool is
    running deadlocks in its first parallel op (seen here as a hung ``explain``).
    ``forkserver`` forks from a clean server process instead, and ``spawn`` is the
    fallback where there is none; each worker pays its imports once.
    """
    if workers <= 0:
        yield None
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=mp.get_context(method), initializer=_drawing_worker
    ) as pool:
        yield pool


def _drawing_worker() -> None:
    """One thread per drawing process: they run side by side, not inside each other."""
    torch.set_num_threads(1)
