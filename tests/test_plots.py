"""Each plot function draws a PNG that loads, at a sane size, including the zero-map path."""

from __future__ import annotations

from pathlib import Path

import matplotlib.colors
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from lightning_vgg.explain import atlas as A
from lightning_vgg.explain import feature_plots as F
from lightning_vgg.explain import normalize as N
from lightning_vgg.explain import plots as P
from lightning_vgg.explain.scales import CamScale
from lightning_vgg.fileio import save_figure
from lightning_vgg.models.vgg import VGG16

SIZE = 64
PER_MAP = CamScale("per_map")


def _texts(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.findobj(match=lambda o: hasattr(o, "get_text"))]


def _saved(fig: Figure, path: Path, min_w: int = 100, min_h: int = 80) -> tuple[int, int]:
    out = save_figure(fig, path)
    assert out == path and path.exists()
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left nothing behind
    with Image.open(path) as img:
        img.load()
        w, h = img.size
        assert img.format == "PNG"
    assert min_w <= w <= 6000 and min_h <= h <= 6000
    return w, h


@pytest.fixture(scope="module")
def photo(cat_photo: Path) -> torch.Tensor:
    img = Image.open(cat_photo).convert("RGB").resize((SIZE, SIZE))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0


@pytest.fixture(scope="module")
def atlas(photo: torch.Tensor) -> A.Atlas:
    torch.manual_seed(0)
    net = VGG16(width=1 / 16, input_size=SIZE)
    return A.compute_atlas(net, photo[None], target="dog").to("cpu")


def test_overlay_label() -> None:
    assert P.overlay_label(0.93, 0) == "pred dog (p=0.93) | true cat"
    assert P.overlay_label(0.07, 1) == "pred cat (p=0.93) | true dog"
    assert P.overlay_label(0.5) == "pred dog (p=0.50)"
    assert P.overlay_label(0.2, "cat") == "pred cat (p=0.80) | true cat"
    with pytest.raises(ValueError):
        P.overlay_label(0.2, 3)


def test_minmax_flat_for_constant_channels() -> None:
    assert (F.minmax(np.full((4, 4), 3.0)) == F.FLAT).all()
    assert (F.minmax(np.zeros((4, 4))) == F.FLAT).all()
    noisy_const = np.full((4, 4), 5.0, dtype=np.float32) + np.float32(4e-7) * np.eye(
        4, dtype=np.float32
    )
    assert (F.minmax(noisy_const) == F.FLAT).all()
    ramp = F.minmax(torch.arange(16.0).view(4, 4))
    assert ramp.min() == 0 and ramp.max() == 1


def test_feature_map_grid(atlas: A.Atlas, tmp_path: Path) -> None:
    act = atlas.activations["block1_conv1"][0]
    act[0] = 0.0  # a dead channel draws flat
    fig = F.feature_map_grid(act, "block1_conv1", max_channels=64)
    assert any(t.startswith(f"block1_conv1  (4, {SIZE}, {SIZE})") for t in _texts(fig))
    _saved(fig, tmp_path / "grid.png")
    big = F.feature_map_grid(torch.rand(100, 8, 8), "block3_conv2", max_channels=16)
    assert any("(first 16 of 100 channels)" in t for t in _texts(big))
    mosaic = big.axes[0].images[0].get_array()
    # 16 channels tiled 4 x 4 into one mosaic (drawn with one imshow, for speed)
    assert mosaic.shape[0] == mosaic.shape[1] and int((~mosaic.mask).sum()) == 16 * 24 * 24
    _saved(big, tmp_path / "big.png")
    with pytest.raises(ValueError):
        F.feature_map_grid(torch.rand(8, 8), "x")


def test_feature_overview(atlas: A.Atlas, tmp_path: Path) -> None:
    acts = {k: v[0] for k, v in atlas.activations.items()}
    fig = F.feature_overview(acts, n=8)
    assert len(fig.axes) == 13 + 1  # one mosaic row per layer, and the colour bar
    first = fig.axes[0].images[0].get_array()
    assert int((~first.mask).sum()) == 4 * 48 * 48  # block1 has 4 channels at this width
    w, h = _saved(fig, tmp_path / "overview.png", min_w=400, min_h=600)
    assert h > w  # one row per layer


