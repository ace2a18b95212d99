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

If a load comes back short or corrupt (a checksum failure, a chunk evicted between lookup
and load), the worker reports the blocks it could not fill through
``get_block_ids_with_load_errors`` and vLLM recomputes them when
``kv_load_failure_policy="recompute"``.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import os
import re
import tempfile
import threading
import time
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
_CONNECTOR_KEYS = {"config", "config_file", "blocks_per_chunk", "lookup_socket_dir", "lookup_timeout_s", "server"}


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
                except Exception as e:  # answer with the error, keep serving
                    conn.send(("err", str(e)))

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

        # scheduler side
        self._reqs: dict[str, _ReqState] = {}
        self._clients: dict[int, Any] = {}
        self._sched_engine: kvtier.Engine | None = None
        # worker side
        self._engine: kvtier.Engine | None = None
        self._layers: list[torch.Tensor] = []  # block-major views, model order
        self._block_shape: tuple[int, ...] = ()
        self._lookup_server: _LookupServer | None = None
        self._load_errors: set[int] = set()
        self._stage_buf: torch.Tensor | None = None
        self.stats = {"loaded_tokens": 0, "saved_tokens": 0, "load_failures": 0}

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

    def _ask_rank(self, rank: int, tokens: list[int], salt: str | None) -> int:
        c = self._clients.get(rank)
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
            self._clients[rank] = c
        try:
            c.send(("lookup", _pack_tokens(tokens), salt))
            status, val = c.recv()
        except (EOFError, OSError):
            self._clients.pop(rank, None)
            raise
        if status != "ok":
            raise RuntimeError(val)
        return int(val)

    def _lookup(self, tokens: list[int], salt: str | None) -> int:
        try:
            if self._sched_engine is not None:
                return self._sched_engine.lookup(tokens, salt)
            return min(self._ask_rank(r, tokens, salt) for r in range(self._num_ranks))
        except Exception as e:  # a lookup failure is a miss, never a failed request
            logger.warning("kvtier lookup failed, treating as a miss: %s", e)
            return 0

    def get_num_new_matched_tokens(
        self, request: "Request", num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        tokens = list(request.prompt_token_ids or [])
        salt = getattr(request, "cache_salt", None) or None
        st = self._reqs.get(request.request_id)
        if st is None:
            st = _ReqState(tokens=tokens, salt=salt)
            n_save = (len(tokens) // self._chunk) * self._chunk
            # Never load the whole prompt: the last token must be computed for logits.
            usable = ((len(tokens) - 1) // self._chunk) * self._chunk if tokens else 0
            stored = self._lookup(tokens[:n_save], salt) if n_save > 0 else 0
            st.hit = min(stored, usable)
            st.saved = stored >= n_save  # every full chunk is stored already: no save
            self._reqs[request.request_id] = st
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
        self._reqs.pop(request.request_id, None)
        return False, None  # saves are synchronous: blocks can be freed now

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

    def _staging(self, n_blocks: int) -> torch.Tensor:
        """A host tensor (n_chunks, layers, blocks_per_chunk, *block) in the cache dtype."""
        shape = (n_blocks // self._bpc, len(self._layers), self._bpc) + self._block_shape
        numel = 1
        for d in shape:
            numel *= d
        # Reused across steps (loads and saves are synchronous): no page faults per request.
        if self._stage_buf is None or self._stage_buf.numel() < numel:
            pin = self._device.type == "cuda"
            self._stage_buf = torch.empty(numel, dtype=self._layers[0].dtype, device="cpu", pin_memory=pin)
        return self._stage_buf[:numel].view(shape)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvTierConnectorMetadata) or self._engine is None:
            return
        for spec in meta.loads:
            self._load(spec)

    def _load(self, spec: LoadSpec) -> None:
        bpc, bs = self._bpc, self._block_size
        first_chunk = spec.first_block // bpc
        n_chunks = len(spec.tokens) // self._chunk
        stage = self._staging(n_chunks * bpc)
        # The engine fills the whole prefix; chunks before first_chunk were computed locally.
        got = 0
        try:
            got = self._engine.retrieve(spec.tokens, stage)
        except Exception as e:
            logger.warning("kvtier load of %s failed: %s", spec.req_id, e)
        got_blocks = got // bs
        ok = [i for i in range(len(spec.block_ids)) if spec.first_block + i < got_blocks]
        bad = spec.block_ids[len(ok) :]
        if ok:
            src_from = spec.first_block - first_chunk * bpc
            ids = torch.tensor(spec.block_ids[: len(ok)], dtype=torch.long, device=self._device)
            flat = stage.view(n_chunks, len(self._layers), bpc, *self._block_shape)
            for li, kv in enumerate(self._layers):
                src = flat[first_chunk:, li].reshape(-1, *self._block_shape)[src_from : src_from + len(ok)]
                kv.index_copy_(0, ids, src.to(self._device, non_blocking=True))
        if bad:
            self._load_errors.update(bad)
            self.stats["load_failures"] += 1
            logger.warning(
                "kvtier: request %s loaded %d of %d tokens; %d block(s) will be recomputed",
                spec.req_id, got, len(spec.tokens), len(bad),
            )
        self.stats["loaded_tokens"] += len(ok) * bs

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads finish inside start_load_kv

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata", **kwargs: Any
    ) -> None:
        return  # whole blocks of all layers are saved in wait_for_save

    def wait_for_save(self):
        if self._engine is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvTierConnectorMetadata):
            return
        for spec in meta.saves:
            try:
                self._save(spec)
            except Exception as e:  # a failed save only costs a future hit
                logger.warning("kvtier save of %s failed: %s", spec.req_id, e)

    def _save(self, spec: SaveSpec) -> None:
        n = len(spec.block_ids)
        stage = self._staging(n)
        ids = torch.tensor(spec.block_ids, dtype=torch.long, device=self._device)
        view = stage.view(n // self._bpc, len(self._layers), self._bpc, *self._block_shape)
        for li, kv in enumerate(self._layers):
            blocks = kv.index_select(0, ids).view(n // self._bpc, self._bpc, *self._block_shape)
            view[:, li].copy_(blocks)
        rep = self._engine.store(spec.tokens, stage, spec.salt)
        self.stats["saved_tokens"] += rep["new_chunks"] * self._chunk

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errs, self._load_errors = self._load_errors, set()
        return errs

    def shutdown(self):
        if self._lookup_server is not None:
            self._lookup_server.close()
            self._lookup_server = None
        if self._engine is not None:
            try:
                self._engine.flush(10.0)
            except Exception:
                pass
