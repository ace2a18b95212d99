"""The connector's worker side (in each vLLM worker process): owns the engine (embedded
mode) and its lookup socket, and loads and saves the step's blocks around the forward pass,
layer by layer where vLLM calls the per-layer hooks. The copies and their ordering against
the forward pass are :mod:`kvtier.transfer`'s (:class:`~kvtier.transfer.Transfer`)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from .arbitration import MIN_STEP_TOKENS
from .events import ConnectorEvents, WorkerEvents, events_enabled
from .groups import HybridEngines, KvGroup, group_identity, is_hybrid, layer_order
from .lookup import LookupServer, authkey, socket_path
from .metadata import KvTierConnectorMetadata, LoadSpec
from .settings import ConnectorSettings, kv_dtype_code, model_identity, use_mla
from .timing import HookTimes
from ..transfer import (
    HostStaging,
    LoadPlan,
    LoadStep,
    PagedLayers,
    PoolMemory,
    SavePlan,
    SaveStep,
    Transfer,
    streams_for,
)

if TYPE_CHECKING:  # pragma: no cover
    from vllm.config import VllmConfig

logger = logging.getLogger("vllm.kvtier")


@dataclasses.dataclass
class _Lane:
    """One vLLM KV-cache group's layers on this worker: its engine (an identity of its
    own over the shared cache), its paged caches and their transfers. A model without the
    hybrid KV cache manager has one lane, of every layer."""

    group: KvGroup
    engine: Any
    paged: PagedLayers
    xfer: Transfer
    layer_names: list[str]


@dataclasses.dataclass
class _InflightLoad:
    """One step's loads: a transfer step per lane, the background job issuing them, the
    host memory to give back once their copies are done, and the requests waiting for
    them (hybrid models: asynchronous loads)."""

    steps: dict[int, LoadStep]
    future: concurrent.futures.Future | None = None
    held: list = dataclasses.field(default_factory=list)  # pool mode: HeldChunks
    waiting: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _SaveItem:
    spec: Any  # SaveSpec
    payload: torch.Tensor | None  # pinned mode: the staging payload of the spec's blocks
    claim: Any  # pool mode: ClaimedChunks (only the new chunks)


@dataclasses.dataclass
class _SavePlan:
    """The saves of one step, staged layer by layer (a transfer step per lane) before the
    store in wait_for_save."""

    meta: Any
    items: list[_SaveItem]
    steps: dict[int, SaveStep]


def saves_on_this_rank(identity: dict, server_mode: bool) -> bool:
    """Whether this rank stores its KV. A replicated layout (MLA) is the same on every
    tensor-parallel rank and keyed without the rank: where the ranks share one store (a
    ``kvtier serve``), tensor rank 0 stores for all and the others only load. Embedded
    engines are private to their rank, so there each rank stores its own copy."""
    if not identity.get("replicated") or not server_mode:
        return True
    return int(identity.get("rank", 0)) == 0


class WorkerSide:
    """Loads and saves of one worker. Nothing happens before register_kv_caches."""

    def __init__(self, settings: ConnectorSettings, vllm_config: "VllmConfig", num_blocks: int | None,
                 hook_times: HookTimes | None = None, groups: list[KvGroup] | None = None):
        self._s = settings
        self.hook_times = hook_times or HookTimes()  # the connector's hooks on this worker
        self._vllm_config = vllm_config
        self._num_blocks = num_blocks  # from vLLM's KVCacheConfig, when given
        self._groups = groups or [KvGroup(0, 1, "full", 0, ())]
        self._lanes: list[_Lane] = []  # one per KV-cache group, once the caches are registered
        self._pool: PoolMemory | None = None  # staging "pool": the engine's L1 pool
        self._layer_lane: dict[str, tuple[int, int]] = {}  # layer name -> (lane, index in the lane)
        self._device = torch.device("cpu")
        self._lookup_server: LookupServer | None = None
        self._errors_lock = threading.Lock()
        self._load_errors: set[int] = set()
        self._recv_done: set[str] = set()  # asynchronous loads finished since the last report
        self._recv_failed: set[str] = set()  # ... of which these did not load everything
        self._load_staging: HostStaging | None = None  # a step's loads run while its saves are staged
        self._save_staging: HostStaging | None = None
        self._hooks_seen = False  # vLLM called wait_for_layer_load / save_kv_layer at least once
        self._saves_here = True  # False: another rank stores this replicated KV for all
        self._xfer_pool: concurrent.futures.ThreadPoolExecutor | None = None  # loads
        self._inflight_load: _InflightLoad | None = None
        self._save_plan: _SavePlan | None = None
        # Stores behind the forward passes (settings.stores_in_background): one step's at a
        # time; its staging buffers are reused only once it is done.
        self._store_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._inflight_store: concurrent.futures.Future | None = None
        self._store_lock = threading.Lock()
        self._background_stores = False  # decided in register_kv_caches (KV events on or off)
        self._events: WorkerEvents | None = None  # KV events on: the tiers' changes as vLLM events
        self._server_events = None  # server mode with events: the server's stream, followed
        # For the scheduler's load-vs-recompute arbitration, drained with each step's stats:
        # forward-pass tokens and seconds, and per tier the load seconds and chunks.
        self._obs_lock = threading.Lock()
        self._obs: dict[str, float] = {}
        self.stats = {
            "loaded_tokens": 0,
            "saved_tokens": 0,
            "load_failures": 0,
            "layerwise_loads": 0,  # loads copied layer by layer behind the forward pass
            "sync_loads": 0,  # loads finished inside start_load_kv (fallback)
            "layers_staged_early": 0,  # layers of saves staged from save_kv_layer
            "layers_staged_late": 0,  # layers of saves staged in wait_for_save (fallback)
            "layer_wait_ms": 0.0,  # time the forward pass waited in wait_for_layer_load
        }

    # -- setup -----------------------------------------------------------------------------

    @property
    def engine(self) -> Any:
        """The kvtier engine (the first group's in a hybrid model), once the caches are
        registered."""
        return self._lanes[0].engine if self._lanes else None

    @engine.setter
    def engine(self, engine: Any) -> None:
        self._lanes[0].engine = engine

    @property
    def hybrid(self) -> bool:
        """Whether vLLM runs the model with more than one KV-cache group."""
        return is_hybrid(self._groups)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Opens the engine for these caches and (embedded mode) starts the lookup socket."""
        names = sorted(kv_caches, key=layer_order)
        first = kv_caches[names[0]]
        code = kv_dtype_code(self._vllm_config, first.dtype)
        self._device = first.device
        rank = self._rank()
        ident = model_identity(self._vllm_config, code, rank)
        group = ident["layout"]["groups"][0]
        group["num_layers"] = len(names)
        groups = self._groups
        if not self.hybrid:  # every layer vLLM gave (vLLM's group config may be absent)
            groups = [dataclasses.replace(groups[0], layer_names=tuple(names))]
        missing = [n for g in groups for n in g.layer_names if n not in kv_caches]
        if missing:
            raise ValueError(f"kvtier connector: vLLM registered no KV cache for layer(s) {', '.join(missing[:4])}")
        self._saves_here = saves_on_this_rank(ident, self._s.server_mode)
        base = None
        for g in groups:
            g_ident = group_identity(ident, g)
            # One engine per group, all over the same tiers and L1 pool (embedded mode).
            engine = self._s.open_engine(g_ident) if base is None else base.for_identity(g_ident)
            base = base or engine  # the first may adopt the server's chunk size
            layer_names = list(g.layer_names)
            paged = PagedLayers.vllm(
                [kv_caches[n] for n in layer_names],
                block_size=self._s.block_size,
                num_kv_heads=group["num_kv_heads"],
                head_size=group["head_dim"],
                num_blocks=self._num_blocks,
                mla=use_mla(self._vllm_config),
                blocks_per_chunk=self._s.blocks_per_chunk,
            )
            if paged.block_nbytes != self._s.block_size * engine.bytes_per_token:
                raise ValueError(
                    f"kvtier connector: a block holds {paged.block_nbytes} bytes over all layers"
                    f"{'' if len(groups) == 1 else f' of KV-cache group {g.index}'}, but the model identity "
                    f"gives {engine.bytes_per_token} bytes/token x {self._s.block_size}; this attention "
                    "backend's KV layout is not supported"
                )
            xfer = Transfer(paged, streams_for(first.device), device_staging_bytes=self._s.device_staging_bytes)
            for i, n in enumerate(layer_names):
                self._layer_lane[n] = (len(self._lanes), i)
            self._lanes.append(_Lane(g, engine, paged, xfer, layer_names))
        paged = self._lanes[0].paged
        cuda = first.device.type == "cuda"
        if self._s.staging == "pool":
            self._pool = PoolMemory(self.engine, paged, self._s.chunk_tokens, cuda_register=cuda)
        else:
            self._load_staging = HostStaging(first.dtype, pin=cuda)
            self._save_staging = HostStaging(first.dtype, pin=cuda)
        if events_enabled(self._vllm_config):
            if self.hybrid:
                logger.warning("kvtier: KV events are not published for models with several KV-cache groups "
                               "(hybrid KV cache manager on): a router cannot tell which groups' blocks a "
                               "chunk stands for")
            else:
                self._events = self._open_events()
        # With KV events on, a step's stores land in the step, so its events announce them.
        self._background_stores = self._s.stores_in_background and self._events is None
        if not self._s.server_mode:
            answering = self.engine
            if self.hybrid:  # the hit every group can load
                answering = HybridEngines([ln.group for ln in self._lanes], [ln.engine for ln in self._lanes],
                                          self.engine.chunk_size, self._s.checkpoint_tokens)
            self._lookup_server = LookupServer(
                answering,
                socket_path(self._s.lookup_socket_dir, self._s.engine_id, rank),
                authkey(self._s.engine_id),
                info=self.info,
                before=self.join_stores,
            )
        logger.info(
            "kvtier connector: %d layers%s, %s layout, block %s %s on %s, %d bytes/token, staging %s; %r",
            len(names), "" if len(self._lanes) == 1 else f" in {len(self._lanes)} KV-cache groups ("
            + ", ".join(f"{ln.group.kind} x{len(ln.layer_names)}" for ln in self._lanes) + ")",
            paged.layout, paged.block_shape, first.dtype, first.device,
            sum(ln.engine.bytes_per_token for ln in self._lanes), self._s.staging, self.engine,
        )

    def _observe(self, **values: float) -> None:
        with self._obs_lock:
            for k, v in values.items():
                self._obs[k] = self._obs.get(k, 0) + v

    def note_step(self, num_tokens: int, seconds: float | None) -> None:
        """A forward pass of ``num_tokens`` tokens took ``seconds`` (prefill-sized steps
        only: a decode step's fixed costs say nothing about the prefill rate)."""
        if seconds and num_tokens >= MIN_STEP_TOKENS:
            self._observe(prefill_tokens=num_tokens, prefill_s=seconds)

    def _note_load(self, spec: LoadSpec, loaded_blocks: int, seconds: float) -> None:
        """Charges a load's time to the slowest tier it read, per chunk read from it."""
        if not spec.tiers or loaded_blocks <= 0:
            return
        bpc = self._s.blocks_per_chunk
        tiers = spec.tiers[: (loaded_blocks + bpc - 1) // bpc]
        slowest = max(tiers)
        self._observe(**{f"load_s.{slowest}": seconds, f"load_chunks.{slowest}": tiers.count(slowest)})

    def take_observations(self) -> dict[str, float]:
        """The observations since the last call."""
        with self._obs_lock:
            obs, self._obs = self._obs, {}
            return obs

    def info(self) -> dict:
        """The counters of :attr:`stats`, plus ``timing``: the hooks' wall time on this worker."""
        return dict(self.stats, timing=self.hook_times.snapshot())

    def _rank(self) -> int:
        try:
            from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

            tp = int(self._vllm_config.parallel_config.tensor_parallel_size)
            return get_pp_group().rank_in_group * tp + get_tensor_model_parallel_rank()
        except Exception:
            return 0

    def _add_load_errors(self, block_ids) -> None:
        with self._errors_lock:
            self._load_errors.update(block_ids)

    # -- loads -----------------------------------------------------------------------------

    def start_load_kv(self, meta: Any) -> None:
        """Starts the step's loads: behind the forward pass, layer by layer, once vLLM has
        shown it calls the per-layer hooks; otherwise complete before returning."""
        self._join_load()
        if not isinstance(meta, KvTierConnectorMetadata) or self.engine is None:
            return
        if not meta.loads:
            if meta.async_loads:  # every block they need was local: nothing to copy
                with self._errors_lock:
                    self._recv_done.update(meta.async_loads)
            return
        specs = list(meta.loads)
        # Recorded on the compute stream now: the copies wait for the work queued so far
        # (e.g. vLLM zeroing freshly allocated blocks).
        lanes = sorted({sp.group for sp in specs})
        load = self._inflight_load = _InflightLoad({i: self._lanes[i].xfer.begin_load() for i in lanes},
                                                   waiting=list(meta.async_loads))
        if self._s.layerwise and self._hooks_seen:
            if self._xfer_pool is None:
                self._xfer_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvtier-load")
            load.future = self._xfer_pool.submit(self._load_job, specs, load)
            self.stats["layerwise_loads"] += len(specs)
        else:
            # Synchronous fallback: vLLM has not called the per-layer hooks (yet), so the
            # blocks must be in place before the forward pass starts.
            self._load_job(specs, load)
            for step in load.steps.values():
                step.wait_all()
            self.stats["sync_loads"] += len(specs)

    def _load_job(self, specs: list[LoadSpec], load: _InflightLoad) -> None:
        """Gets every spec's stored chunks into host memory, then issues their copies layer
        by layer. Runs on the load thread (or inline for the fallback)."""
        # vLLM runs the forward pass under inference mode, which is per thread: the cache and
        # staging tensors are inference tensors that only inference mode may update in place.
        try:
            with torch.inference_mode():
                plans = self._host_chunks(specs, load)
                for lane, step in load.steps.items():
                    step.issue([plan for sp, plan in plans if sp.group == lane])
        except Exception as e:  # unexpected (a copy failed): recompute every block of the step
            logger.warning("kvtier: copying loaded KV into the cache failed: %s", e)
            for spec in specs:
                self._load_failed(spec, spec.block_ids)
            self.stats["load_failures"] += 1
            for step in load.steps.values():
                step.abort()

    def _host_chunks(self, specs: list[LoadSpec], load: _InflightLoad) -> list[tuple[LoadSpec, LoadPlan]]:
        """The stored chunks of every spec in host memory (retrieved into the staging
        buffer, or held in L1), as load plans for the blocks they cover."""
        plans = []
        if self._events is not None:
            for spec in specs:  # before the chunks read back into L1 are reported
                self._events.learn(spec.tokens, spec.salt, spec.block_hashes)
        if self._pool is not None:
            for spec in specs:
                t0 = time.perf_counter()
                try:
                    held = self._pool.acquire(spec.tokens, spec.salt)
                except Exception as e:
                    logger.warning("kvtier load of %s failed: %s", spec.req_id, e)
                    self._short_load(spec, 0)
                    continue
                load.held.append(held)
                plan = self._short_load(spec, held.hit_tokens, held.chunks)
                if plan is not None:
                    plans.append((spec, plan))
                    self._note_load(spec, len(plan.block_ids), time.perf_counter() - t0)
            return plans
        # A spec's tokens end on a chunk, or are a whole prompt whose tail is stored. A
        # windowed spec (first_chunk > 0) reads and holds only chunks first_chunk.. .
        payloads = self._load_staging.payloads([lane.paged.tokens_numel(n) for lane, n in map(self._payload_of, specs)])
        for spec, payload in zip(specs, payloads):
            got = 0
            lane, n = self._payload_of(spec)
            t0 = time.perf_counter()
            try:
                # The engine fills the whole prefix (or window); blocks before first_block
                # were computed locally (or are outside the window).
                got = lane.engine.retrieve(spec.tokens, payload, spec.salt, first_chunk=spec.first_chunk)
            except Exception as e:
                logger.warning("kvtier load of %s failed: %s", spec.req_id, e)
            start = len(spec.tokens) - n  # the payload's first token
            held = max(0, min(got, len(spec.tokens)) - start)
            plan = self._short_load(spec, got, lane.paged.split_tokens(payload, held, first_chunk=spec.first_chunk))
            if plan is not None:
                plans.append((spec, plan))
                self._note_load(spec, len(plan.block_ids), time.perf_counter() - t0)
        return plans

    def _payload_of(self, spec: Any) -> tuple[_Lane, int]:
        """A load or save spec's lane, and the tokens its payload holds: from its first
        chunk (0, or a sliding window's first) to the end of its tokens."""
        return self._lanes[spec.group], len(spec.tokens) - spec.first_chunk * self._s.chunk_tokens

    def _load_failed(self, spec: LoadSpec, block_ids) -> None:
        """vLLM recomputes what a load could not fill: from the first bad block (a
        synchronous load), or the whole request (an asynchronous one: vLLM takes failures
        of hybrid models only per request)."""
        if spec.async_load:
            with self._errors_lock:
                self._recv_failed.add(spec.req_id)
        else:
            self._add_load_errors(block_ids)

    def _short_load(self, spec: LoadSpec, got: int, chunks=None) -> LoadPlan | None:
        """The plan for the blocks the ``got`` loaded tokens cover; the rest are load errors
        (a missing or corrupt chunk, a tail too: vLLM recomputes from the first bad block)."""
        bs = self._s.block_size
        end = spec.num_tokens
        if got >= end:  # everything asked for, the last block possibly in part
            n_ok = len(spec.block_ids)
        else:
            n_ok = max(0, min(len(spec.block_ids), got // bs - spec.first_block))
        bad = spec.block_ids[n_ok:]
        if bad:
            self._load_failed(spec, bad)
            self.stats["load_failures"] += 1
            logger.warning(
                "kvtier: request %s loaded %d of %d tokens; %d block(s) will be recomputed",
                spec.req_id, got, len(spec.tokens), len(bad),
            )
        if n_ok == 0:
            return None
        stop = min(end, (spec.first_block + n_ok) * bs)
        self.stats["loaded_tokens"] += stop - spec.first_block * bs
        return LoadPlan(chunks, spec.first_block, spec.block_ids[:n_ok], stop)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Returns once this layer's loaded blocks are in place (on CUDA: once the compute
        stream waits for them)."""
        self._hooks_seen = True
        load = self._inflight_load
        where = self._layer_lane.get(layer_name)
        if load is None or where is None or where[0] not in load.steps:
            return
        t0 = time.perf_counter()
        load.steps[where[0]].wait_layer(where[1])
        self.stats["layer_wait_ms"] += (time.perf_counter() - t0) * 1000.0

    def _join_load(self) -> None:
        """Waits for the step's loads to be done, then gives their host memory back."""
        load, self._inflight_load = self._inflight_load, None
        if load is None:
            return
        try:
            if load.future is not None:
                load.future.result()  # _load_job handles its own errors
            for step in load.steps.values():
                step.finish()
        finally:
            for held in load.held:
                held.release()
            if load.waiting:  # their loads are over, done or failed: vLLM may schedule them
                with self._errors_lock:
                    self._recv_done.update(load.waiting)

    # -- saves -----------------------------------------------------------------------------

    def _plan_saves(self, meta: KvTierConnectorMetadata) -> _SavePlan:
        self.join_stores()  # the previous step's store still reads the staging buffers
        items, plans = [], []
        if self._pool is not None:
            for sp in meta.saves:
                try:
                    claim = self._pool.begin_store(sp.tokens, sp.salt)
                except Exception as e:  # a failed save only costs a future hit
                    logger.warning("kvtier save of %s failed: %s", sp.req_id, e)
                    continue
                items.append(_SaveItem(sp, None, claim))
                plans.append(SavePlan(claim.chunks, sp.block_ids))
        else:
            # The whole prompt where it ends in a tail (its last block partial); a windowed
            # save (first_chunk > 0) only chunks first_chunk.. .
            payloads = self._save_staging.payloads(
                [lane.paged.tokens_numel(n) for lane, n in map(self._payload_of, meta.saves)])
            for sp, payload in zip(meta.saves, payloads):
                lane, n = self._payload_of(sp)
                items.append(_SaveItem(sp, payload, None))
                plans.append(SavePlan(lane.paged.split_tokens(payload, n, first_chunk=sp.first_chunk), sp.block_ids))
        steps = {}
        try:
            for lane in sorted({it.spec.group for it in items}):
                steps[lane] = self._lanes[lane].xfer.begin_save(
                    [p for it, p in zip(items, plans) if it.spec.group == lane])
        except Exception:
            for it in items:
                if it.claim is not None:
                    it.claim.abort()
            raise
        return _SavePlan(meta, items, steps)

    def save_kv_layer(self, layer_name: str, meta: Any) -> None:
        """Stages this layer's blocks of the step's saves (the layer has just been computed),
        in the background while the next layers compute."""
        self._hooks_seen = True
        where = self._layer_lane.get(layer_name)
        if where is None or self.engine is None or not self._s.layerwise or meta is None or not self._saves_here:
            return
        if not isinstance(meta, KvTierConnectorMetadata) or not meta.saves:
            return
        plan = self._save_plan
        if plan is None or plan.meta is not meta:
            self._abort_saves()
            plan = self._save_plan = self._plan_saves(meta)
        step = plan.steps.get(where[0])
        if step is not None and step.stage_layer(where[1]):
            self.stats["layers_staged_early"] += 1

    def _abort_saves(self) -> None:
        plan, self._save_plan = self._save_plan, None
        if plan is not None:
            for it in plan.items:
                if it.claim is not None:
                    it.claim.abort()

    def wait_for_save(self, meta: Any) -> None:
        """Stages what the hooks did not, then stores the step's saves."""
        t0 = time.perf_counter()
        self._join_load()  # loads of this step are in the cache (and may be saved again)
        self.hook_times.add("wait_for_save.join_load", time.perf_counter() - t0, part=True)
        plan, self._save_plan = self._save_plan, None
        if (self._events is not None and not self._saves_here and isinstance(meta, KvTierConnectorMetadata)):
            # Another rank stores this replicated KV: the chunks still become loadable here
            # once the server holds them, so this rank announces them too.
            for spec in meta.saves:
                self._events.learn(spec.tokens, spec.salt, spec.block_hashes)
        if self.engine is None or meta is None or not self._saves_here:
            return
        if not isinstance(meta, KvTierConnectorMetadata) or not meta.saves:
            return
        if plan is None or plan.meta is not meta:
            if plan is not None:
                self._save_plan = plan
                self._abort_saves()
            plan = self._plan_saves(meta)
        try:
            t0 = time.perf_counter()
            late = [li for step in plan.steps.values() for li in step.finish()]
            self.hook_times.add("wait_for_save.copies", time.perf_counter() - t0, part=True)
        except Exception as e:  # a failed save only costs a future hit; never store a half copy
            logger.warning("kvtier: staging the saves of this step failed, nothing stored: %s", e)
            for it in plan.items:
                if it.claim is not None:
                    it.claim.abort()
            return
        self.stats["layers_staged_late"] += len(late)
        t0 = time.perf_counter()
        if self._events is not None:
            for it in plan.items:  # before the store reports their chunks
                self._events.learn(it.spec.tokens, it.spec.salt, it.spec.block_hashes)
        if self._background_stores:
            # The payloads are staged (host copies done): the store (a copy into L1 and
            # its checksum) runs behind the next steps. Lookups on this worker, a flush and
            # the next step's saves wait for it, so no stored prefix is ever missed. With
            # KV events on, the store lands in this step, so this step's events announce it.
            if self._store_pool is None:
                self._store_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvtier-store")
            with self._store_lock:
                self._inflight_store = self._store_pool.submit(self._store_items, plan.items)
        else:
            self._store_items(plan.items)
        self.hook_times.add("wait_for_save.store", time.perf_counter() - t0, part=True)

    def _store_items(self, items: list[_SaveItem]) -> None:
        """Stores staged saves (pinned staging) or commits claimed L1 buffers (pool)."""
        saved = 0
        for it in items:
            sp = it.spec
            try:
                if it.claim is not None:
                    rep = it.claim.commit()
                else:
                    rep = self._lanes[sp.group].engine.store(sp.tokens, it.payload, sp.salt, first_chunk=sp.first_chunk)
                if not self._lanes[sp.group].group.sliding:  # a prompt's tokens count once
                    saved += min(rep["new_chunks"] * self._s.chunk_tokens, len(sp.tokens))
            except Exception as e:  # a failed save only costs a future hit
                logger.warning("kvtier save of %s failed: %s", it.spec.req_id, e)
        with self._obs_lock:
            self.stats["saved_tokens"] += saved

    def join_stores(self) -> None:
        """Waits for the stores running in the background (none: returns at once)."""
        with self._store_lock:
            fut = self._inflight_store
        if fut is not None:
            fut.result()  # _store_items handles its own errors

    def _open_events(self) -> WorkerEvents | None:
        """KV events on: the engine's own tiers report; in server mode the server's event
        stream does (``kvtier.server_kv_events``: the endpoint it publishes on)."""
        if not self._s.server_mode:
            return WorkerEvents(self.engine, self._s.block_size, self.engine.chunk_size)
        endpoint = self._s.conn.get("server_kv_events")
        if not endpoint:
            logger.warning(
                "kvtier: KV events are on, but the connector in server mode announces nothing "
                "without kvtier.server_kv_events: start kvtier serve with --kv-events-config and "
                "set kvtier.server_kv_events to its endpoint (e.g. tcp://127.0.0.1:5557, the "
                "ready file's kv_events); the server's own stream carries its chunks by kvtier key"
            )
            return None
        from .server_events import ServerResidency

        self._server_events = ServerResidency(str(endpoint))
        return WorkerEvents(self.engine, self._s.block_size, self.engine.chunk_size,
                            source=self._server_events, keep_s=2.0)

    def take_events(self) -> ConnectorEvents | None:
        """KV events on: the blocks that entered and left this worker's L1 since the last
        call (None when off)."""
        return self._events.take() if self._events is not None else None

    def transfer_results(self) -> tuple[set[str], set[str]]:
        """The requests whose asynchronous loads (hybrid models) ended since the last call,
        and those of them that did not load everything (vLLM recomputes them)."""
        self._join_load()
        with self._errors_lock:
            done, failed = self._recv_done, self._recv_failed
            self._recv_done, self._recv_failed = set(), set()
        return done | failed, failed

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks a load could not fill since the last call (vLLM recomputes them)."""
        self._join_load()
        with self._errors_lock:
            errs, self._load_errors = self._load_errors, set()
        return errs

    def shutdown(self) -> None:
        """Finishes the load in flight, stops the threads and the socket, flushes the engine."""
        try:
            self._join_load()
        except Exception:
            pass
        self._abort_saves()
        try:
            self.join_stores()
        except Exception:
            pass
        if self._store_pool is not None:
            self._store_pool.shutdown(wait=True)
        if self._server_events is not None:
            self._server_events.close()
        if self._xfer_pool is not None:
            self._xfer_pool.shutdown(wait=False, cancel_futures=True)
        for lane in self._lanes:
            lane.xfer.close()
        if self._pool is not None:
            try:
                self._pool.close()
            except Exception:
                pass
        if self._lookup_server is not None:
            self._lookup_server.close()
            self._lookup_server = None
        if self.engine is not None:
            try:
                self.engine.flush(10.0)
            except Exception:
                pass
