"""Helpers shared by the bench/compare workers (LMCache, kvtier, baselines).

Every worker runs in its own process, prints exactly one JSON object on its last stdout
line, and exits non-zero on any error, so the orchestrator (compare.py) fails loudly.
"""
import json
import mmap
import os
import statistics
import sys
import time

GB = 1e9  # GB/s means 10^9 bytes per second throughout (as in docs/benchmarks.md).
MIB = 1 << 20
GIB = 1 << 30
CHUNK_TOKENS = 256

# Chunk shapes, bf16, 256 tokens per chunk (the L1 row sweeps all of them so no size
# regresses unseen; issue #21; the other rows use 4 and 32 MiB, those of issue #7):
#   1 MiB  = [2, 2 layers, 256 tokens, 512]
#   4 MiB  = [2, 8 layers, 256 tokens, 512]   (512 = 4 KV heads x head dim 128; 8B at TP 8)
#   16 MiB = [2, 16 layers, 256 tokens, 1024]
#   32 MiB = [2, 32 layers, 256 tokens, 1024] (Llama-3-8B: 8 KV heads x head dim 128)
#   80 MiB = [2, 80 layers, 256 tokens, 1024] (Llama-3-70B)
SHAPES = {
    "1MiB": dict(layers=2, kv_heads=4, head_dim=128, bytes=1 * MIB),
    "4MiB": dict(layers=8, kv_heads=4, head_dim=128, bytes=4 * MIB),
    "16MiB": dict(layers=16, kv_heads=8, head_dim=128, bytes=16 * MIB),
    "32MiB": dict(layers=32, kv_heads=8, head_dim=128, bytes=32 * MIB),
    "80MiB": dict(layers=80, kv_heads=8, head_dim=128, bytes=80 * MIB),
}
for _s in SHAPES.values():
    assert 2 * _s["layers"] * CHUNK_TOKENS * _s["kv_heads"] * _s["head_dim"] * 2 == _s["bytes"]

VOCAB = 128_256


def now():
    return time.perf_counter()


def stats(xs):
    """min / median / max of a list of numbers (what every table cell reports)."""
    xs = [float(x) for x in xs]
    if not xs:
        return None
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "mean": statistics.fmean(xs),
            "n": len(xs)}


def gbps(nbytes, secs):
    return nbytes / secs / GB if secs > 0 else float("nan")


def _timed_calls(n, op, ok):
    """Calls op(0..n), timing each call; ok(i, result) runs outside the per-call timing.
    Returns (total seconds, per-call seconds)."""
    lat = []
    t0 = now()
    for i in range(n):
        t = now()
        r = op(i)
        lat.append(now() - t)
        if ok:
            ok(i, r)
    return now() - t0, lat


def worker_args():
    """Command line of a worker (w_kvtier.py, w_lmcache.py): both take the same options."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", required=True, choices=["l1", "lookup", "disk", "prefetch", "ldqa"])
    ap.add_argument("--shape", default="4MiB", choices=SHAPES)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=128)
    ap.add_argument("--doc-chunks", type=int, default=32)
    ap.add_argument("--budget-gib", type=float, default=2.0)
    ap.add_argument("--prompt-tokens", type=int, default=131072)
    ap.add_argument("--disk-dir", default="/tmp/kvtier-compare-disk")
    ap.add_argument("--working-set-factor", type=float, default=2.0)
    ap.add_argument("--queries", type=int, default=2)
    return ap.parse_args()


def l1_rounds(a, n, chunk_bytes, store, retrieve, verify, clear, store_ok=None, retrieve_ok=None):
    """The L1 store/retrieve measurement both workers share: one warm-up round (first touch
    of the pool's pages), then `a.reps` timed rounds of n stores followed by n retrieves.
    `store(i)` / `retrieve(i)` are timed per call; `store_ok(i, r)` / `retrieve_ok(i, r)`
    check each result outside the per-call timing; `verify()` checks the bytes, `clear()`
    empties the cache between rounds."""
    st, rt, st_lat, rt_lat = [], [], [], []
    for rep in range(a.reps + 1):
        s_secs, lat = _timed_calls(n, store, store_ok)
        r_secs, rl = _timed_calls(n, retrieve, retrieve_ok)
        verify()
        clear()
        if rep:
            st.append(gbps(n * chunk_bytes, s_secs))
            rt.append(gbps(n * chunk_bytes, r_secs))
            st_lat += lat
            rt_lat += rl
    return {"store_gbps": stats(st), "retrieve_gbps": stats(rt),
            "store_ms": stats([x * 1e3 for x in st_lat]), "retrieve_ms": stats([x * 1e3 for x in rt_lat]),
            "chunks_per_rep": n, "budget_bytes": int(a.budget_gib * GIB)}


def tokens_for(doc, n_tokens, seed=1234):
    """Deterministic token ids of document `doc` (a Python list of ints, what a serving
    engine usually holds). Same function in every worker so both systems see equal input."""
    import random

    rng = random.Random(seed * 1_000_003 + doc)
    return [rng.randrange(VOCAB) for _ in range(n_tokens)]


def aligned_buffer(nbytes):
    """A page-aligned anonymous mapping (O_DIRECT needs alignment; baselines.md 1b shows
    malloc'd buffers 16 B past a page boundary make read() ~4.5x slower)."""
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # Touch every page so no page fault is timed.
    m.write(b"\x01" * nbytes) if nbytes <= 64 * MIB else _touch(m, nbytes)
    m.seek(0)
    return m


def _touch(m, nbytes):
    block = b"\x01" * (4 * MIB)
    for off in range(0, nbytes, len(block)):
        m[off : off + min(len(block), nbytes - off)] = block[: min(len(block), nbytes - off)]


def drop_file_cache(root):
    """fsync + POSIX_FADV_DONTNEED every file under `root`: 'cold' reads for both systems.
    (drop_caches needs root on the host and is not used; see baselines.md 1c.)"""
    n = 0
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n


def emit(obj):
    """The worker's result: one JSON line on stdout."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def threads_info():
    info = {"cpu_count": os.cpu_count()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info
