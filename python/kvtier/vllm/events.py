"""KV cache events from the connector: which of vLLM's blocks this instance's kvtier can
serve, in vLLM's own event types, so the publisher vLLM starts for ``--kv-events-config``
carries them to routers next to its GPU-cache events.

How a chunk becomes an event:

* The scheduler side adds the request's vLLM block hashes (``request.block_hashes``, the
  hashes vLLM's own router-facing events carry) to each load and save it sends the workers.
* A worker learns, for each chunk key of such a load or save, the vLLM blocks the chunk
  covers, and watches its engine's L1 and local-disk tier (``Engine.watch_residency``).
  After each forward pass (``get_kv_connector_kv_cache_events``) it turns the chunks that
  entered a tier into one ``BlockStored`` each (all the chunk's block hashes, its tokens,
  the tier's medium: ``CPU`` for L1, ``STORAGE`` for the disk tier) and the chunks that left
  it into ``BlockRemoved`` of that medium. A chunk is announced on a medium only once that
  tier's index holds it (a load hits from then on: for the disk tier, once its write is
  committed) and withdrawn as soon as it left. The media are independent: a chunk L1 and
  the disk both hold is announced on both, and L1 dropping it withdraws only ``CPU``.
* With several ranks each rank's engine holds its own part of a chunk; the scheduler side
  announces a chunk on a medium once every rank reported it there and withdraws it when the
  first rank drops it (:class:`RankVotes`), and hands the events to vLLM in ``take_events``.

Remote tiers are not announced. Chunks the disk tier found at startup are not either (the
tier does not report them; they are under-claimed until evicted). A worker in server mode
announces nothing: the server publishes what it holds itself (``kvtier serve
--kv-events-config``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVConnectorKVEvents
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

logger = logging.getLogger("vllm.kvtier")

#: The medium of the blocks kvtier's L1 holds (Dynamo maps it to host memory).
MEDIUM_L1 = "CPU"
#: The medium of the blocks kvtier's local-disk tier holds (Dynamo maps it to its disk tier).
MEDIUM_DISK = "STORAGE"


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
    """One worker's side: chunk keys to vLLM blocks, and its engine's tier changes as events.

    What is announced is *prefix-closed*, on each medium on its own: a chunk is announced on
    a medium once that tier holds it and the chunk before it is announced on the same medium
    (the first chunk of a prompt needs no parent), and withdrawn with every chunk after it
    announced there as soon as that tier drops it. A load reads a prefix, so a chunk whose
    predecessor is gone would never load; and routers' indexes are trees of blocks (Dynamo's
    RadixTree refuses a block whose parent it does not hold, and drops a block's descendants
    with it), so the stream must never describe a block without its parent. Withdrawals go
    deepest first, so an index that removes blocks one by one (llm-d's) ends in the same
    state. A chunk that a tier still holds when its predecessor comes back there is
    announced again after it.

    ``learn`` is called before the load or save it describes reaches the engine, so the
    change it causes always finds its blocks. The map from keys to blocks is shared by the
    media: a key is forgotten once no tier holds it and it was not learnt in the last two
    takes (a disk write lands after the save that caused it, maybe after L1 dropped the
    chunk already; a save no tier took, or a load that missed, is forgotten then too): the
    map holds about what the tiers hold.
    """

    def __init__(self, engine: Any, block_size: int, chunk_tokens: int, limit: int = 100_000,
                 source: Any = None, keep_s: float = 0.0):
        """``source`` reports the tiers' changes (default: ``engine``'s own tiers; in server
        mode a :class:`~kvtier.vllm.server_events.ServerResidency`); a learnt key that no
        tier reported waits at least two takes and ``keep_s`` seconds for its report (a
        server publishes its changes asynchronously, every 20 ms)."""
        self._engine = engine
        self._source = source if source is not None else engine
        self._keep_s = float(keep_s)
        self._rotated = time.monotonic()
        self._block_size = block_size
        self._chunk_tokens = chunk_tokens
        self._bpc = chunk_tokens // block_size
        self._chunks: dict[str, _Chunk] = {}
        self._children: dict[str, set[str]] = {}  # key -> known keys of the chunks after it
        self._resident: dict[str, set[str]] = {}  # medium -> known keys its tier holds
        self._held: dict[str, set[str]] = {}  # medium -> keys announced there (resident, parent announced)
        self._fresh: set[str] = set()  # keys learnt since the last take
        self._older: set[str] = set()  # ... and in the take before
        self._lock = threading.Lock()  # loads learn on the load thread
        self._synthetic: list[tuple[bool, str, str]] = []  # held at learn time (see learn)
        self.active = bool(self._source.watch_residency(limit))
        if not self.active:
            logger.warning("kvtier: KV events are on, but this engine has no tier that reports "
                           "(no L1 cache, no disk tier): the connector announces no blocks")

    def learn(self, tokens: list[int], salt: str | None, block_hashes: list | None) -> None:
        """The chunks of ``tokens`` (a load's or a save's) cover these vLLM blocks. Only
        whole chunks of whole hashed blocks are learnt (a tail is never announced)."""
        if not self.active or not block_hashes:
            return
        keys = self._engine.chunk_keys(tokens, salt)
        with self._lock:
            new = self._learn(keys, tokens, block_hashes)
            present = getattr(self._source, "present", None)
            if present is not None:
                # A source that knows what it holds (a server, holding chunks other clients
                # stored): chunks already there are announced with the next take.
                self._synthetic.extend((True, k, m) for k in new if (m := present(k)) is not None)

    def _learn(self, keys: list[str], tokens: list[int], block_hashes: list) -> list[str]:
        """Maps the new keys to their blocks; returns the keys that were new."""
        C, bpc = self._chunk_tokens, self._bpc
        new = []
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
            self._fresh.add(key)
            new.append(key)
        return new

    def take(self) -> ConnectorEvents | None:
        """The tiers' changes since the last call as events (None when there are none)."""
        if not self.active:
            return None
        with self._lock:
            out = self._take()
        return ConnectorEvents(out) if out else None

    def _take(self) -> list:
        overflowed, changes = self._source.take_residency_changes()
        if self._synthetic:  # before the source's changes: those came after the check
            # (unless that medium's changes were lost since: then the check is stale too)
            changes = [c for c in self._synthetic if c[2] not in overflowed] + list(changes)
            self._synthetic = []
        out: list = []
        left: list[str] = []  # keys that left a tier: forgotten after the whole batch
        for medium in overflowed:
            # That tier's changes were lost: withdraw every chunk announced on its medium
            # (the router relearns them from later stores and loads) rather than risk
            # claiming one it no longer holds.
            held = self._held.get(medium, set())
            for key in [k for k in held if self._chunks[k].parent_key not in held]:
                self._withdraw(key, medium, out)
            left.extend(self._resident.pop(medium, ()))
        for stored, key, medium in changes:
            if key not in self._chunks:
                continue  # a chunk no request of this process described (e.g. another tenant's)
            resident = self._resident.setdefault(medium, set())
            if stored:
                resident.add(key)
                self._announce(key, medium, out)
            else:
                resident.discard(key)
                if key in self._held.get(medium, ()):
                    self._withdraw(key, medium, out)
                left.append(key)
        # Only after the batch: each medium's changes come in their own order, so the disk
        # may report a chunk after L1's report that it left.
        for key in left:
            if not self._anywhere(key) and key not in self._fresh and key not in self._older:
                self._forget(key)
        now = time.monotonic()
        if now - self._rotated >= self._keep_s:
            for key in self._older:
                if not self._anywhere(key):
                    self._forget(key)
            self._older, self._fresh = self._fresh, set()
            self._rotated = now
        return out

    def _anywhere(self, key: str) -> bool:
        """Whether any watched tier holds ``key``."""
        return any(key in r for r in self._resident.values())

    def _announce(self, key: str, medium: str, out: list) -> None:
        """Announces ``key`` on ``medium`` if it may be (resident there, parent announced
        there), then the chunks after it resident there that were waiting for it."""
        held = self._held.setdefault(medium, set())
        resident = self._resident.get(medium, set())
        chunk = self._chunks[key]
        if key in held or (chunk.parent_key is not None and chunk.parent_key not in held):
            return
        stack = [key]
        while stack:
            k = stack.pop()
            c = self._chunks[k]
            held.add(k)
            out.append(BlockStored(
                block_hashes=c.hashes, parent_block_hash=c.parent, token_ids=c.tokens,
                block_size=self._block_size, lora_id=None, medium=medium, lora_name=None,
            ))
            stack.extend(ch for ch in self._children.get(k, ()) if ch in resident and ch not in held)

    def _withdraw(self, key: str, medium: str, out: list) -> None:
        """Withdraws ``key`` and every chunk after it announced on ``medium``, deepest first."""
        held = self._held.get(medium, set())
        order, stack = [], [key]
        while stack:
            k = stack.pop()
            order.append(k)
            stack.extend(ch for ch in self._children.get(k, ()) if ch in held)
        for k in reversed(order):  # a chunk's descendants come after it in ``order``
            held.discard(k)
            out.append(BlockRemoved(block_hashes=self._chunks[k].hashes, medium=medium))

    def _forget(self, key: str) -> None:
        """Drops what is known of ``key`` (no tier holds it, or none took it); the chunks
        after it keep their own entries."""
        for r in self._resident.values():
            r.discard(key)
        chunk = self._chunks.pop(key, None)
        if chunk is not None and chunk.parent_key is not None:
            siblings = self._children.get(chunk.parent_key)
            if siblings is not None:
                siblings.discard(key)
                if not siblings:
                    del self._children[chunk.parent_key]

    def known_chunks(self) -> int:
        """Chunk keys mapped to vLLM blocks (about what the tiers hold)."""
        return len(self._chunks)


def _key_of(ev) -> tuple:
    # Per medium: a chunk every rank holds in L1 is not loadable from disk unless every
    # rank's disk tier holds it too.
    return (ev.medium, tuple(ev.block_hashes))


class RankVotes:
    """The scheduler side: a chunk is loadable once every rank holds its part, so it is
    announced on a medium when the last rank reported it there and withdrawn when the first
    rank dropped it there.

    Each rank reports a chunk's arrivals and departures on a medium alternately (its
    engine's tier index is the source), so a count per (medium, chunk) is enough.
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
