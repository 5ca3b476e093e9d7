"""The comparison report: measures accumulate correctly, and the report is complete and honest."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess
from dataclasses import asdict
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_vgg.cli import main
from lightning_vgg.errors import UserError
from lightning_vgg.explain.measures import feature_map_measures
from lightning_vgg.labels import SplitRow
from lightning_vgg.models.module import VGGClassifier
from lightning_vgg.report.compare import run_compare
from lightning_vgg.report.history import SUMMARY_KEYS
from lightning_vgg.report.html import Cell, Para, Section, Table, fmt, render_html
from lightning_vgg.report.measuring import FeatureStats
from lightning_vgg.report.runs import select_test_images
from lightning_vgg.report.sections import SECTION_IDS
from tests.conftest import ROOT

TINY = [
    "--trainer.max_epochs=1",
    "--data.image_size=32",
    "--data.split_sizes=[40, 20, 20]",
    "--data.num_workers=0",
    "--data.scan_workers=1",
    "--model.width=0.0625",
    "--model.hidden=512",
    "--trainer.callbacks=[]",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


# --------------------------------------------------------------------------- units


def test_feature_stats_match_the_whole_set() -> None:
    torch.manual_seed(0)
    acts = torch.relu(torch.randn(7, 6, 5, 5))
    acts[:, 2] = 0.0  # dead everywhere
    acts[3] = 0.0  # an all-zero image
    acts[1, 4] = 0.0  # silent on one image only
    stats = FeatureStats()
    for part in (acts[:3], acts[3:4], acts[4:]):
        stats.update(part)
    whole = feature_map_measures(acts)
    result = stats.result()
    got = asdict(result)
    per_image = got.pop("per_image")
    assert got.keys() == whole.keys()
    # The per-image means behind the intervals agree with the pooled measures.
    assert per_image["sparsity"]["mean"] == pytest.approx(whole["sparsity"], rel=1e-6)
    assert per_image["dead_channel_fraction_per_image"]["mean"] == pytest.approx(
        whole["dead_channel_fraction_per_image"], rel=1e-6
    )
    assert per_image["hoyer_sparsity"]["mean"] == pytest.approx(whole["hoyer_sparsity"], rel=1e-5)
    assert per_image["hoyer_sparsity"]["n"] == 6  # the all-zero image has no Hoyer value
    for key, value in whole.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_image_choice_is_fixed_and_per_class() -> None:
    rows = [
        SplitRow(f"/d/{c}{i}.jpg", int(c == "d"), s)
        for s in ("train", "test")
        for c in "cd"
        for i in range(5)
    ]
    picked = select_test_images(rows, 2)
    assert picked == [("/d/c0.jpg", 0), ("/d/c1.jpg", 0), ("/d/d0.jpg", 1), ("/d/d1.jpg", 1)]
    assert select_test_images(rows, 99) == [(r.path, r.label) for r in rows if r.split == "test"]


def test_html_is_self_contained_and_never_shows_nan(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "x.png")
    from lightning_vgg.report.html import Image as Img

    page = render_html(
        "t",
        [Para("a <b> & `code`")],
        [
            Section(
                "s",
                "S",
                [
                    Table(["k", "v"], [["a", Cell(fmt(float("nan")))], ["b", Cell("1.0", 1.0)]]),
                    Img("x.png", "x"),
                ],
            )
        ],
        tmp_path,
    )
    assert "&lt;b&gt;" in page and "<code>code</code>" in page
    assert 'data-value="1.0"' in page and "nan" not in page.lower().replace("data:image", "")
    assert re.search(r'src="data:image/png;base64,', page)
    assert fmt(None) == fmt(float("inf")) == "—"
    assert fmt(0.95051, "pct") == "95.05%"


def _fake_ckpt(path: Path, input_size: int) -> Path:
    model = VGGClassifier(width=1 / 16, hidden=64, input_size=input_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


def test_different_input_sizes_are_refused(tmp_path: Path) -> None:
    a = _fake_ckpt(tmp_path / "a" / "version_0" / "checkpoints" / "best.ckpt", 32)
    b = _fake_ckpt(tmp_path / "b" / "version_0" / "checkpoints" / "best.ckpt", 64)
    with pytest.raises(UserError, match="input sizes"):
        run_compare(str(a), str(b), str(tmp_path / "out"), device="cpu")
    assert not (tmp_path / "out").exists()
    c = _fake_ckpt(tmp_path / "c" / "version_0" / "checkpoints" / "best.ckpt", 32)
    with pytest.raises(UserError, match="no split file"):
        run_compare(str(a), str(c), str(tmp_path / "out"), device="cpu")
    assert not (tmp_path / "out").exists(), "a failed compare leaves no output folder"


# --------------------------------------------------------------------------- end to end


def _fit(save_dir: Path, cache: Path, source: Path, name: str, *extra: str) -> Path:
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "quick.yaml"),
            f"--data.source={source}",
            f"--data.cache_dir={cache}",
            f"--trainer.logger.init_args.save_dir={save_dir}",
            f"--trainer.logger.init_args.name={name}",
            *TINY,
            *extra,
        ]
    )
    return sorted((save_dir / name).glob("version_*"))[-1]


def _test(run: Path, cache: Path) -> None:
    main(
        [
            "test",
            "--config",
            str(ROOT / "configs" / "quick.yaml"),
            f"--ckpt_path={run / 'checkpoints' / 'best.ckpt'}",
            f"--data.cache_dir={cache}",
            *TINY,
        ]
    )


class _Page(HTMLParser):
    """Section ids, image sources and table cells (text, data-value) per section."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self.tables: dict[str, list[list[tuple[str, str | None]]]] = {}
        self._section: list[str] = []
        self._row: list[tuple[str, str | None]] | None = None
        self._cell: list[str] | None = None
        self._value: str | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.append(str(a["id"]))
        if tag == "section":
            self._section.append(str(a.get("id")))
        elif tag == "img":
            self.srcs.append(str(a.get("src")))
        elif tag in ("a", "link"):
            self.hrefs.append(str(a.get("href")))
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell, self._value = [], a.get("data-value")

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._section.pop()
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(("".join(self._cell).strip(), self._value))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables.setdefault(self._section[-1], []).append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _check_report(out: Path, runs: dict[str, Path]) -> _Page:
    html_path, md_path = out / "report.html", out / "report.md"
    assert html_path.is_file() and md_path.is_file() and (out / "measures.json").is_file()
    assert not list(out.parent.glob(f".{out.name}.*")), "no staging folder left behind"
    html = html_path.read_text(encoding="utf-8")
    page = _Page()
    page.feed(html)
    for sid in SECTION_IDS:
        assert sid in page.ids, f"section {sid} missing"
    # No NaN anywhere a reader could see it (base64 data may contain any letters).
    visible = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)
    assert not re.search(r"\bnan\b", visible, re.IGNORECASE)
    measures_text = (out / "measures.json").read_text()
    assert not re.search(r"\bnan\b|infinity", measures_text, re.IGNORECASE)
    json.loads(measures_text, parse_constant=lambda c: pytest.fail(f"{c} in measures.json"))
    # Self-contained: every image inline and decodable, no external resource.
    assert page.srcs and all(s.startswith("data:image/png;base64,") for s in page.srcs)
    for src in page.srcs:
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            im.load()
            assert im.size[0] > 50 and im.size[1] > 20
    assert all(h.startswith("#") for h in page.hrefs)
    assert not re.search(r"<link|<script|@import|url\(|https?://", visible)
    # The markdown twin links PNGs that exist beside it, and carries the same anchors.
    md = md_path.read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(page.srcs)
    assert all((out / link).is_file() and link.startswith("figures/") for link in links)
    for sid in SECTION_IDS:
        assert f'id="{sid}"' in md
    # Results: each run's own numbers, exactly; "—" where test has not run.
    table = page.tables["results"]
    assert table[0][0][0] == "Metric"
    by_label = {row[0][0]: row for row in table[1:]}
    for col, name in ((1, "good"), (3, "bad")):
        summary = json.loads((runs[name] / "summary.json").read_text())["metrics"]
        for key, label in SUMMARY_KEYS.items():
            text, value = by_label[label][col]
            if summary[key] is None:
                assert text == "—" and value is None, (name, key)
            else:
                assert float(value) == summary[key], (name, key)
                shown = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
                assert shown == pytest.approx(summary[key], abs=1e-4)
    rows = [r for r in (runs["good"] / "metrics.csv").read_text().splitlines()[1:] if r]
    val_acc = max(float(r.split(",")[5]) for r in rows)
    assert float(by_label["Max val accuracy"][1][1]) == pytest.approx(val_acc)
    return page


