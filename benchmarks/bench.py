#!/usr/bin/env python3
"""Loader, training and Grad-CAM atlas throughput (issue 5); see benchmarks/README.md.

    python benchmarks/bench.py [--quick] [--only loader|train|atlas] [--json PATH] [--md PATH]
                               [--data ZIP_OR_DIR] [--device auto|cpu|cuda]

Every number is a median of repeats after warm-up: a ``torch.utils.benchmark.Timer``
where a callable is timed, a stopwatch over whole DataLoader epochs or over rounds timed
in turns. GPU work is closed by ``torch.cuda.synchronize()`` or timed with CUDA events.
Each section runs under its own hard time budget (``--budget train=150``); a failure or
a timeout in one section is recorded as a row and the others still run. Rows are
written to the JSON after each measurement, so a run that is killed keeps what it had.

The CLI only parses and dispatches: ``timing.py`` (recorder, machine info, budgets,
timers), ``bench_data.py`` (images, data modules) and one module per section,
``bench_loader.py``, ``bench_train.py``, ``bench_atlas.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

os.environ["KERAS_BACKEND"] = "torch"  # before anything imports keras

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402
from bench_atlas import section_atlas  # noqa: E402
from bench_data import SPLIT, Data, find_data, prepare_data  # noqa: E402
from bench_loader import section_loader  # noqa: E402
from bench_train import section_train  # noqa: E402
from timing import (  # noqa: E402
    Budget,
    Recorder,
    SectionTimeout,
    cpu_share,
    device_label,
    machine_info,
    markdown,
    now,
    release,
)

SECTIONS = ("loader", "train", "atlas")
DEFAULT_BUDGET = {  # seconds per section: (cuda, cpu)
    "loader": (90, 150),
    "train": (180, 120),
    "atlas": (50, 90),
}

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.utils\.flop_counter")


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


def run_section(
    section: str,
    rec: Recorder,
    args: argparse.Namespace,
    dev: torch.device,
    data: Data,
    budget: Budget,
) -> bool:
    """One section under its SIGALRM budget; a failure or timeout becomes a
    ``<section>/failed`` row. Returns whether it failed."""
    t0 = time.perf_counter()
    failed = False
    try:
        with budget.armed():
            if section == "loader":
                section_loader(rec, args, dev, data)
            elif section == "train":
                section_train(rec, args, dev, data, budget)
            else:
                section_atlas(rec, args, dev, data)
    except (SectionTimeout, Exception) as exc:
        failed = True
        traceback.print_exc()
        rec.add(f"{section}/failed", None, "", error=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        release(dev)
    rec.meta.setdefault("section_s", {})[section] = round(time.perf_counter() - t0, 1)
    rec.flush()
    return failed


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
        failed += run_section(section, rec, args, dev, data, budget)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(markdown(rec))
    print()
    print(markdown(rec))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
