"""Place requests on the vLLM instance whose kvtier holds the longest prefix, with Dynamo's
KV router index (``RadixTree`` from ``ai-dynamo-runtime`` on PyPI) fed by the instances'
own KV-event streams.

Each vLLM instance runs with kvtier's connector and vLLM's ``--kv-events-config``; the
connector adds the blocks kvtier holds (medium ``CPU`` for L1, ``STORAGE`` for the disk
tier) to vLLM's stream, in vLLM's block hashes with their token ids. This script subscribes
to every instance, turns each event into the JSON Dynamo's index applies (a block keyed by
vLLM's hash and by Dynamo's own hash of its tokens), and answers placement questions.

    pip install ai-dynamo-runtime --no-deps   # the index needs neither pydantic nor uvloop
    python examples/fleet/kv_router.py --instance a=tcp://127.0.0.1:5557 \\
        --instance b=tcp://127.0.0.1:5558 --block-size 128 < prompts.jsonl

Each stdin line is a JSON list of token ids; each output line says where it goes and how
many blocks each instance would load. vLLM's publisher *connects* to a host address (it
binds only ``tcp://*:PORT``), so this script binds the endpoints and each instance is
started with ``--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
"endpoint": "tcp://ROUTER_HOST:5557", "topic": "kv"}'``. Block hashes must be vLLM's
default 64-bit integers (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`` unset or 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

MEDIA = ("CPU", "STORAGE")  # what kvtier announces; vLLM's own GPU blocks are "GPU"


def stored_json(event_id: int, block_hashes: list[int], parent: int | None, token_ids: list[int],
                block_size: int) -> bytes:
    """A BlockStored as Dynamo's index applies it: each block under its parent, keyed by
    vLLM's hash and Dynamo's hash of the block's tokens."""
    from dynamo._core import compute_block_hash_for_seq

    local = compute_block_hash_for_seq(list(token_ids), block_size)
    blocks = [{"block_hash": int(h), "tokens_hash": t} for h, t in zip(block_hashes, local)]
    stored = {"parent_hash": None if parent is None else int(parent), "blocks": blocks}
    return json.dumps({"event_id": event_id, "data": {"stored": stored}}).encode()


def removed_json(event_id: int, block_hashes: list[int]) -> bytes:
    """A BlockRemoved as Dynamo's index applies it."""
    return json.dumps({"event_id": event_id, "data": {"removed": {"block_hashes": [int(h) for h in block_hashes]}}}).encode()


def cleared_json(event_id: int) -> bytes:
    """An AllBlocksCleared as Dynamo's index applies it."""
    return json.dumps({"event_id": event_id, "data": "cleared"}).encode()


class FleetIndex:
    """One RadixTree over every instance's kvtier blocks; ``place`` picks an instance."""

    def __init__(self, block_size: int, media: tuple[str, ...] = MEDIA):
        from dynamo._core import RadixTree

        self.tree = RadixTree()
        self.block_size = block_size
        self.media = media
        self.names: dict[int, str] = {}
        self._next_id = 0
        self._lock = threading.Lock()

    def apply(self, worker: int, event) -> None:
        """One decoded vLLM event (``vllm.distributed.kv_events`` types) of ``worker``."""
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

        with self._lock:
            self._next_id += 1
            if isinstance(event, BlockStored) and event.medium in self.media:
                ev = stored_json(self._next_id, event.block_hashes, event.parent_block_hash, event.token_ids,
                                 event.block_size)
            elif isinstance(event, BlockRemoved) and event.medium in self.media:
                ev = removed_json(self._next_id, event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                ev = cleared_json(self._next_id)
            else:
                return
            self.tree.apply_event(worker, ev)

    def scores(self, tokens: list[int]) -> dict[int, int]:
        """Blocks of ``tokens``' prefix each instance holds."""
        from dynamo._core import compute_block_hash_for_seq

        with self._lock:
            found = self.tree.find_matches(compute_block_hash_for_seq(tokens, self.block_size)).scores
        return {w: n for (w, _dp), n in found.items()}

    def place(self, tokens: list[int]) -> tuple[str, dict[str, int]]:
        """The instance with the longest cached prefix (the first instance on a tie), and
        every instance's score."""
        s = self.scores(tokens)
        per = {name: s.get(w, 0) for w, name in self.names.items()}
        best = max(self.names, key=lambda w: (s.get(w, 0), -w))
        return self.names[best], per

    def subscribe(self, name: str, endpoint: str) -> None:
        """Binds ``endpoint`` and applies every batch an instance publishes there."""
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        worker = len(self.names) + 1
        self.names[worker] = name
        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.bind(endpoint)
        dec = msgspec.msgpack.Decoder(type=KVEventBatch)

        def run():
            while True:
                _topic, _seq, payload = sock.recv_multipart()
                for ev in dec.decode(payload).events:
                    self.apply(worker, ev)

        threading.Thread(target=run, daemon=True, name=f"kv-events-{name}").start()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instance", action="append", required=True, metavar="NAME=ENDPOINT",
                    help="an instance and the endpoint its vLLM publishes KV events to (repeat)")
    ap.add_argument("--block-size", type=int, required=True, help="vLLM's block size (tokens)")
    ap.add_argument("--settle", type=float, default=0.2, help="seconds to wait for events before each answer")
    args = ap.parse_args()
    index = FleetIndex(args.block_size)
    for spec in args.instance:
        name, _, endpoint = spec.partition("=")
        if not endpoint:
            ap.error(f"--instance {spec!r}: expected NAME=ENDPOINT, e.g. a=tcp://127.0.0.1:5557")
        index.subscribe(name, endpoint)
    for line in sys.stdin:
        if not line.strip():
            continue
        time.sleep(args.settle)
        tokens = json.loads(line)
        best, per = index.place(tokens)
        print(json.dumps({"instance": best, "blocks": per}), flush=True)


if __name__ == "__main__":
    main()
