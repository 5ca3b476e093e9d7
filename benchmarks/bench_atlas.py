"""Section ``atlas``: images/s of our one-pass Grad-CAM atlas of all 13 conv layers beside
Captum and pytorch-grad-cam called per layer, their FLOPs and their agreement
(rows ``atlas/...``)."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from bench_data import Data, make_dm
from timing import (
    Recorder,
    autorange,
    calls_for,
    rate_stats,
    release,
    seconds_per_call,
    stopwatch,
)
from torch import nn


class OneLogit(nn.Module):
    """Our ``(N,)`` logit as ``(N, 1)`` class scores, as pytorch-grad-cam wants them."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.net(inp)[:, None]


class SignTarget:
    """pytorch-grad-cam target: the logit times the sign of the predicted class."""

    def __init__(self, s: float) -> None:
        self.s = s

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        return out[0] * self.s


@dataclass
class Case:
    """A random-init model in eval mode, a batch of test images and the three methods."""

    dev: torch.device
    model: Any
    x: torch.Tensor
    sign: torch.Tensor
    names: list[str]
    units: dict[str, nn.Module]
    shape: dict[str, Any]
    wrapped: nn.Module  # for pytorch-grad-cam, built once, not timed
    targets: list[SignTarget]

    @property
    def n(self) -> int:
        return len(self.x)

    def ours(self, x: torch.Tensor | None = None) -> Any:
        from lightning_vgg.explain.atlas import compute_atlas

        return compute_atlas(self.model, self.x if x is None else x, target="pred")

    def captum(self, x: torch.Tensor | None = None, sign: torch.Tensor | None = None) -> list:
        from lightning_vgg.explain.atlas import captum_gradcam

        x, sign = (self.x, self.sign) if x is None else (x, sign)
        return [captum_gradcam(self.model, x, name, sign) for name in self.names]

    def gradcam(self) -> list[np.ndarray]:
        from pytorch_grad_cam import GradCAM

        out = []
        for layer in self.units.values():
            with GradCAM(model=self.wrapped, target_layers=[layer]) as cam:
                out.append(cam(input_tensor=self.x, targets=self.targets))
        return out


def make_case(args: argparse.Namespace, dev: torch.device, data: Data) -> Case:
    from lightning_vgg.explain.atlas import layer_units, resolve_target
    from lightning_vgg.models.module import VGGClassifier
    from lightning_vgg.models.vgg import keras_conv_names

    if dev.type == "cuda":
        width, size, n = 1.0, 224, 16
    else:
        width, size, n = (0.125, 64, 8) if args.quick else (0.25, 224, 8)
    dm = make_dm(data, augment_backend="fast", resize="bilinear", image_size=size, num_workers=0)
    xs = []
    for b in dm.test_dataloader():
        xs.append(dm.on_after_batch_transfer(b, 0)[0])
        if sum(len(x) for x in xs) >= n:
            break
    x = torch.cat(xs)[:n].to(dev)
    torch.manual_seed(0)
    model = VGGClassifier(width=width, input_size=size).to(dev).eval()
    with torch.no_grad():
        sign = resolve_target("pred", model.net(x))
    units = layer_units(model, "post")
    shape = {"width": width, "size": size, "batch": n}
    targets = [SignTarget(float(s)) for s in sign.tolist()]
    return Case(dev, model, x, sign, keras_conv_names(), units, shape, OneLogit(model.net), targets)


def section_atlas(rec: Recorder, args: argparse.Namespace, dev: torch.device, data: Data) -> None:
    case = make_case(args, dev, data)
    rate_ours = measure_pair(rec, case.dev, "", case.shape, case.ours, case.captum, "")
    stats = autorange(case.gradcam, case.n, min_run_time=4.0, block_s=0.5, digits=2)
    release(dev)
    rate_g = stats.pop("value")
    rec.add("atlas/pytorch-grad-cam-per-layer", rate_g, "img/s", **case.shape, **stats,
            note="pytorch_grad_cam.GradCAM x 13 layers")  # fmt: skip
    rec.add("atlas/ours-vs-pytorch-grad-cam-per-layer", rate_ours / rate_g, "x",
            **case.shape, note="")  # fmt: skip
    flops_row(rec, case)
    if dev.type == "cuda":
        cuda_variants(rec, case)
    agreement_rows(rec, case)


def paired(
    mine: Callable[[], Any], ref: Callable[[], Any], images: int, dev: torch.device
) -> tuple[list[float], list[float], list[float]]:
    """Rates of both sides timed in turns, round by round, and each round's ratio.

    This machine's speed drifts by a quarter within a minute; timing the two sides
    back to back in every round and taking the median of the per-round ratios keeps
    that drift out of the ratio. A ``Timer`` does not fit: its autorange runs one side
    to its end before the other starts, so the drift would land in the ratio. Each
    round is one stopwatch interval of back-to-back calls per side (single calls of the
    fast side scattered by 2x on a 2-core VM).
    """
    mine(), ref()  # warm-up
    est_m, est_r = seconds_per_call(mine), seconds_per_call(ref)
    calls_m = calls_for(est_m, max(est_r, 0.5), hi=50)
    calls_r = calls_for(est_r, 0.5, hi=20)
    rounds = 5 if est_r * calls_r < 2 else 3
    rm, rr = [], []
    for _ in range(rounds):
        rm.append(images / stopwatch(mine, dev, calls_m))
        rr.append(images / stopwatch(ref, dev, calls_r))
    release(dev)
    return rm, rr, [a / b for a, b in zip(rm, rr, strict=True)]


