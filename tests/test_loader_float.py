"""The fast CPU loader's float32 batches (what the model consumes), bit for bit.

Until the loader work of issue 17 the ``fast`` backend's batches were stacked from
per-image tensors (:meth:`ImageFiles.load`) and ``on_after_batch_transfer`` turned
them into the model's input with ``x.to(float32, memory_format=contiguous_format)``
and ``mul_(rescale)``. That pipeline is rebuilt here from the per-image path as the
reference; the batched path (:meth:`ImageFiles.__getitems__`, NCHW planes, labels and
keys in the images' storage, pooled shared buffers in the workers, pooled float
buffers) must give exactly the same tensors, on tiny generated images that go through
every branch: JPEG and PNG, gray, smaller, equal to and larger than the target side.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_vgg.data.datamodule import CatsDogsDataModule, _FloatPool, _one_thread
from lightning_vgg.data.dataset import ImageFiles, collate_skip_broken

SIZE = 24
RESCALE = 1.0 / 255.0
# (height, width, format, mode): upscaled, same size, downscaled (PIL's resize on the
# eval path), gray, PNG (decoded by PIL, not OpenCV)
KINDS = [
    (20, 14, "JPEG", "RGB"),
    (24, 24, "JPEG", "RGB"),
    (40, 30, "JPEG", "RGB"),
    (18, 26, "JPEG", "L"),
    (22, 16, "PNG", "RGB"),
    (31, 24, "PNG", "RGB"),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 cats and 16 dogs, a few pixels each, of the kinds above."""
    root = tmp_path_factory.mktemp("tiny") / "src"
    rng = np.random.default_rng(17)
    for cls in ("Cat", "Dog"):
        folder = root / "PetImages" / cls
        folder.mkdir(parents=True)
        for i in range(16):
            h, w, fmt, mode = KINDS[i % len(KINDS)]
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([yy * 7 + i, xx * 5, (yy + xx) * 3], -1) % 256
            noise = rng.integers(0, 40, (h, w, 3))
            img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).convert(mode)
            img.save(folder / f"{i}.{'jpg' if fmt == 'JPEG' else 'png'}", format=fmt)
    return root


def make_dm(source: Path, tmp_path: Path, **kw: object) -> CatsDogsDataModule:
    args: dict[str, object] = {
        "source": str(source),
        "cache_dir": str(tmp_path / "cache"),
        "split_sizes": [16, 8, 8],
        "image_size": SIZE,
        "batch_size": 5,
        "train_steps_per_epoch": None,
        "val_steps_per_epoch": None,
        "augment_backend": "fast",
        "num_workers": 0,
        "persistent_workers": False,
        "pin_memory": False,
        "scan_workers": 1,
        "rescale": RESCALE,
    }
    args.update(kw)
    dm = CatsDogsDataModule(**args)  # type: ignore[arg-type]
    dm.setup("fit")
    return dm


def reference(ds: ImageFiles, items: list[tuple[int, int]]) -> torch.Tensor:
    """The model's input as the loader made it before: per-image tensors stacked, then
    ``on_after_batch_transfer``'s old conversion."""
    x = torch.stack([ds.load(i, k) for i, k in items])
    return x.to(torch.float32, memory_format=torch.contiguous_format).mul_(RESCALE)


def model_inputs(dm: CatsDogsDataModule, loader: object) -> list[tuple[torch.Tensor, ...]]:
    out = []
    for batch in loader:  # type: ignore[attr-defined]
        x, y, keys = dm.on_after_batch_transfer(
            dm.transfer_batch_to_device(batch, torch.device("cpu"), 0), 0
        )
        out.append((x.clone(), y.clone(), keys.clone()))
    return out


@pytest.mark.parametrize("resize", ["bilinear", "nearest"])
@pytest.mark.parametrize("workers", [0, 2])
def test_float_batches_equal_the_per_image_reference(
    tiny_dir: Path, tmp_path: Path, resize: str, workers: int
) -> None:
    """Train (augmented) and eval (val + test) batches: same float32 values, NCHW
    contiguous, same labels and draw keys, as the per-image pipeline gave."""
    dm = make_dm(tiny_dir, tmp_path, resize=resize, num_workers=workers)
    for split, loader in (
        ("train", dm.train_dataloader()),
        ("val", dm.val_dataloader()),
        ("test", dm.test_dataloader()),
    ):
        ds = dm._dataset(split)
        sampler = loader.batch_sampler
        got = model_inputs(dm, loader)
        assert len(got) == len(list(sampler)) > 0
        for (x, y, keys), items in zip(got, sampler, strict=True):
            ref = reference(ds, items)
            assert x.dtype == torch.float32 and x.is_contiguous() and x.shape == ref.shape
            assert torch.equal(x, ref), f"{split}: float batch differs"
            assert torch.equal(y, torch.tensor([ds.labels[i] for i, _ in items]))
            assert torch.equal(keys, torch.tensor([k for _, k in items]))


