#!/usr/bin/env python3
"""Loader, training and Grad-CAM atlas throughput (issue 5); see benchmarks/README.md.

    python benchmarks/bench.py [--quick] [--only loader|train|atlas] [--json PATH] [--md PATH]
                               [--data ZIP_OR_DIR] [--device auto|cpu|cuda]

Every number is a median of repeats after warm-up. GPU work is timed with CUDA events
or closed by ``torch.cuda.synchronize()``. Each section runs under its own hard time
budget (``--budget train=150``); a failure or a timeout in one section is recorded as
a row and the others still run. Rows are written to the JSON after each measurement,
so a run that is killed keeps what it had.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ["KERAS_BACKEND"] = "torch"  # before anything imports keras

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SPLIT = (0.6, 0.2, 0.2)
SECTIONS = ("loader", "train", "atlas")
DEFAULT_BUDGET = {  # seconds per section: (cuda, cpu)
    "loader": (90, 150),
    "train": (180, 120),
    "atlas": (50, 90),
}

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.utils\.flop_counter")


# --------------------------------------------------------------------------- recording


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: CPU model and cores, GPU, library versions."""
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_cores": cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    with contextlib.suppress(OSError, ValueError):
        kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        info["memory_gib"] = round(kb / 2**20, 1)
    for mod in ("torchvision", "pytorch_lightning", "cv2", "PIL", "captum", "keras"):
        with contextlib.suppress(Exception):
            info[mod] = __import__(mod).__version__
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        info["grad-cam"] = version("grad-cam")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def device_label(device: torch.device, info: dict[str, Any]) -> str:
    if device.type == "cuda":
        return f"cuda: {info.get('gpu', '?')}"
    return f"cpu: {info['cpu']} ({info['cpu_cores']} cores)"


class Recorder:
    """Rows ``{name, value, unit, device, ...}``; rewrites the JSON after every row."""

    def __init__(self, path: Path | None, meta: dict[str, Any], device: str) -> None:
        self.path = path
        self.meta = meta
        self.device = device
        self.rows: list[dict[str, Any]] = []

    def add(self, name: str, value: float | None, unit: str, **extra: Any) -> dict[str, Any]:
        device = extra.pop("device", self.device)
        v = None if value is None or not math.isfinite(value) else float(f"{float(value):.5g}")
        row = {"name": name, "value": v, "unit": unit, "device": device, "load1": load1(), **extra}
        self.rows.append(row)
        note = extra.get("note") or extra.get("error") or ""
        shown = "-" if v is None else f"{v:,.4g}"
        print(f"  {name:<52} {shown:>12} {unit:<10} {note}", flush=True)
        self.flush()
        return row

    def flush(self) -> None:
        if self.path is None:
            return
        self.meta["finished"] = now()
        self.meta["load_end"] = [round(v, 2) for v in os.getloadavg()]
        doc = {"machine": self.meta["machine"], "meta": self.meta, "rows": self.rows}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(self.path)


def _burn(seconds: float, q: Any) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        pass
    q.put((time.process_time() - c0) / (time.perf_counter() - t0))


