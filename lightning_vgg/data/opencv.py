"""OpenCV's thread count, set to one on first use rather than as an import side effect."""

from __future__ import annotations

import functools

import cv2


@functools.cache
def use_one_thread() -> None:
    """Give OpenCV one thread in this process; call before any OpenCV work (cheap after once).

    It must happen before OpenCV starts its thread pool. DataLoader workers inherit
    the setting (and this cache) when they fork: two workers with a pool each fight
    over the cores (2 here), and a pthreads pool does not survive fork (a worker
    calling ``cv2.setNumThreads(1)`` after the parent had used the pool hung inside
    OpenCV). Every function of ``lightning_vgg.data`` that calls OpenCV calls this
    first, so the parent's first OpenCV call already runs single-threaded.
    """
    cv2.setNumThreads(1)
