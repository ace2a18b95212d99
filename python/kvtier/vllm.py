"""kvtier as a vLLM KV connector (``KVConnectorBase_V1``, vLLM 0.32).

Use::

    --kv-transfer-config '{"kv_connector": "KvTierConnector",
                           "kv_connector_module_path": "kvtier.vllm",
                           "kv_role": "kv_both",
                           "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"kvtier.chunk_size": 256,
                                                         "kvtier.max_local_cpu_size": 4}}'

Design
------
*Blocks and chunks.* vLLM holds KV in blocks of ``block_size`` tokens (128 on CPU). A kvtier
chunk is ``blocks_per_chunk`` whole blocks (``chunk_size`` must be a multiple of the block
size; default: one block per chunk). A chunk's payload is, for each attention layer in model
order, the chunk's blocks copied whole from that layer's cache tensor. Whole-block copies do
not depend on the attention backend's layout inside a block; the layout tag in the key
(``vllm-<device>-blocks-v1``) keeps these payloads apart from kvtier's layer-major ones.
Only full chunks of the prompt are stored; loads are always whole chunks, and at least one
prompt token is always left to compute.

*Who answers lookups.* vLLM asks the scheduler-side connector (in the EngineCore process)
how many tokens are stored, but the KV lives in the worker processes (on CPU, and with
tensor parallelism, the workers are separate processes). In embedded mode each worker owns
an engine (its L1 and optional disk tier); the worker-side connector serves lookups on a
private Unix socket (``<lookup_socket_dir>/kvtier-<engine_id>-<rank>.sock``, authenticated
with a key derived from the engine id) and the scheduler asks every rank, taking the
minimum. So the scheduler sees exactly what the workers hold, L1 included, with no second
engine opening the same disk directory. In server mode (``"kvtier.server": "unix:/path"``)
both sides are clients of one ``kvtier serve`` and the scheduler asks the server.

*Lookups do not block the scheduler.* A lookup runs on a small thread pool; the scheduler
waits for it at most ``lookup_budget_ms`` per scheduler step (shared by all the requests
asked in that step), so a fast lookup is answered synchronously and the common case costs no
extra step. A slower one is answered ``(None, False)``: vLLM 0.32 then skips the request for
this step and asks again in the next one. A lookup still unanswered ``lookup_deadline_s``
after it was issued counts as a miss (the prompt is recomputed; warned once).

*Per-layer pipelining.* vLLM calls ``wait_for_layer_load`` before and ``save_kv_layer``
after each attention layer. ``start_load_kv`` retrieves the stored chunks in a background
thread and then copies them into the paged cache layer by layer; ``wait_for_layer_load``
waits only for its own layer, so the copies of later layers overlap the compute of earlier
ones. ``save_kv_layer`` stages the layer's blocks to save into a host buffer as soon as the
layer is computed (a background copy on CPU, a side stream into pinned memory on CUDA) and
``wait_for_save`` commits the stores. Until the hooks have been seen once (and for any layer
whose hook did not run) loads and saves fall back to the synchronous path in
``start_load_kv`` / ``wait_for_save``.

If a load comes back short or corrupt (a checksum failure, a chunk evicted between lookup
and load), the worker reports the blocks it could not fill through
``get_block_ids_with_load_errors`` and vLLM recomputes them when
``kv_load_failure_policy="recompute"``.
"""

from __future__ import annotations

import array
import concurrent.futures
import dataclasses
import hashlib
import os
import re
import tempfile
import threading
import time
from contextlib import nullcontext as _nullctx
from multiprocessing.connection import Client, Listener
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

import kvtier

if TYPE_CHECKING:  # pragma: no cover
    from vllm.attention.backends.abstract import AttentionMetadata
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger("vllm.kvtier")

_TORCH_DTYPES = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.uint8: "u8",
}
for _name, _code in (("float8_e4m3fn", "f8e4m3"), ("float8_e5m2", "f8e5m2")):
    if hasattr(torch, _name):
        _TORCH_DTYPES[getattr(torch, _name)] = _code

# Keys of kv_connector_extra_config read by the connector itself; everything else (with or
# without a "kvtier." prefix) is an engine config key.
_CONNECTOR_KEYS = {
    "config",
    "config_file",
    "blocks_per_chunk",
    "lookup_socket_dir",
    "lookup_timeout_s",
    "lookup_budget_ms",
    "lookup_deadline_s",
    "lookup_threads",
    "layerwise",
    "server",
}


