"""The connector's scheduler side (in vLLM's EngineCore process): answers how many prompt
tokens kvtier can load, and tells the workers which blocks to load and save each step."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from .arbitration import Arbiter, CostModel
from .events import RankVotes, events_enabled, external_hashes
from .groups import HybridEngines, KvGroup, group_identity, is_hybrid, window_boundaries
from .lookup import AsyncLookups, PendingLookup, RankClients, lookup_with_tiers
from .metadata import KvTierConnectorMetadata, LoadSpec, SaveSpec
from .settings import ConnectorSettings, kv_dtype_code, model_identity

if TYPE_CHECKING:  # pragma: no cover
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger("vllm.kvtier")

#: A decode request waiting for its producer's chunks asks again this often.
PD_RETRY_S = 0.02


@dataclasses.dataclass
class _ReqState:
    tokens: list[int]
    salt: str | None
    hit: int = 0  # tokens loadable from kvtier, from the lookup (chunk aligned but for a decoder)
    load_tokens: int = 0  # external tokens vLLM agreed to load
    group_blocks: list[list[int]] = dataclasses.field(default_factory=list)  # per KV-cache group, in prompt order
    saved: bool = False
    usable: int = 0  # the most tokens a load may cover (>= 1 token left; whole chunks but for a decoder)
    n_save: int = 0  # tokens to store: the prompt's full chunks (a prefill instance: all of it)
    n_lookup: int = 0  # tokens whose chunks the lookup asks for
    pending: PendingLookup | None = None  # the lookup, while unanswered
    tiers: list[int] | None = None  # tier of each chunk to load (arbitration on)
    expect: int = 0  # disaggregated decode: tokens the producer stored (from kv_transfer_params)
    wait_until: float = 0.0  # ... waited for until then (monotonic)
    retry_at: float = 0.0  # the next lookup while waiting
    block_hashes: list | None = None  # KV events on: vLLM's hashes of the prompt's blocks
    # Hybrid models (one block table per KV-cache group):
    local: int = 0  # tokens vLLM computed locally (prefix cache) when it asked for the hit
    next_chunk: list[int] = dataclasses.field(default_factory=list)  # per group: the first unsaved chunk
    boundaries: list[int] = dataclasses.field(default_factory=list)  # where later hits may end

    @property
    def block_ids(self) -> list[int]:
        """The blocks of the first (for most models, the only) KV-cache group."""
        return self.group_blocks[0] if self.group_blocks else []


def _runs(indexes: list[int]) -> list[tuple[int, int]]:
    """Sorted indexes as runs of consecutive ones: ``(first, end)``, end exclusive."""
    runs: list[tuple[int, int]] = []
    for i in indexes:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


class SchedulerSide:
    """Per-request lookup state and the step metadata (loads and saves).

    In embedded mode lookups go to the workers' lookup sockets; in server mode this side
    opens its own client of the server.
    """

    def __init__(self, settings: ConnectorSettings, vllm_config: "VllmConfig",
                 groups: list[KvGroup] | None = None):
        self._s = settings
        self._reqs: dict[str, _ReqState] = {}
        self._engine = None  # server mode: this side's client of the server
        #: vLLM's KV-cache groups. A hybrid model's loads are asynchronous (vLLM takes
        #: failures only per request there) and go group by group; saves keep each
        #: sliding-window group's window only.
        self.groups = groups or [KvGroup(0, 1, "full", 0, ())]
        self.hybrid = is_hybrid(self.groups)
        self._async_loads: list[str] = []  # hybrid: requests whose blocks were just allocated
        #: Disaggregated decode: requests whose producer's chunks all arrived in time
        #: (``complete``) or not (``short``: the rest was recomputed).
        self.pd_stats = {"complete": 0, "short": 0}
        self._warned_pd = False
        #: Load or recompute, per request (see :mod:`.arbitration`).
        self.arbiter = Arbiter(settings.arbitration, CostModel(settings.prior_prefill_tok_s, settings.prior_chunk_s))
        # Lookups say which tier holds each chunk; a hybrid load is not split by tier.
        self._detail = settings.arbitration != "off" and not self.hybrid
        #: A prefill/decode instance hands over the whole prompt, its partial last chunk
        #: (the tail) included, where the engine keeps tails (embedded engines are opened so).
        self.tails = settings.disaggregated
        if settings.server_mode:
            ident = model_identity(vllm_config, kv_dtype_code(vllm_config), 0)
            if self.hybrid:
                first = settings.open_engine(group_identity(ident, self.groups[0]))
                engines = [first] + [first.for_identity(group_identity(ident, g)) for g in self.groups[1:]]
                self._engine = HybridEngines(self.groups, engines, settings.chunk_tokens, settings.checkpoint_tokens)
            else:
                self._engine = settings.open_engine(ident)
            lookup = self._server_lookup
            if self.tails and not getattr(self._engine, "save_unfull_chunk", False):
                self.tails = False
                logger.warning(
                    "kvtier: %s with a server that keeps no partial chunks (save_unfull_chunk: false "
                    "in its config): only the prompt's full chunks are handed over and the decoder "
                    "recomputes up to %d tokens of each prompt; set save_unfull_chunk: true in every "
                    "kvtier serve of a prefill/decode deployment",
                    settings.kv_role, settings.chunk_tokens,
                )
        else:
            ranks = RankClients(settings.engine_id, settings.num_ranks, settings.lookup_socket_dir,
                                settings.lookup_timeout_s, detail=self._detail)
            lookup = ranks.lookup
        self.lookups = AsyncLookups(lookup, settings.lookup_threads, settings.lookup_budget_s,
                                    settings.lookup_deadline_s)
        #: KV events (vLLM's --kv-events-config): the workers report what their L1 holds, in
        #: vLLM's block hashes; a chunk is announced once every rank holds it. A server
        #: publishes its own stream (kvtier serve --kv-events-config).
        self.events = RankVotes(settings.num_ranks) if events_enabled(vllm_config) and not self.hybrid else None

    def _server_lookup(self, tokens: list[int], salt: str | None, deadline: float) -> int | tuple[int, list[int]]:
        if not self._detail:
            return self._engine.lookup(tokens, salt)
        return lookup_with_tiers(self._engine, tokens, salt)

    def _resolve(self, st: _ReqState, answer: int | tuple[int, list[int]]) -> None:
        stored, tiers = (answer, None) if isinstance(answer, int) else answer
        st.pending = None
        st.hit = min(stored, st.usable)
        chunk = self._s.chunk_tokens
        n = -(-st.hit // chunk)  # chunks the load reads (a tail, or a chunk read in part, too)
        if tiers is not None and n > 0 and len(tiers) >= n:  # else: no tier per chunk, load all
            k = self.arbiter.plan(list(tiers[:n]), chunk)
            if k < n:
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
            if self.events is not None:
                st.block_hashes = getattr(request, "block_hashes", None)
            role, n, full = self._s.kv_role, len(tokens), (len(tokens) // chunk) * chunk
            st.n_save = n if self.tails and role == "kv_producer" else full
            st.n_lookup = n if self.tails else full
            st.next_chunk = [0] * len(self.groups)
            st.group_blocks = [[] for _ in self.groups]
            # Never load the whole prompt: the last token must be computed for logits. A
            # decoder loads everything else (the tail, or its last chunk, only in part);
            # otherwise loads are whole chunks.
            if role == "kv_consumer":
                st.usable = max(0, n - 1)
            else:
                st.usable = ((n - 1) // chunk) * chunk if tokens else 0
            if self.hybrid:
                # A hit is loadable only where every sliding-window group holds its window:
                # the lookup checks the boundary the load would use.
                st.n_lookup = st.usable
                st.boundaries = window_boundaries(st.n_save, st.usable, self._s.checkpoint_tokens)
            self._reqs[request.request_id] = st
            if role != "kv_producer":
                # A decode instance behind a prefill one: the producer said how many tokens
                # it stored; wait (asking again) until they are all visible, or pd_wait_s.
                params = getattr(request, "kv_transfer_params", None) or {}
                want = int(params.get("kvtier_stored_tokens", 0) or 0)
                expect = min(want, st.usable, st.n_lookup)
                st.expect = expect if role == "kv_consumer" else (expect // chunk) * chunk
                st.wait_until = time.monotonic() + self._s.pd_wait_s
            if st.n_lookup > 0:
                st.pending = self.lookups.submit(tokens[: st.n_lookup], st.salt)
            else:
                self._resolve(st, 0)
        if st.pending is not None:
            answer = self.lookups.answer(st.pending, request.request_id)
            if answer is None:
                # vLLM 0.32: None = "cannot tell yet": the request is skipped this step and
                # asked again in the next one (scheduler.py, skip_request).
                return None, False
            if st.expect and self._waits_for_producer(st, request.request_id, answer):
                return None, False
            self._resolve(st, answer)
        elif st.expect and st.retry_at:  # waiting for the producer's chunks: ask again
            if time.monotonic() < st.retry_at:
                return None, False
            st.retry_at = 0.0
            st.pending = self.lookups.submit(st.tokens[: st.n_lookup], st.salt)
            return self.get_num_new_matched_tokens(request, num_computed_tokens)
        extra = st.hit - num_computed_tokens
        if extra <= 0:
            return 0, False
        st.local = num_computed_tokens
        # Hybrid: vLLM takes load failures only per request (failed_recving), so the
        # request waits for its load (WAITING_FOR_REMOTE_KVS) instead of computing with it.
        return extra, self.hybrid

    def _waits_for_producer(self, st: _ReqState, req_id: str, answer) -> bool:
        """Whether a decode request keeps waiting for its producer's chunks (the lookup
        found fewer than the producer stored, and pd_wait_s has not passed)."""
        stored = answer if isinstance(answer, int) else answer[0]
        if stored >= st.expect:
            self.pd_stats["complete"] += 1
            st.expect = 0
            return False
        if time.monotonic() < st.wait_until:
            st.pending = None
            st.retry_at = time.monotonic() + PD_RETRY_S
            return True
        self.pd_stats["short"] += 1
        if not self._warned_pd:
            self._warned_pd = True
            logger.warning(
                "kvtier: request %s: the prefill instance stored %d tokens, %d are visible after "
                "pd_wait_s=%.3g s; the rest is recomputed (warned once, counted in pd_short)",
                req_id, st.expect, stored, self._s.pd_wait_s,
            )
        st.expect = 0
        return False

    def take_pd_stats(self) -> dict[str, int]:
        """Disaggregated-decode outcomes since the last call (``pd.complete``, ``pd.short``)."""
        d, self.pd_stats = self.pd_stats, dict.fromkeys(self.pd_stats, 0)
        return {f"pd.{k}": v for k, v in d.items()}

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        """Records how many external tokens vLLM agreed to load, and into which blocks."""
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        st.load_tokens = num_external_tokens
        if num_external_tokens > 0:
            st.group_blocks = [list(ids) for ids in blocks.get_block_ids()]
            if self.hybrid:
                self._async_loads.append(request.request_id)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KvTierConnectorMetadata:
        """The loads and saves of the step just scheduled."""
        # Called once at the end of each schedule(): the next step gets a fresh budget.
        self.lookups.new_step()
        meta = KvTierConnectorMetadata(num_tokens=int(getattr(scheduler_output, "total_num_scheduled_tokens", 0) or 0))
        bs = self._s.block_size
        self._emit_async_loads(meta)
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.group_blocks = [list(ids) for ids in new.block_ids]
            if self.hybrid:
                self._maybe_save_groups(meta, new.req_id, st, new.num_computed_tokens, scheduler_output)
                continue
            if st.load_tokens > 0:
                start = new.num_computed_tokens - st.load_tokens  # tokens computed locally before
                end = new.num_computed_tokens
                chunk = self._s.chunk_tokens
                # A decoder's load may end inside a block (and a chunk): that block is filled
                # in part, and the chunk is asked for by all its tokens (its key hashes them).
                first, last = start // bs, -(-end // bs)
                key_end = min(len(st.tokens), -(-end // chunk) * chunk)
                tiers = None
                if st.tiers is not None:  # the chunks this load covers
                    tiers = st.tiers[start // chunk : (end + chunk - 1) // chunk]
                meta.loads.append(LoadSpec(new.req_id, st.tokens[:key_end], st.salt, st.block_ids[first:last], first,
                                           tiers, None if end == key_end else end, self._hashes(st, key_end)))
                st.load_tokens = 0
            self._maybe_save(meta, new.req_id, st, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            if req_id in getattr(cached, "resumed_req_ids", ()):  # preempted: blocks were redone
                st.saved = False
                st.group_blocks = [[] for _ in self.groups]
                st.next_chunk = [0] * len(self.groups)
            nb = cached.new_block_ids[i]
            if nb is not None:
                for ids, new_ids in zip(st.group_blocks, nb):
                    ids.extend(new_ids)
            if self.hybrid:
                self._maybe_save_groups(meta, req_id, st, cached.num_computed_tokens[i], scheduler_output)
            else:
                self._maybe_save(meta, req_id, st, cached.num_computed_tokens[i], scheduler_output)
        return meta

    def _emit_async_loads(self, meta: KvTierConnectorMetadata) -> None:
        """Hybrid: the loads of the requests vLLM allocated blocks for in this schedule()
        (they wait in WAITING_FOR_REMOTE_KVS until the workers report them done): per
        group, the blocks vLLM allocated (a sliding-window group's start at its window)."""
        bs, bpc = self._s.block_size, self._s.blocks_per_chunk
        for req_id in self._async_loads:
            st = self._reqs.get(req_id)
            if st is None or st.load_tokens <= 0:
                continue
            start, end = st.local, st.local + st.load_tokens
            meta.async_loads.append(req_id)
            for g in self.groups:
                ids = st.group_blocks[g.index]
                # Blocks before the window hold vLLM's null block: nothing to fill there.
                first = max(start // bs, g.skipped_tokens(end) // bs)
                last = min(len(ids), -(-end // bs))
                if first >= last:
                    continue
                meta.loads.append(LoadSpec(req_id, st.tokens[:end], st.salt, ids[first:last], first,
                                           group=g.index, first_chunk=first // bpc, async_load=True))
            st.load_tokens = 0
        self._async_loads.clear()

    def _maybe_save_groups(self, meta, req_id, st: _ReqState, computed: int, so) -> None:
        """Hybrid: a full-attention group saves the prompt's full chunks in the step that
        completes them (as :meth:`_maybe_save`); a sliding-window group saves only the
        chunks of the windows before the prompt's hit boundaries (:func:`.groups.window_boundaries`),
        each in the step that computes it: vLLM gives a block back once it leaves the
        window, so a later step may no longer hold it."""
        if self._s.kv_role == "kv_consumer" or st.n_save == 0:
            return
        chunk, bs, bpc = self._s.chunk_tokens, self._s.block_size, self._s.blocks_per_chunk
        done = computed + so.num_scheduled_tokens.get(req_id, 0)
        for g in self.groups:
            ids = st.group_blocks[g.index]
            lo = st.next_chunk[g.index]
            if g.sliding:
                # Blocks vLLM gave back before this step (the window moved past them).
                lo = max(lo, -(-(g.skipped_tokens(computed) // bs) // bpc))
                hi = min(done, st.n_save) // chunk
            elif done < st.n_save:
                continue
            else:
                hi = st.n_save // chunk
            if hi <= lo or len(ids) < hi * bpc:
                continue
            wanted = sorted(i for i in g.window_chunks(st.boundaries, chunk) if lo <= i < hi)
            for first, end in _runs(wanted):  # one save per run of consecutive chunks
                meta.saves.append(SaveSpec(req_id, st.tokens[: end * chunk], st.salt, ids[: end * bpc],
                                           group=g.index, first_chunk=first))
            st.next_chunk[g.index] = hi

    def _hashes(self, st: _ReqState, n_tokens: int) -> list | None:
        """KV events on: vLLM's hashes (as its events carry them) of the full blocks of the
        prompt's first ``n_tokens``."""
        if st.block_hashes is None:
            return None
        return external_hashes(st.block_hashes[: n_tokens // self._s.block_size])

    def observe_events(self, events: list) -> None:
        """The workers' events of a step (all ranks merged by vLLM)."""
        if self.events is not None:
            self.events.add(events)

    def take_events(self) -> list:
        """The events for vLLM's publisher since the last call."""
        return self.events.take() if self.events is not None else []

    def _maybe_save(self, meta, req_id, st: _ReqState, computed: int, so) -> None:
        """Emits the save of the prompt's full chunks (a prefill instance's: the whole
        prompt, its tail in its partial last block) in the step that completes them.

        With chunked prefill the blocks computed in earlier steps stay allocated to the
        request, so one save, in the step where its last full chunk is computed, covers all.
        """
        if st.saved:
            return
        if self._s.kv_role == "kv_consumer":  # a decode instance never stores
            st.saved = True
            return
        n_save = st.n_save
        if n_save == 0:
            st.saved = True
            return
        done = computed + so.num_scheduled_tokens.get(req_id, 0)
        if done < n_save:
            return
        nblocks = -(-n_save // self._s.block_size)
        if len(st.block_ids) < nblocks:
            return
        meta.saves.append(SaveSpec(req_id, st.tokens[:n_save], st.salt, st.block_ids[:nblocks], self._hashes(st, n_save)))
        st.saved = True

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict | None]:
        """Forgets the request (also called for requests aborted while still waiting, e.g.
        on a pending lookup, whose queued lookup is cancelled)."""
        st = self._reqs.pop(request.request_id, None)
        if st is not None and st.pending is not None:
            st.pending.future.cancel()
            st.pending = None
        # Saves finish inside wait_for_save, before the step's output (and so this call and
        # the response) exists: blocks can be freed now, and a prefill instance can tell the
        # decoder what is stored once its save was issued: the whole prompt (every full
        # chunk only, where the engine keeps no tails).
        params = getattr(request, "kv_transfer_params", None) or {}
        if st is None or not (self._s.kv_role == "kv_producer" or params.get("do_remote_decode")):
            return False, None
        stored = st.n_save if st.saved and self._s.kv_role != "kv_consumer" else 0
        out = {"kvtier_stored_tokens": stored, "kvtier_chunk_tokens": self._s.chunk_tokens}
        if self._s.server_mode:
            out["kvtier_server"] = self._s.conn["server"]
        return False, out

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
