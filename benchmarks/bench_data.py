"""The benchmark's images: find the archive, extract and scan it once, lay the splits out
as class folders for the Keras and torchvision peers, and build data modules on it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timing import cpu_count

ROOT = Path(__file__).resolve().parent.parent
SPLIT = (0.6, 0.2, 0.2)


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
