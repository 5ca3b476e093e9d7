"""Regenerate results/cpu/ (issue 14): the CPU experiment, its report, and the fit's throughput.

    python benchmarks/cpu_results.py                 # about 20-25 minutes on 2 cores
    python benchmarks/cpu_results.py --work /tmp/x   # keep the runs somewhere else

Runs ``lightning-vgg experiment --config configs/experiment_cpu.yaml`` (fit the cpu.yaml
model and the seed's control, test both, compare), copies what the repository keeps into
``results/cpu/`` (at most 5 MiB: figures over 240 KiB get a 256-colour palette), and writes
``results/cpu/PROVENANCE.md`` / ``provenance.json`` (command, commit, machine, wall
times). It then times the same model's training step alone (``torch.utils.benchmark``)
and records end-to-end and model-only images per second in
``benchmarks/results/cpu-2core-<date>-fit.{json,md}``, so a slower pipeline is noticed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUDGET_BYTES = 5 * 2**20
MAX_FIGURE_BYTES = 240 * 2**10  # the report has 16 figures and a 1.5 MB measures.json


def machine() -> dict[str, Any]:
    """What ran it: CPU model, cores, memory, Python and torch."""
    import torch

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        cpu = found.group(1).strip() if found else cpu
    mem = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        found = re.search(r"MemTotal:\s*(\d+) kB", meminfo.read_text())
        mem = round(int(found.group(1)) / 2**20, 1) if found else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def commit() -> dict[str, Any]:
    """HEAD and whether the tree had uncommitted changes."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def run_experiment(work: Path) -> float:
    """The experiment command, as a user runs it; returns its wall time in seconds."""
    cmd = [
        sys.executable,
        "-m",
        "lightning_vgg",
        "experiment",
        "--config",
        "configs/experiment_cpu.yaml",
        f"--out={work}",
    ]
    print("$", " ".join(cmd[2:]), flush=True)
    t0 = time.monotonic()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.monotonic() - t0
    # printed now, so that a failure later still leaves it for --reuse
    print(f"experiment wall time {wall:.1f} s", flush=True)
    return wall


def newest_run(root: Path) -> Path:
    return sorted(root.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]


def copy_small(src: Path, dst: Path) -> None:
    """Copy a file; a PNG over MAX_FIGURE_BYTES is stored with a 256-colour palette at
    full size (octree, no dither: a figure's flat colours and text stay sharp), and only
    if that is still too big, downscaled until it fits."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix.lower() != ".png" or src.stat().st_size <= MAX_FIGURE_BYTES:
        shutil.copyfile(src, dst)
        return
    from PIL import Image

    with Image.open(src) as img:
        img = img.convert("RGB")
        scale = 1.0
        while True:
            w, h = int(img.width * scale), int(img.height * scale)
            small = img if scale == 1.0 else img.resize((w, h), Image.LANCZOS)
            small.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
                dst, optimize=True
            )
            if dst.stat().st_size <= MAX_FIGURE_BYTES or scale < 0.3:
                return
            scale *= 0.8


def collect(work: Path, out: Path) -> None:
    """The files the repository keeps, from the experiment's folders."""
    good, bad = newest_run(work / "runs" / "good"), newest_run(work / "runs" / "bad")
    for name, run in (("good", good), ("control", bad)):
        for f in ("summary.json", "summary.md", "metrics.csv", "test_metrics.json"):
            if (run / f).is_file():
                copy_small(run / f, out / name / f)
    copy_small(good / "history.png", out / "good" / "history.png")
    report = work / "report"
    for f in ("report.md", "measures.json"):
        copy_small(report / f, out / "report" / f)
    text = (report / "report.md").read_text(encoding="utf-8")
    for link in sorted(set(re.findall(r"\(figures/([^)]+\.png)\)", text))):
        copy_small(report / "figures" / link, out / "report" / "figures" / link)


