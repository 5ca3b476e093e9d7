"""Shared by the benchmark sections: machine info, the JSON recorder, section budgets,
and the two ways of timing (``torch.utils.benchmark.Timer`` for a callable; a
wall-clock stopwatch where a Timer does not fit)."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.benchmark import Timer

# --------------------------------------------------------------------------- machine


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def cpu_label() -> str:
    return f"cpu: {cpu_name()} ({cpu_count()} cores)"


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


# --------------------------------------------------------------------------- recording


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


def release(device: torch.device) -> None:
    """Free what a measurement left behind (garbage, cached CUDA blocks)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def iqr(values: list[float]) -> float:
    """Interquartile range (linear interpolation, as ``Measurement.iqr``)."""
    if len(values) < 2:
        return 0.0
    q25, q75 = np.quantile(np.asarray(values, dtype=float), [0.25, 0.75])
    return float(q75 - q25)


def rate_stats(rates: list[float], digits: int = 1) -> dict[str, Any]:
    """``value`` (the median) and the row fields of a list of per-repeat rates."""
    return {
        "value": statistics.median(rates) if rates else 0.0,
        "repeats": [round(r, digits) for r in rates],
        "iqr": round(iqr(rates), digits),
    }


class BlockTimer(Timer):
    """A ``torch.utils.benchmark.Timer`` of ``fn()`` whose autoranges run blocks of
    about ``block_s`` seconds (at least ``min_calls`` calls each).

    The stock block-size estimate grows a block tenfold until the timer's own overhead
    is below 1e-4 of it; with about 65 us of overhead per block measured on this VM,
    that turned a 0.45 s training step into blocks of 10 steps, and a ``min_run_time``
    of 2.4 s into one block with no spread. Here one untimed run of ``est_calls`` calls (warm-up, as
    in the stock estimate) sizes the block instead. Also: the process's thread count
    (the Timer's default is one thread) and the garbage collector on, as in real use
    (``timeit`` switches it off). On a GPU the Timer synchronizes around each block.
    """

    def __init__(
        self, fn: Callable[[], Any], block_s: float, min_calls: int = 1, est_calls: int = 1
    ) -> None:
        super().__init__(
            stmt="fn()",
            setup="import gc; gc.enable()",
            globals={"fn": fn},
            num_threads=torch.get_num_threads(),
        )
        self.block_s, self.min_calls, self.est_calls = block_s, min_calls, est_calls

    def _estimate_block_size(self, min_run_time: float) -> int:
        est = self._timeit(self.est_calls) / self.est_calls
        return calls_for(est, self.block_s, lo=self.min_calls)


def autorange(
    fn: Callable[[], Any],
    items: int,
    min_run_time: float,
    block_s: float = 0.2,
    digits: int = 1,
    **kw: int,
) -> dict[str, Any]:
    """Rate of ``fn`` (``items`` per call) by ``BlockTimer.adaptive_autorange``: blocks
    until ``min_run_time`` has passed and there are at least 4 blocks whose IQR is
    within 10 % of their median, or until ``2 * min_run_time`` has passed (on a loaded
    machine the spread rarely gets that small; the cap keeps the section budgets).

    Returns the row fields: ``value`` (items / the Timer's median seconds per call),
    ``repeats`` (each block's rate), ``iqr`` (of those rates), ``median_s`` and
    ``iqr_s`` (the Timer's own, in seconds per call) and ``steps_per_repeat`` (calls per
    block). ``kw``: ``min_calls``, ``est_calls`` of :class:`BlockTimer`.
    """
    m = BlockTimer(fn, block_s, **kw).adaptive_autorange(
        threshold=0.1, min_run_time=min_run_time, max_run_time=2 * min_run_time
    )
    rates = [items / t for t in m.times]
    return {
        "value": items / m.median,
        "repeats": [round(r, digits) for r in rates],
        "iqr": round(iqr(rates), digits),
        "median_s": float(f"{m.median:.4g}"),
        "iqr_s": float(f"{m.iqr:.4g}"),
        "steps_per_repeat": m.number_per_run,
    }


def seconds_per_call(fn: Callable[[], Any], calls: int = 1) -> float:
    """A rough estimate (``Timer.timeit``), for sizing blocks; not a measurement."""
    return BlockTimer(fn, 0.0).timeit(calls).median


def stopwatch(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Seconds per call over ``calls`` back-to-back calls, one wall-clock (CPU) or
    CUDA-event (GPU) interval. For timing in turns, where one Timer per side would
    run that side to its end before the other starts."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def calls_for(seconds_per_call: float, target_s: float, lo: int = 1, hi: int = 200) -> int:
    return int(min(hi, max(lo, math.ceil(target_s / max(seconds_per_call, 1e-6)))))
