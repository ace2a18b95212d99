"""The connector's worker side (in each vLLM worker process): owns the engine (embedded
mode) and its lookup socket, and loads and saves the step's blocks around the forward pass,
layer by layer where vLLM calls the per-layer hooks."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import re
import threading
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch

from .lookup import LookupServer, authkey, socket_path
from .metadata import KvTierConnectorMetadata, LoadSpec, SaveSpec
from .settings import ConnectorSettings, model_identity
from ..transfer import HostStaging, PagedLayers, dtype_code

if TYPE_CHECKING:  # pragma: no cover
    from vllm.config import VllmConfig

logger = logging.getLogger("vllm.kvtier")


class _InflightLoad:
    """One step's loads, retrieved and copied by a background thread: ``ready[i]`` is set
    once layer i's blocks are in place (on CUDA: once their copy is queued, with
    ``cuda_events[i]`` marking its completion on the side stream)."""

    def __init__(self, n_layers: int):
        self.ready = [threading.Event() for _ in range(n_layers)]
        self.cuda_events: list[Any] = [None] * n_layers
        self.future: concurrent.futures.Future | None = None


@dataclasses.dataclass
class _LoadPlan:
    """The part of one LoadSpec that was retrieved: payload blocks first..first+len(ids)
    go to the cache blocks ids."""

    ids: torch.Tensor  # cache blocks to fill, on the cache's device
    payload: torch.Tensor  # the retrieved prefix (from the prompt's first block)
    first: int  # payload block of ids[0]


@dataclasses.dataclass
class _SaveItem:
    spec: SaveSpec
    ids: torch.Tensor  # block ids on the cache's device
    payload: torch.Tensor  # staging for the spec's blocks (transfer payload layout)
    keep: list = dataclasses.field(default_factory=list)  # CUDA temporaries until synced


@dataclasses.dataclass
class _SavePlan:
    """The saves of one step, staged layer by layer before the store in wait_for_save."""

    meta: Any
    items: list[_SaveItem]
    staged: set[int] = dataclasses.field(default_factory=set)
    futures: list = dataclasses.field(default_factory=list)
    events: list = dataclasses.field(default_factory=list)


def _layer_order(name: str) -> tuple[int, str]:
    m = re.search(r"layers\.(\d+)\.", name)
    return (int(m.group(1)) if m else 0, name)


class WorkerSide:
    """Loads and saves of one worker. Nothing happens before register_kv_caches."""

    def __init__(self, settings: ConnectorSettings, vllm_config: "VllmConfig", num_blocks: int | None):
        self._s = settings
        self._vllm_config = vllm_config
        self._num_blocks = num_blocks  # from vLLM's KVCacheConfig, when given
        self.engine = None  # kvtier.Engine, once the caches are registered
        self._paged: PagedLayers | None = None
        self._layer_index: dict[str, int] = {}  # layer name -> index in model order
        self._device = torch.device("cpu")
        self._lookup_server: LookupServer | None = None
        self._errors_lock = threading.Lock()
        self._load_errors: set[int] = set()
        self._load_staging: HostStaging | None = None  # a step's loads run while its saves are staged
        self._save_staging: HostStaging | None = None
        self._hooks_seen = False  # vLLM called wait_for_layer_load / save_kv_layer at least once
        self._xfer_pool: concurrent.futures.ThreadPoolExecutor | None = None  # loads
        self._copy_pool: concurrent.futures.ThreadPoolExecutor | None = None  # save staging (CPU)
        self._stream = None  # CUDA side stream for the copies
        self._inflight_load: _InflightLoad | None = None
        self._save_plan: _SavePlan | None = None
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

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Opens the engine for these caches and (embedded mode) starts the lookup socket."""
        names = sorted(kv_caches, key=_layer_order)
        first = kv_caches[names[0]]
        nb = self._num_blocks
        # The block dimension: 0 for (blocks, ...) layouts (CPU), 1 for (2, blocks, ...).
        bdim = 1 if nb is not None and first.shape[0] != nb and first.ndim > 1 and first.shape[1] == nb else 0
        code = dtype_code(first.dtype)
        self._device = first.device
        rank = self._rank()
        ident = model_identity(self._vllm_config, code, first.device.type, rank)
        ident["layout"]["groups"][0]["num_layers"] = len(names)
        self.engine = self._s.open_engine(ident)  # may adopt the server's chunk size
        paged = PagedLayers([kv_caches[n] for n in names], block_dim=bdim, blocks_per_chunk=self._s.blocks_per_chunk)
        if paged.block_nbytes != self._s.block_size * self.engine.bytes_per_token:
            raise ValueError(
                f"kvtier connector: a block holds {paged.block_nbytes} bytes over all layers, but the "
                f"model identity gives {self.engine.bytes_per_token} bytes/token x {self._s.block_size}; "
                "this attention backend's KV layout is not supported"
            )
        self._paged = paged
        self._layer_index = {n: i for i, n in enumerate(names)}
        self._load_staging = HostStaging(paged)
        self._save_staging = HostStaging(paged)
        if not self._s.server_mode:
            self._lookup_server = LookupServer(
                self.engine,
                socket_path(self._s.lookup_socket_dir, self._s.engine_id, rank),
                authkey(self._s.engine_id),
                info=lambda: dict(self.stats),
            )
        logger.info(
            "kvtier connector: %d layers, block shape %s %s on %s, %d bytes/token; %r",
            len(names), paged.block_shape, first.dtype, first.device, self.engine.bytes_per_token, self.engine,
        )

    def _rank(self) -> int:
        try:
            from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

            tp = int(self._vllm_config.parallel_config.tensor_parallel_size)
            return get_pp_group().rank_in_group * tp + get_tensor_model_parallel_rank()
        except Exception:
            return 0

    def _cuda_stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self._device)
        return self._stream

    def _add_load_errors(self, block_ids) -> None:
        with self._errors_lock:
            self._load_errors.update(block_ids)

    # -- loads -----------------------------------------------------------------------------

    def start_load_kv(self, meta: Any) -> None:
        """Starts the step's loads: behind the forward pass, layer by layer, once vLLM has
        shown it calls the per-layer hooks; otherwise complete before returning."""
        self._join_load()
        if not isinstance(meta, KvTierConnectorMetadata) or self.engine is None or not meta.loads:
            return
        specs = list(meta.loads)
        xfer = _InflightLoad(self._paged.num_layers)
        start_ev = None
        if self._device.type == "cuda":
            # The side stream writes the blocks only after the work already queued on the
            # compute stream (e.g. vLLM zeroing freshly allocated blocks).
            start_ev = torch.cuda.Event()
            start_ev.record(torch.cuda.current_stream(self._device))
        if self._s.layerwise and self._hooks_seen:
            if self._xfer_pool is None:
                self._xfer_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvtier-load")
            self._inflight_load = xfer
            xfer.future = self._xfer_pool.submit(self._load_job, specs, xfer, start_ev)
            self.stats["layerwise_loads"] += len(specs)
        else:
            # Synchronous fallback: vLLM has not called the per-layer hooks (yet), so the
            # blocks must be in place before the forward pass starts.
            self._load_job(specs, xfer, start_ev)
            if start_ev is not None:
                torch.cuda.current_stream(self._device).wait_stream(self._cuda_stream())
            self.stats["sync_loads"] += len(specs)

    def _load_job(self, specs: list[LoadSpec], xfer: _InflightLoad, start_ev) -> None:
        """Retrieves every spec's chunks, then copies them into the cache layer by layer,
        signalling each layer. Runs on the load thread (or inline for the fallback)."""
        # vLLM runs the forward pass under inference mode, which is per thread: the cache and
        # staging tensors are inference tensors that only inference mode may update in place.
        try:
            with torch.inference_mode():
                self._load_layers(specs, xfer, start_ev)
        except Exception as e:  # unexpected (a copy failed): recompute every block of the step
            logger.warning("kvtier: copying loaded KV into the cache failed: %s", e)
            for spec in specs:
                self._add_load_errors(spec.block_ids)
            self.stats["load_failures"] += 1
        finally:
            for ev in xfer.ready:  # never leave the forward pass waiting
                ev.set()

    def _load_layers(self, specs: list[LoadSpec], xfer: _InflightLoad, start_ev) -> None:
        """Retrieves, then copies layer by layer (see _load_job)."""
        paged, chunk = self._paged, self._s.chunk_tokens
        counts = [(len(sp.tokens) // chunk) * paged.blocks_per_chunk for sp in specs]
        plans = []
        for spec, payload in zip(specs, self._load_staging.payloads(counts)):
            plan = self._retrieve(spec, payload)
            if plan is not None:
                plans.append(plan)
        cuda = self._device.type == "cuda"
        # On CUDA this runs on the load thread: select the cache's device and side stream.
        dev_ctx = torch.cuda.device(self._device) if cuda else nullcontext()
        stream_ctx = torch.cuda.stream(self._cuda_stream()) if cuda else nullcontext()
        with dev_ctx, stream_ctx:
            if start_ev is not None:
                self._cuda_stream().wait_event(start_ev)
            for li in range(paged.num_layers):
                for plan in plans:
                    paged.scatter_layer(li, plan.payload, plan.ids, plan.first)
                if cuda:
                    ev = torch.cuda.Event()
                    ev.record(self._cuda_stream())
                    xfer.cuda_events[li] = ev
                xfer.ready[li].set()

    def _retrieve(self, spec: LoadSpec, payload: torch.Tensor) -> _LoadPlan | None:
        """Fills ``payload`` with the spec's stored prefix; returns the blocks that can be
        copied from it, and records the rest as load errors."""
        bs = self._s.block_size
        got = 0
        try:
            # The engine fills the whole prefix; blocks before first_block were computed locally.
            got = self.engine.retrieve(spec.tokens, payload)
        except Exception as e:
            logger.warning("kvtier load of %s failed: %s", spec.req_id, e)
        n_ok = max(0, min(len(spec.block_ids), got // bs - spec.first_block))
        bad = spec.block_ids[n_ok:]
        if bad:
            self._add_load_errors(bad)
            self.stats["load_failures"] += 1
            logger.warning(
                "kvtier: request %s loaded %d of %d tokens; %d block(s) will be recomputed",
                spec.req_id, got, len(spec.tokens), len(bad),
            )
        self.stats["loaded_tokens"] += n_ok * bs
        if n_ok == 0:
            return None
        return _LoadPlan(self._paged.block_index(spec.block_ids[:n_ok]), payload, spec.first_block)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Returns once this layer's loaded blocks are in place (on CUDA: once the compute
        stream waits for them)."""
        self._hooks_seen = True
        xfer = self._inflight_load
        li = self._layer_index.get(layer_name)
        if xfer is None or li is None:
            return
        t0 = time.perf_counter()
        xfer.ready[li].wait()
        ev = xfer.cuda_events[li]
        if ev is not None:  # the compute stream waits on the GPU, the host does not
            torch.cuda.current_stream(self._device).wait_event(ev)
        self.stats["layer_wait_ms"] += (time.perf_counter() - t0) * 1000.0

    def _join_load(self) -> None:
        xfer, self._inflight_load = self._inflight_load, None
        if xfer is not None and xfer.future is not None:
            xfer.future.result()  # _load_job handles its own errors
            if xfer.cuda_events[-1] is not None:
                xfer.cuda_events[-1].synchronize()  # the staging buffer is reused next step

    # -- saves -----------------------------------------------------------------------------

    def _plan_saves(self, meta: KvTierConnectorMetadata) -> _SavePlan:
        payloads = self._save_staging.payloads([len(sp.block_ids) for sp in meta.saves])
        items = [
            _SaveItem(sp, self._paged.block_index(sp.block_ids), payload)
            for sp, payload in zip(meta.saves, payloads)
        ]
        return _SavePlan(meta, items)

    def _stage_layer(self, plan: _SavePlan, li: int) -> None:
        """Copies layer li's blocks of every save of the step into the staging payloads."""
        with torch.inference_mode():  # per thread, as in _load_job
            for it in plan.items:
                tmp = self._paged.gather_layer(li, it.ids, it.payload)
                if tmp is not None:
                    it.keep.append(tmp)  # alive until the copy is synced

    def save_kv_layer(self, layer_name: str, meta: Any) -> None:
        """Stages this layer's blocks of the step's saves (the layer has just been computed),
        in the background while the next layers compute."""
        self._hooks_seen = True
        li = self._layer_index.get(layer_name)
        if li is None or self.engine is None or not self._s.layerwise or meta is None:
            return
        if not isinstance(meta, KvTierConnectorMetadata) or not meta.saves:
            return
        plan = self._save_plan
        if plan is None or plan.meta is not meta:
            plan = self._save_plan = self._plan_saves(meta)
        if li in plan.staged:
            return
        plan.staged.add(li)
        self.stats["layers_staged_early"] += 1
        # The layer's cache is final for the saved blocks (this layer has run), so the copy
        # can proceed while the next layers compute.
        if self._device.type == "cuda":
            stream = self._cuda_stream()
            stream.wait_stream(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(stream):
                self._stage_layer(plan, li)
                ev = torch.cuda.Event()
                ev.record(stream)
            plan.events.append(ev)
        else:
            if self._copy_pool is None:
                self._copy_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvtier-stage")
            plan.futures.append(self._copy_pool.submit(self._stage_layer, plan, li))

    def wait_for_save(self, meta: Any) -> None:
        """Stages what the hooks did not, then stores the step's saves."""
        self._join_load()  # loads of this step are in the cache (and may be saved again)
        plan, self._save_plan = self._save_plan, None
        if self.engine is None or meta is None:
            return
        if not isinstance(meta, KvTierConnectorMetadata) or not meta.saves:
            return
        if plan is None or plan.meta is not meta:
            plan = self._plan_saves(meta)
        failed = None
        for fut in plan.futures:
            try:
                fut.result()
            except Exception as e:
                failed = e
        for ev in plan.events:
            ev.synchronize()
        if failed is not None:  # a failed save only costs a future hit; never store a half copy
            logger.warning("kvtier: staging the saves of this step failed, nothing stored: %s", failed)
            return
        for li in range(self._paged.num_layers):
            if li not in plan.staged:  # the hook did not run for this layer: stage it now
                self._stage_layer(plan, li)
                self.stats["layers_staged_late"] += 1
        if self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()
        for it in plan.items:
            try:
                rep = self.engine.store(it.spec.tokens, it.payload, it.spec.salt)
                self.stats["saved_tokens"] += rep["new_chunks"] * self._s.chunk_tokens
            except Exception as e:  # a failed save only costs a future hit
                logger.warning("kvtier save of %s failed: %s", it.spec.req_id, e)

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
        for pool in (self._xfer_pool, self._copy_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        if self._lookup_server is not None:
            self._lookup_server.close()
            self._lookup_server = None
        if self.engine is not None:
            try:
                self.engine.flush(10.0)
            except Exception:
                pass
