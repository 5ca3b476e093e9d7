#!/usr/bin/env python3
"""Issue 15 in one device call: train seed + control concurrently, test, compare, pack.

    python3 benchmarks/gpu_train.py            # the full run (GPU machine; see README.md)
    python3 benchmarks/gpu_train.py --smoke    # every step at toy size, here on the CPU
    python3 benchmarks/gpu_train.py --stage    # device calls 1-2: wheels + parts check only

What it does, each step timed and recorded in ``run_info.json``:

1. installs the wheels the CLI needs beyond the device image (``.gpu/whl`` or ``.whl``)
   into ``/tmp/site``, if ``jsonargparse``/``captum`` are missing;
2. joins ``.gpu/parts/*`` into ``.gpu/catsdogs-180px.zip`` and checks its sha256
   (``--smoke`` rehearses the same join on the mini archive, cut into parts);
3. scans the archive once (``index_source``), so the concurrent fits hit the cache;
4. fits every ``--runs`` config at once, one process each (batch 20 leaves the GPU
   mostly idle), each stopping itself at an epoch end before ``--budget - --reserve``
   seconds (``EpochProgress.stop_at``) and printing one line per epoch;
5. tests each run as soon as its fit ends (seed: ``best.ckpt``; control: ``last.ckpt``);
6. runs ``compare`` on seed vs control once both are tested;
7. packs ``results/`` into ``$OUT/issue15-results.tar`` every ``--pack-every`` seconds
   and at the end (atomically replaced, so a killed call still returns the last one),
   beside ``$OUT/run_info.json`` and ``$OUT/driver.log``.

Everything ends by ``--budget`` seconds after the start: late processes get SIGINT
(Lightning stops gracefully), then SIGKILL; SIGTERM (the outer ``timeout`` of
``gpu_train.sh``) packs what there is and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FULL_ZIP = ROOT / ".gpu" / "catsdogs-180px.zip"
FULL_SHA256 = "70e66a7841e96022514ad9a6b6ef2abd6f48b3929d0e878e36d79bdd48620bd9"
MINI_SHA256 = "bfaa6e7fbd022972ed242f4e445da9592cc2a0cb9d9b3f756b772fe50bad2d0d"
PARTS = ROOT / ".gpu" / "parts"
META = ROOT / ".gpu" / "meta"
WHEEL_DIRS = (ROOT / ".gpu" / "whl", ROOT / ".whl")
NEEDED_MODULES = ("jsonargparse", "docstring_parser", "typeshed_client", "captum")
SITE = Path(os.environ.get("GPU_TRAIN_SITE", "/tmp/site"))  # where carried wheels go
TAR_NAME = "issue15-results.tar"
TAR_LIMIT = 15 * 2**20  # the device returns files up to 16 MiB; keep a margin
HTML_LIMIT = 4 * 2**20

#: config file, and the checkpoint each run is tested (and compared) with
CONFIGS = {
    "seed": ("configs/seed.yaml", "best"),
    "control": ("configs/control.yaml", "last"),
    "seed_every_conv": ("configs/seed_every_conv.yaml", "best"),
    # issue 17's recipe (full passes, batch 128, one-cycle): `--runs fast`, alone
    "fast": ("configs/fast.yaml", "best"),
}
#: what of each run directory goes into the tar, in order of priority
RUN_FILES = (
    "summary.json",
    "summary.md",
    "metrics.csv",
    "test_metrics.json",
    "config.yaml",
    "history.png",
    "misclassified.json",
)
SMOKE_ARGS = (
    "--model.width=0.0625",
    "--data.image_size=32",
    "--data.split_sizes=[600,200,200]",
    "--data.train_steps_per_epoch=3",
    "--data.val_steps_per_epoch=2",
    "--trainer.accelerator=cpu",
    "--trainer.log_every_n_steps=1",
)


# --------------------------------------------------------------------------- output
class Log:
    """Prints with the elapsed seconds, and keeps a copy in ``$OUT/driver.log``."""

    def __init__(self, path: Path, t0: float) -> None:
        self.path, self.t0 = path, t0
        self.lock = threading.Lock()
        path.write_text("", encoding="utf-8")

    def __call__(self, text: str) -> None:
        line = f"[{time.time() - self.t0:6.1f} s] {text}"
        with self.lock:
            print(line, flush=True)
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(line + "\n")


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def run_text(cmd: list[str]) -> str | None:
    """A command's stdout, or ``None`` when it is missing or fails."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# --------------------------------------------------------------------------- setup
