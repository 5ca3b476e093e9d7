"""The explain command and the visualisation callbacks, on real photos and odd files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from lightning_vgg.callbacks import FeatureMapCallback, GradCAMCallback
from lightning_vgg.cli import main
from lightning_vgg.data.datamodule import CatsDogsDataModule
from lightning_vgg.models.module import VGGClassifier
from lightning_vgg.models.vgg import keras_conv_names
from tests.conftest import pick_images

LAYERS = keras_conv_names()


def tiny_checkpoint(path: Path, width: float = 1 / 16, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = VGGClassifier(width=width, input_size=32, hidden=64)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


def test_explain_writes_every_file_for_files_and_folders(
    tmp_path: Path, mini_dir: Path, cat_photo: Path, dog_photo: Path
) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m.ckpt")
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(dog_photo, folder / "dog.1.jpg")
    out = tmp_path / "out dir é"
    main(
        [
            "explain",
            f"--ckpt_path={ckpt}",
            "--images",
            str(cat_photo),
            str(folder),
            f"--out={out}",
            "--device=cpu",
        ]
    )
    report = json.loads((out / "explain.json").read_text())
    assert [Path(r["image"]).name for r in report["images"]] == [cat_photo.name, "dog.1.jpg"]
    assert report["images"][1]["label"] == "dog"  # from the Kaggle-style name
    for rec in report["images"]:
        assert 0.0 <= rec["prob_dog"] <= 1.0 and rec["pred"] == (
            "dog" if rec["prob_dog"] >= 0.5 else "cat"
        )
        files = rec["files"]
        assert set(files["features"]) == set(LAYERS)
        assert set(files["gradcam_dog"]) == set(LAYERS) and set(files["gradcam_cat"]) == set(LAYERS)
        for rel in [
            *files["features"].values(),
            *files["gradcam_dog"].values(),
            files["atlas"],
            files["features_overview"],
        ]:
            with Image.open(out / rel) as im:
                assert im.size[0] > 100
        assert (out / files["maps"]).is_file()
        assert rec["scale"] == {
            "kind": "per_map",
            "unit": "logit per input pixel",
            "quantile": None,
        }
    assert not list(tmp_path.glob(".out*partial")), "no staging folder left"


def test_explain_records_the_shared_scale_its_figures_use(tmp_path: Path, cat_photo: Path) -> None:
    """With a shared scale, explain.json holds the number the colour bar's top stands for:
    the 99th percentile of the image's non-zero Grad-CAM densities (recomputed here
    from the saved raw maps)."""
    from lightning_vgg.explain.normalize import shared_scale, to_density

    ckpt = tiny_checkpoint(tmp_path / "m.ckpt")
    for view in ("shared", "per_layer"):
        out = tmp_path / view
        main(
            [
                "explain",
                f"--ckpt_path={ckpt}",
                "--images",
                str(cat_photo),
                f"--out={out}",
                "--device=cpu",
                f"--normalize={view}",
                "--workers=0",
            ]
        )
        rec = json.loads((out / "explain.json").read_text())["images"][0]
        raw = np.load(out / rec["files"]["maps"])
        size = raw["input"].shape[-1]
        dens = {
            (cls, layer): to_density(torch.from_numpy(raw[f"gradcam_{cls}.{layer}"]), size)
            for cls in ("dog", "cat")
            for layer in LAYERS
        }
        scale = rec["scale"]
        assert scale["unit"] == "logit per input pixel" and scale["quantile"] == 0.99
        if view == "shared":
            assert scale["kind"] == "absolute"
            assert scale["top"] == pytest.approx(shared_scale(list(dens.values())), rel=1e-5)
        else:
            assert scale["kind"] == "per_layer" and set(scale["top"]) == set(LAYERS)
            for layer in LAYERS:
                want = shared_scale([dens["dog", layer], dens["cat", layer]])
                assert scale["top"][layer] == pytest.approx(want, rel=1e-5)


def test_explain_maps_match_captum_run_separately(
    tmp_path: Path, cat_photo: Path, dog_photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``maps.npz`` holds the exact input and maps that Captum reproduces on its own."""
    from captum.attr import LayerGradCam

    from lightning_vgg.data.preprocess import Preprocess
    from lightning_vgg.models.loading import load_model
    from lightning_vgg.models.vgg import conv_units

    ckpt = tiny_checkpoint(tmp_path / "m.ckpt", seed=3)
    out = tmp_path / "e"
    main(
        [
            "explain",
            f"--ckpt_path={ckpt}",
            "--images",
            str(cat_photo),
            str(dog_photo),
            f"--out={out}",
            "--device=cpu",
            "--workers=0",
            "--check_captum=true",
        ]
    )
    assert "Captum LayerGradCam agreement" in capsys.readouterr().out
    report = json.loads((out / "explain.json").read_text())
    check = report["captum_check"]
    assert check["passed"] and set(check["per_layer"]) == set(LAYERS)
    assert 0 <= check["max_rel_diff"] <= 1e-5

    net = load_model(ckpt, "cpu").net
    units = conv_units(net, "post")
    for rec, photo in zip(report["images"], (cat_photo, dog_photo), strict=True):
        data = np.load(out / rec["files"]["maps"])
        x = torch.from_numpy(data["input"])[None]
        assert torch.equal(x[0], Preprocess(32).load(photo))  # the exact model input
        with torch.no_grad():
            assert float(data["logit"]) == float(net(x))
        for layer in LAYERS:
            for cls, sign in (("dog", 1.0), ("cat", -1.0)):
                ref = LayerGradCam(lambda t, s=sign: s * net(t), units[layer]).attribute(
                    x.clone(), relu_attributions=True
                )[0, 0]
                ours = torch.from_numpy(data[f"gradcam_{cls}.{layer}"])
                assert ours.shape == ref.shape
                # batch 1, as Captum here: the same kernels, so the same bits
                assert torch.equal(ours, ref.detach()), (rec["image"], layer, cls)