def test_gradcam_overlay_and_zero_flag(atlas: A.Atlas, photo: torch.Tensor, tmp_path: Path) -> None:
    maps, zero = N.normalize_per_map(atlas.cams["block4_conv1"])
    assert not zero[0]  # a map with content, for the normal path
    up = N.upsample(maps, SIZE)[0, 0]
    label = "block4_conv1 | " + P.overlay_label(float(atlas.probs[0]), 0)
    fig = P.gradcam_overlay(photo, up, label, PER_MAP, zero=bool(zero[0]))
    assert P.ZERO_FLAG not in _texts(fig)
    assert any(ax.images and len(ax.images) == 2 for ax in fig.axes)  # photo + heat map
    _saved(fig, tmp_path / "overlay.png")
    # A small map is resized to the image by the helper itself.
    _saved(P.gradcam_overlay(photo, maps[0], "small map", PER_MAP), tmp_path / "small.png")
    zero_fig = P.gradcam_overlay(photo, torch.zeros(SIZE, SIZE), "zero", PER_MAP)
    assert P.ZERO_FLAG in _texts(zero_fig)
    _saved(zero_fig, tmp_path / "zero.png")
    # An explicit flag wins over the values (e.g. a flagged map passed un-zeroed).
    flagged = P.gradcam_overlay(photo, up, "flagged", PER_MAP, zero=True)
    assert P.ZERO_FLAG in _texts(flagged)
    flagged.clear()


def test_atlas_figure(atlas: A.Atlas, photo: torch.Tensor, tmp_path: Path) -> None:
    dens = {n: N.to_density(atlas.cams[n], SIZE) for n in atlas.layer_names}
    scale = N.shared_scale(list(dens.values()))
    maps_dog = {n: N.normalize_shared(d, scale)[0, 0] for n, d in dens.items()}
    maps_cat = {n: torch.zeros(SIZE, SIZE) for n in atlas.layer_names}
    zero_cat = dict.fromkeys(atlas.layer_names, True)
    title = P.overlay_label(float(atlas.probs[0]), 0)
    absolute = CamScale("absolute", "logit", scale)
    fig = P.atlas_figure(photo, maps_dog, maps_cat, absolute, None, zero_cat, title=title)
    assert len(fig.axes) == 1 + 2 * 13 + 1  # image, two rows of 13, the colour bar
    assert _texts(fig).count(P.ZERO_FLAG) >= 13
    for name in atlas.layer_names:
        assert name in _texts(fig)
    w, h = _saved(fig, tmp_path / "atlas.png", min_w=800, min_h=150)
    assert w > 3 * h  # a wide strip: 13 layers side by side
    with pytest.raises(ValueError):
        P.atlas_figure(photo, maps_dog, {}, absolute, title="missing")


def test_block_mean_averages_blocks_and_drops_the_ragged_edge() -> None:
    from lightning_vgg.explain.feature_plots import block_mean

    a = np.arange(2 * 5 * 4, dtype=np.float32).reshape(2, 5, 4)
    out = block_mean(a, 2)
    assert out.shape == (2, 2, 2)  # the 5th row is dropped
    assert out[1, 1, 0] == np.mean(a[1, 2:4, 0:2])
    assert block_mean(a, 1) is a


def _rendered(fig: Figure) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(np.float32)


def _axis_pixels(fig: Figure, ax: object) -> np.ndarray:
    """The rendered pixels inside one axis (matplotlib's origin is bottom-left)."""
    rgb = _rendered(fig)
    x0, y0, x1, y1 = ax.get_window_extent().extents  # type: ignore[attr-defined]
    h = rgb.shape[0]
    return rgb[int(h - y1) + 2 : int(h - y0) - 2, int(x0) + 2 : int(x1) - 2]


def test_a_zero_map_is_drawn_darker_than_a_weak_map_and_marked(photo: torch.Tensor) -> None:
    """The "all-zero" tile must never be the brightest of its row (it used to show the
    bare photo): it takes the scale's darkest colour, like a weak map, and a mark."""
    weak = torch.full((SIZE, SIZE), 0.05)
    rows = {
        "m: dog": (
            {"a": weak, "b": torch.zeros(SIZE, SIZE), "c": torch.ones(SIZE, SIZE)},
            {"a": False, "b": True, "c": False},
        )
    }
    fig = P.atlas_comparison(photo, rows, PER_MAP, title="t")
    tiles = [ax for ax in fig.axes if ax.get_title() in ("a", "b", "c")]
    bright = {ax.get_title(): float(_axis_pixels(fig, ax).mean()) for ax in tiles}
    plain = fig.axes[0]  # the bare photo
    assert bright["b"] < float(_axis_pixels(fig, plain).mean()) - 10
    assert abs(bright["b"] - bright["a"]) < 25  # zero looks like weak, not like the photo
    assert _texts(fig).count(P.ZERO_FLAG) == 1