def cpu_share(seconds: float = 0.5) -> float:
    """Mean share of a core that one busy process per core gets right now (1.0: idle
    machine); the load from other tenants, measured rather than guessed."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_burn, args=(seconds, q)) for _ in range(cpu_count())]
    for p in procs:
        p.start()
    shares = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join()
    return round(sum(shares) / len(shares), 2)


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- budgets


class SectionTimeout(Exception):
    """A section ran past its hard budget."""


class Budget:
    """A hard per-section limit (SIGALRM) plus ``left()`` for skipping optional work."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    @contextlib.contextmanager
    def armed(self) -> Iterator[Budget]:
        def fire(signum: int, frame: Any) -> None:
            raise SectionTimeout(f"over its {self.seconds:.0f} s budget")

        old = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        try:
            yield self
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], Any], device: torch.device, calls: int, repeats: int, warmup: int
) -> list[float]:
    """Seconds per call, one value per repeat of ``calls`` back-to-back calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    out: list[float] = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3 / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            out.append((time.perf_counter() - t0) / calls)
    return out


def calls_for(seconds_per_call: float, target_s: float, lo: int = 1, hi: int = 200) -> int:
    return int(min(hi, max(lo, math.ceil(target_s / max(seconds_per_call, 1e-6)))))


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    source: str
    cache: Path
    n_train: int
    n_eval: int
    train_dir: Path
    eval_dir: Path


class StubTrainer:
    """What the data module reads from a trainer, for driving it by hand."""

    world_size = 1
    global_rank = 0
    is_global_zero = True
    log_dir = None

    def __init__(self, training: bool) -> None:
        self.training = training


def find_data(arg: str | None) -> Path:
    candidates = (
        [Path(arg)]
        if arg
        else [
            ROOT / ".gpu" / "catsdogs-180px-mini.zip",
            ROOT.parent / "shared" / "data" / "catsdogs-180px-mini.zip",
        ]
    )
    for c in candidates:
        if c.exists():
            return c.resolve()
    raise SystemExit(f"error: no data found at {', '.join(map(str, candidates))}; pass --data")


def make_dm(data: Data, cls: type | None = None, **kw: Any) -> Any:
    from lightning_vgg.data.datamodule import CatsDogsDataModule

    args: dict[str, Any] = {
        "source": data.source,
        "cache_dir": str(data.cache),
        "split_sizes": list(SPLIT),
        "image_size": 224,
        "batch_size": 20,
        "num_workers": 2,
        "train_steps_per_epoch": None,
        "val_steps_per_epoch": None,
        "scan_workers": min(4, cpu_count()),
        "seed": 42,
    }
    args.update(kw)
    dm = (cls or CatsDogsDataModule)(**args)
    dm.setup("fit")
    return dm


def prepare_data(source: Path, cache: Path) -> Data:
    """Extract + scan once (cached), and lay the same splits out as class folders.

    Keras's ``flow_from_directory`` and torchvision's ``ImageFolder`` read symlink trees
    of exactly our train split and of our val + test splits.
    """
    dm = make_dm(Data(str(source), cache, 0, 0, cache, cache))
    rows = dm.rows or []
    tag = f"{source.stem}-{len(rows)}"
    trees = cache / "trees" / tag
    dirs = {"train": trees / "train", "eval": trees / "eval"}
    if not (trees / ".done").exists():
        for path, label, split in rows:
            d = dirs["train" if split == "train" else "eval"] / ("dog" if label else "cat")
            d.mkdir(parents=True, exist_ok=True)
            p = Path(path)
            link = d / f"{p.parent.name}_{p.name}"
            if not link.exists():
                link.symlink_to(p)
        (trees / ".done").write_text("ok\n")
    n_train = sum(1 for r in rows if r[2] == "train")
    return Data(str(source), cache, n_train, len(rows) - n_train, dirs["train"], dirs["eval"])


def loader_rate(
    loaders: list[Any],
    consume: Callable[[Any], int],
    device: torch.device,
    repeats: int,
    warm: bool = True,
) -> tuple[float, list[float], int]:
    """Images/s over whole epochs of ``loaders`` (the first epoch, with worker start-up,
    is warm-up). An epoch's start (workers refilling the prefetch queue) is included,
    as Lightning sees it."""

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
    return (statistics.median(rates) if rates else 0.0), rates, n


# --------------------------------------------------------------------------- 1. loaders


def cv2_threads() -> int:
    import cv2

    return cv2.getNumThreads()


def section_loader(rec: Recorder, args: argparse.Namespace, dev: torch.device, data: Data) -> None:
    from lightning_vgg.data.datamodule import CatsDogsDataModule
    from lightning_vgg.data.dataset import decode_rgb_array
    from lightning_vgg.data.decode import load_rgb

    if dev.type == "cuda":  # the GPU rows first: on a GPU machine they matter most
        loader_gpu(rec, data, dev)
    cpu = torch.device("cpu")
    cpu_dev = f"cpu: {cpu_name()} ({cpu_count()} cores)"
    reps = 4
    workers = 2
    common = {"batch": 20, "workers": workers, "device": cpu_dev}
    results: dict[str, float] = {}

    paths = sorted(str(p.resolve()) for p in data.eval_dir.rglob("*.jpg"))[:200]
    n = len(paths)
    differ = sum(not np.array_equal(decode_rgb_array(p), np.asarray(load_rgb(p))) for p in paths)
    rec.add(
        "loader/cv2-decode-differs-from-PIL",
        differ,
        "images",
        checked=n,
        device=cpu_dev,
        note=f"of {n} JPEGs, cv2.imdecode vs PIL",
    )

    # (a) ours on the CPU; float and uint8 outputs are timed in turns (pass by pass),
    # so that load from elsewhere on the machine hits both alike.
    labels = {"ours": CatsDogsDataModule}
    for resize in ("bilinear", "nearest"):
        dms, loaders = {}, {}
        for label, cls in labels.items():
            dms[label] = dm = make_dm(
                data, cls, augment_backend="fast", resize=resize, num_workers=workers
            )
            loaders[label] = {
                "train": [dm.train_dataloader()],
                "eval": [dm.val_dataloader(), dm.test_dataloader()],
            }
            for lds in loaders[label].values():
                loader_rate(lds, lambda b: b[0].shape[0], cpu, 0)  # start the workers

        def consume(out: str, dm: Any) -> Callable[[Any], int]:
            def to_float(b: Any) -> int:
                x, _, _ = dm.on_after_batch_transfer(dm.transfer_batch_to_device(b, cpu, 0), 0)
                return x.shape[0]

            return to_float if out == "float" else (lambda b: b[0].shape[0])

        for kind in ("train", "eval"):
            series = [(label, out) for out in ("uint8", "float") for label in labels]
            rates: dict[tuple[str, str], list[float]] = {k: [] for k in series}
            n = 0
            for _ in range(reps):
                for label, out in series:
                    _, r, n = loader_rate(
                        loaders[label][kind], consume(out, dms[label]), cpu, 1, warm=False
                    )
                    rates[(label, out)] += r
            for label, out in series:
                name = f"loader/{label}-fast-{resize}/{kind}/{out}"
                results[name] = statistics.median(rates[(label, out)])
                rec.add(
                    name,
                    results[name],
                    "img/s",
                    images=n,
                    repeats=[round(r, 1) for r in rates[(label, out)]],
                    **common,
                    cv2_threads=1,
                    note=(
                        "DataLoader batches as they come (uint8 NCHW)"
                        if out == "uint8"
                        else "+ on_after_batch_transfer (float32, rescaled)"
                    ),
                )
        del dms, loaders
        gc.collect()

    # (c) the Keras peer
    with contextlib.redirect_stdout(sys.stderr):
        from keras.src.legacy.preprocessing.image import ImageDataGenerator

    nb_train, nb_eval = (5, 20) if args.quick else (15, 40)
    aug = ImageDataGenerator(
        rotation_range=40,
        shear_range=0.2,
        zoom_range=0.2,
        horizontal_flip=True,
        rescale=1 / 255,
        fill_mode="nearest",
    )
    plain = ImageDataGenerator(rescale=1 / 255)
    for kind, gen_maker, nb in (
        (
            "train",
            lambda: aug.flow_from_directory(
                str(data.train_dir), target_size=(224, 224), batch_size=20, class_mode="binary"
            ),
            nb_train,
        ),
        (
            "eval",
            lambda: plain.flow_from_directory(
                str(data.eval_dir),
                target_size=(224, 224),
                batch_size=20,
                class_mode="binary",
                shuffle=False,
            ),
            nb_eval,
        ),
    ):
        with contextlib.redirect_stdout(sys.stderr):
            gen = gen_maker()
        next(gen)
        rates = []
        for _ in range(reps):
            t0, n = time.perf_counter(), 0
            for _ in range(nb):
                n += next(gen)[0].shape[0]
            rates.append(n / (time.perf_counter() - t0))
        name = f"loader/keras/{kind}"
        results[name] = statistics.median(rates)
        rec.add(
            name,
            results[name],
            "img/s",
            images=n,
            repeats=[round(r, 1) for r in rates],
            batch=20,
            workers=0,
            device=cpu_dev,
            note="ImageDataGenerator.flow_from_directory, float32 rescaled, one process",
        )

    # (d) torchvision ImageFolder + PIL transforms
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
            ds, batch_size=20, shuffle=kind == "train", num_workers=workers, persistent_workers=True
        )
        rate, rates, n = loader_rate([ld], lambda b: b[0].shape[0], cpu, reps)
        name = f"loader/torchvision/{kind}"
        results[name] = rate
        rec.add(
            name,
            rate,
            "img/s",
            images=n,
            repeats=[round(r, 1) for r in rates],
            **common,
            note="ImageFolder + PIL transforms, float32",
        )
        del ld

    # ratios against the Keras peer (float output on both sides: what a model gets)
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
                        device=cpu_dev,
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
            rate, rates, n = loader_rate(loaders[kind], on_gpu, dev, reps)
            rec.add(
                f"loader/{label}-gpu-nvjpeg/{kind}" + ("" if bs == 20 else f"/bs{bs}"),
                rate,
                "img/s",
                images=n,
                repeats=[round(r, 1) for r in rates],
                batch=bs,
                workers=gpu_workers,
                note="bytes -> nvJPEG -> nearest resize -> (warp) -> float32 rescaled on the GPU, synchronized",
            )
        del loaders, dm
        gc.collect()


# --------------------------------------------------------------------------- 2. training


def count_flops_per_image(width: float, size: int, dev: torch.device) -> float:
    """conv + matmul FLOPs of one training step (forward + backward), per image."""
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_vgg.models.module import VGGClassifier

    model = VGGClassifier(width=width, input_size=size).to(dev).train()
    x = torch.rand(2, 3, size, size, device=dev)
    y = torch.ones(2, device=dev)
    with FlopCounterMode(display=False) as fc:
        F.binary_cross_entropy_with_logits(model(x).float(), y).backward()
    total = fc.get_total_flops()
    del model
    return total / 2


def make_model(width: float, size: int, dev: torch.device, channels_last: bool) -> Any:
    from lightning_vgg.models.module import VGGClassifier

    torch.manual_seed(0)
    return VGGClassifier(width=width, input_size=size, channels_last=channels_last).to(dev).train()


def make_step(
    model: Any, dev: torch.device, amp: bool
) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def real_images(data: Data, size: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The val + test images, resized and rescaled as for evaluation, on ``dev``.

    Model-only steps train on these rather than on ``torch.rand``: a GPU's clocks
    depend on the data (uniform noise flips more bits and draws more power than
    photos), and the end-to-end rows train on photos.
    """
    dm = make_dm(data, augment_backend="fast", resize="bilinear", image_size=size, num_workers=0)
    xs, ys = [], []
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        for b in loader:
            x, y, _ = dm.on_after_batch_transfer(b, 0)
            xs.append(x.contiguous())
            ys.append(y)
    return torch.cat(xs).to(dev), torch.cat(ys).float().to(dev)


