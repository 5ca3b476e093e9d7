#!/usr/bin/env python3
"""Correctness checks that need a GPU: the atlas vs Captum, nvJPEG decode, a CLI smoke fit.

    python benchmarks/gpu_checks.py --data .gpu/catsdogs-180px-mini.zip --json OUT.json

Each check prints one line and appends a row ``{name, value, unit, device, ok}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

ROWS: list[dict] = []


def row(name: str, value: float, unit: str, ok: bool, **extra: object) -> None:
    """Record and print one result."""
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    ROWS.append({"name": name, "value": value, "unit": unit, "device": dev, "ok": ok, **extra})
    print(f"{'OK ' if ok else 'BAD'} {name}: {value:.3g} {unit} {extra or ''}", flush=True)


def check_atlas(device: torch.device) -> None:
    """compute_atlas equals Captum LayerGradCam on every layer, full width, on the device."""
    from lightning_vgg.explain.atlas import captum_gradcam, compute_atlas
    from lightning_vgg.models.vgg import VGG16, keras_conv_names

    torch.manual_seed(0)
    for inplace in (True, False):
        net = VGG16(inplace_relu=inplace).to(device)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        net.train()
        x = torch.rand(4, 3, 224, 224, device=device)
        with torch.inference_mode():
            atlas = compute_atlas(net, x, target="dog")
        worst = 0.0
        for name in keras_conv_names():
            ref = captum_gradcam(net, x, name, 1.0)
            ours = atlas.cams[name]
            rel = ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
            worst = max(worst, rel)
        row(f"atlas_vs_captum_max_rel_diff_inplace{inplace}", worst, "rel", worst < 1e-4)
        row(f"atlas_left_train_mode_inplace{inplace}", float(net.training), "bool", net.training)


def check_decode(device: torch.device, data: Path) -> None:
    """nvJPEG batch decode + nearest resize equals the CPU path (small IDCT differences)."""
    import zipfile

    from lightning_vgg.data.gpu import decode_batch

    with zipfile.ZipFile(data) as zf:
        names = [n for n in zf.namelist() if n.endswith(".jpg")][:64]
        raw = [torch.frombuffer(bytearray(zf.read(n)), dtype=torch.uint8) for n in names]
    t0 = time.perf_counter()
    gpu, kept = decode_batch(raw, device, 224)
    torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    cpu, _ = decode_batch(raw, "cpu", 224)
    mad = (gpu.cpu().float() - cpu.float()).abs().mean().item()
    row(
        "nvjpeg_vs_cpu_decode_mean_abs_diff",
        mad,
        "gray levels",
        mad < 2.0 and len(kept) == len(raw),
    )
    row("nvjpeg_first_call_batch64", dt, "s", True)


def check_cli(data: Path) -> None:
    """A tiny fit + test through the CLI on the GPU with the GPU pipeline and bf16."""
    from lightning_vgg.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        main(
            [
                "fit", "--config", str(ROOT / "configs" / "quick.yaml"),
                f"--data.source={data}", f"--data.cache_dir={tmp}/cache",
                f"--trainer.logger.init_args.save_dir={tmp}/runs",
                "--trainer.accelerator=gpu", "--trainer.precision=bf16-mixed",
                "--trainer.max_epochs=2", "--data.augment_backend=gpu", "--data.gpu_decode=true",
                "--model.channels_last=true", "--trainer.enable_progress_bar=false",
            ]
        )  # fmt: skip
        run = next(Path(tmp, "runs", "quick").glob("version_*"))
        main(
            [
                "test", "--config", str(ROOT / "configs" / "quick.yaml"),
                f"--ckpt_path={run}/checkpoints/best.ckpt", f"--data.cache_dir={tmp}/cache",
                "--trainer.accelerator=gpu", "--trainer.enable_progress_bar=false",
            ]
        )  # fmt: skip
        summary = json.loads((run / "summary.json").read_text())
        acc = summary["metrics"]["test_acc"]
        row("cli_quick_fit_test_on_gpu", time.perf_counter() - t0, "s", acc is not None, test_acc=acc,
            device_in_summary=summary["device"])  # fmt: skip
        # explain on the GPU, every layer and class checked against Captum on the same batch
        t0 = time.perf_counter()
        main(
            [
                "explain", f"--ckpt_path={run}/checkpoints/best.ckpt", "--n=8",
                f"--out={tmp}/explain", "--device=cuda", "--batch_size=8", "--check_captum=true",
            ]
        )  # fmt: skip
        report = json.loads(Path(tmp, "explain", "explain.json").read_text())
        check = report["captum_check"]
        row("cli_explain_on_gpu_vs_captum", check["max_rel_diff"], "max rel diff", check["passed"],
            seconds=round(time.perf_counter() - t0, 1), device=report["device"],
            images=len(report["images"]), worst_layer=check["worst_layer"])  # fmt: skip


def main() -> None:
    """Run every check, keep going after failures, write the JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    device = torch.device("cuda")
    for fn, fargs in (
        (check_atlas, (device,)),
        (check_decode, (device, args.data)),
        (check_cli, (args.data,)),
    ):
        try:
            fn(*fargs)
        except Exception as exc:
            traceback.print_exc()
            row(fn.__name__, float("nan"), "error", False, error=repr(exc)[:300])
        args.json.write_text(json.dumps(ROWS, indent=2, default=str))


if __name__ == "__main__":
    main()
