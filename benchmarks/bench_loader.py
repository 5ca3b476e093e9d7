"""Section ``loader``: images/s of our data pipeline beside Keras's ImageDataGenerator and
torchvision's ImageFolder, on the same JPEGs (rows ``loader/...``)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")  # before anything imports keras

import numpy as np
import torch
from bench_data import Data, StubTrainer, make_dm
from timing import (
    Recorder,
    autorange,
    cpu_count,
    cpu_label,
    rate_stats,
    seconds_per_call,
    sync,
)

CPU = torch.device("cpu")
BATCH = 20
WORKERS = 2  # CPU rows
REPS = 4


def section_loader(rec: Recorder, args: argparse.Namespace, dev: torch.device, data: Data) -> None:
    if dev.type == "cuda":  # the GPU rows first: on a GPU machine they matter most
        loader_gpu(rec, data, dev)
    decode_check(rec, data)
    results: dict[str, float] = {}
    for resize in ("bilinear", "nearest"):
        ours_cpu(rec, data, resize, results)
    keras_peer(rec, data, args.quick, results)
    torchvision_peer(rec, data, results)
    vs_keras(rec, results)


def loader_rate(
    loaders: list[Any],
    consume: Callable[[Any], int],
    device: torch.device,
    repeats: int,
    warm: bool = True,
) -> tuple[list[float], int]:
    """Images/s of each of ``repeats`` whole epochs of ``loaders`` (the first epoch, with
    worker start-up, is warm-up), and the images per epoch. An epoch's start (workers
    refilling the prefetch queue) is included, as Lightning sees it.

    Wall clock, not a ``Timer``: the unit is a whole epoch of a DataLoader, measured end
    to end; single ``next()`` calls come in bursts as the workers' queue fills and drains.
    """

    def one_pass() -> tuple[int, float]:
        n = 0
        t0 = time.perf_counter()
        for ld in loaders:
            for b in ld:
                n += consume(b)
        sync(device)
        return n, time.perf_counter() - t0

    if warm:
        one_pass()
    rates, n = [], 0
    for _ in range(repeats):
        n, dt = one_pass()
        rates.append(n / dt)
    return rates, n


def decode_check(rec: Recorder, data: Data) -> None:
    from lightning_vgg.data.dataset import decode_rgb_array
    from lightning_vgg.data.decode import load_rgb

    paths = sorted(str(p.resolve()) for p in data.eval_dir.rglob("*.jpg"))[:200]
    n = len(paths)
    differ = sum(not np.array_equal(decode_rgb_array(p), np.asarray(load_rgb(p))) for p in paths)
    rec.add(
        "loader/cv2-decode-differs-from-PIL",
        differ,
        "images",
        checked=n,
        device=cpu_label(),
        note=f"of {n} JPEGs, cv2.imdecode vs PIL",
    )


def ours_cpu(rec: Recorder, data: Data, resize: str, results: dict[str, float]) -> None:
    """(a) ours on the CPU; float and uint8 outputs are timed in turns (pass by pass),
    so that load from elsewhere on the machine hits both alike."""
    from lightning_vgg.data.datamodule import CatsDogsDataModule

    labels = {"ours": CatsDogsDataModule}
    dms, loaders = {}, {}
    for label, cls in labels.items():
        dms[label] = dm = make_dm(
            data, cls, augment_backend="fast", resize=resize, num_workers=WORKERS
        )
        loaders[label] = {
            "train": [dm.train_dataloader()],
            "eval": [dm.val_dataloader(), dm.test_dataloader()],
        }
        for lds in loaders[label].values():
            loader_rate(lds, lambda b: b[0].shape[0], CPU, 0)  # start the workers

    def consume(out: str, dm: Any) -> Callable[[Any], int]:
        def to_float(b: Any) -> int:
            x, _, _ = dm.on_after_batch_transfer(dm.transfer_batch_to_device(b, CPU, 0), 0)
            return x.shape[0]

        return to_float if out == "float" else (lambda b: b[0].shape[0])

    for kind in ("train", "eval"):
        series = [(label, out) for out in ("uint8", "float") for label in labels]
        rates: dict[tuple[str, str], list[float]] = {k: [] for k in series}
        n = 0
        for _ in range(REPS):
            for label, out in series:
                r, n = loader_rate(loaders[label][kind], consume(out, dms[label]), CPU, 1, False)
                rates[(label, out)] += r
        for label, out in series:
            name = f"loader/{label}-fast-{resize}/{kind}/{out}"
            stats = rate_stats(rates[(label, out)])
            results[name] = stats["value"]
            rec.add(
                name,
                stats.pop("value"),
                "img/s",
                images=n,
                **stats,
                batch=BATCH,
                workers=WORKERS,
                device=cpu_label(),
                cv2_threads=1,
                note=(
                    "DataLoader batches as they come (uint8 NCHW)"
                    if out == "uint8"
                    else "+ on_after_batch_transfer (float32, rescaled)"
                ),
            )
    del dms, loaders
    gc.collect()


def keras_peer(rec: Recorder, data: Data, quick: bool, results: dict[str, float]) -> None:
    """(c) the Keras peer: one process, so a ``Timer`` of ``next(gen)`` fits. Its blocks
    add up to the work of the earlier hand loop (``REPS`` x ``nb`` batches)."""
    with contextlib.redirect_stdout(sys.stderr):
        from keras.src.legacy.preprocessing.image import ImageDataGenerator

    nb_train, nb_eval = (5, 20) if quick else (15, 40)
    aug = ImageDataGenerator(
        rotation_range=40,
        shear_range=0.2,
        zoom_range=0.2,
        horizontal_flip=True,
        rescale=1 / 255,
        fill_mode="nearest",
    )
    plain = ImageDataGenerator(rescale=1 / 255)
    flow = {"target_size": (224, 224), "batch_size": BATCH, "class_mode": "binary"}
    for kind, gen_maker, nb in (
        ("train", lambda: aug.flow_from_directory(str(data.train_dir), **flow), nb_train),
        (
            "eval",
            lambda: plain.flow_from_directory(str(data.eval_dir), shuffle=False, **flow),
            nb_eval,
        ),
    ):
        with contextlib.redirect_stdout(sys.stderr):
            gen = gen_maker()
        next(gen)
        # every batch holds BATCH images (the mini archive's splits are multiples of 20)
        est = seconds_per_call(lambda gen=gen: next(gen))
        stats = autorange(lambda gen=gen: next(gen), BATCH, min_run_time=REPS * nb * est)
        name = f"loader/keras/{kind}"
        results[name] = stats["value"]
        rec.add(
            name,
            stats.pop("value"),
            "img/s",
            images=BATCH * stats["steps_per_repeat"],
            **stats,
            batch=BATCH,
            workers=0,
            device=cpu_label(),
            note="ImageDataGenerator.flow_from_directory, float32 rescaled, one process",
        )


def torchvision_peer(rec: Recorder, data: Data, results: dict[str, float]) -> None:
    """(d) torchvision ImageFolder + PIL transforms, whole DataLoader epochs."""
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    tfs = {
        "train": T.Compose(
            [
                T.RandomAffine(40, scale=(0.8, 1.2), shear=0.2),
                T.RandomHorizontalFlip(),
                T.Resize((224, 224)),
                T.ToTensor(),
            ]
        ),
        "eval": T.Compose([T.Resize((224, 224)), T.ToTensor()]),
    }
    for kind, root in (("train", data.train_dir), ("eval", data.eval_dir)):
        ds = datasets.ImageFolder(str(root), transform=tfs[kind])
        ld = DataLoader(
            ds, batch_size=BATCH, shuffle=kind == "train", num_workers=WORKERS,
            persistent_workers=True,
        )  # fmt: skip
        rates, n = loader_rate([ld], lambda b: b[0].shape[0], CPU, REPS)
        stats = rate_stats(rates)
        name = f"loader/torchvision/{kind}"
        results[name] = stats["value"]
        rec.add(
            name,
            stats.pop("value"),
            "img/s",
            images=n,
            **stats,
            batch=BATCH,
            workers=WORKERS,
            device=cpu_label(),
            note="ImageFolder + PIL transforms, float32",
        )
        del ld


def vs_keras(rec: Recorder, results: dict[str, float]) -> None:
    """Ratios against the Keras peer (float output on both sides: what a model gets)."""
    targets = {"train": 15.0, "eval": 2.0}
    for label in ("ours",):
        for resize in ("bilinear", "nearest"):
            for kind in ("train", "eval"):
                for out in ("float", "uint8"):
                    ours = results.get(f"loader/{label}-fast-{resize}/{kind}/{out}")
                    keras = results.get(f"loader/keras/{kind}")
                    if not ours or not keras:
                        continue
                    ratio = ours / keras
                    rec.add(
                        f"loader/{label}-fast-{resize}/{kind}/{out}/vs-keras",
                        ratio,
                        "x",
                        target=targets[kind],
                        met=ratio >= targets[kind],
                        device=cpu_label(),
                        note=(
                            "float32 on both sides"
                            if out == "float"
                            else "our uint8 batches (rescaled later, on the GPU) vs Keras's float32"
                        )
                        + f"; target >= {targets[kind]:g}x",
                    )


def loader_gpu(rec: Recorder, data: Data, dev: torch.device) -> None:
    """(b) ours on the GPU: raw JPEG bytes, nvJPEG decode, warp on the device."""
    from lightning_vgg.data.datamodule import CatsDogsDataModule

    reps = 3
    gpu_workers = min(4, max(2, cpu_count() // 4))
    runs = [(label, cls, bs) for bs in (20, 256) for label, cls in (("ours", CatsDogsDataModule),)]
    for label, cls, bs in runs:
        dm = make_dm(
            data,
            cls,
            augment_backend="gpu",
            gpu_decode=True,
            num_workers=gpu_workers,
            pin_memory=True,
            batch_size=bs,
            # bs 256: an endless stream of 8 batches per pass (the split has 600 images)
            train_steps_per_epoch=None if bs == 20 else 8,
        )
        loaders = {"train": [dm.train_dataloader()]}
        if bs == 20:
            loaders["eval"] = [dm.val_dataloader(), dm.test_dataloader()]
        stub = StubTrainer(training=True)
        dm.trainer = stub  # after creating the loaders, as tests/test_datamodule.py does

        def on_gpu(b: Any, dm: Any = dm) -> int:
            b = dm.transfer_batch_to_device(b, dev, 0)
            x, _, _ = dm.on_after_batch_transfer(b, 0)
            return x.shape[0]

        for kind in loaders:
            stub.training = kind == "train"
            rates, n = loader_rate(loaders[kind], on_gpu, dev, reps)
            stats = rate_stats(rates)
            rec.add(
                f"loader/{label}-gpu-nvjpeg/{kind}" + ("" if bs == 20 else f"/bs{bs}"),
                stats.pop("value"),
                "img/s",
                images=n,
                **stats,
                batch=bs,
                workers=gpu_workers,
                note="bytes -> nvJPEG -> nearest resize -> (warp) -> float32 rescaled on the GPU, synchronized",
            )
        del loaders, dm
        gc.collect()