def ensure_wheels(env: dict[str, str], say: Log) -> dict[str, Any]:
    """Install the carried wheels into /tmp/site when a needed module is missing."""
    missing = [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]
    if missing and SITE.is_dir():  # installed by an earlier call on this (warm) machine
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), env.get("PYTHONPATH")]))
        sys.path.insert(0, str(SITE))
        importlib.invalidate_caches()
        missing = [m for m in missing if importlib.util.find_spec(m) is None]
    if not missing:
        return {"installed": False}
    wheels = next((d for d in WHEEL_DIRS if any(d.glob("*.whl"))), None)
    if wheels is None:
        raise SystemExit(f"missing modules {missing} and no wheels in .gpu/whl or .whl")
    t = time.time()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    cmd += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", str(SITE)]
    subprocess.run([*cmd, *map(str, sorted(wheels.glob("*.whl")))], check=True)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), env.get("PYTHONPATH")]))
    say(f"installed {missing} from {wheels.relative_to(ROOT)} in {time.time() - t:.1f} s")
    return {"installed": True, "from": str(wheels.relative_to(ROOT)), "missing": missing}


def check_parts(say: Log) -> tuple[list[str], list[str]]:
    """Compare the parts present with ``.gpu/meta/parts.sha256``: (ok, bad or missing)."""
    listing = META / "parts.sha256"
    if not listing.is_file():
        found = sorted(p.name for p in PARTS.glob("*.part-*"))
        say(f"no {listing.relative_to(ROOT)}; parts present: {found or 'none'}")
        return found, []
    ok, bad = [], []
    for line in listing.read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        part = ROOT / name.strip().lstrip("*")
        if not part.is_file():
            bad.append(f"{part.name} (missing)")
        elif sha256_of(part) != digest:
            bad.append(f"{part.name} (sha256 differs, {part.stat().st_size} bytes)")
        else:
            ok.append(part.name)
    say(f"parts ok: {ok or 'none'}; missing or bad: {bad or 'none'}")
    return ok, bad


def join_parts(parts: list[Path], target: Path, sha256: str) -> None:
    """``cat parts > target`` through a temporary file, kept only if its sha256 matches."""
    tmp = target.with_name(target.name + ".joining")
    h = hashlib.sha256()
    with tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
                    out.write(block)
    if h.hexdigest() != sha256:
        tmp.unlink()
        sizes = ", ".join(f"{p.name}={p.stat().st_size}" for p in parts)
        raise SystemExit(f"joined archive has sha256 {h.hexdigest()}, not {sha256}; parts: {sizes}")
    os.replace(tmp, target)


def full_archive(say: Log) -> dict[str, Any]:
    """The full archive in ``.gpu/``, joined from its parts if needed, sha256-checked."""
    t = time.time()
    if FULL_ZIP.is_file() and sha256_of(FULL_ZIP) == FULL_SHA256:
        say(f"{FULL_ZIP.relative_to(ROOT)} present, sha256 ok")
        return {"path": str(FULL_ZIP), "sha256": FULL_SHA256, "joined": False}
    parts = sorted(PARTS.glob("catsdogs-180px.zip.part-*"))
    _, bad = check_parts(say)
    if not parts or bad:
        raise SystemExit(
            "the archive's parts are incomplete (was the machine given back between the "
            "carrying calls?); start again from call 1 of benchmarks/README.md"
        )
    join_parts(parts, FULL_ZIP, FULL_SHA256)
    say(f"joined {len(parts)} parts into {FULL_ZIP.relative_to(ROOT)}: sha256 ok")
    return {
        "path": str(FULL_ZIP),
        "sha256": FULL_SHA256,
        "joined": True,
        "parts": [p.name for p in parts],
        "join_s": round(time.time() - t, 1),
    }


def rehearse_join(source: Path, work: Path, say: Log) -> dict[str, Any]:
    """``--smoke``: cut the mini archive into parts, join them back, check the sha256."""
    t = time.time()
    folder = work / "parts"
    folder.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    size = 2 * 2**20
    parts = []
    for i in range(0, len(data), size):
        part = folder / f"{source.name}.part-a{chr(ord('a') + i // size)}"
        part.write_bytes(data[i : i + size])
        parts.append(part)
    target = work / source.name
    join_parts(parts, target, sha256_of(source))
    ok = sha256_of(target) == MINI_SHA256 if source.name == "catsdogs-180px-mini.zip" else None
    shutil.rmtree(folder)
    say(f"rehearsed the join: {len(parts)} parts of {source.name}, sha256 ok")
    return {
        "path": str(target),
        "sha256": sha256_of(target),
        "joined": True,
        "parts": [p.name for p in parts],
        "mini_sha256_ok": ok,
        "join_s": round(time.time() - t, 1),
    }


