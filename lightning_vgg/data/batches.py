"""Batches in shared memory: one segment per batch (images, labels and keys), pooled and reused by each loader worker.

:meth:`~lightning_vgg.data.dataset.ImageFiles.__getitems__` writes a batch's images
straight into a :class:`SlotBatch`; in a loader worker its memory comes from a
per-process pool of shared buffers that the main process hands back (a flag at the
end of each buffer) when the last tensor on it is freed.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

__all__ = ["POOL_BYTES", "POOL_SLOTS", "SlotBatch", "batch_storage"]


def _layout(n: int, c: int, h: int, w: int) -> tuple[int, int]:
    """Where a batch's int64 labels and keys start (in int64 elements, 8-byte aligned
    after the ``N x C x H x W`` uint8 images) and the bytes of images + labels + keys."""
    ints_at = -(-(n * c * h * w) // 8)
    return ints_at, (ints_at + 2 * n) * 8


def batch_storage(n: int, c: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, C, H, W)`` uint8 images and ``(2, N)`` int64 (labels, keys) as views of one
    storage, in shared memory when called in a loader worker (as ``default_collate``
    does): the batch then crosses to the main process as one shared segment, one file
    descriptor, instead of one per tensor (each costs a socket round trip in both
    processes)."""
    nbytes = _layout(n, c, h, w)[1]
    if get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(nbytes)
    else:
        storage = torch.UntypedStorage(nbytes)
    return _views(storage, n, c, h, w)


def _views(
    storage: torch.UntypedStorage, n: int, c: int, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    ints_at, _ = _layout(n, c, h, w)
    x = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (n, c, h, w))
    ints = torch.empty(0, dtype=torch.int64).set_(storage, ints_at, (2, n))
    return x, ints


#: A loader worker keeps at most this many shared batch buffers of one size...
POOL_SLOTS = 4
#: ... and at most this many bytes of them in all (a bigger batch is not pooled).
POOL_BYTES = 32 << 20


class _ShmPool:
    """Shared-memory batch buffers that a loader worker reuses once the main process
    has dropped every tensor of the batch it sent in one.

    A fresh segment per batch, as ``default_collate`` makes, is allocated and zeroed
    by the kernel (``fallocate``) and then faults in page by page as the worker writes
    it: on the 2-core VM that was about 2.5 ms per 3 MB batch (20 x 224 px), as
    much as decoding 20 images. A pooled buffer is written in place.

    Reuse is safe by construction: each buffer ends with an int64 flag, set to 1 here
    when the buffer is handed out and back to 0 by the main process only when the
    last tensor or array on its memory is freed (:func:`_rebuild_pooled`). A buffer
    whose flag is still 1 is never written; when none is free (a consumer keeping
    batches, a batch lost at shutdown), the batch gets a fresh segment as before.
    """

    def __init__(self) -> None:
        self.slots: dict[int, list[torch.UntypedStorage]] = {}
        self.bytes = 0

    def take(self, nbytes: int) -> torch.UntypedStorage | None:
        """A free buffer of ``nbytes`` (+ its flag), flagged as in use; or None."""
        slots = self.slots.setdefault(nbytes, [])
        for storage in slots:
            flag = _flag(storage)
            if flag[0] == 0:
                flag[0] = 1
                return storage
        size = nbytes + 8
        if len(slots) >= POOL_SLOTS or self.bytes + size > POOL_BYTES:
            return None
        try:
            storage = torch.UntypedStorage._new_shared(size)
        except RuntimeError:  # /dev/shm full: the unpooled path says so if it fails too
            return None
        self.bytes += size
        slots.append(storage)
        _flag(storage)[0] = 1
        return storage


def _flag(storage: torch.UntypedStorage) -> np.ndarray:
    """The in-use flag at the end of a pooled buffer, as a one-element int64 array."""
    return torch.empty(0, dtype=torch.int64).set_(storage, storage.nbytes() // 8 - 1, (1,)).numpy()


_POOL = _ShmPool()  # one per process; only loader workers use it


class _PooledBatch(list):
    """``[images, labels, keys]`` in a pooled buffer; pickled (worker to main process)
    as the buffer plus its layout, rebuilt by :func:`_rebuild_pooled`."""

    def __init__(self, storage: torch.UntypedStorage, shape: tuple[int, ...], m: int) -> None:
        x, ints = _views(storage, *shape)
        super().__init__([x[:m], ints[0, :m], ints[1, :m]])
        self.storage, self.shape, self.m = storage, shape, m

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_pooled, (self.storage, self.shape, self.m)


class _Lease:
    """Holds a pooled buffer in the main process; clears its flag when freed.

    ``torch.from_numpy`` of an array whose base is the lease keeps the lease alive for
    as long as any tensor, view or array shares that memory (all of them hold the
    storage, the storage holds the array); when the last goes, so does the lease.
    """

    def __init__(self, arr: np.ndarray, flag: np.ndarray) -> None:
        self.arr, self.flag = arr, flag
        self.__array_interface__ = arr.__array_interface__

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit, numpy may be gone
            self.flag[0] = 0  # the worker may now write this buffer again


def _rebuild_pooled(
    storage: torch.UntypedStorage, shape: tuple[int, ...], m: int
) -> list[torch.Tensor]:
    n, c, h, w = shape
    ints_at, nbytes = _layout(n, c, h, w)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,)).numpy()
    mem = torch.from_numpy(np.asarray(_Lease(raw, _flag(storage))))
    x = mem[: n * c * h * w].view(n, c, h, w)
    ints = mem[ints_at * 8 :].view(torch.int64).view(2, n)
    return [x[:m], ints[0, :m], ints[1, :m]]


class SlotBatch(list):
    """The samples :meth:`~lightning_vgg.data.dataset.ImageFiles.__getitems__` returns: their images are already
    the slots of one batch ``x``, with room for labels and keys (``ints``) behind it;
    in a loader worker, in a pooled shared buffer when one is free (:class:`_ShmPool`)."""

    x: torch.Tensor
    ints: torch.Tensor
    storage: torch.UntypedStorage | None

    @classmethod
    def allocate(cls, n: int, size: int) -> SlotBatch:
        slots = cls()
        shape = (n, 3, size, size)
        storage = None
        if get_worker_info() is not None:
            storage = _POOL.take(_layout(*shape)[1])
        if storage is None:
            slots.x, slots.ints = batch_storage(*shape)
        else:
            slots.x, slots.ints = _views(storage, *shape)
        slots.storage = storage
        return slots

    def collate(self) -> list[torch.Tensor] | None:
        kept = [i for i, b in enumerate(self) if b is not None]
        if not kept:
            if self.storage is not None:
                _flag(self.storage)[0] = 0  # nothing is sent: the buffer is free again
            return None
        m = len(kept)
        for j, i in enumerate(kept):  # close the gaps of images that failed (j <= i)
            if i != j:
                self.x[j].copy_(self.x[i])
        self.ints[0, :m] = torch.tensor([self[i][1] for i in kept])
        self.ints[1, :m] = torch.tensor([self[i][2] for i in kept])
        if self.storage is not None:
            return _PooledBatch(self.storage, tuple(self.x.shape), m)
        return [self.x[:m], self.ints[0, :m], self.ints[1, :m]]
