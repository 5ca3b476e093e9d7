"""One preprocessing for test, predict and explain: the checkpoint's, bit for bit (issue 12 A)."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_vgg.cli import main
from lightning_vgg.data.datamodule import CatsDogsDataModule
from lightning_vgg.data.dataset import ImageFiles
from lightning_vgg.data.preprocess import Preprocess
from tests.conftest import ROOT

SIZE = 32


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize(
    ("backend", "resize"),
    [("keras", "nearest"), ("fast", "bilinear"), ("fast", "nearest"), ("gpu", "antialias")],
)
def test_preprocess_equals_the_test_loader(
    mini_zip: Path, cache: Path, backend: str, resize: str
) -> None:
    """The test loader's batch (after transfer) and ``Preprocess.load`` are the same bits."""
    dm = CatsDogsDataModule(
        source=str(mini_zip),
        cache_dir=str(cache),
        split_sizes=[20, 10, 10],
        image_size=SIZE,
        batch_size=10,
        num_workers=0,
        scan_workers=1,
        augment_backend=backend,  # type: ignore[arg-type]
        resize=resize,  # type: ignore[arg-type]
        rescale=1.0 / 255.0,
    )
    dm.setup("test")
    x, _, keys = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    rows = dm.split_rows("test")
    pre = Preprocess.from_hparams(dm.hparams)
    assert pre == dm.preprocess()
    assert pre == Preprocess(SIZE, resize, 1.0 / 255.0, backend)  # type: ignore[arg-type]
    ours = pre.load_batch([rows[int(k)][0] for k in keys])
    assert ours.dtype == torch.float32 and ours.is_contiguous()
    assert torch.equal(ours, x)
    probe, _, _ = dm.probe_from_paths([rows[int(k)][0] for k in keys[:3]])
    assert torch.equal(probe, x[:3]), "the callbacks' probes see the test images"


def test_preprocess_upscales_like_the_dataset_and_warns_on_missing_settings(
    tmp_path: Path,
) -> None:
    small = tmp_path / "small.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 14, 3), dtype=np.uint8)).save(small)
    for backend in ("keras", "fast"):
        for resize in ("nearest", "bilinear", "antialias"):
            ds = ImageFiles([small], [0], SIZE, backend=backend, resize=resize)  # type: ignore[arg-type]
            pre = Preprocess(SIZE, resize, 0.5, backend)  # type: ignore[arg-type]
            assert torch.equal(pre.load(small), ds.load(0).float() * 0.5)
    with pytest.warns(UserWarning, match="no data settings"):
        pre = Preprocess.from_hparams(None, image_size=64)
    assert pre == Preprocess(64, "nearest", 1.0 / 255.0, "keras")
    with pytest.warns(UserWarning, match="the model takes 64 px"):
        assert Preprocess.from_hparams({"image_size": 32}, image_size=64).image_size == 64
    with pytest.raises(ValueError, match="resize"):
        Preprocess(SIZE, "cubic")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- end to end

FIT = [
    "--trainer.max_epochs=1",
    f"--data.image_size={SIZE}",
    "--data.split_sizes=[120, 40, 40]",
    "--data.train_steps_per_epoch=2",
    "--data.num_workers=0",
    "--data.scan_workers=1",
    "--model.width=0.0625",
    "--model.hidden=64",
    "--trainer.callbacks=[]",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def _fit_predict(source: Path, tmp: Path, name: str, data: list[str]) -> tuple[Path, Path]:
    """Fit one epoch with ``data`` settings, predict under the config's own; the
    checkpoint and the CSV. predict must adopt the checkpoint's preprocessing."""
    quick = str(ROOT / "configs" / "quick.yaml")
    common = [f"--data.source={source}", f"--data.cache_dir={tmp / 'cache'}", *FIT]
    main(
        [
            "fit",
            "--config",
            quick,
            f"--trainer.logger.init_args.save_dir={tmp / 'runs'}",
            f"--trainer.logger.init_args.name={name}",
            *common,
            *data,
        ]
    )
    run = sorted((tmp / "runs" / name).glob("version_*"))[-1]
    ckpt = run / "checkpoints" / "last.ckpt"
    main(["predict", "--config", quick, f"--ckpt_path={ckpt}", *common])
    return ckpt, run / "predictions.csv"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("resize", "backend"), [("bilinear", "fast"), ("nearest", "keras")], ids=["bilinear", "nearest"]
)
def test_explain_prob_equals_predict(
    mini_zip: Path, tmp_path: Path, resize: str, backend: str
) -> None:
    """``explain`` reads the checkpoint's preprocessing: its P(dog) is predict's to 1e-6."""
    from lightning_vgg.models.loading import load_model_and_preprocess

    ckpt, csv_path = _fit_predict(
        mini_zip,
        tmp_path,
        resize,
        [f"--data.resize={resize}", f"--data.augment_backend={backend}"],
    )
    predicted = {r["path"]: float(r["prob_dog"]) for r in csv.DictReader(csv_path.open())}
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert raw["datamodule_hyper_parameters"]["resize"] == resize

    out = tmp_path / "explained"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback, no override warning
        main(
            [
                "explain",
                f"--ckpt_path={ckpt}",
                "--n=2",
                f"--out={out}",
                "--device=cpu",
                "--workers=0",
                "--max_channels=4",
                "--overview_n=2",
            ]
        )
    report = json.loads((out / "explain.json").read_text())
    assert report["preprocess"] == {
        "image_size": SIZE,
        "resize": resize,
        "rescale": 1.0 / 255.0,
        "backend": backend,
    }
    assert len(report["images"]) == 2
    diffs = [abs(rec["prob_dog"] - predicted[rec["image"]]) for rec in report["images"]]
    assert max(diffs) <= 1e-6, diffs  # predictions.csv keeps 6 decimals

    # The check has teeth: the other resize mode moves P(dog) far more than that.
    model, pre = load_model_and_preprocess(ckpt, "cpu")
    other = pre.with_resize("nearest" if resize == "bilinear" else "bilinear")
    paths = [rec["image"] for rec in report["images"]]
    with torch.no_grad():
        p_right = torch.sigmoid(model(pre.load_batch(paths)))
        p_wrong = torch.sigmoid(model(other.load_batch(paths)))
    assert (p_right.double() - torch.tensor([predicted[p] for p in paths])).abs().max() <= 1e-6
    assert (p_right - p_wrong).abs().max() > 1e-4