def measure_pair(rec: Recorder, dev: torch.device, tag: str, vshape: dict[str, Any],
                 mine: Callable[[], Any], ref: Callable[[], Any], note: str) -> float:  # fmt: skip
    """Time ours against Captum with :func:`paired`, add the three rows, return our rate."""
    rm, rr, ratios = paired(mine, ref, vshape["batch"], dev)
    sm, sr = rate_stats(rm, 2), rate_stats(rr, 2)
    rec.add(f"atlas/ours-one-pass{tag}", sm.pop("value"), "img/s", **vshape, **sm,
            note="compute_atlas: 13 layers, 1 forward + 1 backward")  # fmt: skip
    rec.add(f"atlas/captum-per-layer{tag}", sr.pop("value"), "img/s", **vshape, **sr,
            note="captum LayerGradCam x 13 layers")  # fmt: skip
    ratio = statistics.median(ratios)
    rec.add(f"atlas/ours-vs-captum-per-layer{tag}", ratio, "x", **vshape, target=8.0,
            met=ratio >= 8.0, per_round=[round(v, 2) for v in ratios],
            note=f"target >= 8x; median of per-round ratios, the sides timed in turns{note}")  # fmt: skip
    return statistics.median(rm)


def flops_row(rec: Recorder, case: Case) -> None:
    """What bounds the ratio: the arithmetic each side does (conv + matmul FLOPs, as run)."""
    from torch.utils.flop_counter import FlopCounterMode

    one, sign1 = case.x[:1], case.sign[:1]
    flops = {}
    for label, fn in (
        ("ours", lambda: case.ours(one)),
        ("captum", lambda: case.captum(one, sign1)),
    ):
        with FlopCounterMode(display=False) as fc:
            fn()
        flops[label] = fc.get_total_flops()
    rec.add(
        "atlas/flops-ratio-captum-vs-ours",
        flops["captum"] / flops["ours"],
        "x",
        **case.shape,
        ours_gflop_per_image=round(flops["ours"] / 1e9, 3),
        captum_gflop_per_image=round(flops["captum"] / 1e9, 3),
        note="conv+matmul FLOPs of Captum per layer / ours: the speed-up a compute-bound "
        "device could reach (backward-data convolutions run slower than forward ones)",
    )


def cuda_variants(rec: Recorder, case: Case) -> None:
    """GPU only: the ratio depends on how busy each pass keeps the GPU: larger batches,
    and cuDNN's measured algorithm choice, applied to both sides alike."""
    n = case.n
    variants: list[tuple[str, int, bool]] = [("bs64", 64, False), ("cudnn-benchmark", n, True)]
    for tag, bs, bench_mode in variants:
        xb = case.x.repeat(-(-bs // n), 1, 1, 1)[:bs].contiguous()
        sb = case.sign.repeat(-(-bs // n))[:bs]
        prev = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = bench_mode
        try:
            measure_pair(
                rec,
                case.dev,
                f"/{tag}",
                {**case.shape, "batch": bs, "cudnn_benchmark": bench_mode},
                lambda xb=xb: case.ours(xb),
                lambda xb=xb, sb=sb: case.captum(xb, sb),
                f"; batch {bs}, cudnn.benchmark={bench_mode} on both sides",
            )
        finally:
            torch.backends.cudnn.benchmark = prev


def pytorch_grad_cam_raw(case: Case) -> dict[str, np.ndarray]:
    """pytorch-grad-cam's per-layer maps after its ReLU, before its normalisation
    (captured on the way into its ``scale_cam_image``)."""
    import pytorch_grad_cam.base_cam as gc_base
    from pytorch_grad_cam import GradCAM

    raw: list[np.ndarray] = []
    real_scale = gc_base.scale_cam_image

    def record_raw(cam: np.ndarray, target_size: Any = None) -> np.ndarray:
        raw.append(np.array(cam, copy=True))
        return real_scale(cam, target_size)

    pgc: dict[str, np.ndarray] = {}
    gc_base.scale_cam_image = record_raw
    try:
        for name, layer in case.units.items():
            raw.clear()
            with GradCAM(model=case.wrapped, target_layers=[layer]) as cam:
                cam(input_tensor=case.x, targets=case.targets)
            pgc[name] = raw[0]  # the per-layer call; the second one is its aggregation
    finally:
        gc_base.scale_cam_image = real_scale
    return pgc


def agreement_rows(rec: Recorder, case: Case) -> None:
    """Agreement on the same inputs and targets, worst layer of each reference."""
    atlas = case.ours()
    cap = dict(zip(case.names, case.captum(), strict=True))
    pgc = pytorch_grad_cam_raw(case)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.double().cpu(), b.double().cpu()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    per_layer_c = {k: rel(atlas.cams[k][:, 0], cap[k][:, 0]) for k in case.names}
    per_layer_g = {k: rel(atlas.cams[k][:, 0], torch.from_numpy(pgc[k])) for k in case.names}
    for ref, per_layer in (("captum", per_layer_c), ("pytorch-grad-cam", per_layer_g)):
        worst = max(per_layer, key=per_layer.get)  # type: ignore[arg-type]
        rec.add(
            f"atlas/agreement/ours-vs-{ref}",
            per_layer[worst],
            "max rel diff",
            **case.shape,
            worst_layer=worst,
            per_layer={k: float(f"{v:.3g}") for k, v in per_layer.items()},
            note=f"max |ours - {ref}| / max |{ref}| per layer, worst {worst}"
            + ("; before its min-max normalisation" if ref != "captum" else ""),
        )
