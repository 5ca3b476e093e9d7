"""Train/val/test splits: seeded, class-stratified assignment and its CSV form."""

from __future__ import annotations

import csv
import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lightning_vgg.errors import UserError
from lightning_vgg.fileio import write_csv
from lightning_vgg.labels import SplitRow

SPLITS = ("train", "val", "test")
LABELS = (0, 1)  # cat, dog
CSV_HEADER = ("path", "label", "split")

# (train, val, test): counts or fractions; test None means "whatever is left".
SplitSizes = tuple[float | int, float | int, float | int | None]
DEFAULT_SIZES: SplitSizes = (17000, 4000, 4000)  # the Keras experiment's split


def _is_fraction(value: float | int) -> bool:
    return isinstance(value, float) and value <= 1.0


def split_counts(sizes: SplitSizes, n: int) -> tuple[int, int, int]:
    """Turn requested sizes into exact train/val/test counts for ``n`` images.

    Train and val are hard requirements; test is best effort, because the Keras
    default asks for 25,000 images and the real data has 24,998 usable ones: the
    test split simply takes what is left (3,998).

    Args:
        sizes: All counts (ints) or all fractions of ``n`` (floats in [0, 1] summing
            to at most 1); zero fits either kind. Test None means the rest; fractions
            summing to 1 also give test the rest, so rounding never loses an image.
        n: How many images there are.

    Returns:
        ``(train, val, test)`` with ``train + val + test <= n``.

    Raises:
        UserError: Invalid sizes, or not enough images for train and val.
    """
    if len(sizes) != 3:
        raise UserError(f"split sizes must be (train, val, test), got {sizes!r}")
    if sizes[0] is None or sizes[1] is None:
        raise UserError(f"train and val split sizes are required, got {sizes!r}")
    given = [s for s in sizes if s is not None]
    for s in given:
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or s < 0:
            raise UserError(f"split sizes must be non-negative numbers, got {sizes!r}")
        if isinstance(s, float) and s > 1.0 and not s.is_integer():
            raise UserError(f"split size {s} is neither a fraction (<= 1) nor a count")
    nonzero = [s for s in given if s != 0]
    fractions = [_is_fraction(s) for s in nonzero]
    if any(fractions) and not all(fractions):
        raise UserError(f"split sizes mix counts and fractions: {sizes!r}; use one kind")
    train, val, test = sizes
    if nonzero and all(fractions):
        total = sum(given)
        if total > 1.0 + 1e-9:
            raise UserError(f"split fractions sum to {total:g}, more than 1: {sizes!r}")
        train_n = min(math.floor(train * n + 0.5), n)
        val_n = min(math.floor(val * n + 0.5), n - train_n)
        rest = n - train_n - val_n
        if test is None or total > 1.0 - 1e-9:
            return train_n, val_n, rest
        return train_n, val_n, min(math.floor(test * n + 0.5), rest)
    train_n, val_n = int(train), int(val)
    if train_n + val_n > n:
        raise UserError(
            f"cannot make a split of {train_n} train + {val_n} val images "
            f"from only {n} usable images; lower data.split sizes"
        )
    rest = n - train_n - val_n
    return train_n, val_n, rest if test is None else min(int(test), rest)


