"""KV cache events from the connector: which of vLLM's blocks this instance's kvtier can
serve, in vLLM's own event types, so the publisher vLLM starts for ``--kv-events-config``
carries them to routers next to its GPU-cache events.

How a chunk becomes an event:

* The scheduler side adds the request's vLLM block hashes (``request.block_hashes``, the
  hashes vLLM's own router-facing events carry) to each load and save it sends the workers.
* A worker learns, for each chunk key of such a load or save, the vLLM blocks the chunk
  covers, and watches its engine's L1 (``Engine.watch_residency``). After each forward pass
  (``get_kv_connector_kv_cache_events``) it turns the chunks that entered L1 into one
  ``BlockStored`` each (all the chunk's block hashes, its tokens, medium ``CPU``) and the
  chunks that left it into ``BlockRemoved``. A chunk is announced only once L1's index holds
  it (a load hits from then on) and withdrawn as soon as it left.
* With several ranks each rank's engine holds its own part of a chunk; the scheduler side
  announces a chunk once every rank reported it and withdraws it when the first rank drops
  it (:class:`RankVotes`), and hands the events to vLLM in ``take_events``.

Only L1 is announced (medium ``CPU``): the disk tier does not report its evictions yet, so a
chunk that only it holds is not claimed. A worker in server mode announces nothing: the
server publishes what it holds itself (``kvtier serve --kv-events-config``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVConnectorKVEvents
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

logger = logging.getLogger("vllm.kvtier")

#: The medium of the blocks kvtier's L1 holds (Dynamo maps it to host memory).
MEDIUM_L1 = "CPU"


def events_enabled(vllm_config: Any) -> bool:
    """Whether vLLM publishes KV events (``--kv-events-config`` with events on)."""
    cfg = getattr(vllm_config, "kv_events_config", None)
    return bool(cfg is not None and getattr(cfg, "enable_kv_cache_events", False))


def external_hashes(block_hashes: list) -> list:
    """vLLM's block hashes as its events carry them (bytes, or 64-bit ints when
    ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`` is set, vLLM 0.32's default)."""
    return [maybe_convert_block_hash(h) for h in block_hashes]


class ConnectorEvents(KVConnectorKVEvents):
    """The events of one step, from one worker or (after vLLM merged them) all of them."""

    def __init__(self, events: list | None = None, num_workers: int = 1):
        self._events = list(events or [])
        self._workers = num_workers

    def add_events(self, events: list) -> None:
        self._events.extend(events)

    def aggregate(self) -> "ConnectorEvents":
        return self

    def increment_workers(self, count: int = 1) -> None:
        self._workers += count

    def get_all_events(self) -> list:
        return self._events

    def get_number_of_workers(self) -> int:
        return self._workers

    def clear_events(self) -> None:
        self._events = []

    def __repr__(self) -> str:
        return f"ConnectorEvents({len(self._events)} events, {self._workers} workers)"


class _Chunk:
    """The vLLM blocks one chunk key covers, and the chunk before it."""

    __slots__ = ("hashes", "parent", "tokens", "parent_key")

    def __init__(self, hashes: list, parent, tokens: list[int], parent_key: str | None):
        self.hashes = hashes
        self.parent = parent
        self.tokens = tokens
        self.parent_key = parent_key