def source_info(commit: str | None) -> dict[str, Any]:
    """What code ran: ``--commit``, else ``.gpu/meta/source.json``, else git."""
    info: dict[str, Any] = {}
    meta = META / "source.json"
    if meta.is_file():
        with contextlib.suppress(ValueError):
            info = json.loads(meta.read_text(encoding="utf-8"))
    if commit:
        info["commit"] = commit
    if not info.get("commit"):
        info["commit"] = run_text(["git", "-C", str(ROOT), "rev-parse", "HEAD"]) or "unknown"
        info.setdefault("from", "git" if info["commit"] != "unknown" else None)
    return info


INDEX_SCRIPT = """
import json, sys, time
t = time.time()
import torch
from lightning_vgg.data.sources import index_source
root, items = index_source(sys.argv[1], workers=int(sys.argv[2]), progress=False)
cuda = torch.cuda.is_available()
print("INDEX " + json.dumps({
    "images": len(items), "root": str(root), "seconds": round(time.time() - t, 1),
    "torch": torch.__version__, "cuda": torch.version.cuda,
    "device": torch.cuda.get_device_name(0) if cuda else None,
}))
"""


# --------------------------------------------------------------------------- jobs
@dataclass
class Job:
    """One child process: its command, log file, and outcome."""

    name: str
    argv: list[str]
    log: Path
    kill_at: float
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    ended: float = 0.0
    rc: int | None = None
    killed: str | None = None
    reader: threading.Thread | None = None

    def start(self, env: dict[str, str], say: Log, echo: re.Pattern[str]) -> None:
        say(f"start {self.name} (log: {self.log.name})")
        self.started = time.time()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            process_group=0,  # a group (not a session): the device ends it with the call
        )
        self.reader = threading.Thread(target=self._read, args=(say, echo), daemon=True)
        self.reader.start()

    def _read(self, say: Log, echo: re.Pattern[str]) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with self.log.open("w", encoding="utf-8", errors="replace") as fh:
            fh.write("$ " + " ".join(self.argv) + "\n")
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                fh.write(line + "\n")
                fh.flush()
                if echo.match(line):
                    say(line)

    def poll(self, say: Log) -> bool:
        """True once the process has ended (and its output is read)."""
        if self.proc is None:
            return False
        if self.rc is not None:
            return True
        now = time.time()
        if self.proc.poll() is None:
            if now > self.kill_at + 20 and self.killed == "SIGINT":
                self.signal(signal.SIGKILL, say)
            elif now > self.kill_at and self.killed is None:
                self.signal(signal.SIGINT, say)
            return False
        if self.reader is not None:
            self.reader.join(timeout=5)
        self.rc, self.ended = self.proc.returncode, time.time()
        say(f"end {self.name}: exit {self.rc} after {self.ended - self.started:.0f} s")
        if self.rc != 0:
            for line in tail(self.log, 12):
                say(f"  {self.name}| {line}")
        return True

    def signal(self, sig: signal.Signals, say: Log, why: str = "past its deadline") -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        say(f"{self.name}: {why}, {sig.name}")
        self.killed = sig.name
        with contextlib.suppress(ProcessLookupError):
            if sig == signal.SIGKILL:
                os.killpg(self.proc.pid, sig)  # the DataLoader workers too
            else:
                self.proc.send_signal(sig)

    def record(self) -> dict[str, Any]:
        end = self.ended or time.time()
        return {
            "rc": self.rc,
            "seconds": round(end - self.started, 1) if self.started else None,
            "killed": self.killed,
        }


def tail(path: Path, n: int) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    lines = [x for x in lines if not x.startswith(("$ ", "\U0001f4a1"))]
    return lines[-n:]


# --------------------------------------------------------------------------- packing
def linked_figures(report_md: Path) -> list[str]:
    """Relative paths that ``report.md`` links or embeds (``figures/...``)."""
    return linked_figures_text(report_md.read_text(encoding="utf-8", errors="replace"))