def take(images: tuple[torch.Tensor, torch.Tensor], bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = images
    reps = -(-bs // len(x))
    return x.repeat(reps, 1, 1, 1)[:bs].contiguous(), y.repeat(reps)[:bs].contiguous()


def model_only(
    step: Callable[..., Any],
    bs: int,
    images: tuple[torch.Tensor, torch.Tensor],
    dev: torch.device,
    target_s: float,
    reps: int,
) -> tuple[float, list[float], int]:
    x, y = take(images, bs)
    warm = 3 if dev.type == "cuda" else 1
    est = statistics.median(time_calls(lambda: step(x, y), dev, 1, 2, warm))
    calls = calls_for(est, target_s)
    per = time_calls(lambda: step(x, y), dev, calls, reps, 0)
    return bs / statistics.median(per), [round(bs / p, 1) for p in per], calls


def end_to_end(
    dm: Any,
    step: Callable[..., Any],
    dev: torch.device,
    target_s: float,
    reps: int,
    prefetch: bool = False,
) -> tuple[float, list[float], int]:
    """Loader -> transfer_batch_to_device -> on_after_batch_transfer -> training step.

    With ``prefetch`` the two hooks run one batch ahead in a thread on a side CUDA
    stream (``prefetch.DevicePrefetcher``).
    """
    from prefetch import DevicePrefetcher

    loader = dm.train_dataloader()
    dm.trainer = StubTrainer(training=True)
    bs = dm.hparams.batch_size
    if prefetch:
        it: Any = DevicePrefetcher(loader, dm, dev)

        def one() -> None:
            x, y, _ = next(it)
            step(x, y.float())

    else:
        it = iter(loader)

        def one() -> None:
            b = dm.transfer_batch_to_device(next(it), dev, 0)
            x, y, _ = dm.on_after_batch_transfer(b, 0)
            step(x, y.float())

    try:
        warm = 5 if dev.type == "cuda" else 2
        est = statistics.median(time_calls(one, dev, 1, 2, warm))
        calls = calls_for(est, target_s, lo=3)
        per = time_calls(one, dev, calls, reps, 0)
    finally:
        if prefetch:
            it.close()
        it = loader = None  # shuts the workers down
        gc.collect()
    return bs / statistics.median(per), [round(bs / p, 1) for p in per], calls


def section_train(
    rec: Recorder, args: argparse.Namespace, dev: torch.device, data: Data, budget: Budget
) -> None:
    from lightning_vgg.data.datamodule import CatsDogsDataModule

    cuda = dev.type == "cuda"
    if cuda:
        width, size = 1.0, 224
        bss = [20, 256] if args.quick else [20, 64, 128, 256]
        e2e_bss = [256] if args.quick else [256, 20]
        target_s, reps = 0.6, 3
        torch.backends.cudnn.benchmark = False  # torch's default, for the fp32 baseline
    else:
        width, size = (0.125, 64) if args.quick else (0.25, 128)
        bss = [20, 64]
        e2e_bss = [20]
        target_s, reps = (0.8, 3) if args.quick else (2.0, 3)
    shape = {"width": width, "size": size}
    images = real_images(data, size, dev)
    fpi = count_flops_per_image(width, size, dev)
    rec.add(
        "train/flops-per-image", fpi / 1e9, "GFLOP", **shape, note="conv+matmul, forward+backward"
    )
    best_note = "bf16-mixed autocast + channels_last" + (" + cudnn.benchmark" if cuda else "")
    settings = {"fp32": (False, False), "best": (True, True)}
    model_rates: dict[tuple[str, int], float] = {}
    steps: dict[str, Callable[..., Any]] = {}
    for setting, (amp, cl) in settings.items():
        if cuda:
            torch.backends.cudnn.benchmark = setting == "best"
        model = make_model(width, size, dev, channels_last=cl)
        step = make_step(model, dev, amp)
        for bs in bss:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            name = f"train/model-only/{setting}/bs{bs}"
            try:
                rate, rates, calls = model_only(step, bs, images, dev, target_s, reps)
            except torch.cuda.OutOfMemoryError as exc:
                rec.add(name, None, "img/s", batch=bs, **shape, error=f"OOM: {str(exc)[:120]}")
                continue
            model_rates[(setting, bs)] = rate
            extra: dict[str, Any] = {}
            if cuda:
                extra["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
            rec.add(
                name,
                rate,
                "img/s",
                batch=bs,
                **shape,
                repeats=rates,
                steps_per_repeat=calls,
                tflops=round(rate * fpi / 1e12, 2),
                **extra,
                note=("torch defaults, NCHW" if setting == "fp32" else best_note)
                + (f"; {extra['peak_mem_gib']} GiB peak" if extra else ""),
            )
        steps[setting] = step
        if setting == "fp32" and cuda:
            del model, step, steps[setting]
            gc.collect()
            torch.cuda.empty_cache()

    # end to end: our loader feeding the best setting
    gpu_kw = {"augment_backend": "gpu", "gpu_decode": True}
    cpu_kw = {"augment_backend": "fast", "resize": "bilinear"}
    if cuda:
        variants = {
            "ours": (CatsDogsDataModule, gpu_kw, False),
            "ours+thread": (CatsDogsDataModule, gpu_kw, True),
        }
        workers = min(6, max(2, cpu_count() - 4))
    else:
        variants = {
            "ours": (CatsDogsDataModule, cpu_kw, False),
        }
        workers = 2
    # on the CPU, fp32 is the faster setting and loader and model share the cores
    e2e_setting = "best" if cuda else "fp32"
    step = steps[e2e_setting]
    e2e_note = (
        best_note
        if cuda
        else "fp32 (faster than bf16 on this CPU); loader and model share the cores"
    )
    for bs in e2e_bss:
        for label, (cls, kw, prefetch) in variants.items():
            if bs != e2e_bss[0] and prefetch:
                continue  # the thread variant only at the big batch: budget
            name = f"train/end-to-end/{label}/{e2e_setting}/bs{bs}"
            if budget.left() < 25:
                rec.add(name, None, "img/s", error="skipped: section budget nearly spent")
                continue
            dm = make_dm(
                data,
                cls,
                image_size=size,
                batch_size=bs,
                num_workers=workers,
                prefetch_factor=4,
                persistent_workers=False,
                train_steps_per_epoch=100_000,
                **kw,
            )
            rate, rates, calls = end_to_end(dm, step, dev, target_s * 2, reps, prefetch)
            ref = model_rates.get((e2e_setting, bs))
            frac = rate / ref if ref else None
            goal: dict[str, Any] = {}
            if cuda:
                goal = {"target_fraction": 0.9, "met": None if frac is None else frac >= 0.9}
                if bs == 256:
                    goal.update(target_img_s=4500, met_img_s=rate >= 4500)
            rec.add(
                name,
                rate,
                "img/s",
                batch=bs,
                **shape,
                workers=workers,
                repeats=rates,
                steps_per_repeat=calls,
                of_model_only=None if frac is None else round(frac, 3),
                **goal,
                note=f"{kw.get('augment_backend')} loader + {e2e_note}"
                + ("" if frac is None else f"; {frac:.0%} of model-only"),
            )
            del dm
            gc.collect()

    # torch.compile of the best setting, if there is time left
    if cuda and not args.quick and not args.no_compile:
        bs = 256
        name = f"train/model-only/best+compile/bs{bs}"
        if budget.left() < 100:
            rec.add(name, None, "img/s", error="skipped: section budget nearly spent")
            return
        t0 = time.perf_counter()
        compiled = torch.compile(model)
        cstep = make_step(compiled, dev, True)
        cstep(*take(images, bs))
        sync(dev)
        compile_s = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats(dev)
        rate, rates, calls = model_only(cstep, bs, images, dev, target_s, reps)
        ref = model_rates.get(("best", bs))
        rec.add(
            name,
            rate,
            "img/s",
            batch=bs,
            **shape,
            repeats=rates,
            tflops=round(rate * fpi / 1e12, 2),
            compile_s=round(compile_s, 1),
            peak_mem_gib=round(torch.cuda.max_memory_allocated(dev) / 2**30, 2),
            vs_eager=None if not ref else round(rate / ref, 3),
            note=f"torch.compile(model), {compile_s:.0f} s to compile",
        )
        name = f"train/end-to-end/ours+thread/best+compile/bs{bs}"
        if budget.left() < 25:
            rec.add(name, None, "img/s", error="skipped: section budget nearly spent")
            return
        dm = make_dm(
            data,
            CatsDogsDataModule,
            image_size=size,
            batch_size=bs,
            num_workers=workers,
            prefetch_factor=4,
            persistent_workers=False,
            train_steps_per_epoch=100_000,
            **gpu_kw,
        )
        e2e, e2e_rates, calls = end_to_end(dm, cstep, dev, target_s * 2, reps, True)
        frac = e2e / rate
        rec.add(
            name,
            e2e,
            "img/s",
            batch=bs,
            **shape,
            workers=workers,
            repeats=e2e_rates,
            steps_per_repeat=calls,
            of_model_only=round(frac, 3),
            target_fraction=0.9,
            met=frac >= 0.9,
            target_img_s=4500,
            met_img_s=e2e >= 4500,
            note=f"gpu loader (prefetch thread) + compiled best; {frac:.0%} of model-only",
        )


# --------------------------------------------------------------------------- 3. atlas


def section_atlas(rec: Recorder, args: argparse.Namespace, dev: torch.device, data: Data) -> None:
    import pytorch_grad_cam.base_cam as gc_base
    from pytorch_grad_cam import GradCAM
    from torch import nn

    from lightning_vgg.explain.atlas import (
        captum_gradcam,
        compute_atlas,
        layer_units,
        resolve_target,
    )
    from lightning_vgg.models.module import VGGClassifier
    from lightning_vgg.models.vgg import keras_conv_names

    cuda = dev.type == "cuda"
    if cuda:
        width, size, n = 1.0, 224, 16
    else:
        width, size, n = (0.125, 64, 8) if args.quick else (0.25, 224, 8)
    shape = {"width": width, "size": size, "batch": n}
    dm = make_dm(data, augment_backend="fast", resize="bilinear", image_size=size, num_workers=0)
    xs = []
    for b in dm.test_dataloader():
        xs.append(dm.on_after_batch_transfer(b, 0)[0])
        if sum(len(x) for x in xs) >= n:
            break
    x = torch.cat(xs)[:n].to(dev)
    torch.manual_seed(0)
    model = VGGClassifier(width=width, input_size=size).to(dev).eval()
    net = model.net
    names = keras_conv_names()
    units = layer_units(model, "post")
    with torch.no_grad():
        sign = resolve_target("pred", net(x))

    class OneLogit(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            return self.net(inp)[:, None]  # (N, 1): pytorch-grad-cam wants class scores

    class SignTarget:
        def __init__(self, s: float) -> None:
            self.s = s

        def __call__(self, out: torch.Tensor) -> torch.Tensor:
            return out[0] * self.s

    wrapped = OneLogit(net)
    targets = [SignTarget(float(s)) for s in sign.tolist()]

    def ours() -> Any:
        return compute_atlas(model, x, target="pred")

    def captum() -> list[torch.Tensor]:
        return [captum_gradcam(model, x, name, sign) for name in names]

    def gradcam() -> list[np.ndarray]:
        out = []
        for layer in units.values():
            with GradCAM(model=wrapped, target_layers=[layer]) as cam:
                out.append(cam(input_tensor=x, targets=targets))
        return out

    def rate_of(fn: Callable[[], Any], images: int) -> tuple[float, list[float]]:
        # Single calls of the fast side scattered by 2x on a 2-core VM (0.31 vs 0.77 s):
        # time back-to-back calls filling about a second per repeat, median of 3 or 5.
        est = statistics.median(time_calls(fn, dev, 1, 1, 1))
        calls = calls_for(est, 1.0, hi=50)
        r = 5 if est * calls < 1.5 else 3 if est < 3 else 1
        per = time_calls(fn, dev, calls, r, 0) if r > 1 else [est]
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        return images / statistics.median(per), [round(images / p, 2) for p in per]

    def paired(
        mine: Callable[[], Any], ref: Callable[[], Any], images: int
    ) -> tuple[list[float], list[float], list[float]]:
        """Rates of both sides timed in turns, round by round, and each round's ratio.

        This machine's speed drifts by a quarter within a minute; timing the two sides
        back to back in every round and taking the median of the per-round ratios
        keeps that drift out of the ratio.
        """
        est_m = statistics.median(time_calls(mine, dev, 1, 1, 1))
        est_r = statistics.median(time_calls(ref, dev, 1, 1, 1))
        calls_m = calls_for(est_m, max(est_r, 0.5), hi=50)
        calls_r = calls_for(est_r, 0.5, hi=20)
        rounds = 5 if est_r * calls_r < 2 else 3
        rm, rr = [], []
        for _ in range(rounds):
            rm.append(images / statistics.median(time_calls(mine, dev, calls_m, 1, 0)))
            rr.append(images / statistics.median(time_calls(ref, dev, calls_r, 1, 0)))
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        return rm, rr, [a / b for a, b in zip(rm, rr, strict=True)]

    def measure_pair(tag: str, vshape: dict[str, Any], mine: Callable[[], Any],
                     ref: Callable[[], Any], note: str) -> float:  # fmt: skip
        """Time ours against Captum with :func:`paired`, add the three rows, return our rate."""
        rm, rr, ratios = paired(mine, ref, vshape["batch"])
        rec.add(f"atlas/ours-one-pass{tag}", statistics.median(rm), "img/s", **vshape,
                repeats=[round(v, 2) for v in rm],
                note="compute_atlas: 13 layers, 1 forward + 1 backward")  # fmt: skip
        rec.add(f"atlas/captum-per-layer{tag}", statistics.median(rr), "img/s", **vshape,
                repeats=[round(v, 2) for v in rr], note="captum LayerGradCam x 13 layers")  # fmt: skip
        ratio = statistics.median(ratios)
        rec.add(f"atlas/ours-vs-captum-per-layer{tag}", ratio, "x", **vshape, target=8.0,
                met=ratio >= 8.0, per_round=[round(v, 2) for v in ratios],
                note=f"target >= 8x; median of per-round ratios, the sides timed in turns{note}")  # fmt: skip
        return statistics.median(rm)

    rate_ours = measure_pair("", shape, ours, captum, "")
    rate_g, per_g = rate_of(gradcam, n)
    rec.add("atlas/pytorch-grad-cam-per-layer", rate_g, "img/s", **shape, repeats=per_g,
            note="pytorch_grad_cam.GradCAM x 13 layers")  # fmt: skip
    rec.add("atlas/ours-vs-pytorch-grad-cam-per-layer", rate_ours / rate_g, "x",
            **shape, note="")  # fmt: skip

    # What bounds the ratio: the arithmetic each side does (conv + matmul FLOPs, as run).
    from torch.utils.flop_counter import FlopCounterMode

    one = x[:1]
    flops = {}
    for label, fn in (
        ("ours", lambda: compute_atlas(model, one, target="pred")),
        ("captum", lambda: [captum_gradcam(model, one, k, sign[:1]) for k in names]),
    ):
        with FlopCounterMode(display=False) as fc:
            fn()
        flops[label] = fc.get_total_flops()
    rec.add(
        "atlas/flops-ratio-captum-vs-ours",
        flops["captum"] / flops["ours"],
        "x",
        **shape,
        ours_gflop_per_image=round(flops["ours"] / 1e9, 3),
        captum_gflop_per_image=round(flops["captum"] / 1e9, 3),
        note="conv+matmul FLOPs of Captum per layer / ours: the speed-up a compute-bound "
        "device could reach (backward-data convolutions run slower than forward ones)",
    )

    if cuda:
        # The ratio depends on how busy each pass keeps the GPU: larger batches, and
        # cuDNN's measured algorithm choice, applied to both sides alike.
        variants: list[tuple[str, int, bool]] = [("bs64", 64, False), ("cudnn-benchmark", n, True)]
        for tag, bs, bench_mode in variants:
            xb = x.repeat(-(-bs // n), 1, 1, 1)[:bs].contiguous()
            sb = sign.repeat(-(-bs // n))[:bs]
            prev = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = bench_mode
            try:
                measure_pair(
                    f"/{tag}",
                    {**shape, "batch": bs, "cudnn_benchmark": bench_mode},
                    lambda xb=xb: compute_atlas(model, xb, target="pred"),
                    lambda xb=xb, sb=sb: [captum_gradcam(model, xb, k, sb) for k in names],
                    f"; batch {bs}, cudnn.benchmark={bench_mode} on both sides",
                )
            finally:
                torch.backends.cudnn.benchmark = prev

    # agreement on the same inputs and targets
    atlas = ours()
    cap = dict(zip(names, captum(), strict=True))
    raw: list[np.ndarray] = []
    real_scale = gc_base.scale_cam_image

    def record_raw(cam: np.ndarray, target_size: Any = None) -> np.ndarray:
        raw.append(np.array(cam, copy=True))  # after its ReLU, before its normalisation
        return real_scale(cam, target_size)

    pgc: dict[str, np.ndarray] = {}
    gc_base.scale_cam_image = record_raw
    try:
        for name, layer in units.items():
            raw.clear()
            with GradCAM(model=wrapped, target_layers=[layer]) as cam:
                cam(input_tensor=x, targets=targets)
            pgc[name] = raw[0]  # the per-layer call; the second one is its aggregation
    finally:
        gc_base.scale_cam_image = real_scale

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.double().cpu(), b.double().cpu()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    per_layer_c = {k: rel(atlas.cams[k][:, 0], cap[k][:, 0]) for k in names}
    per_layer_g = {k: rel(atlas.cams[k][:, 0], torch.from_numpy(pgc[k])) for k in names}
    for ref, per_layer in (("captum", per_layer_c), ("pytorch-grad-cam", per_layer_g)):
        worst = max(per_layer, key=per_layer.get)  # type: ignore[arg-type]
        rec.add(
            f"atlas/agreement/ours-vs-{ref}",
            per_layer[worst],
            "max rel diff",
            **shape,
            worst_layer=worst,
            per_layer={k: float(f"{v:.3g}") for k, v in per_layer.items()},
            note=f"max |ours - {ref}| / max |{ref}| per layer, worst {worst}"
            + ("; before its min-max normalisation" if ref != "captum" else ""),
        )


# --------------------------------------------------------------------------- main


def markdown(rec: Recorder) -> str:
    m = rec.meta["machine"]
    lines = [
        f"# Benchmarks: {rec.device}",
        "",
        f"- CPU: {m['cpu']} ({m['cpu_cores']} cores), {m.get('memory_gib', '?')} GiB",
    ]
    if "gpu" in m:
        lines.append(f"- GPU: {m['gpu']} ({m['gpu_memory_gib']} GiB), CUDA {m.get('cuda')}")
    versions = ", ".join(
        f"{k} {m[k]}" for k in ("python", "torch", "torchvision", "cv2", "PIL", "keras") if k in m
    )
    lines += [
        f"- {versions}",
        f"- command: `{rec.meta['command']}`",
        f"- started {rec.meta['started']}, load average {rec.meta['load_start']} at the start,"
        f" {rec.meta.get('load_end')} at the end",
        f"- CPU share per core available at each section's start (1.0 = idle machine):"
        f" {rec.meta.get('cpu_share')}",
        "",
        "| name | value | unit | load1 | notes |",
        "| --- | ---: | --- | ---: | --- |",
    ]
    for r in rec.rows:
        v = "-" if r["value"] is None else f"{r['value']:,.4g}"
        note = str(r.get("note") or r.get("error") or "").replace("|", "/")
        if "met" in r and r["met"] is not None:
            note = ("**met** " if r["met"] else "**missed** ") + note
        lines.append(f"| {r['name']} | {v} | {r['unit']} | {r['load1']} | {note} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes/repeats (CPU: minutes)")
    ap.add_argument("--only", choices=SECTIONS, action="append", help="run only this section")
    ap.add_argument("--json", type=Path, help="write rows here (rewritten after every row)")
    ap.add_argument("--md", type=Path, help="also write a markdown table here")
    ap.add_argument("--data", help="zip or folder of images (default: the mini archive)")
    ap.add_argument("--cache-dir", type=Path, help="extraction/scan cache")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    ap.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="SECTION=SECONDS",
        help="hard time limit of a section (defaults: loader 90/150, train 180/120, atlas 50/90 s on cuda/cpu)",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(args.device)
    info = machine_info(dev)
    meta = {
        "machine": info,
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "started": now(),
        "load_start": [round(v, 2) for v in os.getloadavg()],
        "quick": args.quick,
    }
    rec = Recorder(args.json, meta, device_label(dev, info))
    print(f"device: {rec.device}; load average {meta['load_start']}", flush=True)

    source = find_data(args.data)
    cache = args.cache_dir or Path(
        os.environ.get(
            "LIGHTNING_VGG_BENCH_CACHE", Path(tempfile.gettempdir()) / "lightning_vgg_bench"
        )
    )
    t0 = time.perf_counter()
    data = prepare_data(source, cache)
    meta["data"] = {
        "source": str(source),
        "train_images": data.n_train,
        "eval_images": data.n_eval,
        "split": list(SPLIT),
        "prepare_s": round(time.perf_counter() - t0, 1),
    }
    print(f"data: {source} ({data.n_train} train, {data.n_eval} val+test)", flush=True)

    budgets = {k: v[0] if dev.type == "cuda" else v[1] for k, v in DEFAULT_BUDGET.items()}
    for item in args.budget:
        k, _, v = item.partition("=")
        budgets[k] = float(v)
    meta["budgets_s"] = budgets
    failed = 0
    for section in args.only or SECTIONS:
        share = cpu_share()
        meta.setdefault("cpu_share", {})[section] = share
        budget = Budget(budgets[section])
        print(f"[{section}] budget {budget.seconds:.0f} s; cpu share {share}", flush=True)
        t0 = time.perf_counter()
        try:
            with budget.armed():
                if section == "loader":
                    section_loader(rec, args, dev, data)
                elif section == "train":
                    section_train(rec, args, dev, data, budget)
                else:
                    section_atlas(rec, args, dev, data)
        except (SectionTimeout, Exception) as exc:
            failed += 1
            traceback.print_exc()
            rec.add(f"{section}/failed", None, "", error=f"{type(exc).__name__}: {exc}"[:300])
        finally:
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        meta.setdefault("section_s", {})[section] = round(time.perf_counter() - t0, 1)
        rec.flush()
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(markdown(rec))
    print()
    print(markdown(rec))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
