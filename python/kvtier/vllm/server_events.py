"""A ``kvtier serve``'s KV-event stream as the residency source of a connector in server
mode: the server announces what its L1 holds (all clients, all models) with kvtier's chunk
keys as block hashes; a worker turns the keys it knows (its own requests' chunks) into
vLLM's block hashes, as it does for an embedded engine's L1.

The medium is ``SHARED``: the chunks live in a cache shared by the node's instances (Dynamo
maps it to its external tier), not in this instance's memory. Only the server's L1 is
followed (its ``CPU`` events); chunks only its disk tier holds are not announced by the
connector (the server's own stream announces them, medium ``STORAGE``).

The stream is followed with a ZeroMQ SUB socket. A batch that is missing (a gap in the
sequence numbers: the subscriber fell behind or the server restarted), a batch that does
not decode, or the server's ``AllBlocksCleared`` counts as an overflow: the worker withdraws
everything it announced from the server and relearns from later changes. Chunks the server
announced before this worker subscribed are not announced (under-counted, never claimed
wrongly).
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("vllm.kvtier")

#: The medium of the blocks a shared ``kvtier serve`` holds.
MEDIUM_SERVER = "SHARED"


class ServerResidency:
    """Follows a server's event stream; hands its changes over like an embedded engine's
    ``take_residency_changes``: ``(overflowed media, [(stored, key_hex, medium)])``."""

    def __init__(self, endpoint: str, limit: int = 100_000):
        import zmq

        self.endpoint = endpoint
        self._limit = max(1, int(limit))
        self._lock = threading.Lock()
        self._changes: list[tuple[bool, str, str]] = []
        self._overflowed = False
        self._last_seq: int | None = None
        self._present: set[bytes] = set()  # keys the server holds, as far as the stream told
        self._stop = False
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.RCVTIMEO, 200)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self._thread = threading.Thread(target=self._run, daemon=True, name="kvtier-server-events")
        self._thread.start()

    def _lose(self) -> None:
        """Changes were lost: the consumer must forget what it announced (lock held)."""
        self._changes = []
        self._overflowed = True
        self._present.clear()

    def _push(self, change: tuple[bool, str, str]) -> None:
        if len(self._changes) >= self._limit:
            self._lose()
        self._changes.append(change)

    def _run(self) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch

        dec = msgspec.msgpack.Decoder(type=KVEventBatch)
        while not self._stop:
            try:
                _topic, seq_bytes, payload = self._sock.recv_multipart()
            except zmq.Again:
                continue
            except (zmq.ZMQError, ValueError):  # closed, or not a 3-frame message
                if self._stop:
                    return
                with self._lock:
                    self._lose()
                continue
            seq = int.from_bytes(seq_bytes, "big", signed=True)
            try:
                events = dec.decode(payload).events
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                logger.warning("kvtier: a batch of the server's KV events (%s) did not decode: %s",
                               self.endpoint, e)
                events = None
            with self._lock:
                if events is None or (self._last_seq is not None and seq != self._last_seq + 1):
                    self._lose()
                self._last_seq = seq
                for ev in events or ():
                    # The server's block hashes are its 32-byte chunk keys. Only its L1
                    # (medium CPU) is followed: its disk tier's events (STORAGE) are a
                    # second, independent set that one SHARED medium cannot tell apart.
                    if isinstance(ev, (BlockStored, BlockRemoved)) and ev.medium not in (None, "CPU"):
                        continue
                    if isinstance(ev, BlockStored):
                        for h in ev.block_hashes:
                            if isinstance(h, bytes):
                                self._present.add(h)
                                self._push((True, h.hex(), MEDIUM_SERVER))
                    elif isinstance(ev, BlockRemoved):
                        for h in ev.block_hashes:
                            if isinstance(h, bytes):
                                self._present.discard(h)
                                self._push((False, h.hex(), MEDIUM_SERVER))
                    else:  # AllBlocksCleared: the server's own queue overflowed
                        self._lose()

    def present(self, key_hex: str) -> str | None:
        """The medium of ``key_hex`` if the server holds it (as far as the stream told since
        this subscriber joined), else None: a chunk another instance stored and this one
        loads was announced before this worker knew its blocks."""
        with self._lock:
            return MEDIUM_SERVER if bytes.fromhex(key_hex) in self._present else None

    def watch_residency(self, limit: int) -> bool:
        """Already following the stream (the queue bound was given at construction)."""
        return True

    def take_residency_changes(self) -> tuple[list[str], list[tuple[bool, str, str]]]:
        """The changes since the last call, and the media whose earlier changes were lost
        (like an embedded engine's ``take_residency_changes``)."""
        with self._lock:
            out = ([MEDIUM_SERVER] if self._overflowed else [], self._changes)
            self._overflowed, self._changes = False, []
        return out

    def close(self) -> None:
        """Stops following the stream."""
        self._stop = True
        self._thread.join(timeout=2.0)
        self._sock.close(0)
        self._ctx.term()