def linked_figures_text(text: str) -> list[str]:
    """Relative paths linked or embedded in a Markdown text."""
    found = re.findall(r"\]\(([^)\s]+)", text) + re.findall(r'src="([^"]+)"', text)
    return sorted({f for f in found if "://" not in f and not f.startswith(("#", "/", ".."))})


class Packer:
    """Rewrites ``$OUT/issue15-results.tar`` (atomically) and ``$OUT/run_info.json``."""

    def __init__(self, out: Path, work: Path, info: dict[str, Any]) -> None:
        self.out, self.work, self.info = out, work, info
        self.run_dirs: dict[str, Path] = {}
        self.compare_dir: Path | None = None
        self.packs = 0

    def members(self) -> list[tuple[str, Path]]:
        """``(name in the tar, file)`` in order of priority."""
        items: list[tuple[str, Path]] = []
        for run, folder in self.run_dirs.items():
            names = [*RUN_FILES, *sorted(p.name for p in folder.glob("misclassified_*.png"))]
            items += [(f"results/{run}/{n}", folder / n) for n in names]
        cmp = self.compare_dir
        if cmp is not None and (cmp / "report.md").is_file():
            items += [
                (f"results/seed_vs_control/{n}", cmp / n) for n in ("report.md", "measures.json")
            ]
            items += [
                (f"results/seed_vs_control/{n}", cmp / n) for n in linked_figures(cmp / "report.md")
            ]
            html = cmp / "report.html"
            if html.is_file():
                size = html.stat().st_size
                self.info["report_html"] = f"{size} bytes, " + (
                    "packed" if size <= HTML_LIMIT else f"left out (over {HTML_LIMIT} bytes)"
                )
                if size <= HTML_LIMIT:
                    items.append(("results/seed_vs_control/report.html", html))
        items += [(f"results/logs/{p.name}", p) for p in sorted((self.work / "logs").glob("*.log"))]
        items.append(("results/logs/driver.log", self.out / "driver.log"))
        return items

    def pack(self) -> None:
        self.packs += 1
        self.info["packs"] = self.packs
        self.info["wall_time_s"] = round(time.time() - self.info["t0"], 1)
        left_out: list[str] = []
        used = 0
        tmp = self.out / f".{TAR_NAME}.tmp"
        with tarfile.open(tmp, "w") as tar:
            for name, path in self.members():
                try:
                    data = path.read_bytes()
                except OSError:
                    continue  # not written (yet)
                if name.startswith("results/logs/") and len(data) > 256 * 1024:
                    data = b"[... cut ...]\n" + data[-256 * 1024 :]
                if used + len(data) + 1024 > TAR_LIMIT - 64 * 1024:
                    left_out.append(f"{name} ({len(data)} bytes)")
                    continue
                used += len(data) + 1024
                add_bytes(tar, name, data)
            self.info["left_out"] = left_out
            self.info["tar_bytes_about"] = used
            add_bytes(tar, "results/run_info.json", self.info_json().encode())
        os.replace(tmp, self.out / TAR_NAME)
        tmp = self.out / ".run_info.json.tmp"
        tmp.write_text(self.info_json(), encoding="utf-8")
        os.replace(tmp, self.out / "run_info.json")

    def info_json(self) -> str:
        return json.dumps({k: v for k, v in self.info.items() if k != "t0"}, indent=2) + "\n"


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    entry = tarfile.TarInfo(name)
    entry.size, entry.mtime, entry.mode = len(data), int(time.time()), 0o644
    tar.addfile(entry, io.BytesIO(data))