def test_every_gradcam_figure_names_its_scale_and_has_a_colour_bar(photo: torch.Tensor) -> None:
    dens = {
        "block1_conv1": torch.rand(SIZE, SIZE) * 1e-3,
        "block5_conv3": torch.rand(SIZE, SIZE) * 1e-5,
    }
    pairs = list(dens.items())
    absolute = CamScale.fit("absolute", pairs, "logit", "both models")
    per_layer = CamScale.fit("per_layer", pairs, "logit", "both models")
    # The per-layer scale keeps the deep layer readable; the absolute one leaves it dark.
    assert float(absolute.normalize("block5_conv3", dens["block5_conv3"]).max()) < 0.05
    assert float(per_layer.normalize("block5_conv3", dens["block5_conv3"]).max()) == 1.0
    zeros = dict.fromkeys(dens, False)
    for scale, words in (
        (absolute, "one absolute scale"),
        (per_layer, "one scale per layer"),
        (PER_MAP, "its own maximum"),
    ):
        maps = {k: scale.normalize(k, d) for k, d in dens.items()}
        figs = [
            P.atlas_comparison(photo, {"good: dog": (maps, zeros)}, scale, title="x"),
            P.atlas_figure(photo, maps, maps, scale, title="x"),
            P.gradcam_overlay(photo, maps["block1_conv1"], "x", scale),
            P.gallery_figure(photo[None], maps["block1_conv1"][None], ["c"], "g", scale),
        ]
        for fig in figs:
            texts = _texts(fig)
            assert any(words in t for t in texts), texts
            bars = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]
            assert len(bars) == 1 and bars[0].get_ylabel() == scale.colorbar_label()
            top = bars[0].get_ylim()[1]
            assert top == pytest.approx(scale.colorbar_max())
    assert (
        absolute.colorbar_max() == absolute.value
        and "logit per input pixel" in absolute.colorbar_label()
    )
    fig = P.atlas_comparison(
        photo, {"r": ({k: per_layer.normalize(k, d) for k, d in dens.items()}, zeros)}, per_layer
    )
    # One layer alone on the per-layer scale: its top value, in physical units.
    one = P.gradcam_overlay(
        photo,
        per_layer.normalize("block5_conv3", dens["block5_conv3"]),
        "x",
        per_layer,
        layer="block5_conv3",
    )
    bar = next(ax for ax in one.axes if getattr(ax, "_colorbar", None) is not None)
    assert bar.get_ylim()[1] == pytest.approx(per_layer.top("block5_conv3"))
    assert "logit per input pixel" in bar.get_ylabel()
    assert f"top = {per_layer.top('block5_conv3'):.3g} logit/pixel" in one.get_suptitle()
    notes = [ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()]
    assert notes == [f"top {per_layer.top(k):.2g}" for k in dens]


def test_feature_figures_number_channels_and_grey_out_constant_ones() -> None:
    act = torch.rand(10, 8, 8)
    act[3] = 2.0  # constant: drawn grey, not min-max stretched noise
    fig = F.feature_map_grid(act, "block2_conv1")
    title = fig.get_suptitle()
    assert "min–max scaled on its own" in title and "grey = constant channel" in title
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "4", "8"]
    mosaic = ax.images[0].get_array()
    cell, pad = 24, 2
    # channel 3 is row 0, column 3 of the mosaic: all FLAT, drawn in the "under" colour
    block = mosaic[:cell, 3 * (cell + pad) : 3 * (cell + pad) + cell]
    assert (block == F.FLAT).all()
    under = ax.images[0].get_cmap().get_under()
    assert np.allclose(under[:3], matplotlib.colors.to_rgb(F.FLAT_COLOUR))
    strip = F.feature_overview({"a": act, "b": act}, n=5)
    assert [t.get_text() for t in strip.axes[1].get_xticklabels()] == list("01234")
    comp = F.feature_comparison({"good": {"a": act}, "bad": {"a": act}}, n=5, title="t")
    assert any(F.CHANNEL_NOTE in t for t in _texts(comp))
