"""``KvTierConnector``: the class vLLM loads. vLLM builds one instance per role (SCHEDULER in
the EngineCore process, WORKER in each worker); each instance holds only its role's side and
forwards vLLM's calls to it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)
from vllm.logger import init_logger

from .groups import check_hybrid, kv_groups
from .metadata import KvTierConnectorMetadata
from .scheduler import SchedulerSide
from .settings import ConnectorSettings
from .stats import WORKER_COUNTERS, KvTierConnectorStats, KvTierPromMetrics, payload
from .timing import HookTimes
from .worker import WorkerSide

if TYPE_CHECKING:  # pragma: no cover
    from vllm.attention.backends.abstract import AttentionMetadata
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# The package's modules log to "vllm.kvtier" (vLLM shows only loggers under "vllm.").
logger = init_logger("vllm.kvtier")


class KvTierConnector(KVConnectorBase_V1, SupportsHMA):
    """Stores prompt KV in kvtier and loads stored prefixes instead of recomputing them.
    With vLLM's hybrid KV cache manager on, each KV-cache group (full attention, sliding
    window) is stored under an identity of its own (see :mod:`.groups`)."""

    def __init__(
        self,
        vllm_config: "VllmConfig",
        role: KVConnectorRole,
        kv_cache_config: "KVCacheConfig | None" = None,
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        settings = ConnectorSettings.from_vllm(vllm_config)
        model = str(getattr(getattr(vllm_config, "model_config", None), "model", "?"))
        # Group kinds kvtier cannot store fail here, naming the model and the group.
        groups = kv_groups(kv_cache_config, model)
        check_hybrid(groups, settings, model)
        self.scheduler_side: SchedulerSide | None = None
        self.worker_side: WorkerSide | None = None
        # Wall time inside this role's hooks (the cost kvtier adds to vLLM's steps).
        self.hook_times = HookTimes()
        self._role_name = "scheduler" if role == KVConnectorRole.SCHEDULER else "worker"
        self._counters_sent = dict.fromkeys(WORKER_COUNTERS, 0)  # worker counters already reported
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler_side = SchedulerSide(settings, vllm_config, groups)
        else:
            num_blocks = int(kv_cache_config.num_blocks) if kv_cache_config is not None else None
            self.worker_side = WorkerSide(settings, vllm_config, num_blocks, self.hook_times, groups)
        logger.info(
            "kvtier connector (%s): chunk %d tokens = %d block(s) of %d; %s mode",
            role.name if hasattr(role, "name") else role,
            settings.chunk_tokens,
            settings.blocks_per_chunk,
            settings.block_size,
            "server" if settings.server_mode else "embedded",
        )

    # -- counters (for tests and metrics) --------------------------------------------------

    @property
    def stats(self) -> dict:
        """Worker side: loaded/saved tokens, load failures, pipelining counters."""
        return self.worker_side.stats if self.worker_side is not None else {}

    @property
    def lookup_stats(self) -> dict:
        """Scheduler side: lookups answered in their step, late, deferred, expired."""
        return self.scheduler_side.lookups.stats if self.scheduler_side is not None else {}

    def pending_lookups(self) -> int:
        """Scheduler side: requests whose lookup is still unanswered."""
        return self.scheduler_side.pending_lookups() if self.scheduler_side is not None else 0

    # -- vLLM's stats and metrics -----------------------------------------------------------

    def get_kv_connector_stats(self) -> KvTierConnectorStats | None:
        """This role's figures since the last call (vLLM asks after every step)."""
        return self.hook_times.call("get_kv_connector_stats", self._interval_stats)

    def _interval_stats(self) -> KvTierConnectorStats | None:
        counters = None
        if self.worker_side is not None:
            now = {c: self.worker_side.stats.get(c, 0) for c in WORKER_COUNTERS}
            counters = {c: now[c] - self._counters_sent[c] for c in WORKER_COUNTERS}
            self._counters_sent = now
            counters.update(self.worker_side.take_observations())
        elif self.scheduler_side is not None:
            counters = {f"decision.{k}": v for k, v in self.scheduler_side.arbiter.take_decisions().items()}
            counters.update(self.scheduler_side.take_pd_stats())
        stats = KvTierConnectorStats(data=payload(self._role_name, self.hook_times.interval(), counters))
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvTierConnectorStats:
        return KvTierConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: "VllmConfig",
        metric_types: dict,
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KvTierPromMetrics:
        return KvTierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # -- scheduler side --------------------------------------------------------------------

    def update_connector_output(self, connector_output: Any) -> None:
        """The workers' output of a step: their stats feed the load-vs-recompute model,
        their KV events the scheduler's announcements."""
        if self.scheduler_side is None:
            return
        stats = getattr(connector_output, "kv_connector_stats", None)
        data = getattr(stats, "data", None) if stats is not None else None
        if data:
            self.hook_times.call("update_connector_output", self.scheduler_side.observe, data)
        events = getattr(connector_output, "kv_cache_events", None)
        if events is not None:
            self.hook_times.call("update_connector_output", self.scheduler_side.observe_events,
                                 events.get_all_events())

    def take_events(self):
        """KV events for vLLM's publisher: the blocks kvtier's L1 took in or dropped."""
        if self.scheduler_side is None:
            return ()
        return self.scheduler_side.take_events()

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.hook_times.call(
            "get_num_new_matched_tokens", self.scheduler_side.get_num_new_matched_tokens, request, num_computed_tokens
        )

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        self.hook_times.call(
            "update_state_after_alloc", self.scheduler_side.update_state_after_alloc, request, blocks, num_external_tokens
        )

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = self.hook_times.call("build_connector_meta", self.scheduler_side.build_connector_meta, scheduler_output)
        # Called once per schedule(): a scheduler step runs from here to the next call.
        self.hook_times.step_begin()
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict | None]:
        if self.scheduler_side is None:
            return False, None
        return self.hook_times.call("request_finished", self.scheduler_side.request_finished, request, block_ids)

    def request_finished_all_groups(self, request: "Request", block_ids: tuple[list[int], ...]
                                    ) -> tuple[bool, dict | None]:
        """vLLM's call for a finished request when the connector supports hybrid models:
        saves are issued in the steps and end in them, so no block is held back."""
        return self.request_finished(request, list(block_ids[0]) if block_ids else [])

    # -- worker side -----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self.worker_side.register_kv_caches(kv_caches)

    def _step_meta(self) -> KvTierConnectorMetadata | None:
        return self._get_connector_metadata() if self.has_connector_metadata() else None

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        if self.worker_side is not None:
            # A forward pass runs from here (or its first layer hook) to the end of wait_for_save.
            self.hook_times.open_step()
            self.hook_times.call("start_load_kv", self.worker_side.start_load_kv, self._step_meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self.worker_side is not None:
            self.hook_times.open_step()
            self.hook_times.call("wait_for_layer_load", self.worker_side.wait_for_layer_load, layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata", **kwargs: Any
    ) -> None:
        if self.worker_side is not None:
            self.hook_times.call("save_kv_layer", self.worker_side.save_kv_layer, layer_name, self._step_meta())

    def wait_for_save(self):
        if self.worker_side is not None:
            meta = self._step_meta()
            try:
                self.hook_times.call("wait_for_save", self.worker_side.wait_for_save, meta)
            finally:
                took = self.hook_times.step_end()
                self.worker_side.note_step(getattr(meta, "num_tokens", 0), took)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Hybrid models: the requests whose loads ended in this step (failed ones too, as
        vLLM wants them), and the failed ones, which vLLM recomputes."""
        if self.worker_side is None:
            return KVConnectorTransferResults()
        done, failed = self.worker_side.transfer_results()
        return KVConnectorTransferResults(finished_recving=done, failed_recving=failed)

    def get_kv_connector_kv_cache_events(self):
        """The blocks that entered and left this worker's L1 in the last step (KV events on)."""
        if self.worker_side is None:
            return None
        return self.worker_side.take_events()

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self.worker_side is None:
            return set()
        return self.hook_times.call("get_block_ids_with_load_errors", self.worker_side.get_block_ids_with_load_errors)

    def shutdown(self):
        t = self.hook_times.snapshot()
        if t["steps"]:
            logger.info(
                "kvtier connector: %.3f s in hooks over %d steps of %.3f s (%.2f%%); per hook: %s",
                t["connector_s"], t["steps"], t["step_s"], 100.0 * t["connector_fraction"],
                ", ".join(f"{n} {h['seconds']:.3f}s/{h['calls']}" for n, h in t["hooks"].items()),
            )
        for side in (self.worker_side, self.scheduler_side):
            if side is not None:
                side.shutdown()
