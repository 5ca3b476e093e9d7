#!/usr/bin/env python3
"""Seconds per image of ``lightning-vgg explain`` (maps + 41 figures), for the README.

python benchmarks/explain_cost.py [--data ZIP] [--n 8] [--width 1.0] [--size 224] [--workers 2]

A randomly initialised network of the given width: the cost does not depend on the
weights. The first image pays for starting the drawing processes, so the rate is
taken over the images after it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lightning_vgg.explain.run import run_explain  # noqa: E402
from lightning_vgg.models.module import VGGClassifier  # noqa: E402


def main() -> None:
    """Explain ``n`` photos from the archive twice (1 image, then n) and report the difference."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/catsdogs-180px-mini.zip"))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        with zipfile.ZipFile(a.data) as zf:
            names = sorted(n for n in zf.namelist() if n.lower().endswith(".jpg"))[: a.n]
            for name in names:
                zf.extract(name, tmp / "img")
        photos = sorted(str(p) for p in (tmp / "img").rglob("*.jpg"))
        torch.manual_seed(0)
        model = VGGClassifier(width=a.width, input_size=a.size)
        ckpt = tmp / "m.ckpt"
        torch.save(
            {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, ckpt
        )
        took = {}
        for k in (1, len(photos)):
            t0 = time.perf_counter()
            run_explain(
                str(ckpt),
                str(tmp / f"out{k}"),
                images=photos[:k],
                device=a.device,
                workers=a.workers,
            )
            took[k] = time.perf_counter() - t0
        per = (took[len(photos)] - took[1]) / (len(photos) - 1)
        print(
            f"explain: width {a.width}, {a.size} px, {a.device}, {a.workers} drawing processes: "
            f"{took[1]:.1f} s for 1 image, {took[len(photos)]:.1f} s for {len(photos)}: "
            f"{per:.1f} s per further image"
        )


if __name__ == "__main__":
    main()
