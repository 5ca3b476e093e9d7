"""Section ``train``: images/s of VGG16-BN training steps, on a batch already on the
device (``train/model-only/...``) and fed by our loader (``train/end-to-end/...``)."""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from bench_data import Data, StubTrainer, make_dm
from timing import Budget, Recorder, autorange, cpu_count, sync

Step = Callable[[torch.Tensor, torch.Tensor], Any]
Images = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Setup:
    """What every row of the section shares."""

    dev: torch.device
    width: float
    size: int
    bss: list[int]
    e2e_bss: list[int]
    target_s: float
    reps: int
    images: Images = field(repr=False)
    fpi: float = 0.0

    @property
    def cuda(self) -> bool:
        return self.dev.type == "cuda"

    @property
    def shape(self) -> dict[str, Any]:
        return {"width": self.width, "size": self.size}

    @property
    def best_note(self) -> str:
        return "bf16-mixed autocast + channels_last" + (" + cudnn.benchmark" if self.cuda else "")


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


def make_step(model: Any, dev: torch.device, amp: bool) -> Step:
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


def real_images(data: Data, size: int, dev: torch.device) -> Images:
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


def take(images: Images, bs: int) -> Images:
    x, y = images
    reps = -(-bs // len(x))
    return x.repeat(reps, 1, 1, 1)[:bs].contiguous(), y.repeat(reps)[:bs].contiguous()


def model_only(step: Step, bs: int, s: Setup) -> dict[str, Any]:
    """Steps on a fixed batch: a ``Timer`` of ``step(x, y)`` after 1 (CPU) or 3 (GPU)
    warm-up steps, which also let cuDNN pick its algorithms."""
    x, y = take(s.images, bs)
    for _ in range(3 if s.cuda else 1):
        step(x, y)
    sync(s.dev)
    return autorange(lambda: step(x, y), bs, min_run_time=s.target_s * s.reps)


def end_to_end(dm: Any, step: Step, s: Setup, prefetch: bool = False) -> dict[str, Any]:
    """Loader -> transfer_batch_to_device -> on_after_batch_transfer -> training step.

    With ``prefetch`` the two hooks run one batch ahead in a thread on a side CUDA
    stream (``prefetch.DevicePrefetcher``). The Timer times blocks of about
    ``2 * target_s`` (at least 3 steps each), as the hand loop did: the loader's
    prefetch queue fills and drains, so single steps come in bursts, and the median of
    single steps would not be the throughput.
    """
    from prefetch import DevicePrefetcher

    loader = dm.train_dataloader()
    dm.trainer = StubTrainer(training=True)
    bs = dm.hparams.batch_size
    if prefetch:
        it: Any = DevicePrefetcher(loader, dm, s.dev)

        def one() -> None:
            x, y, _ = next(it)
            step(x, y.float())

    else:
        it = iter(loader)

        def one() -> None:
            b = dm.transfer_batch_to_device(next(it), s.dev, 0)
            x, y, _ = dm.on_after_batch_transfer(b, 0)
            step(x, y.float())

    try:
        for _ in range(5 if s.cuda else 2):
            one()
        block_s = 2 * s.target_s
        return autorange(
            one, bs, min_run_time=(s.reps - 0.5) * block_s, block_s=block_s,
            min_calls=3, est_calls=2,
        )  # fmt: skip
    finally:
        if prefetch:
            it.close()
        it = loader = None  # shuts the workers down
        gc.collect()


def section_train(
    rec: Recorder, args: argparse.Namespace, dev: torch.device, data: Data, budget: Budget
) -> None:
    if dev.type == "cuda":
        width, size = 1.0, 224
        bss = [20, 256] if args.quick else [20, 64, 128, 256]
        e2e_bss = [256] if args.quick else [256, 20]
        target_s, reps = 0.6, 3
        torch.backends.cudnn.benchmark = False  # torch's default, for the fp32 baseline
    else:
        width, size = (0.125, 64) if args.quick else (0.25, 128)
        bss, e2e_bss = [20, 64], [20]
        target_s, reps = (0.8, 3) if args.quick else (2.0, 3)
    s = Setup(dev, width, size, bss, e2e_bss, target_s, reps, real_images(data, size, dev))
    s.fpi = count_flops_per_image(width, size, dev)
    rec.add(
        "train/flops-per-image", s.fpi / 1e9, "GFLOP", **s.shape,
        note="conv+matmul, forward+backward",
    )  # fmt: skip
    model_rates, steps, model = model_only_rows(rec, s)
    workers = end_to_end_rows(rec, s, data, budget, model_rates, steps)
    if s.cuda and not args.quick and not args.no_compile:
        compile_rows(rec, s, data, budget, model, model_rates, workers)


def model_only_rows(
    rec: Recorder, s: Setup
) -> tuple[dict[tuple[str, int], float], dict[str, Step], Any]:
    """``train/model-only/{fp32,best}/bsN``; returns the rates, the steps kept for the
    end-to-end rows and the best setting's model (for ``torch.compile``)."""
    settings = {"fp32": (False, False), "best": (True, True)}
    model_rates: dict[tuple[str, int], float] = {}
    steps: dict[str, Step] = {}
    model = None
    for setting, (amp, cl) in settings.items():
        if s.cuda:
            torch.backends.cudnn.benchmark = setting == "best"
        model = make_model(s.width, s.size, s.dev, channels_last=cl)
        step = make_step(model, s.dev, amp)
        for bs in s.bss:
            if s.cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(s.dev)
            name = f"train/model-only/{setting}/bs{bs}"
            try:
                stats = model_only(step, bs, s)
            except torch.cuda.OutOfMemoryError as exc:
                rec.add(name, None, "img/s", batch=bs, **s.shape, error=f"OOM: {str(exc)[:120]}")
                continue
            rate = model_rates[(setting, bs)] = stats.pop("value")
            extra: dict[str, Any] = {}
            if s.cuda:
                extra["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(s.dev) / 2**30, 2)
            rec.add(
                name, rate, "img/s", batch=bs, **s.shape, **stats,
                tflops=round(rate * s.fpi / 1e12, 2), **extra,
                note=("torch defaults, NCHW" if setting == "fp32" else s.best_note)
                + (f"; {extra['peak_mem_gib']} GiB peak" if extra else ""),
            )  # fmt: skip
        steps[setting] = step
        if setting == "fp32" and s.cuda:
            del model, step, steps[setting]
            gc.collect()
            torch.cuda.empty_cache()
    return model_rates, steps, model


def end_to_end_rows(
    rec: Recorder, s: Setup, data: Data, budget: Budget,
    model_rates: dict[tuple[str, int], float], steps: dict[str, Step],
) -> int:  # fmt: skip
    """``train/end-to-end/...``: our loader feeding the best setting (fp32 on the CPU,
    where it is the faster one and loader and model share the cores); returns the
    number of loader workers."""
    from lightning_vgg.data.datamodule import CatsDogsDataModule

    gpu_kw = {"augment_backend": "gpu", "gpu_decode": True}
    cpu_kw = {"augment_backend": "fast", "resize": "bilinear"}
    if s.cuda:
        variants = {
            "ours": (CatsDogsDataModule, gpu_kw, False),
            "ours+thread": (CatsDogsDataModule, gpu_kw, True),
        }
        workers = min(6, max(2, cpu_count() - 4))
    else:
        variants = {"ours": (CatsDogsDataModule, cpu_kw, False)}
        workers = 2
    setting = "best" if s.cuda else "fp32"
    note = s.best_note if s.cuda else "fp32 (faster than bf16 on this CPU); loader and model share the cores"  # fmt: skip
    for bs in s.e2e_bss:
        for label, (cls, kw, prefetch) in variants.items():
            if bs != s.e2e_bss[0] and prefetch:
                continue  # the thread variant only at the big batch: budget
            name = f"train/end-to-end/{label}/{setting}/bs{bs}"
            if budget.left() < 25:
                rec.add(name, None, "img/s", error="skipped: section budget nearly spent")
                continue
            dm = make_dm(
                data, cls, image_size=s.size, batch_size=bs, num_workers=workers,
                prefetch_factor=4, persistent_workers=False, train_steps_per_epoch=100_000, **kw,
            )  # fmt: skip
            stats = end_to_end(dm, steps[setting], s, prefetch)
            rate = stats.pop("value")
            ref = model_rates.get((setting, bs))
            frac = rate / ref if ref else None
            goal: dict[str, Any] = {}
            if s.cuda:
                goal = {"target_fraction": 0.9, "met": None if frac is None else frac >= 0.9}
                if bs == 256:
                    goal.update(target_img_s=4500, met_img_s=rate >= 4500)
            rec.add(
                name, rate, "img/s", batch=bs, **s.shape, workers=workers, **stats,
                of_model_only=None if frac is None else round(frac, 3), **goal,
                note=f"{kw.get('augment_backend')} loader + {note}"
                + ("" if frac is None else f"; {frac:.0%} of model-only"),
            )  # fmt: skip
            del dm
            gc.collect()
    return workers


def compile_rows(
    rec: Recorder, s: Setup, data: Data, budget: Budget, model: Any,
    model_rates: dict[tuple[str, int], float], workers: int,
) -> None:  # fmt: skip
    """GPU, full runs: ``torch.compile`` of the best setting, if there is time left."""
    from lightning_vgg.data.datamodule import CatsDogsDataModule

    bs = 256
    name = f"train/model-only/best+compile/bs{bs}"
    if budget.left() < 100:
        rec.add(name, None, "img/s", error="skipped: section budget nearly spent")
        return
    t0 = time.perf_counter()  # one event, the first (compiling) step: a stopwatch
    compiled = torch.compile(model)
    cstep = make_step(compiled, s.dev, True)
    cstep(*take(s.images, bs))
    sync(s.dev)
    compile_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats(s.dev)
    stats = model_only(cstep, bs, s)
    rate = stats.pop("value")
    ref = model_rates.get(("best", bs))
    rec.add(
        name, rate, "img/s", batch=bs, **s.shape, **stats,
        tflops=round(rate * s.fpi / 1e12, 2), compile_s=round(compile_s, 1),
        peak_mem_gib=round(torch.cuda.max_memory_allocated(s.dev) / 2**30, 2),
        vs_eager=None if not ref else round(rate / ref, 3),
        note=f"torch.compile(model), {compile_s:.0f} s to compile",
    )  # fmt: skip
    name = f"train/end-to-end/ours+thread/best+compile/bs{bs}"
    if budget.left() < 25:
        rec.add(name, None, "img/s", error="skipped: section budget nearly spent")
        return
    dm = make_dm(
        data, CatsDogsDataModule, image_size=s.size, batch_size=bs, num_workers=workers,
        prefetch_factor=4, persistent_workers=False, train_steps_per_epoch=100_000,
        augment_backend="gpu", gpu_decode=True,
    )  # fmt: skip
    stats = end_to_end(dm, cstep, s, True)
    e2e = stats.pop("value")
    frac = e2e / rate
    rec.add(
        name, e2e, "img/s", batch=bs, **s.shape, workers=workers, **stats,
        of_model_only=round(frac, 3), target_fraction=0.9, met=frac >= 0.9,
        target_img_s=4500, met_img_s=e2e >= 4500,
        note=f"gpu loader (prefetch thread) + compiled best; {frac:.0%} of model-only",
    )  # fmt: skip
