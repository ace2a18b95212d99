"""The connector's figures in vLLM's own channels: ``KVConnectorStats`` (sent from the
workers and the scheduler to vLLM's stat loggers each step, logged with vLLM's periodic
stats line) and Prometheus metrics on vLLM's ``/metrics``.

The payload is a flat ``{name: number}`` dict, summed across steps and ranks:
``<role>.steps``, ``<role>.step_s``, ``<role>.connector_s`` (hook time inside those steps),
``<role>.hook_s.<hook>`` and ``<role>.calls.<hook>`` for each hook, where ``<role>`` is
``worker`` (a step is one forward pass) or ``scheduler`` (one schedule() call), plus the
worker counters ``worker.loaded_tokens``, ``worker.saved_tokens``, ``worker.load_failures``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

if TYPE_CHECKING:  # pragma: no cover
    from vllm.config import VllmConfig

#: Worker counters (of ``WorkerSide.stats``) carried in the stats payload.
WORKER_COUNTERS = ("loaded_tokens", "saved_tokens", "load_failures")


def _pct(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 3) if whole > 0 else 0.0


class KvTierConnectorStats(KVConnectorStats):
    """kvtier's per-interval figures (see the module doc for the payload)."""

    def reset(self) -> None:
        """Forgets the interval's figures."""
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "KvTierConnectorStats":
        """Sums ``other``'s figures into these (another step, or another rank)."""
        for k, v in (other.data or {}).items():
            if isinstance(v, (int, float)):
                self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        """The summary vLLM logs: each role's share of its step time spent in kvtier's
        hooks, the slowest hook, and the tokens moved."""
        d = self.data
        out: dict[str, int | float] = {}
        for role in ("worker", "scheduler"):
            steps = d.get(f"{role}.steps", 0)
            if not steps:
                continue
            out[f"kvtier_{role}_steps"] = int(steps)
            out[f"kvtier_{role}_hooks_pct"] = _pct(d.get(f"{role}.connector_s", 0.0), d.get(f"{role}.step_s", 0.0))
        for c in WORKER_COUNTERS:
            if d.get(f"worker.{c}"):
                out[f"kvtier_{c}"] = int(d[f"worker.{c}"])
        for k, v in d.items():
            if k.startswith("scheduler.decision.") and v:
                out[f"kvtier_arbitration_{k[len('scheduler.decision.'):]}"] = int(v)
        hooks = {k: v for k, v in d.items() if ".hook_s." in k}
        if hooks:
            name, secs = max(hooks.items(), key=lambda kv: kv[1])
            out["kvtier_slowest_hook"] = name.replace(".hook_s.", ".")
            out["kvtier_slowest_hook_ms"] = round(secs * 1000.0, 3)
        return out

    def is_empty(self) -> bool:
        """Nothing recorded in the interval."""
        return not any(self.data.values())


def payload(role: str, interval: dict[str, Any], counters: dict[str, Any] | None = None) -> dict[str, float]:
    """The flat stats payload of one role from :meth:`HookTimes.interval` and, on a worker,
    the counters' increase over the interval."""
    out: dict[str, float] = {
        f"{role}.steps": interval["steps"],
        f"{role}.step_s": interval["step_s"],
        f"{role}.connector_s": interval["connector_s"],
    }
    for name, (calls, secs) in interval["hooks"].items():
        out[f"{role}.hook_s.{name}"] = secs
        out[f"{role}.calls.{name}"] = calls
    for k, v in (counters or {}).items():
        out[f"{role}.{k}"] = v
    return out


class KvTierPromMetrics(KVConnectorPromMetrics):
    """Counters on vLLM's ``/metrics`` (labels: vLLM's per-engine labels, plus ``role`` and
    ``hook``): ``vllm:kvtier_connector_hook_seconds`` and ``..._hook_calls`` per hook,
    ``vllm:kvtier_connector_steps``, ``..._step_seconds`` and ``..._step_hook_seconds``
    per role (so ``rate(step_hook_seconds) / rate(step_seconds)`` is the share of vLLM's
    steps spent in kvtier), and ``vllm:kvtier_loaded_tokens`` / ``saved_tokens`` /
    ``load_failures``."""

    def __init__(
        self,
        vllm_config: "VllmConfig",
        metric_types: dict,
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counter = self._counter_cls
        names = list(labelnames)
        self._hook_s = counter(
            name="vllm:kvtier_connector_hook_seconds",
            documentation="Wall time spent inside each kvtier connector hook.",
            labelnames=names + ["role", "hook"],
        )
        self._hook_calls = counter(
            name="vllm:kvtier_connector_hook_calls",
            documentation="Calls of each kvtier connector hook.",
            labelnames=names + ["role", "hook"],
        )
        self._steps = counter(
            name="vllm:kvtier_connector_steps",
            documentation="vLLM steps seen by the kvtier connector (worker: forward passes; scheduler: schedule calls).",
            labelnames=names + ["role"],
        )
        self._step_s = counter(
            name="vllm:kvtier_connector_step_seconds",
            documentation="Wall time of those steps.",
            labelnames=names + ["role"],
        )
        self._step_hook_s = counter(
            name="vllm:kvtier_connector_step_hook_seconds",
            documentation="Time inside kvtier's hooks during those steps (the connector's share of them).",
            labelnames=names + ["role"],
        )
        self._decisions = counter(
            name="vllm:kvtier_arbitration_decisions",
            documentation="Load-vs-recompute decisions per request with stored KV: load (all stored chunks), "
            "partial (a prefix loaded, the rest recomputed), recompute, unmeasured (loaded before the rates "
            "were measured), off.",
            labelnames=names + ["decision"],
        )
        self._pd = counter(
            name="vllm:kvtier_pd_requests",
            documentation="Disaggregated decode requests: all of the prefill instance's chunks were found "
            "(complete) or not within pd_wait_s (short: the rest recomputed).",
            labelnames=names + ["outcome"],
        )
        self._worker = {
            c: counter(name=f"vllm:kvtier_{c}", documentation=f"kvtier connector: {c.replace('_', ' ')}.",
                       labelnames=names)
            for c in WORKER_COUNTERS
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        """Adds one interval's payload to the counters of engine ``engine_idx``."""
        labels = [str(v) for v in self.per_engine_labelvalues.get(engine_idx, [])]
        for key, value in (transfer_stats_data or {}).items():
            if not isinstance(value, (int, float)) or value <= 0:
                continue
            role, _, rest = key.partition(".")
            kind, _, hook = rest.partition(".")
            if kind == "hook_s":
                self._hook_s.labels(*labels, role, hook).inc(value)
            elif kind == "calls":
                self._hook_calls.labels(*labels, role, hook).inc(value)
            elif kind == "steps":
                self._steps.labels(*labels, role).inc(value)
            elif kind == "step_s":
                self._step_s.labels(*labels, role).inc(value)
            elif kind == "connector_s":
                self._step_hook_s.labels(*labels, role).inc(value)
            elif kind == "decision":
                self._decisions.labels(*labels, hook).inc(value)
            elif kind == "pd":
                self._pd.labels(*labels, hook).inc(value)
            elif role == "worker" and kind in self._worker:
                self._worker[kind].labels(*labels).inc(value)
