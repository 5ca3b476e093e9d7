"""The data module on real JPEGs: splits, the control's subset, augmentation draws, batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_vgg.data.datamodule import CatsDogsDataModule
from lightning_vgg.data.dataset import ImageFiles


def make_dm(source: Path, tmp_path: Path, **kw: object) -> CatsDogsDataModule:
    args: dict[str, object] = {
        "source": str(source),
        "cache_dir": str(tmp_path / "cache"),
        "split_sizes": [60, 20, 20],
        "image_size": 32,
        "batch_size": 8,
        "train_steps_per_epoch": 3,
        "val_steps_per_epoch": None,
        "num_workers": 0,
        "scan_workers": 1,
    }
    args.update(kw)
    dm = CatsDogsDataModule(**args)  # type: ignore[arg-type]
    dm.setup("fit")
    return dm


def test_batches_are_rescaled_floats(mini_zip: Path, tmp_path: Path) -> None:
    dm = make_dm(mini_zip, tmp_path, augment_backend="keras")
    batch = next(iter(dm.train_dataloader()))
    x, y, _ = dm.on_after_batch_transfer(batch, 0)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.std() > 0.05
    assert set(y.tolist()) <= {0, 1}
    assert len(dm.train_dataloader()) == 3
    assert len(dm.val_dataloader()) == 3  # ceil(20 / 8), whole split
    assert sum(len(b[1]) for b in dm.test_dataloader()) == 20


def test_control_keeps_three_per_class_with_flipped_labels(mini_zip: Path, tmp_path: Path) -> None:
    plain = make_dm(mini_zip, tmp_path)
    dm = make_dm(mini_zip, tmp_path, subset_per_class=3, flip_labels=True)
    rows = dm.split_rows("train")
    assert len(rows) == 6
    true = {p: label for p, label, _ in plain.split_rows("train")}
    assert all(label == 1 - true[p] for p, label, _ in rows), "labels swapped"
    assert sorted(label for _, label, _ in rows) == [0, 0, 0, 1, 1, 1]
    assert dm.split_rows("test") == plain.split_rows("test"), "same test split as the seed"
    assert dm.split_rows("val") == plain.split_rows("val")
    # Keras repeats the 6 images in every one of the steps
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and all(len(b[1]) == 6 for b in batches)


def test_augmentation_draws_depend_only_on_seed_and_key(mini_zip: Path, tmp_path: Path) -> None:
    dm = make_dm(mini_zip, tmp_path, augment_backend="keras")
    ds = dm._dataset("train")
    a, b, c = ds.load(0, key=5), ds.load(0, key=5), ds.load(0, key=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    plain = ImageFiles(ds.paths, ds.labels, 32)
    assert not torch.equal(a.round().to(torch.uint8), plain.load(0))


def test_gpu_backend_on_cpu_tensors_matches_the_keras_backend(
    mini_zip: Path, tmp_path: Path
) -> None:
    keras_dm = make_dm(mini_zip, tmp_path, augment_backend="keras")
    gpu_dm = make_dm(mini_zip, tmp_path, augment_backend="gpu")
    kb = next(iter(keras_dm.train_dataloader()))
    gb = next(iter(gpu_dm.train_dataloader()))

    class FakeTrainer:
        training = True

    gpu_dm.trainer = FakeTrainer()  # type: ignore[assignment]
    keras_dm.trainer = FakeTrainer()  # type: ignore[assignment]
    xk, _, _ = keras_dm.on_after_batch_transfer(kb, 0)
    xg, _, _ = gpu_dm.on_after_batch_transfer(gb, 0)
    assert torch.equal(kb[2], gb[2]), "same draw keys"
    assert (xk - xg).abs().mean().item() * 255 < 0.05


def test_split_file_reproduces_the_split(mini_zip: Path, tmp_path: Path) -> None:
    from lightning_vgg.data.split import write_split_csv

    dm = make_dm(mini_zip, tmp_path)
    write_split_csv(tmp_path / "split.csv", dm.rows or [])
    again = CatsDogsDataModule(source="/nonexistent", split_file=str(tmp_path / "split.csv"))
    again.setup("test")
    assert again.rows == dm.rows


def test_probe_batch_is_fixed_cats_then_dogs(mini_zip: Path, tmp_path: Path) -> None:
    dm = make_dm(mini_zip, tmp_path)
    x, y, paths = dm.probe_batch(2)
    x2, _, paths2 = dm.probe_batch(2)
    assert y.tolist() == [0, 0, 1, 1] and paths == paths2 and torch.equal(x, x2)
    assert x.shape == (4, 3, 32, 32) and x.max() <= 1.0


def test_bad_split_sizes_are_user_errors(mini_zip: Path, tmp_path: Path) -> None:
    from lightning_vgg.errors import UserError

    with pytest.raises(UserError, match="three values"):
        CatsDogsDataModule(split_sizes=[1, 2])
    with pytest.raises(UserError):
        make_dm(mini_zip, tmp_path, split_sizes=[900, 200, 0])


def test_gpu_decode_path_on_cpu_equals_the_cpu_loader(mini_zip: Path, tmp_path: Path) -> None:
    cpu_dm = make_dm(mini_zip, tmp_path, augment_backend="keras", image_size=48)
    dev_dm = make_dm(mini_zip, tmp_path, augment_backend="gpu", gpu_decode=True, image_size=48)

    class FakeTrainer:
        training = True

    cb = next(iter(cpu_dm.train_dataloader()))
    db = next(iter(dev_dm.train_dataloader()))
    for dm in (cpu_dm, dev_dm):
        dm.trainer = FakeTrainer()  # type: ignore[assignment]
    assert db.data.ndim == 1 and db.data.dtype == torch.uint8  # raw bytes travel, one tensor
    assert int(db.lengths.sum()) == db.data.numel()
    db = dev_dm.transfer_batch_to_device(db, torch.device("cpu"), 0)
    xc, yc, kc = cpu_dm.on_after_batch_transfer(cb, 0)
    xd, yd, kd = dev_dm.on_after_batch_transfer(db, 0)
    assert torch.equal(yc, yd) and torch.equal(kc, kd)
    # libjpeg-turbo in torchvision vs PIL: same decoder family, tiny IDCT differences
    assert (xc - xd).abs().mean().item() * 255 < 1.0
