"""The connector's own cost: wall time spent inside each vLLM hook, and the share of the
steps it ran in that this is.

vLLM calls the hooks on its critical path (the scheduler loop, the forward pass), so their
time is what kvtier adds to every step, whether or not anything is reused. End-to-end A/B
runs cannot show it on a noisy machine; an in-process fraction can.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class HookTimes:
    """Per hook: calls, total and worst seconds; per step: how many steps and their wall time.

    A *step* spans from ``step_begin`` (or ``open_step``) to ``step_end``. On a worker it
    is one forward pass: from the first of ``start_load_kv`` and the first layer's
    ``wait_for_layer_load`` (vLLM 0.32 calls ``start_load_kv`` after the forward pass when
    the step has no synchronous loads) to the end of ``wait_for_save``. On the scheduler it
    runs from one ``build_connector_meta`` to the next. :meth:`snapshot` gives the totals and
    ``connector_fraction``: hook time over step time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hooks: dict[str, list[float]] = {}  # name -> [calls, seconds, max seconds]
        self._steps = 0
        self._step_s = 0.0
        self._step_hook_s = 0.0  # hook time inside counted steps
        self._step_start: float | None = None
        self._in_step_s = 0.0  # hook time since the current step began
        self._iv = self._new_interval()  # the same, since the last interval() call

    @staticmethod
    def _new_interval() -> dict:
        return {"steps": 0, "step_s": 0.0, "connector_s": 0.0, "hooks": {}}

    def add(self, name: str, seconds: float, *, part: bool = False) -> None:
        """Records one call of ``name`` that took ``seconds``. A ``part`` is a piece of a hook
        already timed (e.g. ``wait_for_save.store``): listed, not counted twice in the step."""
        with self._lock:
            h = self._hooks.get(name)
            if h is None:
                h = self._hooks[name] = [0, 0.0, 0.0]
            h[0] += 1
            h[1] += seconds
            if seconds > h[2]:
                h[2] = seconds
            ih = self._iv["hooks"].get(name)
            self._iv["hooks"][name] = (1, seconds) if ih is None else (ih[0] + 1, ih[1] + seconds)
            if self._step_start is not None and not part:
                self._in_step_s += seconds

    def call(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs ``fn(*args)`` and records its wall time under ``name`` (also when it raises)."""
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.add(name, time.perf_counter() - t0)

    def step_begin(self, now: float | None = None) -> None:
        """A step starts (a step already open is closed first)."""
        now = time.perf_counter() if now is None else now
        with self._lock:
            self._close_step(now)
            self._step_start = now
            self._in_step_s = 0.0

    def open_step(self, now: float | None = None) -> None:
        """A step starts unless one is open already (the first of several hooks that may
        come first in a step)."""
        now = time.perf_counter() if now is None else now
        with self._lock:
            if self._step_start is None:
                self._step_start = now
                self._in_step_s = 0.0

    def step_end(self, now: float | None = None) -> float | None:
        """The open step ends; returns its wall time (None when no step was open)."""
        now = time.perf_counter() if now is None else now
        with self._lock:
            return self._close_step(now)

    def _close_step(self, now: float) -> float | None:
        if self._step_start is None:
            return None
        took = max(0.0, now - self._step_start)
        self._steps += 1
        self._step_s += took
        self._step_hook_s += self._in_step_s
        self._iv["steps"] += 1
        self._iv["step_s"] += took
        self._iv["connector_s"] += self._in_step_s
        self._step_start = None
        self._in_step_s = 0.0
        return took

    def snapshot(self) -> dict:
        """``{"steps", "step_s", "connector_s", "connector_fraction", "hooks": {name: {"calls",
        "seconds", "max_ms"}}}``; ``connector_s`` is the hook time inside counted steps."""
        with self._lock:
            hooks = {
                n: {"calls": int(c), "seconds": s, "max_ms": m * 1000.0} for n, (c, s, m) in sorted(self._hooks.items())
            }
            frac = self._step_hook_s / self._step_s if self._step_s > 0 else 0.0
            return {
                "steps": self._steps,
                "step_s": self._step_s,
                "connector_s": self._step_hook_s,
                "connector_fraction": frac,
                "hooks": hooks,
            }

    def interval(self) -> dict:
        """What was recorded since the last call (steps closed in it, their time and hook
        time, and ``hooks``: ``{name: (calls, seconds)}``), for vLLM's per-step stats."""
        with self._lock:
            iv, self._iv = self._iv, self._new_interval()
            return iv

    def reset(self) -> None:
        """Forgets everything recorded (e.g. after a warm-up)."""
        with self._lock:
            self._hooks.clear()
            self._steps = 0
            self._step_s = self._step_hook_s = self._in_step_s = 0.0
            self._step_start = None
            self._iv = self._new_interval()
