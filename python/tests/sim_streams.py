"""A simulated device for testing kvtier.transfer's stream ordering without a GPU.

``SimStreams`` implements the streams interface of :mod:`kvtier.transfer.streams` with
deferred execution: work launched on a stream is queued, not run. It runs only when the host
synchronises (``synchronize``, or the test's ``drain``), and then in an order chosen by a
policy among everything the recorded events allow:

- ``"side_first"``: side-stream work runs as early as it can (before compute work queued
  earlier, unless a wait forbids it): catches a copy that reads blocks before the compute
  stream has written them, or writes them while compute still reads the old ones;
- ``"compute_first"``: compute work runs as early as it can: catches attention reading
  blocks a load has not written yet;
- ``"random"``: a seeded random interleaving.

The caches are CPU tensors, so the work really moves data: a missing wait shows up as wrong
bytes. Every queued and executed operation is logged for order assertions.
"""

from __future__ import annotations

import random
import threading

import torch


class SimEvent:
    """An event; ``record`` points it at a queued record operation."""

    _n = 0

    def __init__(self):
        SimEvent._n += 1
        self.id = SimEvent._n
        self.op: dict | None = None  # the latest record operation


class SimStream:
    def __init__(self, name: str):
        self.name = name
        self.queue: list[dict] = []


class DeadlockError(RuntimeError):
    pass


class SimStreams:
    """Deferred-execution streams (see the module doc)."""

    def __init__(self, policy: str = "side_first", seed: int = 0, device_staging: bool = True):
        self.policy = policy
        self.device_staging = device_staging
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._compute = SimStream("compute")
        self.streams = [self._compute]
        #: (stream, kind, detail) in issue order.
        self.issued: list[tuple[str, str, str]] = []
        #: (stream, kind, detail) in execution order.
        self.executed: list[tuple[str, str, str]] = []

    # -- the streams interface ------------------------------------------------------------

    def compute(self):
        return self._compute

    def new_stream(self):
        with self._lock:
            s = SimStream(f"side{len(self.streams)}")
            self.streams.append(s)
            return s

    def event(self):
        return SimEvent()

    def record(self, event, stream):
        with self._lock:
            op = {"kind": "record", "event": event, "done": False, "what": f"ev{event.id}"}
            event.op = op
            self._push(stream, op)

    def wait(self, stream, event):
        with self._lock:
            # Like CUDA: the wait is on the record issued last before this call (none: no-op).
            self._push(stream, {"kind": "wait", "on": event.op, "done": False, "what": f"ev{event.id}"})

    def launch(self, stream, what, fn):
        with self._lock:
            self._push(stream, {"kind": "fn", "fn": fn, "done": False, "what": what})

    def synchronize(self, event):
        with self._lock:
            op = event.op
            if op is None:
                return
            while not op["done"]:
                self._step(f"host waits for ev{event.id}")

    def empty(self, nbytes, stream):
        return torch.empty(nbytes, dtype=torch.uint8)

    def index(self, ids):
        return ids.clone()

    # -- test helpers -----------------------------------------------------------------------

    def drain(self):
        """Runs everything queued (the host waits for the whole device)."""
        with self._lock:
            while any(s.queue for s in self.streams):
                self._step("drain")

    def executed_names(self, stream_name=None):
        return [w for s, k, w in self.executed if k == "fn" and (stream_name is None or s == stream_name)]

    # -- internals ----------------------------------------------------------------------------

    def _push(self, stream, op):
        op["stream"] = stream.name
        stream.queue.append(op)
        self.issued.append((stream.name, op["kind"], op["what"]))

    def _runnable(self, s):
        if not s.queue:
            return False
        op = s.queue[0]
        return op["kind"] != "wait" or op["on"] is None or op["on"]["done"]

    def _step(self, why):
        ready = [s for s in self.streams if self._runnable(s)]
        if not ready:
            pending = {s.name: [o["what"] for o in s.queue] for s in self.streams if s.queue}
            raise DeadlockError(f"{why}: nothing can run; queued: {pending}")
        side = [s for s in ready if s is not self._compute]
        comp = [s for s in ready if s is self._compute]
        if self.policy == "side_first":
            pick = side[0] if side else comp[0]
        elif self.policy == "compute_first":
            pick = comp[0] if comp else side[0]
        else:
            pick = self._rng.choice(ready)
        op = pick.queue.pop(0)
        if op["kind"] == "fn":
            with torch.inference_mode():
                op["fn"]()
        op["done"] = True
        self.executed.append((pick.name, op["kind"], op["what"]))
