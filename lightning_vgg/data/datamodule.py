"""LightningDataModule for Cats-vs-Dogs: source, scan, split, Keras augmentation, loaders."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightning_vgg.checks import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check_ranges,
)
from lightning_vgg.data.archives import MAX_DOWNLOAD_MB, MAX_EXTRACT_MB
from lightning_vgg.data.augment import AugmentConfig, warp_batch, warp_theta
from lightning_vgg.data.dataset import (
    AugmentBackend,
    EncodedBatch,
    ImageFiles,
    collate_skip_broken,
    draw_params,
)
from lightning_vgg.data.preprocess import Preprocess
from lightning_vgg.data.sampler import Exhausted, KerasBatchSampler
from lightning_vgg.data.sources import DEFAULT_URL, index_source
from lightning_vgg.data.split import make_split, read_split_csv, write_split_csv
from lightning_vgg.errors import UserError
from lightning_vgg.labels import SplitRow

Row = SplitRow
SPLITS = ("train", "val", "test")


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _scaled_float(x: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x.to(float32, contiguous).mul_(scale)`` (the same values), into ``out`` if given,
    in chunks of whole images of about 512 KiB of floats, so that the second pass
    finds them in the core's L2 cache: a 12 MB batch (20 x 224 px) went through memory
    twice, 0.8 ms instead of 1.1 ms on one core of the 2-core machine."""
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    n = x.shape[0]
    per = max(1, (512 << 10) // max(1, 4 * x[0].numel())) if n else 1
    for i in range(0, n, per):
        out[i : i + per].copy_(x[i : i + per]).mul_(scale)
    return out


class _Giveback:
    """Lends a pooled array to ``torch.from_numpy``: the tensor's storage keeps this
    object alive as long as any tensor, view or array shares the memory (autograd's
    saved input included); when the last goes, the array goes back on its free list."""

    def __init__(self, arr: np.ndarray, free: list[np.ndarray]) -> None:
        self.arr, self.free = arr, free
        self.__array_interface__ = arr.__array_interface__

    def __del__(self) -> None:
        self.free.append(self.arr)


class _FloatPool:
    """float32 batch buffers on the CPU, reused once nothing holds the last batch in one.

    A fresh 12 MB batch (20 x 224 px) is often new memory from the kernel: 3,000 page
    faults, about 3 ms on this 2-core VM, more than the conversion itself; whether
    ``malloc`` hands back the last batch's memory depended on what else the process
    had allocated in between. At most ``slots`` buffers of a shape and ``max_bytes`` in
    all are kept; past that a batch is allocated as before.
    """

    def __init__(self, slots: int = 3, max_bytes: int = 64 << 20) -> None:
        self.slots, self.max_bytes = slots, max_bytes
        self.free: dict[tuple[int, ...], list[np.ndarray]] = {}
        self.made: dict[tuple[int, ...], int] = {}
        self.bytes = 0

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        free = self.free.setdefault(shape, [])
        try:
            arr = free.pop()
        except IndexError:
            nbytes = 4 * int(np.prod(shape))
            if self.made.get(shape, 0) >= self.slots or self.bytes + nbytes > self.max_bytes:
                return torch.empty(shape, dtype=torch.float32)
            arr = np.empty(shape, np.float32)
            self.made[shape] = self.made.get(shape, 0) + 1
            self.bytes += nbytes
        return torch.from_numpy(np.asarray(_Giveback(arr, free)))

    def __getstate__(self) -> dict[str, Any]:  # a copied data module starts empty
        return {"slots": self.slots, "max_bytes": self.max_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)


@contextlib.contextmanager
def _one_thread(enabled: bool) -> Iterator[None]:
    """Run the enclosed CPU ops on one intra-op thread, then restore the thread count.

    For the float conversion of a batch on the CPU: a memory-bound pass of about half a
    millisecond (batch 20 at 224 px), run while the loader workers keep the cores busy.
    A parallel region there waits for a preempted OpenMP thread and then spins: on the
    2-core machine it took 4-25 ms of wall time per batch and took CPU from the workers.
    Setting the count costs microseconds; the values are the same either way.
    """
    n = torch.get_num_threads() if enabled else 1
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


class CatsDogsDataModule(pl.LightningDataModule):
    """The seed's data pipeline: 17,000 / 4,000 / 4,000 images, Keras augmentation.

    Args:
        source: A directory, a ``.zip`` file, or an http(s) URL of a zip. The default
            is the official Microsoft download (about 800 MB), fetched once.
        cache_dir: Where downloads, extractions and scan results go; defaults to
            ``$LIGHTNING_VGG_CACHE`` or ``~/.cache/lightning_vgg``.
        split_sizes: Train, val and test sizes, as counts or as fractions. When there
            are fewer images than asked for, test takes what is left.
        split_file: A ``split.csv`` from an earlier run; when given, the source is not
            scanned and exactly those images are used.
        seed: Seeds the split, the batch order and the augmentation draws.
        image_size: Square side the images are resized to (224 in the seed).
        batch_size: Global training batch size (20 in the seed).
        eval_batch_size: Validation/test batch size; defaults to ``batch_size``.
        train_steps_per_epoch: Batches per training epoch, taken from Keras's endless
            stream (80 in the seed); ``None`` for one full pass.
        val_steps_per_epoch: Validation batches per epoch, also a shuffled stream as
            in the seed (20); ``None`` validates on the whole val split.
        rotation_range: Keras ``rotation_range`` in degrees.
        shear_range: Keras ``shear_range``, which Keras reads in degrees.
        zoom_range: Keras ``zoom_range``; zx and zy are drawn from [1-z, 1+z].
        horizontal_flip: Random horizontal flips.
        rescale: Multiplies pixel values (1/255 in the seed).
        augment_backend: ``keras`` (exact, CPU), ``fast`` (OpenCV, CPU) or ``gpu``
            (batched on the training device).
        resize: ``nearest`` like Keras's loader, or ``bilinear``/``antialias``.
        subset_per_class: Keep only this many training images per class (the
            control uses 3).
        flip_labels: Swap cat and dog labels in the training split (the control).
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory; ``None`` pins when CUDA is available.
        persistent_workers: Keep workers alive between epochs.
        prefetch_factor: Batches prefetched per worker (DataLoader default if None).
        scan_workers: Processes for the one-off decode scan of the source.
        gpu_decode: Ship raw JPEG bytes and decode whole batches on the training
            device (nvJPEG on CUDA); pair with ``augment_backend: gpu``.
        max_missing_fraction: ``validate``, ``test`` and ``predict`` stop with an
            error, writing nothing, when more than this share of their images cannot
            be read (or when none can); unreadable images are skipped with a warning.
        sha256: The archive's expected sha256 (a downloaded or local zip); a
            mismatch is refused before anything is extracted. Without it, an https
            download is checked only for being a whole zip, with a warning.
        max_download_mb: Refuse a download larger than this (MiB).
        max_extract_mb: Refuse an archive that unpacks to more than this (MiB).
        exhausted: When ``train_steps_per_epoch`` batches are more than the training
            split holds: ``repeat`` walks on into the next shuffled pass (Keras 3);
            ``stop`` ends training once one pass is used up, as tf.keras 2.x did
            ("Your input ran out of data; interrupting training"). The seed's
            control ran under tf.keras 2.x and so trained a single step.
    """

    def __init__(
        self,
        source: str = DEFAULT_URL,
        cache_dir: str | None = None,
        split_sizes: Sequence[int | float] = (17000, 4000, 4000),
        split_file: str | None = None,
        seed: int = 42,
        image_size: PositiveInt = 224,
        batch_size: PositiveInt = 20,
        eval_batch_size: PositiveInt | None = None,
        train_steps_per_epoch: PositiveInt | None = 80,
        val_steps_per_epoch: PositiveInt | None = 20,
        rotation_range: NonNegativeFloat = 40.0,
        shear_range: NonNegativeFloat = 0.2,
        zoom_range: NonNegativeFloat = 0.2,
        horizontal_flip: bool = True,
        rescale: PositiveFloat = 1.0 / 255.0,
        augment_backend: AugmentBackend = "keras",
        resize: Literal["nearest", "bilinear", "antialias"] = "nearest",
        subset_per_class: PositiveInt | None = None,
        flip_labels: bool = False,
        num_workers: NonNegativeInt = 2,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        prefetch_factor: PositiveInt | None = None,
        scan_workers: NonNegativeInt = 2,
        gpu_decode: bool = False,
        max_missing_fraction: ClosedUnitInterval = 0.01,
        sha256: str | None = None,
        max_download_mb: PositiveFloat = MAX_DOWNLOAD_MB,
        max_extract_mb: PositiveFloat = MAX_EXTRACT_MB,
        exhausted: Exhausted = "repeat",
    ) -> None:
        super().__init__()
        # the CLI checks these while parsing; a direct Python call gets the same message
        check_ranges("data", CatsDogsDataModule.__init__, locals())
        self.save_hyperparameters()
        if len(split_sizes) != 3:
            raise UserError(
                f"data.split_sizes needs three values (train, val, test), got {list(split_sizes)}"
            )
        if subset_per_class is not None and subset_per_class < 1:
            raise UserError(f"data.subset_per_class must be at least 1, got {subset_per_class}")
        self.augment_cfg = AugmentConfig(
            rotation_range=rotation_range,
            shear_range=shear_range,
            zoom_range=zoom_range,
            horizontal_flip=horizontal_flip,
        )
        self.rows: list[Row] | None = None
        self.root: Path | None = None
        self._float_pool = _FloatPool()

    # ----------------------------------------------------------------- indexing
    def prepare_data(self) -> None:
        """Download/extract and scan once (rank 0); later calls hit the cache."""
        if self.hparams.split_file is None:
            self._index()

    def _index(self) -> tuple[Path, list[tuple[str, int]]]:
        hp = self.hparams
        return index_source(
            hp.source,
            hp.cache_dir,
            workers=hp.scan_workers,
            sha256=hp.sha256,
            max_download_mb=hp.max_download_mb,
            max_extract_mb=hp.max_extract_mb,
        )

    def _make_rows(self) -> list[Row]:
        hp = self.hparams
        if hp.split_file is not None:
            return read_split_csv(hp.split_file)
        root, items = self._index()
        self.root = root
        rows = make_split(items, tuple(hp.split_sizes), seed=hp.seed)
        return [SplitRow(str((root / p).resolve()), label, split) for p, label, split in rows]

    def setup(self, stage: str | None = None) -> None:
        """Build (or load) the split and write ``split.csv`` to the run's log dir."""
        if self.rows is None:
            self.rows = self._make_rows()
        if stage in ("fit", None) and self.trainer is not None:
            self._check_world_size(self.trainer.world_size)
            # ``log_dir`` broadcasts rank 0's directory under DDP, so every rank must ask
            log_dir = self.trainer.log_dir
            if log_dir is not None:
                self._keep_split_file(Path(log_dir) / "split.csv")

    def _keep_split_file(self, path: Path) -> None:
        """Write the run's ``split.csv``, or check a resumed run's against this split.

        A run's split is fixed at its first fit: ``test`` reads that file, so a
        resume that would rewrite it with another split (other seed, other source)
        would let the model be scored on images it trained on. The verdict is
        broadcast so that every DDP rank stops together.
        """
        trainer = self.trainer
        assert trainer is not None and self.rows is not None
        problem = ""
        if trainer.is_global_zero:
            if not path.is_file():
                write_split_csv(path, self.rows)
            elif read_split_csv(path) != self.rows:
                problem = (
                    f"the run's {path} holds another split than these data settings give; "
                    "resume with the run's data settings (or --data.split_file "
                    f"{path}), or start a new run"
                )
        problem = trainer.strategy.broadcast(problem)
        if problem:
            raise UserError(problem)

    def _check_world_size(self, world: int) -> None:
        bs = self.hparams.batch_size
        if world > 1 and bs % world:
            raise UserError(
                f"data.batch_size={bs} is the global batch and must divide evenly over the "
                f"{world} processes (trainer.devices x trainer.num_nodes); use a multiple of "
                f"{world}, or another number of devices"
            )

    def split_rows(self, split: str) -> list[Row]:
        """Rows of one split in file order; the training split after subset/flip."""
        if self.rows is None:
            self.setup(None if split != "train" else "index")
        assert self.rows is not None
        rows = [r for r in self.rows if r[2] == split]
        if not rows:
            raise UserError(f"the {split} split is empty; check data.split_sizes / data.split_file")
        if split != "train":
            return rows
        hp = self.hparams
        if hp.subset_per_class is not None:
            rng = np.random.default_rng([hp.seed, 7])
            keep: list[Row] = []
            for label in (0, 1):
                cls = [r for r in rows if r[1] == label]
                if len(cls) < hp.subset_per_class:
                    raise UserError(
                        f"data.subset_per_class={hp.subset_per_class} but the train split has only {len(cls)} images of class {label}"
                    )
                pick = sorted(rng.choice(len(cls), hp.subset_per_class, replace=False))
                keep += [cls[i] for i in pick]
            rows = keep
        if hp.flip_labels:
            rows = [r._replace(label=1 - r.label) for r in rows]
        return rows

    # ------------------------------------------------------------------ loaders
    def _dataset(self, split: str) -> ImageFiles:
        rows = self.split_rows(split)
        hp = self.hparams
        return ImageFiles(
            [r[0] for r in rows],
            [r[1] for r in rows],
            image_size=hp.image_size,
            augment=split == "train",
            cfg=self.augment_cfg,
            backend=hp.augment_backend,
            resize=hp.resize,
            seed=hp.seed,
            encoded=hp.gpu_decode,
        )

    def _loader(self, split: str) -> DataLoader:
        hp = self.hparams
        ds = self._dataset(split)
        world, rank = 1, 0
        if self.trainer is not None:
            world, rank = self.trainer.world_size, self.trainer.global_rank
        if split == "train":
            self._check_world_size(world)
        eval_bs = hp.batch_size if hp.eval_batch_size is None else hp.eval_batch_size
        bs = hp.batch_size if split == "train" else eval_bs
        steps = {"train": hp.train_steps_per_epoch, "val": hp.val_steps_per_epoch}.get(split)
        sampler = KerasBatchSampler(
            len(ds),
            bs,
            steps=steps,
            shuffle=split == "train" or steps is not None,
            seed=hp.seed + SPLITS.index(split),
            num_replicas=world,
            rank=rank,
            exhausted=hp.exhausted if split == "train" else "repeat",
        )
        if split == "train":
            self._train_sampler = sampler
        workers = hp.num_workers
        pin = torch.cuda.is_available() if hp.pin_memory is None else hp.pin_memory
        return DataLoader(
            ds,
            batch_sampler=sampler,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=hp.persistent_workers and workers > 0,
            prefetch_factor=hp.prefetch_factor if workers > 0 else None,
            collate_fn=collate_skip_broken,
        )

    def train_dataloader(self) -> DataLoader:
        """Augmented, shuffled, ``train_steps_per_epoch`` batches per epoch."""
        return self._loader("train")

    def train_stream_exhausted(self) -> bool:
        """True once this epoch used up a ``data.exhausted: stop`` training stream."""
        sampler = getattr(self, "_train_sampler", None)
        return sampler is not None and sampler.is_exhausted()

    def val_dataloader(self) -> DataLoader:
        """Rescale-only, ``val_steps_per_epoch`` batches from a shuffled stream."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """The whole test split once, in file order."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test split, for ``predict``."""
        return self._loader("test")

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        """Decode encoded batches on the device itself (``gpu_decode``)."""
        if isinstance(batch, EncodedBatch):
            from lightning_vgg.data.gpu import decode_batch

            chunks = list(torch.split(batch.data, batch.lengths.tolist()))  # host lengths
            x, kept = decode_batch(chunks, device, self.hparams.image_size)
            if not kept:
                return None
            rest = [batch.labels, batch.keys] + ([] if batch.theta is None else [batch.theta])
            if len(kept) != len(chunks):
                idx = torch.tensor(kept)
                rest = [t[idx] for t in rest]
            # non_blocking from pinned memory: no host-device sync per batch
            return (x, *(t.to(device, non_blocking=True) for t in rest))
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment on the device (``gpu`` backend) and rescale to floats.

        Returns:
            ``(images, labels, draw_keys)``.
        """
        training = self.trainer is not None and self.trainer.training
        if batch is None:
            if training and self.trainer.world_size > 1:
                # No image on this rank (a short last batch has fewer images than
                # ranks, or none of them loaded). It must still join the gradient
                # all-reduce, so it trains on an empty batch and contributes zero.
                s, dev = self.hparams.image_size, self.trainer.strategy.root_device
                empty = torch.zeros(0, dtype=torch.long, device=dev)
                return torch.zeros(0, 3, s, s, device=dev), empty, empty.clone()
            return None
        x, y, keys, *theta = batch  # theta: the gpu backend's warps, drawn in the workers
        if _shares_storage(y, x):
            # the fast backend's batches keep labels and keys in the images' memory (one
            # shared segment per batch); hand out copies so that keeping them (e.g. a
            # callback collecting keys) does not keep the whole batch alive
            y, keys = y.clone(), keys.clone()
        on_cpu = x.device.type == "cpu"
        warp = training and self.hparams.augment_backend == "gpu"
        if on_cpu and not warp and x.dtype == torch.uint8:
            pool = self.__dict__.setdefault("_float_pool", _FloatPool())
            out = pool.take(tuple(x.shape))
            with _one_thread(True):
                return _scaled_float(x, self.hparams.rescale, out), y, keys
        fresh = x.dtype != torch.float32  # then the conversion copies: x is ours to scale
        # contiguous NCHW float32 in one pass
        with _one_thread(on_cpu):
            x = x.to(torch.float32, memory_format=torch.contiguous_format)
        if warp:
            if theta:
                x = warp_theta(x, theta[0])
            else:
                params = [
                    draw_params(self.augment_cfg, self.hparams.seed, int(k)) for k in keys.tolist()
                ]
                x = warp_batch(x, params)
            fresh = True
        # In place when x is a fresh tensor: no second 12 MB temporary per batch.
        with _one_thread(on_cpu):
            x = x.mul_(self.hparams.rescale) if fresh else x * self.hparams.rescale
        # keys name each image (its index in the split for val/test), for galleries
        return x, y, keys

    # ------------------------------------------------------------------ probes
    def probe_batch(
        self, per_class: int, split: str = "val"
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """The first ``per_class`` cats and dogs of a split, rescaled, fixed for a run.

        Returns:
            Images ``(2k, 3, S, S)`` in [0, 1], labels, and file paths.
        """
        rows = self.split_rows(split)
        cats = [r for r in rows if r[1] == 0][:per_class]
        picked = cats + [r for r in rows if r[1] == 1][:per_class]
        x, _, paths = self.probe_from_paths([r[0] for r in picked])
        return x, torch.tensor([r[1] for r in picked]), paths

    def preprocess(self) -> Preprocess:
        """How this data module turns a file into an evaluation input (see
        :class:`~lightning_vgg.data.preprocess.Preprocess`)."""
        hp = self.hparams
        return Preprocess(int(hp.image_size), hp.resize, float(hp.rescale), hp.augment_backend)

    def probe_from_paths(self, paths: Sequence[str]) -> tuple[torch.Tensor, None, list[str]]:
        """Images loaded exactly as for evaluation (decoder, resize, rescale), as one batch."""
        return self.preprocess().load_batch(list(paths)), None, list(paths)
