"""Tests for the seeded, stratified train/val/test split and its CSV form."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from lightning_vgg.data.split import (
    SPLITS,
    make_split,
    read_split_csv,
    split_counts,
    write_split_csv,
)
from lightning_vgg.errors import UserError


def _items(cats: int, dogs: int) -> list[tuple[str, int]]:
    return [(f"PetImages/Cat/{i}.jpg", 0) for i in range(cats)] + [
        (f"PetImages/Dog/{i}.jpg", 1) for i in range(dogs)
    ]


def _tally(rows: list[tuple[str, int, str]]) -> Counter[tuple[str, int]]:
    return Counter((split, label) for _, label, split in rows)


def _expected(
    train: tuple[int, int], val: tuple[int, int], test: tuple[int, int]
) -> Counter[tuple[str, int]]:
    """Per-class counts (cats, dogs) for each split, in ``_tally``'s form."""
    return Counter(
        {
            (split, label): n
            for split, pair in zip(SPLITS, (train, val, test), strict=True)
            for label, n in enumerate(pair)
        }
    )


@pytest.fixture(scope="module")
def full() -> list[tuple[str, int]]:
    """The real data's shape: 12,499 usable images per class."""
    return _items(12_499, 12_499)


def test_default_split_on_the_real_counts(full: list[tuple[str, int]]) -> None:
    rows = make_split(full)
    assert _tally(rows) == _expected(train=(8500, 8500), val=(2000, 2000), test=(1999, 1999))
    assert sorted((path, label) for path, label, _ in rows) == sorted(full)  # disjoint, complete


def test_rows_are_ordered_by_split_then_path(full: list[tuple[str, int]]) -> None:
    rows = make_split(full[:3000] + full[-3000:], (0.5, 0.25, None))
    splits = [split for _, _, split in rows]
    assert splits == sorted(splits, key=["train", "val", "test"].index)
    for name in ("train", "val", "test"):
        paths = [path for path, _, split in rows if split == name]
        assert paths == sorted(paths)


def test_same_seed_same_split_whatever_the_input_order(full: list[tuple[str, int]]) -> None:
    shuffled = list(full)
    random.Random(3).shuffle(shuffled)
    assert make_split(shuffled, seed=7) == make_split(full, seed=7)
    assert make_split(full, seed=7) != make_split(full, seed=8)


def test_known_assignment_is_stable() -> None:
    # Pinned so an accidental change to the algorithm (or numpy's stream) is noticed.
    assert make_split(_items(4, 4), (4, 2, None), seed=42) == [
        ("PetImages/Cat/2.jpg", 0, "train"),
        ("PetImages/Cat/3.jpg", 0, "train"),
        ("PetImages/Dog/2.jpg", 1, "train"),
        ("PetImages/Dog/3.jpg", 1, "train"),
        ("PetImages/Cat/1.jpg", 0, "val"),
        ("PetImages/Dog/0.jpg", 1, "val"),
        ("PetImages/Cat/0.jpg", 0, "test"),
        ("PetImages/Dog/1.jpg", 1, "test"),
    ]


def test_fractions() -> None:
    rows = make_split(_items(500, 500), (0.7, 0.15, 0.15))
    assert _tally(rows) == _expected(train=(350, 350), val=(75, 75), test=(75, 75))


def test_fractions_summing_to_one_lose_nothing_to_rounding() -> None:
    assert split_counts((0.7, 0.2, 0.1), 999) == (699, 200, 100)
    assert sum(split_counts((1 / 3, 1 / 3, 1 / 3), 1000)) == 1000


def test_fractions_below_one_leave_images_out() -> None:
    rows = make_split(_items(500, 500), (0.5, 0.2, 0.1))
    assert Counter(split for _, _, split in rows) == {"train": 500, "val": 200, "test": 100}


def test_stratification_keeps_class_shares() -> None:
    rows = make_split(_items(300, 700), (500, 200, None))
    assert _tally(rows) == _expected(train=(150, 350), val=(60, 140), test=(90, 210))