def model_only_rate(seconds: float = 20.0) -> dict[str, float]:
    """Training steps of the cpu.yaml model alone (synthetic batch of 64 at 64 px)."""
    import torch
    import torch.utils.benchmark as tb

    from lightning_vgg.models.module import VGGClassifier

    torch.manual_seed(0)
    model = VGGClassifier(width=0.125, input_size=64, channels_last=True, lr=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.rand(64, 3, 64, 64)
    y = torch.randint(0, 2, (64,)).float()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()

    timer = tb.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=seconds)
    return {"img_per_s": 64 / m.median, "median_step_s": m.median, "iqr_s": m.iqr}


def write_bench(record: dict[str, Any], date: str) -> Path:
    """benchmarks/results/cpu-2core-<date>-fit.{json,md}."""
    base = ROOT / "benchmarks" / "results" / f"cpu-2core-{date}-fit"
    base.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    fit = record["fit"]
    lines = [
        f"# CPU fit throughput ({date})",
        "",
        f"`{record['command']}` at commit `{record['source']['commit'][:7]}` on "
        f"{record['machine']['cpu']} ({record['machine']['cores']} cores).",
        "",
        "| row | value |",
        "| --- | --- |",
        f"| fit wall time (summary.json) | {fit['fit_wall_time_s']:.0f} s |",
        f"| epochs | {fit['epochs']} |",
        f"| end to end, train + val images per second of fit | {fit['img_per_s']:.0f} img/s |",
        f"| model only, training step, batch 64 | {record['model_only']['img_per_s']:.0f} img/s |",
        f"| end to end / model only | {fit['img_per_s'] / record['model_only']['img_per_s']:.2f} |",
        "",
    ]
    base.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    return base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "experiment_cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "cpu")
    ap.add_argument(
        "--reuse",
        type=float,
        metavar="WALL_S",
        help="collect an experiment already in --work instead of running it; WALL_S is its "
        "measured wall time in seconds (recorded as given)",
    )
    args = ap.parse_args()
    started = dt.datetime.now(dt.timezone.utc)
    source, host = commit(), machine()
    wall = run_experiment(args.work) if args.reuse is None else args.reuse
    tmp = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # our own staging folder from an earlier try
    collect(args.work, tmp)
    good = json.loads((tmp / "good" / "summary.json").read_text())
    epochs = int(good["epochs"])
    fit_s = float(good.get("fit_wall_time_s", good.get("wall_time_s")))
    seen = epochs * (17000 + 4000)
    model_only = model_only_rate()
    date = started.strftime("%Y-%m-%d")
    record = {
        "command": "python benchmarks/cpu_results.py",
        "experiment": "lightning-vgg experiment --config configs/experiment_cpu.yaml",
        "started_utc": started.isoformat(timespec="seconds"),
        "source": source,
        "machine": host,
        "experiment_wall_time_s": round(wall, 1),
        "experiment_reused": args.reuse is not None,
        "fit": {
            "epochs": epochs,
            "fit_wall_time_s": fit_s,
            "images_seen": seen,
            "img_per_s": seen / fit_s,
        },
        "model_only": model_only,
        "good": good.get("metrics"),
        "control": json.loads((tmp / "control" / "summary.json").read_text()).get("metrics"),
    }
    (tmp / "provenance.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (tmp / "PROVENANCE.md").write_text(
        f"# results/cpu\n\nEvery file here comes from `{record['command']}` "
        f"(which runs `{record['experiment']}`), started {record['started_utc']} at commit "
        f"`{source['commit']}`{' (with uncommitted changes)' if source['dirty'] else ''}, on "
        f"{host['cpu']} with {host['cores']} cores and {host['memory_gib']} GiB, torch "
        f"{host['torch']}. Experiment wall time {wall:.0f} s; the good model's fit "
        f"{fit_s:.0f} s for {epochs} epochs. Figures over {MAX_FIGURE_BYTES // 1024} KiB are "
        "stored with a 256-colour palette (downscaled only if still over).\n",
        encoding="utf-8",
    )
    size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    if size > BUDGET_BYTES:
        raise SystemExit(f"results/cpu would be {size / 2**20:.1f} MiB, over 5 MiB")
    if args.out.exists():
        shutil.rmtree(args.out)  # results/cpu is this script's own output
    os.replace(tmp, args.out)
    bench = write_bench(record, date)
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB) and {bench}.{{json,md}}")


if __name__ == "__main__":
    main()