class WorkerEvents:
    """One worker's side: chunk keys to vLLM blocks, and its engine's L1 changes as events.

    What is announced is *prefix-closed*: a chunk is announced once L1 holds it and the chunk
    before it is announced (the first chunk of a prompt needs no parent), and withdrawn with
    every announced chunk after it as soon as L1 drops it. A load reads a prefix, so a chunk
    whose predecessor is gone would never load; and routers' indexes are trees of blocks
    (Dynamo's RadixTree refuses a block whose parent it does not hold, and drops a block's
    descendants with it), so the stream must never describe a block without its parent.
    Withdrawals go deepest first, so an index that removes blocks one by one (llm-d's)
    ends in the same state. A chunk that L1 still holds when its predecessor comes back is
    announced again after it.

    ``learn`` is called before the load or save it describes reaches the engine, so the
    change it causes always finds its blocks. Keys learnt for chunks that never entered L1
    (a save L1 refused, a load that missed) are forgotten two takes later; keys of chunks
    that left L1 are forgotten at once: the map holds about what L1 holds.
    """

    def __init__(self, engine: Any, block_size: int, chunk_tokens: int, limit: int = 100_000):
        self._engine = engine
        self._block_size = block_size
        self._chunk_tokens = chunk_tokens
        self._bpc = chunk_tokens // block_size
        self._chunks: dict[str, _Chunk] = {}
        self._children: dict[str, set[str]] = {}  # key -> known keys of the chunks after it
        self._resident: set[str] = set()  # known keys L1 holds
        self._held: set[str] = set()  # keys announced (resident, and their parent announced)
        self._fresh: list[str] = []  # keys learnt since the last take
        self._older: list[str] = []  # ... and in the take before
        self._lock = threading.Lock()  # loads learn on the load thread
        self.active = bool(engine.watch_residency(limit))
        if not self.active:
            logger.warning("kvtier: KV events are on, but this engine's L1 reports nothing "
                           "(no L1 cache): the connector announces no blocks")

    def learn(self, tokens: list[int], salt: str | None, block_hashes: list | None) -> None:
        """The chunks of ``tokens`` (a load's or a save's) cover these vLLM blocks. Only
        whole chunks of whole hashed blocks are learnt (a tail is never announced)."""
        if not self.active or not block_hashes:
            return
        keys = self._engine.chunk_keys(tokens, salt)
        with self._lock:
            self._learn(keys, tokens, block_hashes)

    def _learn(self, keys: list[str], tokens: list[int], block_hashes: list) -> None:
        C, bpc = self._chunk_tokens, self._bpc
        for i, key in enumerate(keys):
            hs = block_hashes[i * bpc : (i + 1) * bpc]
            if len(hs) < bpc or (i + 1) * C > len(tokens):
                break
            if key in self._chunks:
                continue
            parent_key = keys[i - 1] if i > 0 else None
            parent = block_hashes[i * bpc - 1] if i > 0 else None
            self._chunks[key] = _Chunk(list(hs), parent, list(tokens[i * C : (i + 1) * C]), parent_key)
            if parent_key is not None:
                self._children.setdefault(parent_key, set()).add(key)
            self._fresh.append(key)

    def take(self) -> ConnectorEvents | None:
        """The L1 changes since the last call as events (None when there are none)."""
        if not self.active:
            return None
        with self._lock:
            out = self._take()
        return ConnectorEvents(out) if out else None

    def _take(self) -> list:
        overflowed, changes = self._engine.take_residency_changes()
        out: list = []
        if overflowed:
            # Changes were lost: withdraw every chunk announced (the router relearns them
            # from later stores and loads) rather than risk claiming one L1 no longer holds.
            for key in [k for k in self._held if self._chunks[k].parent_key not in self._held]:
                self._withdraw(key, out)
            for key in list(self._resident):
                self._forget(key)
        for stored, key in changes:
            if key not in self._chunks:
                continue  # a chunk no request of this process described (e.g. another tenant's)
            if stored:
                self._resident.add(key)
                self._announce(key, out)
            else:
                self._resident.discard(key)
                if key in self._held:
                    self._withdraw(key, out)
                self._forget(key)
        for key in self._older:
            if key not in self._resident:
                self._forget(key)
        self._older, self._fresh = self._fresh, []
        return out

    def _announce(self, key: str, out: list) -> None:
        """Announces ``key`` if it may be (resident, parent announced), then the resident
        chunks after it that were waiting for it."""
        chunk = self._chunks[key]
        if key in self._held or (chunk.parent_key is not None and chunk.parent_key not in self._held):
            return
        stack = [key]
        while stack:
            k = stack.pop()
            c = self._chunks[k]
            self._held.add(k)
            out.append(BlockStored(
                block_hashes=c.hashes, parent_block_hash=c.parent, token_ids=c.tokens,
                block_size=self._block_size, lora_id=None, medium=MEDIUM_L1, lora_name=None,
            ))
            stack.extend(ch for ch in self._children.get(k, ()) if ch in self._resident and ch not in self._held)

    def _withdraw(self, key: str, out: list) -> None:
        """Withdraws ``key`` and every announced chunk after it, deepest first."""
        order, stack = [], [key]
        while stack:
            k = stack.pop()
            order.append(k)
            stack.extend(ch for ch in self._children.get(k, ()) if ch in self._held)
        for k in reversed(order):  # a chunk's descendants come after it in ``order``
            self._held.discard(k)
            out.append(BlockRemoved(block_hashes=self._chunks[k].hashes, medium=MEDIUM_L1))

    def _forget(self, key: str) -> None:
        """Drops what is known of ``key`` (no longer in L1, or never entered it); the chunks
        after it keep their own entries."""
        self._resident.discard(key)
        chunk = self._chunks.pop(key, None)
        if chunk is not None and chunk.parent_key is not None:
            siblings = self._children.get(chunk.parent_key)
            if siblings is not None:
                siblings.discard(key)
                if not siblings:
                    del self._children[chunk.parent_key]

    def known_chunks(self) -> int:
        """Chunk keys mapped to vLLM blocks (about what L1 holds)."""
        return len(self._chunks)


def _key_of(ev) -> tuple:
    return tuple(ev.block_hashes)


class RankVotes:
    """The scheduler side: a chunk is loadable once every rank holds its part, so it is
    announced when the last rank reported it and withdrawn when the first rank dropped it.

    Each rank reports a chunk's arrivals and departures alternately (its engine's L1 index
    is the source), so a count per chunk is enough.
    """

    def __init__(self, num_ranks: int):
        self._ranks = max(1, int(num_ranks))
        self._count: dict[tuple, int] = {}
        self._queue: list = []

    def add(self, events: list) -> None:
        """One step's events of the workers (vLLM merged the ranks' lists)."""
        n = self._ranks
        for ev in events:
            if isinstance(ev, BlockStored):
                k = _key_of(ev)
                c = self._count.get(k, 0) + 1
                self._count[k] = c
                if c == n:
                    self._queue.append(ev)
            elif isinstance(ev, BlockRemoved):
                k = _key_of(ev)
                c = self._count.get(k, 0)
                if c <= 0:
                    continue
                if c == n:
                    self._queue.append(ev)
                if c == 1:
                    del self._count[k]
                else:
                    self._count[k] = c - 1

    def take(self) -> list:
        """The events to publish since the last call."""
        q, self._queue = self._queue, []
        return q
