"""Decodes KV-event batches with vLLM's own msgspec types and replays them into an index.

Input: a file of length-prefixed msgpack payloads (4-byte big-endian length, then the
payload), as `crates/kvtier-server/tests/events.rs` writes them from the ZMQ stream.
Output (stdout, JSON): batches and events decoded, counts per event type, and the final
set of block hashes (hex) after applying BlockStored/BlockRemoved/AllBlocksCleared in order.
Any payload vLLM's decoder rejects makes the script fail (exit 1).
"""
import json
import struct
import sys

import msgspec
from vllm.distributed.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
)


def main(path):
    data = open(path, "rb").read()
    dec = msgspec.msgpack.Decoder(type=KVEventBatch)
    index, counts, batches, events, media = set(), {}, 0, 0, set()
    off = 0
    while off < len(data):
        (n,) = struct.unpack_from(">I", data, off)
        off += 4
        batch = dec.decode(data[off : off + n])
        off += n
        batches += 1
        assert isinstance(batch.ts, float) and batch.ts > 1e9, batch.ts
        for ev in batch.events:
            events += 1
            counts[type(ev).__name__] = counts.get(type(ev).__name__, 0) + 1
            if isinstance(ev, BlockStored):
                assert ev.block_size > 0 and ev.parent_block_hash is None
                media.add(ev.medium)
                index.update(h.hex() for h in ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                media.add(ev.medium)
                index.difference_update(h.hex() for h in ev.block_hashes)
            elif isinstance(ev, AllBlocksCleared):
                index.clear()
    print(json.dumps({
        "batches": batches,
        "events": events,
        "counts": counts,
        "media": sorted(media),
        "index": sorted(index),
    }))


if __name__ == "__main__":
    main(sys.argv[1])
