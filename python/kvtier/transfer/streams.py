"""Where transfer work runs, and how it is ordered: the stream/event model of the pipeline.

:class:`~.pipeline.Transfer` issues every copy through a *streams* object with CUDA's
model: work ``launch``-ed on a stream runs in issue order; ``record(event, stream)`` marks
the point reached by the work issued to ``stream`` so far; ``wait(stream, event)`` makes
work issued to ``stream`` afterwards run only once that point is done (waiting on an event
never recorded is a no-op, as in CUDA); ``synchronize(event)`` blocks the host. The compute
stream is :meth:`compute` (the calling thread's current stream: vLLM's forward pass).

- :class:`CudaStreams`: real CUDA streams and events (copies through a device buffer).
- :class:`ThreadStreams`: CPU caches; the compute stream is the calling thread itself
  (work runs inline) and each side stream is one worker thread, so the same ordering code
  gives background copies that never race the forward pass.

Tests inject their own implementation (a simulator that runs side-stream work as early or
as late as the recorded events allow) to check the ordering without a GPU.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch


class TransferError(RuntimeError):
    """A copy issued to a stream failed (raised where the host waits for it)."""


class CudaStreams:
    """CUDA streams and events of one device; device buffers stage the host copies."""

    #: Copies between host chunks and the caches go through a buffer on the device, so the
    #: host side is one large DMA per chunk run.
    device_staging = True

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def compute(self) -> Any:
        """The calling thread's current stream (the forward pass's)."""
        return torch.cuda.current_stream(self.device)

    def new_stream(self) -> Any:
        """A side stream for copies."""
        return torch.cuda.Stream(device=self.device)

    def event(self) -> Any:
        """A new event."""
        return torch.cuda.Event()

    def record(self, event: Any, stream: Any) -> None:
        """Marks the work issued to ``stream`` so far."""
        event.record(stream)

    def wait(self, stream: Any, event: Any) -> None:
        """Work issued to ``stream`` from now on waits for ``event`` (on the device)."""
        stream.wait_event(event)

    def launch(self, stream: Any, what: str, fn: Callable[[], None]) -> None:
        """Runs ``fn`` with ``stream`` current: the copies it issues go to ``stream``. Under
        inference mode, like every copy of the transfers (vLLM's caches are inference
        tensors, and the caller may be outside the forward pass)."""
        with torch.cuda.device(self.device), torch.cuda.stream(stream), torch.inference_mode():
            fn()

    def synchronize(self, event: Any) -> None:
        """Blocks the host until ``event`` is done."""
        event.synchronize()

    def empty(self, nbytes: int, stream: Any) -> torch.Tensor:
        """A device byte buffer owned by ``stream`` (freed memory is reused in its order)."""
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def index(self, ids: torch.Tensor) -> torch.Tensor:
        """Host block ids as a device tensor, copied on the current stream without blocking
        the host (from pinned memory)."""
        return ids.pin_memory().to(self.device, non_blocking=True)


class _Event:
    """A :class:`ThreadStreams` event: set when the stream reaches it."""

    __slots__ = ("done", "error", "recorded")

    def __init__(self):
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.recorded = False


class _Host:
    """The compute stream of :class:`ThreadStreams`: the calling thread."""

    name = "compute"


class _Worker:
    """A side stream of :class:`ThreadStreams`: one thread running its work in order. After
    a failure the rest of its work is skipped and its events carry the error."""

    def __init__(self, name: str):
        self.name = name
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: tuple) -> None:
        self._q.put(item)

    def close(self) -> None:
        self._q.put(None)

    def _run(self) -> None:
        with torch.inference_mode():  # the caches may be inference tensors (vLLM's forward)
            while True:
                item = self._q.get()
                if item is None:
                    return
                kind, x = item
                if kind == "fn":
                    if self._error is None:
                        try:
                            x()
                        except BaseException as e:  # noqa: BLE001 - surfaced at the next wait
                            self._error = e
                elif kind == "record":
                    x.error = self._error
                    x.done.set()
                else:  # "wait"
                    x.done.wait()


class ThreadStreams:
    """Streams for caches in host memory: the compute stream is the calling thread (work
    launched on it runs inline), each side stream a worker thread."""

    device_staging = False

    def __init__(self):
        self._host = _Host()
        self._workers: list[_Worker] = []

    def compute(self) -> Any:
        """The calling thread."""
        return self._host

    def new_stream(self) -> Any:
        """A worker thread."""
        w = _Worker(f"kvtier-copy-{len(self._workers)}")
        self._workers.append(w)
        return w

    def event(self) -> Any:
        """A new event."""
        return _Event()

    def record(self, event: Any, stream: Any) -> None:
        """Marks the work issued to ``stream`` so far (on the compute stream: all of it is done)."""
        event.recorded = True
        if stream is self._host:
            event.done.set()
        else:
            stream.put(("record", event))

    def wait(self, stream: Any, event: Any) -> None:
        """Later work on ``stream`` waits for ``event`` (the compute stream waits at once)."""
        if not event.recorded:
            return
        if stream is self._host:
            self.synchronize(event)
        else:
            stream.put(("wait", event))

    def launch(self, stream: Any, what: str, fn: Callable[[], None]) -> None:
        """Runs ``fn`` inline (compute stream) or queues it on the worker."""
        if stream is self._host:
            with torch.inference_mode():
                fn()
        else:
            stream.put(("fn", fn))

    def synchronize(self, event: Any) -> None:
        """Blocks until ``event``; TransferError if work before it failed."""
        if not event.recorded:
            return
        event.done.wait()
        if event.error is not None:
            raise TransferError(f"a background KV copy failed: {event.error}") from event.error

    def empty(self, nbytes: int, stream: Any) -> torch.Tensor:
        """A host byte buffer."""
        return torch.empty(nbytes, dtype=torch.uint8)

    def index(self, ids: torch.Tensor) -> torch.Tensor:
        """Block ids as they are (the caches are in host memory)."""
        return ids

    def close(self) -> None:
        """Stops the worker threads once their queued work is done."""
        for w in self._workers:
            w.close()
        self._workers.clear()
