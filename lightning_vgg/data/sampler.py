"""Keras-style endless shuffled batch stream, cut into Lightning epochs of fixed steps."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
from torch.utils.data import Sampler

#: One sample request: (dataset index, draw key). The key numbers every draw of the
#: stream once, so augmentation parameters can be a pure function of (seed, key).
Draw = tuple[int, int]
Exhausted = Literal["repeat", "stop"]


class EpochHandle:
    """What Lightning finds at ``batch_sampler.sampler``: forwards ``set_epoch``.

    It holds no samples itself; iterating the batch sampler is what draws batches.
    """

    def __init__(self, owner: KerasBatchSampler) -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the batch sampler that owns this handle."""
        self._owner.set_epoch(epoch)


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
        exhausted: What happens when ``steps`` asks for more batches than the data
            holds. ``repeat`` walks on into the next pass (Keras 3, and this
            project's default). ``stop`` ends the stream after one pass, as tf.keras
            2.x did: its ``DataHandler.catch_stop_iteration`` logs "Your input ran
            out of data; interrupting training" when an iterator over a
            ``flow_from_directory`` Sequence is used up and fit stops. The seed's
            control (6 images, batch 20, 80 steps) therefore trained one step.
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
        exhausted: Exhausted = "repeat",
    ) -> None:
        if exhausted not in ("repeat", "stop"):
            raise ValueError(f"exhausted must be 'repeat' or 'stop', got {exhausted!r}")
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
        self.exhausted = exhausted
        # Lightning advances samplers through ``dataloader.sampler`` and
        # ``dataloader.batch_sampler.sampler`` only, never through the batch sampler
        # itself (lightning_fabric.utilities.data._set_sampler_epoch). Without this
        # handle every epoch would replay epoch 0's batches and augmentation draws.
        self.sampler = EpochHandle(self)

    def set_epoch(self, epoch: int) -> None:
        """Move the stream to epoch ``epoch`` (Lightning calls it through ``.sampler``)."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = epoch

    @property
    def steps_per_epoch(self) -> int:
        """Batches an epoch asks for (``steps``, or one pass)."""
        return self.steps if self.steps is not None else self.per_pass

    def _end(self) -> int:
        """One past the last stream position of this epoch."""
        end = (self.epoch + 1) * self.steps_per_epoch
        return min(end, self.per_pass) if self.exhausted == "stop" else end

    def __len__(self) -> int:
        return max(0, self._end() - self.epoch * self.steps_per_epoch)

    def is_exhausted(self) -> bool:
        """True once the current epoch used up a ``stop`` stream: training must end."""
        return self.exhausted == "stop" and self._end() >= self.per_pass

    def _order(self, pass_idx: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, pass_idx]).permutation(self.n)

    def __iter__(self) -> Iterator[list[Draw]]:
        start = self.epoch * self.steps_per_epoch
        cached: tuple[int, np.ndarray] | None = None
        for pos in range(start, self._end()):
            pass_idx, b = divmod(pos, self.per_pass)
            if cached is None or cached[0] != pass_idx:
                cached = (pass_idx, self._order(pass_idx))
            lo = b * self.batch_size
            idx = cached[1][lo : lo + self.batch_size]
            draws = [(int(i), pass_idx * self.n + lo + j) for j, i in enumerate(idx)]
            yield draws[self.rank :: self.num_replicas]