@pytest.fixture(scope="module")
def compared(mini_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("compare")
    cache = tmp / "cache"
    good = _fit(tmp / "runs", cache, mini_zip, "good")
    bad = _fit(
        tmp / "runs", cache, mini_zip, "bad", "--data.subset_per_class=3", "--data.flip_labels=true"
    )
    _test(good, cache)
    out = tmp / "report"
    run_compare(
        str(good / "checkpoints" / "best.ckpt"),
        str(bad / "checkpoints" / "best.ckpt"),
        str(out),
        n_per_class=4,
        batch_size=5,
        deletion_steps=4,
        device="cpu",
    )
    return {"good": good, "bad": bad, "out": out, "cache": cache}


@pytest.mark.slow
def test_compare_end_to_end(compared: dict[str, Path]) -> None:
    good, bad, out = compared["good"], compared["bad"], compared["out"]
    page = _check_report(out, {"good": good, "bad": bad})
    text = " ".join(page.text)
    assert "has no test results yet" in text and "lightning-vgg test" in text
    m = json.loads((out / "measures.json").read_text())
    layers = m["layers"]
    assert len(layers) == 13 and layers[-1] == "block5_conv3"
    assert len(m["images"]) == 8 and [i["label"] for i in m["images"]] == [0] * 4 + [1] * 4
    for name in ("good", "bad"):
        assert set(m[name]["features"]) == set(layers) == set(m[name]["sanity"])
        fa = m[name]["faithfulness"]
        assert 0.0 <= fa["gradcam"]["block5_conv3"]["deletion_auc"]["mean"] <= 1.0
        assert len(fa["curves"]["fractions"]) == 5
        for layer in layers:
            assert -1.0 <= m[name]["sanity"][layer]["spearman_mean"] <= 1.0
            assert 0.0 <= m[name]["gradcam"][layer]["zero_map_fraction"] <= 1.0
    assert m["good"]["results"]["test_acc"] is not None and m["bad"]["results"]["test_acc"] is None
    # Galleries are drawn from the measured images for both models (tested or not),
    # on one scale shared by both; the atlas comes in an absolute and a per-layer view.
    scales = m["figure_scales"]
    drawn = sorted(p.name for p in (out / "figures").glob("*_misclassified_*.png"))
    wrong = {
        n: {
            c: sum(
                (i["prob_dog"][n] >= 0.5) != bool(i["label"])
                for i in m["images"]
                if i["label"] == c
            )
            for c in (0, 1)
        }
        for n in ("good", "bad")
    }
    expected = sorted(
        f"{n}_misclassified_{c}.png"
        for n in ("good", "bad")
        for k, c in enumerate(("cat", "dog"))
        if wrong[n][k]
    )
    assert drawn == expected and drawn
    assert scales["misclassified"]["kind"] == "absolute" and scales["misclassified"]["top"] > 0
    assert scales["misclassified"]["layer"] == "block5_conv3"
    assert scales["gradcam"]["absolute"]["top"] > 0
    assert set(scales["gradcam"]["per_layer"]["top"]) == set(layers)
    for view in ("absolute", "per_layer"):
        assert len(list((out / "figures").glob(f"gradcam_{view}_*.png"))) == 2
    assert f"{scales['gradcam']['absolute']['top']:.3g} logit per input pixel" in text
    assert len(page.tables["measures-features"]) == 5 * 14  # 5 measures: header + 13 layers
    # Uncertainty: intervals, the bootstrap settings, paired differences, the cascade.
    assert m["bootstrap"]["B"] == 1000 and m["bootstrap"]["seed"] == 0
    for name in ("good", "bad"):
        s = m[name]["sanity"]["block5_conv3"]
        assert s["n"] == 8 and s["ci95"][0] <= s["spearman_mean"] <= s["ci95"][1]
        assert [e["n"] for e in m[name]["cascade"]["rho"]] == [8] * 14
        assert m[name]["cascade"]["steps"][0] == "classifier"
        assert len(m[name]["per_image"]["sanity"]["block1_conv1"]) == 8
    assert set(m["verdict"]["accuracy"]) == {"good", "bad"}
    assert m["verdict"]["findings"] and "Too few images" in text
    assert any(h == "#setup" for h in page.hrefs)

    # A folder holding a file of the user's is refused; with --overwrite the report is
    # written into it and the user's file is kept. A split file whose test set differs
    # from the bad run's is used, with a warning in the report.
    _test(bad, compared["cache"])
    out2 = out.parent / "report2"
    out2.mkdir()
    (out2 / "stale.txt").write_text("from an earlier run")
    lines = (bad / "split.csv").read_text().splitlines()
    first_test = next(i for i, line in enumerate(lines) if line.endswith(",test"))
    split = out.parent / "split_minus_one.csv"
    split.write_text("\n".join(lines[:first_test] + lines[first_test + 1 :]) + "\n")
    args = {
        "good": str(bad / "checkpoints" / "last.ckpt"),
        "bad": str(good / "checkpoints" / "last.ckpt"),
        "out": str(out2),
        "n_per_class": 2,
        "show_per_class": 0,
        "split_file": str(split),
        "deletion_steps": 2,
        "device": "cpu",
    }
    with pytest.raises(UserError, match="--overwrite"):
        run_compare(**args)
    with pytest.warns(UserWarning, match="differs"):
        run_compare(**args, overwrite=True)
    assert (out2 / "stale.txt").read_text() == "from an earlier run"
    page = _check_report(out2, {"good": bad, "bad": good})
    assert "differs from the one in" in " ".join(page.text)
    m = json.loads((out2 / "measures.json").read_text())
    assert len(m["images"]) == 4 and m["good"]["checkpoint"].startswith(str(bad))
    assert m["bad"]["results"]["test_acc"] is not None
    assert (
        m["images"][0]["path"]
        != json.loads((out / "measures.json").read_text())["images"][0]["path"]
    )


@pytest.mark.slow
@pytest.mark.browser
def test_report_renders_in_headless_chromium(compared: dict[str, Path], tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1400,8000",  # the findings push figures down
            (compared["out"] / "report.html").resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert shot.is_file(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (8000, 1400)
    assert pixels.std() > 20, "the page rendered blank"
    # Embedded figures rendered: plenty of non-white, colourful pixels, not just text.
    colourful = (pixels.max(axis=2) - pixels.min(axis=2)) > 60
    assert colourful.mean() > 0.02
    assert math.isfinite(float(pixels.mean()))


def test_comparison_figures_draw_and_check_layers(tmp_path: Path) -> None:
    from lightning_vgg.explain.feature_plots import feature_comparison
    from lightning_vgg.explain.plots import atlas_comparison
    from lightning_vgg.explain.scales import CamScale
    from lightning_vgg.fileio import save_figure

    image = torch.rand(3, 32, 32)
    acts = {"block1_conv1": torch.rand(4, 32, 32), "block5_conv3": torch.zeros(4, 2, 2)}
    fig = feature_comparison({"good": acts, "bad": acts}, image=image, n=3, title="t")
    with Image.open(save_figure(fig, tmp_path / "f.png")) as im:
        assert im.size[0] > 200 and im.size[1] > 150
    maps = {k: torch.rand(32, 32) for k in acts}
    zeros = {"block1_conv1": False, "block5_conv3": True}
    scale = CamScale("absolute", "logit", 0.5)
    fig = atlas_comparison(
        image, {"good: dog": (maps, zeros), "bad: dog": (maps, zeros)}, scale, "t"
    )
    with Image.open(save_figure(fig, tmp_path / "a.png")) as im:
        assert im.size[0] > 300
    with pytest.raises(ValueError, match="layers"):
        feature_comparison({"good": acts, "bad": {"block1_conv1": acts["block1_conv1"]}})
    with pytest.raises(ValueError, match="layers"):
        atlas_comparison(
            image, {"a": (maps, zeros), "b": ({"block1_conv1": maps["block1_conv1"]}, {})}, scale
        )
