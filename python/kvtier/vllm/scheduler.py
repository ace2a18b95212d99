"""The connector's scheduler side (in vLLM's EngineCore process): answers how many prompt
tokens kvtier can load, and tells the workers which blocks to load and save each step."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from .arbitration import Arbiter, CostModel
from .lookup import AsyncLookups, PendingLookup, RankClients
from .metadata import KvTierConnectorMetadata, LoadSpec, SaveSpec
from .settings import ConnectorSettings, kv_dtype_code, model_identity

if TYPE_CHECKING:  # pragma: no cover
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger("vllm.kvtier")


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
    pending: PendingLookup | None = None  # the lookup, while unanswered
    tiers: list[int] | None = None  # tier of each chunk to load (arbitration on)


class SchedulerSide:
    """Per-request lookup state and the step metadata (loads and saves).

    In embedded mode lookups go to the workers' lookup sockets; in server mode this side
    opens its own client of the server.
    """

    def __init__(self, settings: ConnectorSettings, vllm_config: "VllmConfig"):
        self._s = settings
        self._reqs: dict[str, _ReqState] = {}
        self._engine = None  # server mode: this side's client of the server
        #: Load or recompute, per request (see :mod:`.arbitration`).
        self.arbiter = Arbiter(settings.arbitration, CostModel(settings.prior_prefill_tok_s, settings.prior_chunk_s))
        self._detail = settings.arbitration != "off"  # lookups say which tier holds each chunk
        if settings.server_mode:
            ident = model_identity(vllm_config, kv_dtype_code(vllm_config), 0)
            self._engine = settings.open_engine(ident)
            lookup = self._server_lookup
        else:
            ranks = RankClients(settings.engine_id, settings.num_ranks, settings.lookup_socket_dir,
                                settings.lookup_timeout_s, detail=self._detail)
            lookup = ranks.lookup
        self.lookups = AsyncLookups(lookup, settings.lookup_threads, settings.lookup_budget_s,
                                    settings.lookup_deadline_s)

    def _server_lookup(self, tokens: list[int], salt: str | None, deadline: float) -> int | tuple[int, list[int]]:
        if not self._detail:
            return self._engine.lookup(tokens, salt)
        d = self._engine.lookup_detail(tokens, salt)
        return int(d["hit_tokens"]), list(d["tiers"])

    def _resolve(self, st: _ReqState, answer: int | tuple[int, list[int]]) -> None:
        stored, tiers = (answer, None) if isinstance(answer, int) else answer
        st.pending = None
        st.hit = min(stored, st.usable)
        chunk = self._s.chunk_tokens
        n = st.hit // chunk
        if tiers is not None and n > 0 and len(tiers) >= n:  # else: no tier per chunk, load all
            k = self.arbiter.plan(list(tiers[:n]), chunk)
            st.hit = k * chunk
            st.tiers = list(tiers[:k])
        st.saved = st.n_save > 0 and stored >= st.n_save  # every full chunk is stored: no save
        if st.n_save == 0:
            st.saved = True

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        """vLLM's question; None = "cannot tell yet" (the lookup is still running)."""
        chunk = self._s.chunk_tokens
        st = self._reqs.get(request.request_id)
        if st is None:
            tokens = list(request.prompt_token_ids or [])
            st = _ReqState(tokens=tokens, salt=getattr(request, "cache_salt", None) or None)
            st.n_save = (len(tokens) // chunk) * chunk
            # Never load the whole prompt: the last token must be computed for logits.
            st.usable = ((len(tokens) - 1) // chunk) * chunk if tokens else 0
            self._reqs[request.request_id] = st
            if st.n_save > 0:
                st.pending = self.lookups.submit(tokens[: st.n_save], st.salt)
            else:
                self._resolve(st, 0)
        if st.pending is not None:
            answer = self.lookups.answer(st.pending, request.request_id)
            if answer is None:
                # vLLM 0.32: None = "cannot tell yet": the request is skipped this step and
                # asked again in the next one (scheduler.py, skip_request).
                return None, False
            self._resolve(st, answer)
        extra = st.hit - num_computed_tokens
        if extra <= 0:
            return 0, False
        return extra, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        """Records how many external tokens vLLM agreed to load, and into which blocks."""
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        st.load_tokens = num_external_tokens
        if num_external_tokens > 0:
            st.block_ids = list(blocks.get_block_ids()[0])

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KvTierConnectorMetadata:
        """The loads and saves of the step just scheduled."""
        # Called once at the end of each schedule(): the next step gets a fresh budget.
        self.lookups.new_step()
        meta = KvTierConnectorMetadata(num_tokens=int(getattr(scheduler_output, "total_num_scheduled_tokens", 0) or 0))
        bs = self._s.block_size
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            if st.load_tokens > 0:
                start = new.num_computed_tokens - st.load_tokens  # tokens computed locally before
                end = new.num_computed_tokens
                first, last = start // bs, end // bs
                tiers = None
                if st.tiers is not None:  # the chunks this load covers
                    chunk = self._s.chunk_tokens
                    tiers = st.tiers[start // chunk : (end + chunk - 1) // chunk]
                meta.loads.append(LoadSpec(new.req_id, st.tokens[:end], st.salt, st.block_ids[first:last], first, tiers))
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
        chunk = self._s.chunk_tokens
        n_save = (len(st.tokens) // chunk) * chunk
        if n_save == 0:
            st.saved = True
            return
        done = computed + so.num_scheduled_tokens.get(req_id, 0)
        if done < n_save:
            return
        nblocks = n_save // self._s.block_size
        if len(st.block_ids) < nblocks:
            return
        meta.saves.append(SaveSpec(req_id, st.tokens[:n_save], st.salt, st.block_ids[:nblocks]))
        st.saved = True

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict | None]:
        """Forgets the request (also called for requests aborted while still waiting, e.g.
        on a pending lookup, whose queued lookup is cancelled)."""
        st = self._reqs.pop(request.request_id, None)
        if st is not None and st.pending is not None:
            st.pending.future.cancel()
            st.pending = None
        return False, None  # saves finish inside wait_for_save: blocks can be freed now

    def observe(self, data: dict) -> None:
        """Feeds the workers' per-step figures (their connector stats payload, summed over
        the ranks) to the arbitration's cost model: forward-pass tokens and time, and load
        time per chunk of the slowest tier each load read."""
        model = self.arbiter.model
        model.observe_step(int(data.get("worker.prefill_tokens", 0)), float(data.get("worker.prefill_s", 0.0)))
        for key, secs in data.items():
            if key.startswith("worker.load_s."):
                tier = key[len("worker.load_s."):]
                model.observe_load(int(tier), int(data.get(f"worker.load_chunks.{tier}", 0)), float(secs))

    def pending_lookups(self) -> int:
        """Requests whose lookup is still unanswered."""
        return sum(1 for st in self._reqs.values() if st.pending is not None)

    def shutdown(self) -> None:
        """Stops the lookup threads' queue."""
        self.lookups.shutdown()