def metrics_rows(run_dir: Path | None) -> list[dict[str, str]]:
    if run_dir is None or not (run_dir / "metrics.csv").is_file():
        return []
    with (run_dir / "metrics.csv").open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def run_dir_of(runs: Path, name: str) -> Path | None:
    found = sorted((runs / name).glob("version_*"), key=lambda p: int(p.name.split("_")[-1] or 0))
    return found[-1] if found else None


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU, a few minutes")
    ap.add_argument("--stage", action="store_true", help="install wheels, check parts, exit")
    ap.add_argument("--runs", help="configs to train (default: seed,control)")
    ap.add_argument(
        "--precision",
        choices=("32-true", "bf16-mixed", "16-mixed"),
        help="training precision (default: bf16-mixed; smoke: 32-true); tests run in 32-true",
    )
    ap.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NHWC model (default: on with bf16-mixed)",
    )
    ap.add_argument("--budget", type=float, help="seconds for everything (default 530; smoke 240)")
    ap.add_argument(
        "--reserve",
        type=float,
        help="seconds kept after the fits for tests, compare and packing (default 150; smoke 100)",
    )
    ap.add_argument("--epochs", type=int, help="override trainer.max_epochs (smoke: 2)")
    ap.add_argument("--compare-n", type=int, help="compare --n_per_class (default 50; smoke 4)")
    ap.add_argument("--workers", type=int, help="DataLoader workers per run (default 5; smoke 1)")
    ap.add_argument(
        "--probes",
        action="store_true",
        help="keep the configs' feature-map/Grad-CAM callbacks (off: ~3-6 s each firing)",
    )
    ap.add_argument("--data", type=Path, help="archive to use (default: the full one in .gpu/)")
    ap.add_argument(
        "--out", type=Path, help="results folder (default: $OUT, else /tmp/gpu-train-out)"
    )
    ap.add_argument("--work", type=Path, help="runs, cache and logs (default: /tmp/gpu-train)")
    ap.add_argument("--commit", help="the commit the tree is at (default: .gpu/meta/source.json)")
    ap.add_argument("--pack-every", type=float, help="seconds between packs (default 30; smoke 5)")
    a = ap.parse_args(argv)
    smoke = a.smoke
    a.runs = [r for r in (a.runs or "seed,control").split(",") if r]
    for run in a.runs:
        if run not in CONFIGS:
            ap.error(f"unknown run {run!r}: one of {', '.join(CONFIGS)}")
    a.precision = a.precision or ("32-true" if smoke else "bf16-mixed")
    if a.channels_last is None:
        a.channels_last = a.precision == "bf16-mixed"
    a.budget = a.budget or (240.0 if smoke else 530.0)
    a.reserve = a.reserve if a.reserve is not None else (100.0 if smoke else 150.0)
    a.epochs = a.epochs or (2 if smoke else None)
    a.compare_n = a.compare_n or (4 if smoke else 50)
    a.workers = a.workers if a.workers is not None else (1 if smoke else 5)
    a.pack_every = a.pack_every or (5.0 if smoke else 30.0)
    a.out = a.out or Path(os.environ.get("OUT") or "/tmp/gpu-train-out")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t0 = time.time()
    a.out.mkdir(parents=True, exist_ok=True)
    say = Log(a.out / "driver.log", t0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))

    if a.stage:
        say(f"stage: {run_text(['nvidia-smi', '-L']) or 'no nvidia-smi'}")
        ensure_wheels(env, say)
        check_parts(say)
        return 0

    work = a.work or (
        Path(tempfile.mkdtemp(prefix="gpu-train-")) if a.smoke else Path("/tmp/gpu-train")
    )
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(t0))
    runs_dir, logs = work / f"runs-{stamp}", work / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    env["LIGHTNING_VGG_CACHE"] = str(work / "cache")
    deadline = t0 + a.budget
    fit_deadline = deadline - a.reserve

    info: dict[str, Any] = {
        "issue": 15,
        "mode": "smoke" if a.smoke else "full",
        "status": "running",
        "argv": sys.argv[1:] if argv is None else argv,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "t0": t0,
        "budget_s": a.budget,
        "reserve_s": a.reserve,
        "precision": a.precision,
        "test_precision": "32-true",
        "channels_last": a.channels_last,
        "probes": a.probes,
        "gpu": run_text(["nvidia-smi", "-L"]),
        "gpu_details": run_text(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        ),
        "host": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "node": platform.node(),
        },
        "source": source_info(a.commit),
        "runs": {
            r: {"config": CONFIGS[r][0], "tested_with": f"{CONFIGS[r][1]}.ckpt"} for r in a.runs
        },
        "compare": None,
    }
    packer = Packer(a.out, work, info)
    jobs: list[Job] = []

    def on_term(signum: int, frame: Any) -> None:
        # `timeout` signals the driver and its process group: the second must not
        # interrupt the final packing
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        say(
            f"{info['mode']} run of {', '.join(a.runs)}; precision {a.precision}, "
            f"budget {a.budget:.0f} s (fits stop by {a.budget - a.reserve:.0f} s); "
            f"gpu: {info['gpu'] or 'none'}; commit {info['source'].get('commit')}"
        )
        packer.pack()
        info["wheels"] = ensure_wheels(env, say)
        if a.smoke:
            mini = a.data or next(
                (
                    p
                    for p in (
                        ROOT / ".gpu" / "catsdogs-180px-mini.zip",
                        ROOT.parent / "shared" / "data" / "catsdogs-180px-mini.zip",
                    )
                    if p.is_file()
                ),
                None,
            )
            info["data"] = rehearse_join(mini, work, say) if mini else full_archive(say)
        elif a.data:
            info["data"] = {"path": str(a.data), "sha256": sha256_of(a.data), "joined": False}
        else:
            info["data"] = full_archive(say)
        data = info["data"]["path"]

        try:
            idx = subprocess.run(
                [sys.executable, "-c", INDEX_SCRIPT, data, str(min(16, os.cpu_count() or 2))],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                check=False,
                timeout=max(10.0, fit_deadline - time.time()),
            )
        except subprocess.TimeoutExpired as exc:
            raise SystemExit(f"scanning {data} did not end before the fits' deadline") from exc
        line = next((x for x in idx.stdout.splitlines() if x.startswith("INDEX ")), None)
        if line is None:
            say("index failed:\n" + (idx.stdout + idx.stderr)[-3000:])
            raise SystemExit("the archive could not be scanned")
        info["index"] = json.loads(line[6:])
        say(
            f"indexed {info['index']['images']} images in {info['index']['seconds']} s; "
            f"torch {info['index']['torch']}, device {info['index']['device'] or 'cpu'}"
        )
        packer.pack()

        common = [
            f"--data.source={data}",
            f"--trainer.logger.init_args.save_dir={runs_dir}",
            "--trainer.enable_progress_bar=false",
            "--data.augment_backend=gpu",
            "--data.gpu_decode=true",
            f"--data.num_workers={a.workers}",
            *(SMOKE_ARGS if a.smoke else ()),
            *([] if a.probes else ["--trainer.callbacks=[]"]),
        ]
        echo = re.compile(rf"^({'|'.join(a.runs)}) (epoch|stopping)|^error:|^Traceback")
        py = [sys.executable, "-m", "lightning_vgg"]
        pending_tests: dict[str, Job] = {}
        for run in a.runs:
            cfg, _ = CONFIGS[run]
            fit = [
                *py,
                "fit",
                "--config",
                cfg,
                *common,
                f"--trainer.precision={a.precision}",
                "--trainer.benchmark=true",
                *(["--model.channels_last=true"] if a.channels_last else []),
                *([f"--trainer.max_epochs={a.epochs}"] if a.epochs else []),
                # last.ckpt of a 1 GB model after every epoch costs minutes; the seed is
                # tested from best.ckpt, the control (one epoch) from last.ckpt
                # (about 3 s per 1 GB save on the H200: every 50 epochs, 5 saves)
                f"--last_checkpoint.every_n_epochs={1 if run == 'control' or a.smoke else 50}",
                # best.ckpt is rewritten at every improvement; without the optimizer's
                # momentum it is half the bytes (test needs only the weights)
                "--checkpoint.save_weights_only=true",
                "--trainer.callbacks+=lightning_vgg.callbacks.EpochProgress",
                f"--trainer.callbacks.name={run}",
                f"--trainer.callbacks.stop_at={fit_deadline:.0f}",
            ]
            job = Job(f"{run}-fit", fit, logs / f"{run}-fit.log", kill_at=fit_deadline + 30)
            job.start(env, say, echo)
            jobs.append(job)
            pending_tests[run] = job

        tests: dict[str, Job] = {}
        compare: Job | None = None
        last_pack = time.time()
        while True:
            now = time.time()
            for run in a.runs:  # known early, so that partial results get packed
                if run not in packer.run_dirs and (rd := run_dir_of(runs_dir, run)):
                    packer.run_dirs[run] = rd
            for run, fit in list(pending_tests.items()):
                if not fit.poll(say):
                    continue
                del pending_tests[run]
                info["runs"][run]["fit"] = fit.record()
                rd = run_dir_of(runs_dir, run)
                ckpt = rd / "checkpoints" / f"{CONFIGS[run][1]}.ckpt" if rd else None
                if ckpt is None or not ckpt.is_file():
                    say(f"{run}: no {CONFIGS[run][1]}.ckpt, not tested")
                    continue
                packer.run_dirs[run] = rd
                test = [
                    *py,
                    "test",
                    "--config",
                    CONFIGS[run][0],
                    f"--ckpt_path={ckpt}",
                    *common,
                    "--trainer.precision=32-true",
                ]
                tests[run] = Job(f"{run}-test", test, logs / f"{run}-test.log", deadline - 25)
                tests[run].start(env, say, echo)
                jobs.append(tests[run])
            for run, test in tests.items():
                if test.rc is None and test.poll(say):
                    info["runs"][run]["test"] = test.record()
            tested = {r for r, t in tests.items() if t.rc == 0}
            if compare is None and {"seed", "control"} <= tested:
                cmp_dir = work / f"compare-{stamp}" / "seed_vs_control"
                cmp_dir.parent.mkdir(parents=True, exist_ok=True)
                good = packer.run_dirs["seed"] / "checkpoints" / f"{CONFIGS['seed'][1]}.ckpt"
                bad = packer.run_dirs["control"] / "checkpoints" / f"{CONFIGS['control'][1]}.ckpt"
                argv_cmp = [
                    *py,
                    "compare",
                    f"--good={good}",
                    f"--bad={bad}",
                    f"--out={cmp_dir}",
                    f"--n_per_class={a.compare_n}",
                    f"--device={'cpu' if a.smoke else 'auto'}",
                ]
                compare = Job("compare", argv_cmp, logs / "compare.log", deadline - 15)
                compare.start(env, say, echo)
                jobs.append(compare)
                packer.compare_dir = cmp_dir
                info["compare"] = {"n_per_class": a.compare_n, "out": "results/seed_vs_control"}
            if compare is not None and compare.rc is None and compare.poll(say):
                info["compare"].update(compare.record())
            if not pending_tests and all(t.rc is not None for t in tests.values()):
                if compare is None:
                    if {"seed", "control"} <= set(a.runs):
                        say("compare skipped: seed or control has no test result")
                    break
                if compare.rc is not None:
                    break
            if now > deadline:
                say("budget spent")
                break
            if now - last_pack >= a.pack_every:
                summarize_runs(info, packer)
                packer.pack()
                last_pack = now
            time.sleep(0.5)
        info["status"] = "done"
    except KeyboardInterrupt as exc:
        info["status"] = f"interrupted ({exc})"
        say(f"interrupted: {exc}")
    except SystemExit as exc:
        info["status"] = f"failed: {exc}"
        say(f"failed: {exc}")
    finally:
        for job in jobs:
            if job.proc is not None and job.proc.poll() is None:
                job.signal(signal.SIGKILL, say, "still running at the end")
                job.poll(say)
        summarize_runs(info, packer)
        failed = [j.name for j in jobs if j.rc not in (0, None)]
        if info["status"] == "done" and failed:
            info["status"] = f"done with failures: {', '.join(failed)}"
        packer.pack()
        for run, entry in info["runs"].items():
            rows = metrics_rows(packer.run_dirs.get(run))
            vals = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
            test = entry.get("test_metrics", {}).get("test/acc")
            say(
                f"{run}: {len(rows)} epochs, max val_acc "
                f"{max(vals) if vals else float('nan'):.4f}, test_acc "
                f"{'-' if test is None else f'{test:.4f}'} ({entry['tested_with']})"
            )
        size = (a.out / TAR_NAME).stat().st_size
        say(
            f"{info['status']}; wall {info['wall_time_s']} s; {a.out / TAR_NAME}: {size} bytes, "
            f"{packer.packs} packs; left out: {info.get('left_out') or 'nothing'}"
        )
    return 0 if info["status"] == "done" else 1


def summarize_runs(info: dict[str, Any], packer: Packer) -> None:
    """Epochs reached, best/last metrics and split identity, into ``info``."""
    splits = {}
    for run, folder in packer.run_dirs.items():
        rows = metrics_rows(folder)
        entry = info["runs"][run]
        entry["run_dir"] = str(folder)
        entry["epochs_done"] = len(rows)
        if rows:
            entry["last_epoch"] = rows[-1]
        test = folder / "test_metrics.json"
        if test.is_file():
            with contextlib.suppress(ValueError):
                entry["test_metrics"] = json.loads(test.read_text(encoding="utf-8"))
        split = folder / "split.csv"
        if split.is_file():
            splits[run] = entry["split_sha256"] = sha256_of(split)
    if len(splits) > 1:
        info["same_split"] = len(set(splits.values())) == 1


if __name__ == "__main__":
    sys.exit(main())
