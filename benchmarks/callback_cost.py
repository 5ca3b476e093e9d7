#!/usr/bin/env python3
"""Cost of one FeatureMapCallback + GradCAMCallback firing, for the README's "Costs" table.

python benchmarks/callback_cost.py [--width 1.0] [--size 224] [--per_class 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lightning_vgg.callbacks import FeatureMapCallback, GradCAMCallback  # noqa: E402
from lightning_vgg.fileio import save_figure  # noqa: E402
from lightning_vgg.models.module import VGGClassifier  # noqa: E402


def main() -> None:
    """Time compute and drawing separately, on random probe images."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--per_class", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    model = VGGClassifier(width=a.width, input_size=a.size).to(a.device)
    n = 2 * a.per_class
    x = torch.rand(n, 3, a.size, a.size)
    y = torch.tensor([0] * a.per_class + [1] * a.per_class)
    paths = [f"probe{i}.jpg" for i in range(n)]
    fm, gc = FeatureMapCallback(per_class=a.per_class), GradCAMCallback(per_class=a.per_class)
    for cb in (fm, gc):
        cb.figures(model, x, y, paths)  # warm-up
        t0 = time.perf_counter()
        figs = cb.figures(model, x, y, paths)
        if a.device == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            for name, fig in figs:
                save_figure(fig, Path(tmp) / f"{name}.png")
        t2 = time.perf_counter()
        print(
            f"{type(cb).__name__}: {n} probes, {len(figs)} figures, width {a.width}, {a.size}px, "
            f"{a.device}: compute+figure objects {t1 - t0:.2f} s, saving {t2 - t1:.2f} s"
        )


if __name__ == "__main__":
    main()
