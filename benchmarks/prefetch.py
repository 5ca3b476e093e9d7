"""A device-side prefetcher for benchmarks: the GPU hooks run one batch ahead in a thread."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from lightning_vgg.data.datamodule import CatsDogsDataModule


class DevicePrefetcher:
    """Run ``transfer_batch_to_device`` + ``on_after_batch_transfer`` one batch ahead.

    A background thread decodes and warps batch k+1 on its own CUDA stream while the
    main thread's stream trains on batch k, so host-side work inside the decode (nvJPEG's
    Huffman stage runs on the CPU) overlaps the training step instead of adding to it.
    Measured by bench.py as ``ours+thread``; inside Lightning this would be an
    iterable the data module returns, yielding batches that are already on the device.
    """

    def __init__(self, loader: Any, dm: CatsDogsDataModule, device: torch.device, depth: int = 2):
        import queue
        import threading

        self.loader, self.dm, self.device = loader, dm, device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
                for b in self.loader:
                    if self.stop.is_set():
                        return
                    b = self.dm.transfer_batch_to_device(b, self.device, 0)
                    b = self.dm.on_after_batch_transfer(b, 0)
                    event = None
                    if self.cuda:
                        event = torch.cuda.Event()
                        event.record(self.stream)
                    self.queue.put((b, event))
        except BaseException as exc:  # handed to the consumer
            self.error = exc
        self.queue.put(None)

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> Any:
        item = self.queue.get()
        if item is None:
            if self.error is not None:
                raise self.error
            raise StopIteration
        batch, event = item
        if event is None:
            return batch
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in batch or ():
            if isinstance(t, torch.Tensor) and t.is_cuda:
                t.record_stream(current)  # allocated on the side stream, used on this one
        return batch

    def close(self) -> None:
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.1)
            except Exception:
                continue