def test_largest_remainder_totals_are_exact() -> None:
    rows = make_split(_items(7, 6), (5, 4, None))
    counts = Counter(split for _, _, split in rows)
    assert counts == {"train": 5, "val": 4, "test": 4}
    tally = _tally(rows)
    assert tally[("train", 0)] + tally[("val", 0)] + tally[("test", 0)] == 7


def test_test_count_is_capped_or_none_means_the_rest() -> None:
    assert split_counts((17000, 4000, 4000), 24_998) == (17000, 4000, 3998)
    assert split_counts((10, 5, None), 100) == (10, 5, 85)
    assert split_counts((10, 5, 20), 100) == (10, 5, 20)


@pytest.mark.parametrize(
    ("sizes", "n", "expected"),
    [
        ((0, 0, None), 10, (0, 0, 10)),
        ((10, 0, 0), 10, (10, 0, 0)),
        ((0.8, 0, 0.2), 10, (8, 0, 2)),
        ((0, 0, 0), 10, (0, 0, 0)),
        ((0, 0, None), 0, (0, 0, 0)),
        ((1.0, 0, 0), 10, (10, 0, 0)),
    ],
)
def test_zero_sizes(sizes: tuple, n: int, expected: tuple[int, int, int]) -> None:
    assert split_counts(sizes, n) == expected


def test_empty_input_and_empty_splits() -> None:
    assert make_split([], (0, 0, None)) == []
    rows = make_split(_items(5, 5), (10, 0, 0))
    assert {split for _, _, split in rows} == {"train"} and len(rows) == 10


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ((17000, 4000, 4000), r"split of 17000 train \+ 4000 val images from only 100 "),
        ((0.7, 10, None), "mix counts and fractions"),
        ((0.7, 0.4, None), "fractions sum to 1.1"),
        ((-1, 0, None), "non-negative"),
        ((None, 0, None), "train and val split sizes are required"),
        ((2.5, 0, None), "neither a fraction"),
        ((1, 2), r"must be \(train, val, test\)"),
    ],
)
def test_bad_sizes(sizes: tuple, message: str) -> None:
    with pytest.raises(UserError, match=message):
        make_split(_items(50, 50), sizes)


def test_bad_items_and_seed() -> None:
    with pytest.raises(UserError, match=r"duplicate image path in split input: a\.jpg"):
        make_split([("a.jpg", 0), ("a.jpg", 1)], (0, 0, None))
    with pytest.raises(UserError, match="seed"):
        make_split(_items(2, 2), (0, 0, None), seed=-1)


def test_csv_round_trip(tmp_path: Path) -> None:
    rows = make_split([*_items(20, 20), ("odd, name \u00e9.jpg", 1)], (20, 10, None))
    write_split_csv(tmp_path / "split.csv", rows)
    assert (tmp_path / "split.csv").read_text().startswith("path,label,split\n")
    assert read_split_csv(tmp_path / "split.csv") == rows


def test_csv_with_bom_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_bytes("\ufeffpath,label,split\r\na.jpg,0,train\r\n\r\nb.jpg,1,test\r\n".encode())
    assert read_split_csv(path) == [("a.jpg", 0, "train"), ("b.jpg", 1, "test")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "bad header in split file .*s.csv: expected path,label,split, got an empty file"),
        ("file,label,split\n", "bad header .* got file,label,split"),
        ("path,label,split\na.jpg,cat,train\n", r"line 2: bad label 'cat'"),
        ("path,label,split\na.jpg,2,train\n", r"line 2: bad label '2'"),
        ("path,label,split\na.jpg,0,validation\n", r"line 2: bad split 'validation'"),
        ("path,label,split\na.jpg,0\n", "line 2: expected 3 columns, got 2"),
        ("path,label,split\na.jpg,0,train\na.jpg,1,val\n", "line 3: duplicate path a.jpg"),
        ("path,label,split\n,0,train\n", "line 2: empty path"),
    ],
)
def test_bad_csv(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "s.csv"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        read_split_csv(path)


def test_missing_csv(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"split file not found: .*nope\.csv"):
        read_split_csv(tmp_path / "nope.csv")
