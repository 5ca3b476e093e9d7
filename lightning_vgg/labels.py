"""Class names, split rows and the one rule that reads a label from a file's path.

Every part of the project that names a class, holds a row of ``split.csv`` or guesses
a label from where an image lies uses this module, so the rules cannot drift apart
(``explain`` once accepted ``cats.1.jpg`` where the data scan did not).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

#: Label index -> name, as in the Keras experiment: cat = 0, dog = 1.
CLASS_NAMES = ("cat", "dog")
#: Folder names that label the images below them.
CLASS_DIRS = {"cat": 0, "cats": 0, "dog": 1, "dogs": 1}
#: Kaggle's flat ``train/`` layout: the label starts the file name (``cat.0.jpg``).
KAGGLE_NAME = re.compile(r"^(cat|dog)[._-]", re.IGNORECASE)
#: How many parent folders :func:`label_from_path` looks at.
FOLDER_DEPTH = 3


class SplitRow(NamedTuple):
    """One line of ``split.csv``: an image, its label and the split it belongs to."""

    path: str
    label: int
    split: str


def label_from_name(name: str) -> int | None:
    """The label a Kaggle file name carries (``cat.0.jpg`` -> 0), else ``None``."""
    match = KAGGLE_NAME.match(name)
    return CLASS_NAMES.index(match.group(1).lower()) if match else None


def label_from_folder(name: str) -> int | None:
    """The label a class folder name carries (``Dog``, ``cats``), else ``None``."""
    return CLASS_DIRS.get(name.lower())


def label_from_path(path: str | Path) -> int | None:
    """The true label of an image from its name or its nearest class folder, if any.

    The same rule as the data scan's: a Kaggle name first, then the closest of the
    last few parent folders that is a class folder.
    """
    p = Path(path)
    label = label_from_name(p.name)
    if label is not None:
        return label
    for part in reversed(p.parent.parts[-FOLDER_DEPTH:]):
        label = label_from_folder(part)
        if label is not None:
            return label
    return None