def test_explain_captum_check_reports_a_disagreement(
    tmp_path: Path, cat_photo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning_vgg.explain.maps as maps

    real = maps.signed_maps

    def skewed(atlas):  # a 1% error in one layer, as a broken implementation would make
        out = real(atlas)
        out["dog"]["block4_conv2"] = out["dog"]["block4_conv2"] * 1.01
        return out

    monkeypatch.setattr(maps, "signed_maps", skewed)
    out = tmp_path / "e"
    with pytest.warns(UserWarning, match="differs from Captum.*block4_conv2"):
        main(
            [
                "explain",
                f"--ckpt_path={tiny_checkpoint(tmp_path / 'm.ckpt', seed=3)}",
                "--images",
                str(cat_photo),
                f"--out={out}",
                "--device=cpu",
                "--workers=0",
                "--check_captum=true",
            ]
        )
    check = json.loads((out / "explain.json").read_text())["captum_check"]
    assert not check["passed"] and check["worst_layer"] == "block4_conv2"
    assert check["per_layer"]["block4_conv2"] == pytest.approx(0.01, rel=1e-3)


def test_explain_without_images_uses_the_runs_test_split(tmp_path: Path, mini_dir: Path) -> None:
    run = tmp_path / "runs" / "x" / "version_0"
    ckpt = tiny_checkpoint(run / "checkpoints" / "best.ckpt")
    imgs = pick_images(mini_dir, 2)
    lines = ["path,label,split"] + [
        f"{p},{0 if c == 'Cat' else 1},test" for c, ps in imgs.items() for p in ps
    ]
    (run / "split.csv").write_text("\n".join(lines) + "\n")
    main(["explain", f"--ckpt_path={ckpt}", "--n=2", f"--out={tmp_path / 'e'}", "--device=cpu"])
    recs = json.loads((tmp_path / "e" / "explain.json").read_text())["images"]
    assert [r["label"] for r in recs] == ["cat", "dog"]


def test_explain_draws_in_worker_processes_without_hanging(tmp_path: Path, cat_photo: Path) -> None:
    """The drawing pool starts after the model ran; its workers must not deadlock.

    Forked from a process whose torch thread pool was running, a worker hung in its
    first parallel op; 128 px maps also take the grid's averaging-down path.
    """
    import subprocess
    import sys

    torch.manual_seed(0)
    model = VGGClassifier(width=1 / 16, input_size=128, hidden=64)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, ckpt)
    out = tmp_path / "e"
    cmd = [sys.executable, "-m", "lightning_vgg", "explain", f"--ckpt_path={ckpt}"]
    cmd += ["--images", str(cat_photo), f"--out={out}", "--device=cpu", "--workers=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((out / "explain.json").read_text())["images"][0]
    with Image.open(out / rec["files"]["features"]["block1_conv1"]) as im:
        assert im.size[0] > 100


def test_explain_handles_odd_files(
    tmp_path: Path, cat_photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m.ckpt")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "notes.jpg").write_text("this is not an image")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(odd / "one_pixel.png")
    Image.open(cat_photo).convert("L").save(odd / "gray.jpg")
    Image.open(cat_photo).convert("CMYK").save(odd / "cmyk.jpg")
    Image.new("1", (10_000, 10_000)).save(odd / "huge.png")  # 100 MP: refused before decoding
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        main(
            [
                "explain",
                f"--ckpt_path={ckpt}",
                "--images",
                str(odd),
                f"--out={tmp_path / 'o'}",
                "--device=cpu",
            ]
        )
    report = json.loads((tmp_path / "o" / "explain.json").read_text())
    assert sorted(Path(r["image"]).name for r in report["images"]) == [
        "cmyk.jpg",
        "gray.jpg",
        "one_pixel.png",
    ]
    reasons = {Path(s["image"]).name: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"notes.jpg", "huge.png"} and "pixels" in reasons["huge.png"]

    with pytest.raises(SystemExit) as exc:
        main(
            [
                "explain",
                f"--ckpt_path={ckpt}",
                "--images",
                str(odd / "notes.jpg"),
                f"--out={tmp_path / 'p'}",
            ]
        )
    assert exc.value.code == 2 and "could be read" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_explain_rejects_bad_checkpoints(
    tmp_path: Path, cat_photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00garbage")
    other = tmp_path / "other.ckpt"
    ckpt = torch.load(tiny_checkpoint(tmp_path / "w.ckpt", width=1 / 8), weights_only=False)
    ckpt["hyper_parameters"]["width"] = 1 / 16  # weights of one width, claims another
    torch.save(ckpt, other)
    for path, words in (
        (tmp_path / "missing.ckpt", "not found"),
        (bad, "cannot read"),
        (other, "does not match"),
    ):
        with pytest.raises(SystemExit):
            main(
                [
                    "explain",
                    f"--ckpt_path={path}",
                    "--images",
                    str(cat_photo),
                    f"--out={tmp_path / 'o'}",
                ]
            )
        assert words in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_dm(mini_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> CatsDogsDataModule:
    dm = CatsDogsDataModule(
        source=str(mini_zip),
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        split_sizes=[40, 20, 20],
        image_size=32,
        batch_size=4,
        num_workers=0,
        scan_workers=1,
    )
    dm.setup("fit")
    return dm


def test_callbacks_write_pngs_under_fast_dev_run(
    tmp_path: Path, tiny_dm: CatsDogsDataModule
) -> None:
    model = VGGClassifier(width=1 / 16, input_size=32, hidden=64)
    fm = FeatureMapCallback(every_n_epochs=1, per_class=1, max_channels=8)
    gc = GradCAMCallback(every_n_epochs=1, per_class=1)
    trainer = pl.Trainer(
        fast_dev_run=True,
        callbacks=[fm, gc],
        default_root_dir=tmp_path,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, tiny_dm)
    pngs = sorted(p.name for p in tmp_path.rglob("visualizations/*/*.png"))
    assert {p.parent.name for p in tmp_path.rglob("visualizations/*/*.png")} == {
        "epoch_000",
        "fit_end",
    }
    assert any(p.startswith("features_cat0_") and "overview" in p for p in pngs)
    assert any(p.startswith("features_dog1_") and "block5_conv3" in p for p in pngs)
    assert sum(p.startswith("gradcam_") for p in pngs) == 4  # 2 probes x (epoch end, fit end)
    for p in tmp_path.rglob("visualizations/*/*.png"):
        with Image.open(p) as im:
            assert np.asarray(im).std() > 0


@pytest.mark.parametrize("train_mode", [True, False])
def test_callbacks_leave_mode_bn_stats_and_hooks_as_they_were(
    tiny_dm: CatsDogsDataModule, train_mode: bool
) -> None:
    model = VGGClassifier(width=1 / 16, input_size=32, hidden=64)
    fm = FeatureMapCallback(per_class=1, max_channels=4)
    gc = GradCAMCallback(per_class=1)
    model.train(train_mode)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean.uniform_(-1, 1)
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    modes = {n: m.training for n, m in model.named_modules()}
    x, y, paths = tiny_dm.probe_batch(1)
    with torch.inference_mode():  # as inside Lightning's validate/test
        assert len(gc.figures(model, x, y, paths)) == 2
        assert len(fm.figures(model, x, y, paths)) == 2 * 14
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert torch.equal(bn.num_batches_tracked, before[2])
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_collect_images_keeps_folder_order_and_drops_repeats(tmp_path: Path) -> None:
    from lightning_vgg.errors import UserError
    from lightning_vgg.explain.inputs import collect_images

    (tmp_path / "sub").mkdir()
    for name in ("b.jpg", "a.png", "notes.txt", "sub/c.JPG"):
        (tmp_path / name).write_bytes(b"x")
    got = collect_images([tmp_path / "b.jpg", tmp_path, tmp_path / "sub" / ".." / "a.png"])
    assert [p.relative_to(tmp_path).as_posix() for p in got] == ["b.jpg", "a.png", "sub/c.JPG"]
    with pytest.raises(UserError, match="image not found"):
        collect_images([tmp_path / "missing.jpg"])