def _flag(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(v)


@dataclasses.dataclass
class LoadSpec:
    req_id: str
    tokens: list[int]  # the prompt up to the end of the last chunk to load
    salt: str | None
    block_ids: list[int]  # vLLM blocks to fill, in prompt order
    first_block: int  # index (in the prompt) of block_ids[0]


@dataclasses.dataclass
class SaveSpec:
    req_id: str
    tokens: list[int]  # the prompt's full chunks
    salt: str | None
    block_ids: list[int]  # the blocks holding them, in prompt order


@dataclasses.dataclass
class KvTierConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = dataclasses.field(default_factory=list)
    saves: list[SaveSpec] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _ReqState:
    tokens: list[int]
    salt: str | None
    hit: int = 0  # tokens loadable from kvtier (chunk aligned), from the lookup
    load_tokens: int = 0  # external tokens vLLM agreed to load
    block_ids: list[int] = dataclasses.field(default_factory=list)
    saved: bool = False
    usable: int = 0  # the most tokens a load may cover (whole chunks, >= 1 token left)
    n_save: int = 0  # tokens in the prompt's full chunks
    pending: "concurrent.futures.Future | None" = None  # the lookup, while unanswered
    deadline: float = 0.0  # monotonic time after which a pending lookup counts as a miss
    deferred: bool = False  # answered (None, False) at least once


class _InflightLoad:
    """One step's loads, retrieved and copied by a background thread: ``ready[i]`` is set
    once layer i's blocks are in place (on CUDA: once their copy is queued, with
    ``cuda_events[i]`` marking its completion on the side stream)."""

    def __init__(self, n_layers: int):
        self.ready = [threading.Event() for _ in range(n_layers)]
        self.cuda_events: list[Any] = [None] * n_layers
        self.future: concurrent.futures.Future | None = None


@dataclasses.dataclass
class _SaveItem:
    spec: SaveSpec
    ids: torch.Tensor  # block ids on the cache's device
    stage: torch.Tensor  # (chunks, layers, blocks_per_chunk, *block) host view
    keep: list = dataclasses.field(default_factory=list)  # CUDA temporaries until synced


@dataclasses.dataclass
class _SavePlan:
    """The saves of one step, staged layer by layer before the store in wait_for_save."""

    meta: Any
    items: list[_SaveItem]
    staged: set[int] = dataclasses.field(default_factory=set)
    futures: list = dataclasses.field(default_factory=list)
    events: list = dataclasses.field(default_factory=list)


def _settings(vllm_config: "VllmConfig") -> tuple[dict[str, Any], dict[str, str]]:
    """Splits kv_connector_extra_config into connector settings and engine config pairs."""
    extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
    conn: dict[str, Any] = {}
    eng: dict[str, Any] = {}
    for k, v in extra.items():
        key = k[len("kvtier.") :] if k.startswith("kvtier.") else k
        (conn if key in _CONNECTOR_KEYS else eng)[key] = v
    return conn, eng


def _block_size(vllm_config: "VllmConfig") -> int:
    return int(vllm_config.cache_config.block_size)


def _identity(vllm_config: "VllmConfig", dtype_code: str, device: str, rank: int) -> dict:
    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    return {
        "model_name": str(mc.model),
        "model_revision": getattr(mc, "revision", None),
        "world_size": int(pc.tensor_parallel_size),
        "rank": rank % int(pc.tensor_parallel_size),
        "pp_size": int(pc.pipeline_parallel_size),
        "pp_rank": rank // int(pc.tensor_parallel_size),
        "layout": {
            "tag": f"vllm-{device}-blocks-v1",
            "groups": [
                {
                    "num_layers": int(mc.get_num_layers(pc)),
                    "num_kv_heads": int(mc.get_num_kv_heads(pc)),
                    "head_dim": int(mc.get_head_size()),
                    "dtype": dtype_code,
                    "planes": 2,
                }
            ],
        },
    }


def _cache_dtype(vllm_config: "VllmConfig") -> torch.dtype:
    cd = vllm_config.cache_config.cache_dtype
    if cd in (None, "auto"):
        return vllm_config.model_config.dtype
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE  # vLLM's own table

    return STR_DTYPE_TO_TORCH_DTYPE[cd]


def _engine_config(conn: dict[str, Any], eng: dict[str, Any], chunk_size: int):
    """The config argument for kvtier.Engine: a YAML path, or a dict of keys."""
    if "server" in conn:
        return {"server": conn["server"]}
    path = conn.get("config") or conn.get("config_file")
    if path:
        if eng:
            raise ValueError("kvtier connector: give either a config file or inline keys, not both")
        # chunk_size must match the block mapping: the env override wins over the file.
        os.environ["KVTIER_CHUNK_SIZE"] = str(chunk_size)
        os.environ["KVTIER_SAVE_UNFULL_CHUNK"] = "false"
        return str(path)
    cfg = dict(eng)
    cfg["chunk_size"] = chunk_size
    cfg["save_unfull_chunk"] = False
    return cfg


def _socket_path(conn: dict[str, Any], engine_id: str, rank: int) -> str:
    d = conn.get("lookup_socket_dir") or tempfile.gettempdir()
    tag = hashlib.sha256(engine_id.encode()).hexdigest()[:16]
    return os.path.join(str(d), f"kvtier-{tag}-{rank}.sock")


def _authkey(engine_id: str) -> bytes:
    return hashlib.sha256(b"kvtier-lookup:" + engine_id.encode()).digest()


def _pack_tokens(tokens: list[int]) -> bytes:
    return array.array("I", tokens).tobytes()


class _LookupServer:
    """Answers the scheduler's lookups from a worker's embedded engine (a daemon thread)."""

    def __init__(self, engine: "kvtier.Engine", path: str, authkey: bytes, info=None):
        self.engine = engine
        self.info = info or dict
        self.path = path
        if os.path.exists(path):
            os.unlink(path)
        self.listener = Listener(path, family="AF_UNIX", authkey=authkey)
        os.chmod(path, 0o600)
        threading.Thread(target=self._accept, name="kvtier-lookup", daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn = self.listener.accept()
            except Exception:  # listener closed, or a client failed authentication
                if self.listener is None:
                    return
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            while True:
                try:
                    op, payload, salt = conn.recv()
                except (EOFError, OSError):
                    return
                try:
                    if op == "lookup":
                        toks = array.array("I")
                        toks.frombytes(payload)
                        conn.send(("ok", self.engine.lookup(toks.tolist(), salt)))
                    elif op == "stats":
                        conn.send(("ok", self.engine.stats()))
                    elif op == "flush":
                        conn.send(("ok", self.engine.flush(float(payload or 30.0))))
                    elif op == "chunk_keys":
                        conn.send(("ok", self.engine.chunk_keys(list(payload), salt)))
                    elif op == "connector":
                        conn.send(("ok", self.info()))
                    elif op == "identity":
                        conn.send(("ok", self.engine.identity()))
                    else:
                        conn.send(("err", f"unknown op {op!r}"))
                except (EOFError, OSError):
                    return  # the client went away (e.g. it gave up on a slow lookup)
                except Exception as e:  # answer with the error, keep serving
                    try:
                        conn.send(("err", str(e)))
                    except OSError:
                        return

    def close(self):
        listener, self.listener = self.listener, None
        try:
            listener.close()
            os.unlink(self.path)
        except OSError:
            pass


def worker_call(engine_id: str, op: str, payload: Any = None, salt: str | None = None,
                rank: int = 0, lookup_socket_dir: str | None = None) -> Any:
    """Asks a running worker's connector (embedded mode) for ``stats`` (engine),
    ``connector`` (loaded/saved tokens, load failures), ``flush``,
    ``chunk_keys`` (payload: tokens), ``identity`` or ``lookup`` (payload: tokens).
    For tests and operators; ``engine_id`` is the ``--kv-transfer-config`` engine_id."""
    path = _socket_path({"lookup_socket_dir": lookup_socket_dir}, engine_id, rank)
    with Client(path, family="AF_UNIX", authkey=_authkey(engine_id)) as c:
        c.send((op, _pack_tokens(payload) if op == "lookup" else payload, salt))
        status, val = c.recv()
    if status != "ok":
        raise RuntimeError(val)
    return val


class KvTierConnector(KVConnectorBase_V1):
    """Stores prompt KV in kvtier and loads stored prefixes instead of recomputing them."""

    def __init__(
        self,
        vllm_config: "VllmConfig",
        role: KVConnectorRole,
        kv_cache_config: "KVCacheConfig | None" = None,
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._conn_cfg, self._eng_cfg = _settings(vllm_config)
        self._block_size = _block_size(vllm_config)
        bpc = int(self._conn_cfg.get("blocks_per_chunk", 0) or 0)
        cs = int(self._eng_cfg.pop("chunk_size", 0) or 0)
        if bpc <= 0:
            bpc = max(1, cs // self._block_size) if cs else 1
        if cs and cs != bpc * self._block_size:
            raise ValueError(
                f"kvtier connector: chunk_size {cs} must be a multiple of vLLM's block size "
                f"{self._block_size} (whole blocks per chunk)"
            )
        self._chunk = bpc * self._block_size
        self._bpc = bpc
        self._engine_id = str(vllm_config.kv_transfer_config.engine_id or "kvtier")
        self._server_mode = "server" in self._conn_cfg
        pc = vllm_config.parallel_config
        self._num_ranks = int(pc.tensor_parallel_size) * int(pc.pipeline_parallel_size)
        self._lookup_timeout = float(self._conn_cfg.get("lookup_timeout_s", 30.0))
        self._lookup_budget = float(self._conn_cfg.get("lookup_budget_ms", 2.0)) / 1000.0
        self._lookup_deadline = float(self._conn_cfg.get("lookup_deadline_s", 2.0))
        if self._lookup_budget < 0 or self._lookup_deadline <= 0:
            raise ValueError(
                "kvtier connector: lookup_budget_ms must be >= 0 and lookup_deadline_s > 0 "
                f"(got {self._lookup_budget * 1000.0} ms, {self._lookup_deadline} s)"
            )
        self._layerwise = _flag(self._conn_cfg.get("layerwise", True))

        # scheduler side
        self._reqs: dict[str, _ReqState] = {}
        self._tls = threading.local()  # per lookup thread: its connections to the ranks
        self._lookup_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._step_wait_left = self._lookup_budget  # blocking left in this scheduler step
        self._warned_deadline = False
        self._logged_deferred = False
        self.lookup_stats = {"sync": 0, "deferred": 0, "late": 0, "expired": 0}
        self._sched_engine: kvtier.Engine | None = None
        # worker side
        self._engine: kvtier.Engine | None = None
        self._layers: list[torch.Tensor] = []  # block-major views, model order
        self._layer_index: dict[str, int] = {}  # layer name -> index in _layers
        self._block_shape: tuple[int, ...] = ()
        self._lookup_server: _LookupServer | None = None
        self._errors_lock = threading.Lock()
        self._load_errors: set[int] = set()
        self._bufs: dict[str, torch.Tensor] = {}  # host staging buffers, "load" and "save"
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

        if role == KVConnectorRole.SCHEDULER and self._server_mode:
            self._sched_engine = self._open_engine(
                _identity(vllm_config, _TORCH_DTYPES[_cache_dtype(vllm_config)], self._device_type(), 0)
            )
        logger.info(
            "kvtier connector (%s): chunk %d tokens = %d block(s) of %d; %s mode",
            role.name if hasattr(role, "name") else role,
            self._chunk,
            bpc,
            self._block_size,
            "server" if self._server_mode else "embedded",
        )

    # -- helpers ---------------------------------------------------------------------------

    def _device_type(self) -> str:
        dev = getattr(self._vllm_config.device_config, "device_type", None) or "cpu"
        return str(dev)

    def _open_engine(self, identity: dict) -> "kvtier.Engine":
        cfg = _engine_config(self._conn_cfg, self._eng_cfg, self._chunk)
        eng = kvtier.Engine(cfg, identity=identity)
        if eng.chunk_size != self._chunk:  # server mode: the server's chunk size rules
            if eng.chunk_size % self._block_size:
                raise ValueError(
                    f"kvtier connector: the server's chunk_size {eng.chunk_size} is not a multiple "
                    f"of vLLM's block size {self._block_size}"
                )
            self._chunk = eng.chunk_size
            self._bpc = eng.chunk_size // self._block_size
        return eng

    # -- scheduler side --------------------------------------------------------------------

    def _client(self, rank: int):
        """This lookup thread's connection to a worker rank (connections are not shared
        between threads: a request and its answer must not interleave with another's)."""
        clients = getattr(self._tls, "clients", None)
        if clients is None:
            clients = self._tls.clients = {}
        c = clients.get(rank)
        if c is None:
            path = _socket_path(self._conn_cfg, self._engine_id, rank)
            deadline = time.monotonic() + self._lookup_timeout
            while True:
                try:
                    c = Client(path, family="AF_UNIX", authkey=_authkey(self._engine_id))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            clients[rank] = c
        return c

    def _drop_clients(self) -> None:
        # After a timeout or an error a connection may still owe an answer: never reuse it.
        for c in getattr(self._tls, "clients", {}).values():
            try:
                c.close()
            except OSError:
                pass
        self._tls.clients = {}

    def _ask_ranks(self, tokens: list[int], salt: str | None, deadline: float) -> int:
        """The minimum over the ranks of their stored prefix. The question goes to every
        rank before any answer is read, so the ranks look up in parallel."""
        payload = _pack_tokens(tokens)
        try:
            conns = []
            for r in range(self._num_ranks):
                c = self._client(r)
                c.send(("lookup", payload, salt))
                conns.append((r, c))
            best: int | None = None
            for r, c in conns:
                if not c.poll(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"worker rank {r} did not answer the lookup before its deadline")
                status, val = c.recv()
                if status != "ok":
                    raise RuntimeError(f"worker rank {r}: {val}")
                best = int(val) if best is None else min(best, int(val))
            return best or 0
        except BaseException:
            self._drop_clients()
            raise

    def _lookup(self, tokens: list[int], salt: str | None, deadline: float | None = None) -> int:
        """Runs on a lookup thread. Any failure is a miss, never a failed request."""
        if deadline is None:
            deadline = time.monotonic() + self._lookup_deadline
        try:
            if self._sched_engine is not None:
                return self._sched_engine.lookup(tokens, salt)
            return self._ask_ranks(tokens, salt, deadline)
        except TimeoutError as e:
            # The scheduler has already counted this request a miss (its deadline is
            # earlier); this only retires the thread and its connections.
            logger.debug("kvtier lookup abandoned: %s", e)
            return 0
        except Exception as e:
            logger.warning("kvtier lookup failed, treating as a miss: %s", e)
            return 0

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._lookup_pool is None:
            n = max(1, int(self._conn_cfg.get("lookup_threads", 4)))
            self._lookup_pool = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="kvtier-lookup")
        return self._lookup_pool

    def _resolve(self, st: _ReqState, stored: int) -> None:
        st.pending = None
        st.hit = min(stored, st.usable)
        st.saved = st.n_save > 0 and stored >= st.n_save  # every full chunk is stored: no save
        if st.n_save == 0:
            st.saved = True

    def _answered(self, req_id: str, st: _ReqState) -> bool:
        """True once the request's lookup has an answer (a result, or a miss past its
        deadline). Blocks at most what is left of this step's lookup budget."""
        fut = st.pending
        assert fut is not None
        now = time.monotonic()
        wait = min(self._step_wait_left, st.deadline - now)
        if not fut.done() and wait > 0:
            concurrent.futures.wait([fut], timeout=wait)
            self._step_wait_left = max(0.0, self._step_wait_left - (time.monotonic() - now))
        if fut.done():
            self.lookup_stats["late" if st.deferred else "sync"] += 1
            self._resolve(st, fut.result())
            return True
        if time.monotonic() >= st.deadline:
            fut.cancel()  # a queued lookup never runs; a running one is left to finish
            self._resolve(st, 0)
            self.lookup_stats["expired"] += 1
            if not self._warned_deadline:
                self._warned_deadline = True
                logger.warning(
                    "kvtier: a lookup took longer than lookup_deadline_s=%.3g s (request %s); "
                    "such requests are treated as misses and recomputed (warned once)",
                    self._lookup_deadline,
                    req_id,
                )
            return True
        st.deferred = True
        self.lookup_stats["deferred"] += 1
        if not self._logged_deferred:
            self._logged_deferred = True
            logger.info(
                "kvtier: lookup of request %s is slower than lookup_budget_ms=%.3g: answering "
                "asynchronously (the scheduler asks again next step)",
                req_id,
                self._lookup_budget * 1000.0,
            )
        return False

    def get_num_new_matched_tokens(
        self, request: "Request", num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        st = self._reqs.get(request.request_id)
        if st is None:
            tokens = list(request.prompt_token_ids or [])
            st = _ReqState(tokens=tokens, salt=getattr(request, "cache_salt", None) or None)
            st.n_save = (len(tokens) // self._chunk) * self._chunk
            # Never load the whole prompt: the last token must be computed for logits.
            st.usable = ((len(tokens) - 1) // self._chunk) * self._chunk if tokens else 0
            self._reqs[request.request_id] = st
            if st.n_save > 0:
                st.deadline = time.monotonic() + self._lookup_deadline
                # The lookup thread gives up a little after the scheduler stops waiting.
                st.pending = self._pool().submit(self._lookup, tokens[: st.n_save], st.salt, st.deadline + 1.0)
            else:
                self._resolve(st, 0)
        if st.pending is not None and not self._answered(request.request_id, st):
            # vLLM 0.32: None = "cannot tell yet": the request is skipped this step and
            # asked again in the next one (scheduler.py, skip_request).
            return None, False
        extra = st.hit - num_computed_tokens
        if extra <= 0:
            return 0, False
        return extra, False

    def update_state_after_alloc(
        self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int
    ):
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        st.load_tokens = num_external_tokens
        if num_external_tokens > 0:
            st.block_ids = list(blocks.get_block_ids()[0])

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        # Called once at the end of each schedule(): the next step gets a fresh budget.
        self._step_wait_left = self._lookup_budget
        meta = KvTierConnectorMetadata()
        bs = self._block_size
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            if st.load_tokens > 0:
                start = new.num_computed_tokens - st.load_tokens  # tokens computed locally before
                end = new.num_computed_tokens
                first, last = start // bs, end // bs
                meta.loads.append(
                    LoadSpec(new.req_id, st.tokens[:end], st.salt, st.block_ids[first:last], first)
                )
                st.load_tokens = 0
            self._maybe_save(meta, new.req_id, st, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            if req_id in getattr(cached, "resumed_req_ids", ()):  # preempted: blocks were redone
                st.block_ids = []
                st.saved = False
            nb = cached.new_block_ids[i]
            if nb is not None:
                st.block_ids.extend(nb[0])
            self._maybe_save(meta, req_id, st, cached.num_computed_tokens[i], scheduler_output)
        return meta

    def _maybe_save(self, meta, req_id, st: _ReqState, computed: int, so) -> None:
        """Emits the save of the prompt's full chunks in the step that completes them.

        With chunked prefill the blocks computed in earlier steps stay allocated to the
        request, so one save, in the step where its last full chunk is computed, covers all.
        """
        if st.saved:
            return
        n_save = (len(st.tokens) // self._chunk) * self._chunk
        if n_save == 0:
            st.saved = True
            return
        done = computed + so.num_scheduled_tokens.get(req_id, 0)
        if done < n_save:
            return
        nblocks = n_save // self._block_size
        if len(st.block_ids) < nblocks:
            return
        meta.saves.append(SaveSpec(req_id, st.tokens[:n_save], st.salt, st.block_ids[:nblocks]))
        st.saved = True

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict | None]:
        # Also called for requests aborted while still waiting (e.g. on a pending lookup).
        st = self._reqs.pop(request.request_id, None)
        if st is not None and st.pending is not None:
            st.pending.cancel()
            st.pending = None
        return False, None  # saves finish inside wait_for_save: blocks can be freed now

    def pending_lookups(self) -> int:
        """Requests whose lookup is still unanswered (scheduler side; for tests and metrics)."""
        return sum(1 for st in self._reqs.values() if st.pending is not None)

    # -- worker side -----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        def layer_index(name: str) -> tuple[int, str]:
            m = re.search(r"layers\.(\d+)\.", name)
            return (int(m.group(1)) if m else 0, name)

        names = sorted(kv_caches, key=layer_index)
        num_blocks = int(self._kv_cache_config.num_blocks) if self._kv_cache_config is not None else None
        first = kv_caches[names[0]]
        # The block dimension: 0 for (blocks, ...) layouts (CPU), 1 for (2, blocks, ...).
        if num_blocks is not None and first.shape[0] != num_blocks and first.ndim > 1 and first.shape[1] == num_blocks:
            bdim = 1
        else:
            bdim = 0
        self._layers = [kv_caches[n].movedim(bdim, 0) if bdim else kv_caches[n] for n in names]
        self._layer_index = {n: i for i, n in enumerate(names)}
        self._block_shape = tuple(self._layers[0].shape[1:])
        dtype = first.dtype
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"kvtier connector: unsupported KV cache dtype {dtype}")
        self._device = first.device
        rank = self._rank()
        ident = _identity(self._vllm_config, _TORCH_DTYPES[dtype], first.device.type, rank)
        ident["layout"]["groups"][0]["num_layers"] = len(names)
        self._engine = self._open_engine(ident)
        per_block = len(names) * self._layers[0][0].numel() * first.element_size()
        if per_block != self._block_size * self._engine.bytes_per_token:
            raise ValueError(
                f"kvtier connector: a block holds {per_block} bytes over all layers, but the model "
                f"identity gives {self._engine.bytes_per_token} bytes/token x {self._block_size}; "
                "this attention backend's KV layout is not supported"
            )
        if not self._server_mode:
            self._lookup_server = _LookupServer(
                self._engine,
                _socket_path(self._conn_cfg, self._engine_id, rank),
                _authkey(self._engine_id),
                info=lambda: dict(self.stats),
            )
        logger.info(
            "kvtier connector: %d layers, block shape %s %s on %s, %d bytes/token; %r",
            len(names), self._block_shape, dtype, first.device, self._engine.bytes_per_token, self._engine,
        )

    def _rank(self) -> int:
        try:
            from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

            tp = int(self._vllm_config.parallel_config.tensor_parallel_size)
            return get_pp_group().rank_in_group * tp + get_tensor_model_parallel_rank()
        except Exception:
            return 0

    def _buffer(self, kind: str, numel: int) -> torch.Tensor:
        """A flat host tensor in the cache dtype, one per kind ("load", "save": a step's loads
        run while its saves are staged). Reused across steps: no page faults per request;
        pinned on CUDA so the copies can be asynchronous."""
        buf = self._bufs.get(kind)
        if buf is None or buf.numel() < numel:
            pin = self._device.type == "cuda"
            buf = torch.empty(numel, dtype=self._layers[0].dtype, device="cpu", pin_memory=pin)
            self._bufs[kind] = buf
        return buf[:numel]

    def _chunk_shape(self, n_chunks: int) -> tuple[int, ...]:
        return (n_chunks, len(self._layers), self._bpc) + self._block_shape

    def _carve(self, kind: str, chunk_counts: list[int]) -> list[torch.Tensor]:
        """Views (chunks, layers, blocks_per_chunk, *block) of one staging buffer, one per
        entry of chunk_counts, back to back."""
        per_chunk = len(self._layers) * self._bpc
        for d in self._block_shape:
            per_chunk *= d
        flat = self._buffer(kind, per_chunk * sum(chunk_counts))
        views, off = [], 0
        for n in chunk_counts:
            views.append(flat[off : off + n * per_chunk].view(self._chunk_shape(n)))
            off += n * per_chunk
        return views

    def _cuda_stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self._device)
        return self._stream

    def _add_load_errors(self, block_ids) -> None:
        with self._errors_lock:
            self._load_errors.update(block_ids)

    # -- loads -----------------------------------------------------------------------------

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        self._join_load()
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvTierConnectorMetadata) or self._engine is None or not meta.loads:
            return
        specs = list(meta.loads)
        xfer = _InflightLoad(len(self._layers))
        start_ev = None
        if self._device.type == "cuda":
            # The side stream writes the blocks only after the work already queued on the
            # compute stream (e.g. vLLM zeroing freshly allocated blocks).
            start_ev = torch.cuda.Event()
            start_ev.record(torch.cuda.current_stream(self._device))
        if self._layerwise and self._hooks_seen:
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
        plans = []  # from _retrieve: (block ids, stage chunks, first block in them, n blocks)
        # vLLM runs the forward pass under inference mode, which is per thread: the cache and
        # staging tensors are inference tensors that only inference mode may update in place.
        try:
            with torch.inference_mode():
                self._load_layers(specs, xfer, start_ev, plans)
        except Exception as e:  # unexpected (a copy failed): recompute every block of the step
            logger.warning("kvtier: copying loaded KV into the cache failed: %s", e)
            for spec in specs:
                self._add_load_errors(spec.block_ids)
            self.stats["load_failures"] += 1
        finally:
            for ev in xfer.ready:  # never leave the forward pass waiting
                ev.set()

    def _load_layers(self, specs: list[LoadSpec], xfer: _InflightLoad, start_ev, plans: list) -> None:
        """Retrieves, then copies layer by layer (see _load_job); appends to plans."""
        stages = self._carve("load", [len(sp.tokens) // self._chunk for sp in specs])
        for spec, stage in zip(specs, stages):
            plan = self._retrieve(spec, stage)
            if plan is not None:
                plans.append(plan)
        cuda = self._device.type == "cuda"
        # On CUDA this runs on the load thread: select the cache's device and side stream.
        dev_ctx = torch.cuda.device(self._device) if cuda else _nullctx()
        stream_ctx = torch.cuda.stream(self._cuda_stream()) if cuda else _nullctx()
        with dev_ctx, stream_ctx:
            if start_ev is not None:
                self._cuda_stream().wait_event(start_ev)
            for li, kv in enumerate(self._layers):
                for plan in plans:
                    src = self._layer_blocks(plan, li)
                    if cuda:
                        src = src.to(self._device, non_blocking=True)
                    kv.index_copy_(0, plan[0], src)
                if cuda:
                    ev = torch.cuda.Event()
                    ev.record(self._cuda_stream())
                    xfer.cuda_events[li] = ev
                xfer.ready[li].set()

    def _retrieve(self, spec: LoadSpec, stage: torch.Tensor):
        """Fills ``stage`` with the spec's stored prefix; returns (block ids, source blocks
        (n, layers, *block)) for the blocks that were filled, and records the rest as load
        errors."""
        bpc, bs = self._bpc, self._block_size
        first_chunk = spec.first_block // bpc
        got = 0
        try:
            # The engine fills the whole prefix; chunks before first_chunk were computed locally.
            got = self._engine.retrieve(spec.tokens, stage)
        except Exception as e:
            logger.warning("kvtier load of %s failed: %s", spec.req_id, e)
        got_blocks = got // bs
        n_ok = max(0, min(len(spec.block_ids), got_blocks - spec.first_block))
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
        ids = torch.tensor(spec.block_ids[:n_ok], dtype=torch.long, device=self._device)
        return ids, stage[first_chunk:], spec.first_block - first_chunk * bpc, n_ok

    @staticmethod
    def _layer_blocks(plan, li: int) -> torch.Tensor:
        """Layer li's loaded blocks (n, *block) out of a plan from _retrieve: within a chunk
        a layer's blocks are contiguous (the payload is layer-major), so this is one view per
        chunk (a copy of this layer only when chunks of several blocks each are loaded)."""
        _, chunks, src_from, n_ok = plan
        return chunks[:, li].flatten(0, 1)[src_from : src_from + n_ok]

    def wait_for_layer_load(self, layer_name: str) -> None:
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
        stages = self._carve("save", [len(sp.block_ids) // self._bpc for sp in meta.saves])
        items = [
            _SaveItem(sp, torch.tensor(sp.block_ids, dtype=torch.long, device=self._device), stage)
            for sp, stage in zip(meta.saves, stages)
        ]
        return _SavePlan(meta, items)

    def _stage_layer(self, plan: _SavePlan, li: int) -> None:
        """Copies layer li's blocks of every save of the step into the staging buffer."""
        with torch.inference_mode():  # per thread, as in _load_job
            self._stage_layer_blocks(plan, li)

    def _stage_layer_blocks(self, plan: _SavePlan, li: int) -> None:
        kv = self._layers[li]
        for it in plan.items:
            n = len(it.spec.block_ids)
            blocks = kv.index_select(0, it.ids).view(n // self._bpc, self._bpc, *self._block_shape)
            if kv.device.type == "cuda":
                it.stage[:, li].copy_(blocks, non_blocking=True)
                it.keep.append(blocks)  # alive until the copy is synced
            else:
                it.stage[:, li].copy_(blocks)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata", **kwargs: Any
    ) -> None:
        self._hooks_seen = True
        li = self._layer_index.get(layer_name)
        if li is None or self._engine is None or not self._layerwise or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
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

    def wait_for_save(self):
        self._join_load()  # loads of this step are in the cache (and may be saved again)
        plan, self._save_plan = self._save_plan, None
        if self._engine is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
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
        for li in range(len(self._layers)):
            if li not in plan.staged:  # the hook did not run for this layer: stage it now
                self._stage_layer(plan, li)
                self.stats["layers_staged_late"] += 1
        if self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()
        for it in plan.items:
            try:
                rep = self._engine.store(it.spec.tokens, it.stage, it.spec.salt)
                self.stats["saved_tokens"] += rep["new_chunks"] * self._chunk
            except Exception as e:  # a failed save only costs a future hit
                logger.warning("kvtier save of %s failed: %s", it.spec.req_id, e)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._join_load()
        with self._errors_lock:
            errs, self._load_errors = self._load_errors, set()
        return errs

    def shutdown(self):
        try:
            self._join_load()
        except Exception:
            pass
        for pool in (self._xfer_pool, self._copy_pool, self._lookup_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        if self._lookup_server is not None:
            self._lookup_server.close()
            self._lookup_server = None
        if self._engine is not None:
            try:
                self._engine.flush(10.0)
            except Exception:
                pass
