"""Keras-style endless shuffled batch stream, cut into Lightning epochs of fixed steps."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

#: One sample request: (dataset index, draw key). The key numbers every draw of the
#: stream once, so augmentation parameters can be a pure function of (seed, key).
Draw = tuple[int, int]


class KerasBatchSampler(Sampler[list[Draw]]):
    """Batches as Keras's ``flow_from_directory`` iterator yields them.

    Keras walks an endless stream of passes over the data, each pass a fresh
    permutation cut into ``ceil(n / batch_size)`` batches (the last one short), and
    ``steps_per_epoch`` just takes the next batches of that stream. The seed takes 80
    batches of 20 per epoch, so an "epoch" sees 1,600 of 17,000 images, and the
    control's 6 images come back 80 times per epoch. Epoch ``e`` covers stream
    positions ``[e * steps, (e + 1) * steps)``, which makes resuming exact.

    Under DDP every rank cuts the same global batch and keeps its own slice
    (images ``rank, rank + k, ...``), so a run on k ranks sees exactly the images a
    single process would. Every rank yields the same number of batches; full batches
    split evenly when ``batch_size`` is a multiple of k (the data module insists on
    that for training), and a short last batch splits as evenly as it can: with
    fewer images than ranks, the last ranks get an empty list, which the data
    module turns into an empty training batch so that rank still joins the step.

    Args:
        n: Dataset size.
        batch_size: Global batch size.
        steps: Batches per epoch; ``None`` means one full pass per epoch.
        shuffle: Draw a new permutation per pass (Keras's default) or keep order.
        seed: Base seed of the permutations.
        num_replicas: DDP world size.
        rank: This process's rank.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        steps: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if n <= 0:
            raise ValueError("cannot sample batches from an empty split")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not one of {num_replicas} replicas")
        self.n = n
        self.batch_size = batch_size
        self.steps = steps
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.per_pass = math.ceil(n / batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps if self.steps is not None else self.per_pass

    def _order(self, pass_idx: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, pass_idx]).permutation(self.n)

    def __iter__(self) -> Iterator[list[Draw]]:
        start = self.epoch * len(self)
        cached: tuple[int, np.ndarray] | None = None
        for pos in range(start, start + len(self)):
            pass_idx, b = divmod(pos, self.per_pass)
            if cached is None or cached[0] != pass_idx:
                cached = (pass_idx, self._order(pass_idx))
            lo = b * self.batch_size
            idx = cached[1][lo : lo + self.batch_size]
            draws = [(int(i), pass_idx * self.n + lo + j) for j, i in enumerate(idx)]
            yield draws[self.rank :: self.num_replicas]