def _largest_remainder(total: int, pools: Sequence[int]) -> list[int]:
    """Share ``total`` across pools in proportion to their sizes, summing exactly.

    Integer arithmetic keeps it exact and identical on every machine; ties go to
    the lower class index.
    """
    size = sum(pools)
    if size == 0:
        return [0] * len(pools)
    quotas = [total * p // size for p in pools]
    remainders = [total * p % size for p in pools]
    order = sorted(range(len(pools)), key=lambda i: (-remainders[i], i))
    for i in order[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


def make_split(
    items: Sequence[tuple[str, int]],
    sizes: SplitSizes = DEFAULT_SIZES,
    seed: int = 42,
) -> list[tuple[str, int, str]]:
    """Assign images to train/val/test, stratified by class and reproducible from ``seed``.

    Each class is shuffled on its own and each split takes from every class in
    proportion to what that class has left (largest-remainder rounding), so class
    balance is the same in all three splits. Input order does not matter: items are
    sorted first, so the same files and seed give the same split on any machine.

    Args:
        items: ``(path, label)`` pairs; paths must be unique.
        sizes: Train, val and test sizes, as for ``split_counts``.
        seed: Seed for ``numpy.random.default_rng``.

    Returns:
        ``(path, label, split)`` rows sorted by split (train, val, test) then path;
        images beyond the requested sizes are left out.

    Raises:
        UserError: Duplicate paths, a bad seed, or sizes that cannot be met.
    """
    ordered = sorted((str(path), int(label)) for path, label in items)
    for (a, _), (b, _) in itertools.pairwise(ordered):
        if a == b:
            raise UserError(f"duplicate image path in split input: {a}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise UserError(f"split seed must be a non-negative integer, got {seed!r}")
    counts = split_counts(sizes, len(ordered))

    classes = sorted({label for _, label in ordered})
    by_class = {c: [path for path, label in ordered if label == c] for c in classes}
    rng = np.random.default_rng(seed)
    shuffled = {c: [by_class[c][i] for i in rng.permutation(len(by_class[c]))] for c in classes}

    left = {c: len(by_class[c]) for c in classes}
    taken = dict.fromkeys(classes, 0)
    rows: list[tuple[str, int, str]] = []
    for split, count in zip(SPLITS, counts, strict=True):
        shares = _largest_remainder(count, [left[c] for c in classes])
        for c, share in zip(classes, shares, strict=True):
            picked = shuffled[c][taken[c] : taken[c] + share]
            rows.extend(sorted((path, c, split) for path in picked))
            taken[c] += share
            left[c] -= share
    order = {name: i for i, name in enumerate(SPLITS)}
    rows.sort(key=lambda row: (order[row[2]], row[0]))
    return rows


def write_split_csv(path: str | os.PathLike[str], rows: Sequence[tuple[str, int, str]]) -> None:
    """Save a split so a later run (or a reader of the results) sees exactly the same files."""
    write_csv(path, CSV_HEADER, rows)


def read_split_csv(path: str | os.PathLike[str]) -> list[SplitRow]:
    """Load a split written by ``write_split_csv`` (or by hand), checking every row.

    A hand-edited file is a likely input, so problems are reported with the line
    number rather than surfacing later as a confusing training error.

    Raises:
        UserError: Missing file, wrong header, bad label or split, or duplicate paths.
    """
    target = Path(path)
    try:
        # utf-8-sig: spreadsheet programs like to prepend a byte-order mark.
        with open(target, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or tuple(h.strip() for h in header) != CSV_HEADER:
                raise UserError(
                    f"bad header in split file {target}: expected {','.join(CSV_HEADER)}, "
                    f"got {','.join(header) if header else 'an empty file'}"
                )
            rows: list[SplitRow] = []
            seen: set[str] = set()
            for record in reader:
                if not record:
                    continue  # blank line
                where = f"split file {target} line {reader.line_num}"
                if len(record) != 3:
                    raise UserError(f"{where}: expected 3 columns, got {len(record)}")
                file, label_text, split = record[0], record[1].strip(), record[2].strip()
                if not file:
                    raise UserError(f"{where}: empty path")
                if label_text not in {str(label) for label in LABELS}:
                    raise UserError(f"{where}: bad label {label_text!r} (expected 0 or 1)")
                if split not in SPLITS:
                    raise UserError(f"{where}: bad split {split!r} (expected train, val or test)")
                if file in seen:
                    raise UserError(f"{where}: duplicate path {file}")
                seen.add(file)
                rows.append(SplitRow(file, int(label_text), split))
    except FileNotFoundError as exc:
        raise UserError(f"split file not found: {target}") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read split file {target}: {exc}") from exc
    return rows