def test_batch_layout_and_what_the_hook_hands_out(tiny_dir: Path, tmp_path: Path) -> None:
    """The DataLoader's uint8 batch is contiguous NCHW with labels and keys in the same
    storage; the hook hands out labels and keys of their own (so that keeping them
    does not keep the batch alive) and restores the intra-op thread count."""
    dm = make_dm(tiny_dir, tmp_path)
    x8, y8, k8 = next(iter(dm.val_dataloader()))
    assert x8.dtype == torch.uint8 and x8.is_contiguous() and x8.shape == (5, 3, SIZE, SIZE)
    assert y8.untyped_storage().data_ptr() == x8.untyped_storage().data_ptr()
    threads = torch.get_num_threads()
    x, y, keys = dm.on_after_batch_transfer((x8, y8, k8), 0)
    assert torch.get_num_threads() == threads
    for small in (y, keys):
        assert small.untyped_storage().data_ptr() != x8.untyped_storage().data_ptr()
    assert torch.equal(y, y8) and torch.equal(keys, k8)
    assert torch.equal(x, x8.float() * RESCALE)


def test_one_thread_restores_the_count() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), _one_thread(True):
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == before


def test_broken_images_leave_the_batch_in_order(tiny_dir: Path, tmp_path: Path) -> None:
    """Images that fail mid-run are dropped and the rest close up, as with per-item
    loading: same images, labels and keys in the same order."""
    dm = make_dm(tiny_dir, tmp_path, augment_backend="fast")
    ds = dm._dataset("test")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(ds.paths[1]).read_bytes()[:60])
    ds.paths[1] = ds.paths[3] = str(broken)
    items = [(i, 100 + i) for i in range(6)]
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        x, y, keys = collate_skip_broken(ds.__getitems__(items))
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        per_item = collate_skip_broken([ds[item] for item in items])
    kept = [0, 2, 4, 5]
    assert torch.equal(keys, torch.tensor([100 + i for i in kept]))
    assert torch.equal(y, per_item[1]) and torch.equal(keys, per_item[2])
    assert torch.equal(x, per_item[0])
    assert torch.equal(x, torch.stack([ds.load(i) for i in kept]))
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert collate_skip_broken(ds.__getitems__([(1, 1), (3, 3)])) is None


def test_held_batches_are_never_overwritten(tiny_dir: Path, tmp_path: Path) -> None:
    """Workers reuse a shared batch buffer, and the hook a float buffer, only once no
    tensor, view or array on it is left: batches kept whole, as views, as numpy
    arrays or as autograd's saved input stay what they were."""
    dm0 = make_dm(tiny_dir, tmp_path, num_workers=0, batch_size=2)
    loader0 = dm0.train_dataloader()
    ref = [model_inputs(dm0, loader0) for _ in range(2)]
    dm = make_dm(tiny_dir, tmp_path, num_workers=2, batch_size=2)
    loader = dm.train_dataloader()
    conv = torch.nn.Conv2d(3, 2, 3)
    held: list[tuple[int, int, object]] = []
    for epoch in range(2):
        for i, batch in enumerate(loader):
            if i % 4 == 0:
                held.append((epoch, i, batch[0]))  # the uint8 batch from the worker
            x = dm.on_after_batch_transfer(batch, 0)[0]
            if i % 4 == 1:
                held.append((epoch, i, x))
            elif i % 4 == 2:
                held.append((epoch, i, x[1:].numpy()))
            elif epoch == 0 and i % 4 == 3:
                held.append((epoch, i, conv(x)))  # keeps x as autograd's saved input
            del x, batch
        gc.collect()
    assert len(held) > 10
    for epoch, i, kept in held:
        want = ref[epoch][i][0]
        if isinstance(kept, np.ndarray):
            assert np.array_equal(kept, want[1:].numpy())
        elif kept.dtype == torch.uint8:
            assert torch.equal(kept.float() * RESCALE, want)
        elif kept.requires_grad:
            conv.zero_grad()
            kept.sum().backward()
            grad = conv.weight.grad.clone()
            conv.zero_grad()
            conv(want).sum().backward()
            assert torch.allclose(grad, conv.weight.grad)
        else:
            assert torch.equal(kept, want)


def test_float_pool_reuses_only_released_buffers() -> None:
    pool = _FloatPool(slots=2)
    a = pool.take((2, 3))
    a_ptr = a.data_ptr()
    b = pool.take((2, 3))
    c = pool.take((2, 3))  # past the slots: a plain tensor
    assert len({a_ptr, b.data_ptr(), c.data_ptr()}) == 3
    view = a[1:]
    del a
    assert pool.take((2, 3)).data_ptr() not in (a_ptr, b.data_ptr())  # a's view is alive
    del view
    assert pool.take((2, 3)).data_ptr() == a_ptr
    assert pool.made == {(2, 3): 2}
