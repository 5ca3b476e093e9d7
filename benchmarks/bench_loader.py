"""Section ``loader``: images/s of our data pipeline beside Keras's ImageDataGenerator and
torchvision's ImageFolder, on the same JPEGs (rows ``loader/...``)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")  # before anything imports keras

import numpy as np
import torch
from bench_data import Data, StubTrainer, make_dm
from timing import (
    Recorder,
    cpu_count,
    cpu_label,
    rate_stats,
    sync,
)

CPU = torch.device("cpu")
BATCH = 20
WORKERS = 2  # CPU rows
REPS = 4


def section_loader(rec: Recorder, args: argparse.Namespace, dev: torch.device, data: Data) -> None:
    t0 = time.perf_counter()
    rec.meta.setdefault("commit", source_commit())
    if dev.type == "cuda":  # the GPU rows first: on a GPU machine they matter most
        loader_gpu(rec, data, dev)
    decode_check(rec, data)
    conversion_vs_decode(rec, data)
    results: dict[str, float] = {}
    per_round = ours_and_keras(rec, data, args.quick, results)
    torchvision_peer(rec, data, results)
    vs_keras(rec, results, per_round)
    rec.add(
        "loader/wall-time",
        time.perf_counter() - t0,
        "s",
        commit=rec.meta["commit"],
        device=cpu_label(),
        note=f"this section, at commit {rec.meta['commit']}",
    )


def source_commit() -> str:
    """``git rev-parse --short HEAD``, plus "+ uncommitted changes" when the tree is dirty."""
    import subprocess

    from bench_data import ROOT

    def git(*a: str) -> str:
        return subprocess.run(
            ["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return head + (" + uncommitted changes" if dirty else "")


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


def conversion_vs_decode(rec: Recorder, data: Data, rounds: int = 5) -> None:
    """The float conversion of a batch (``on_after_batch_transfer`` on the CPU: uint8
    NCHW to float32, rescaled) beside decoding that batch's JPEGs, in one process, in
    turns (one pass over 20 batches of 20 each, per side and round). Each conversion
    gets another batch of the eval split (60 MB of uint8 in all, more than the L3
    cache), as a loader hands them over, and its float output is dropped at once, so
    that the data module's float buffers are reused as in training."""
    import itertools

    from lightning_vgg.data.dataset import decode_rgb_array

    dm = make_dm(data, augment_backend="fast", resize="bilinear", num_workers=0)
    evals = itertools.chain(dm.val_dataloader(), dm.test_dataloader())
    batches = list(itertools.islice(evals, 20))
    paths = sorted(str(p.resolve()) for p in data.eval_dir.rglob("*.jpg"))
    groups = [paths[i : i + BATCH] for i in range(0, len(batches) * BATCH, BATCH)]
    groups = [g for g in groups if len(g) == BATCH]

    def convert_all() -> None:
        for b in batches:
            dm.on_after_batch_transfer(b, 0)

    def decode_all() -> None:
        for g in groups:
            for p in g:
                decode_rgb_array(p)

    convert_all(), decode_all()  # warm-up
    ms: dict[str, list[float]] = {"convert": [], "decode": []}
    for _ in range(rounds):
        for side, fn, n in (
            ("convert", convert_all, len(batches)),
            ("decode", decode_all, len(groups)),
        ):
            t0 = time.perf_counter()
            fn()
            ms[side].append(1e3 * (time.perf_counter() - t0) / n)
    conv, dec = statistics.median(ms["convert"]), statistics.median(ms["decode"])
    common = {"batch": BATCH, "device": cpu_label(), "rounds": rounds}
    rec.add(
        "loader/float-conversion-per-batch",
        conv,
        "ms",
        repeats=[round(v, 3) for v in ms["convert"]],
        **common,
        note="on_after_batch_transfer of a uint8 batch (20 x 3 x 224 x 224) on the CPU",
    )
    rec.add(
        "loader/jpeg-decode-per-batch",
        dec,
        "ms",
        repeats=[round(v, 3) for v in ms["decode"]],
        **common,
        note="decode_rgb_array of that many 180 px JPEGs (cv2.imdecode), one process",
    )
    ratios = [c / d for c, d in zip(ms["convert"], ms["decode"], strict=True)]
    ratio = statistics.median(ratios)
    rec.add(
        "loader/float-conversion/vs-decode",
        ratio,
        "x",
        per_round=[round(r, 3) for r in ratios],
        target=1.0,
        met=ratio <= 1.0,
        device=cpu_label(),
        note="conversion time / decode time per batch, median of per-round ratios; target <= 1",
    )


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (``/proc``, clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ours_and_keras(
    rec: Recorder, data: Data, quick: bool, results: dict[str, float]
) -> dict[str, list[float]]:
    """(a) ours on the CPU beside (c) the Keras peer, timed in turns.

    Each round runs, per kind (train, eval), one whole epoch of each of our four
    series (bilinear/nearest resize x uint8/float output) and then one block of
    ``next(gen)`` of Keras's generator, so that load from elsewhere on this shared
    machine hits both sides alike; a ratio is the median of the per-round ratios.
    Each measurement also records CPU time per image: ours the main process plus its
    loader workers (``/proc``), Keras its one process.

    Returns:
        The per-round ratios ours / Keras, by our row name.
    """
    with contextlib.redirect_stdout(sys.stderr):
        from keras.src.legacy.preprocessing.image import ImageDataGenerator

    from lightning_vgg.data.datamodule import CatsDogsDataModule

    rounds = 6 if quick else 8
    # Keras blocks of about a second (train: 10 batches at ~190 img/s; eval: its split)
    keras_batches = {"train": 10, "eval": 20}
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
    with contextlib.redirect_stdout(sys.stderr):
        gens = {
            "train": aug.flow_from_directory(str(data.train_dir), **flow),
            "eval": plain.flow_from_directory(str(data.eval_dir), shuffle=False, **flow),
        }
    for gen in gens.values():
        next(gen)  # warm-up

    dms, loaders = {}, {}
    for resize in ("bilinear", "nearest"):
        dms[resize] = dm = make_dm(
            data, CatsDogsDataModule, augment_backend="fast", resize=resize, num_workers=WORKERS
        )
        loaders[resize] = {
            "train": [dm.train_dataloader()],
            "eval": [dm.val_dataloader(), dm.test_dataloader()],
        }

    def consume(out: str, dm: Any) -> Callable[[Any], int]:
        def to_float(b: Any) -> int:
            x, _, _ = dm.on_after_batch_transfer(dm.transfer_batch_to_device(b, CPU, 0), 0)
            return x.shape[0]

        return to_float if out == "float" else (lambda b: b[0].shape[0])

    # start the workers (each loader's first epoch), then note their process ids
    pids: dict[tuple[str, str], list[int]] = {}
    iters: list[Any] = []
    for resize, by_kind in loaders.items():
        for kind, lds in by_kind.items():
            its = [iter(ld) for ld in lds]  # persistent workers: the same processes later
            for it in its:
                for _ in it:
                    pass
            iters += its
            pids[(resize, kind)] = [w.pid for it in its for w in it._workers]

    series = [(resize, out) for resize in ("bilinear", "nearest") for out in ("uint8", "float")]
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    images: dict[str, int] = {}
    ratios: dict[str, list[float]] = {}
    for _ in range(rounds):
        for kind in ("train", "eval"):
            ours_round = {}
            for resize, out in series:
                name = f"loader/ours-fast-{resize}/{kind}/{out}"
                workers = pids[(resize, kind)]
                c0, w0 = time.process_time(), sum(proc_cpu_s(p) for p in workers)
                r, n = loader_rate(loaders[resize][kind], consume(out, dms[resize]), CPU, 1, False)
                used = time.process_time() - c0 + sum(proc_cpu_s(p) for p in workers) - w0
                rates.setdefault(name, []).extend(r)
                cpu.setdefault(name, []).append(1e3 * used / n)
                images[name] = n
                ours_round[name] = r[0]
            gen, nb = gens[kind], keras_batches[kind]
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(nb):
                next(gen)
            dt, used = time.perf_counter() - t0, time.process_time() - c0
            name = f"loader/keras/{kind}"
            rates.setdefault(name, []).append(nb * BATCH / dt)
            cpu.setdefault(name, []).append(1e3 * used / (nb * BATCH))
            images[name] = nb * BATCH
            for ours_name, r in ours_round.items():
                ratios.setdefault(ours_name, []).append(r / rates[name][-1])

    for name in [f"loader/ours-fast-{r}/{k}/{o}" for r, o in series for k in ("train", "eval")]:
        stats = rate_stats(rates[name])
        results[name] = stats["value"]
        rec.add(
            name,
            stats.pop("value"),
            "img/s",
            images=images[name],
            **stats,
            batch=BATCH,
            workers=WORKERS,
            device=cpu_label(),
            cv2_threads=1,
            cpu_ms_per_img=round(statistics.median(cpu[name]), 4),
            note=(
                "DataLoader batches as they come (uint8 NCHW)"
                if name.endswith("uint8")
                else "+ on_after_batch_transfer (float32 NCHW, rescaled)"
            ),
        )
    for kind in ("train", "eval"):
        name = f"loader/keras/{kind}"
        stats = rate_stats(rates[name])
        results[name] = stats["value"]
        rec.add(
            name,
            stats.pop("value"),
            "img/s",
            images=images[name],
            **stats,
            batch=BATCH,
            workers=0,
            device=cpu_label(),
            cpu_ms_per_img=round(statistics.median(cpu[name]), 4),
            note="ImageDataGenerator.flow_from_directory, float32 NHWC rescaled, one process;"
            " timed in turns with ours",
        )
    del iters, dms, loaders, gens
    gc.collect()
    return ratios


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


def vs_keras(rec: Recorder, results: dict[str, float], per_round: dict[str, list[float]]) -> None:
    """Ratios against the Keras peer (float output on both sides: what a model gets): the
    median of the per-round ratios (ours and Keras timed in turns), with ``per_round``."""
    targets = {"train": 15.0, "eval": 2.0}
    for label in ("ours",):
        for resize in ("bilinear", "nearest"):
            for kind in ("train", "eval"):
                for out in ("float", "uint8"):
                    name = f"loader/{label}-fast-{resize}/{kind}/{out}"
                    rounds = per_round.get(name)
                    if not rounds:
                        continue
                    ratio = statistics.median(rounds)
                    rec.add(
                        f"{name}/vs-keras",
                        ratio,
                        "x",
                        target=targets[kind],
                        met=ratio >= targets[kind],
                        per_round=[round(r, 3) for r in rounds],
                        ratio_of_medians=round(results[name] / results[f"loader/keras/{kind}"], 3),
                        device=cpu_label(),
                        note=(
                            "float32 on both sides"
                            if out == "float"
                            else "our uint8 batches (rescaled later, on the GPU) vs Keras's float32"
                        )
                        + f"; median of per-round ratios; target >= {targets[kind]:g}x",
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
