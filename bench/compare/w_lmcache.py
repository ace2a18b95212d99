"""LMCache 0.5.6 side of bench/compare: its storage layer (LocalCPUBackend, LocalDiskBackend,
StorageManager) driven on CPU tensors through its public classes, as a user (or
LMCacheEngine) would call them, in its own process. Constructors as in
shared/reference/baselines.md 3c. Workloads mirror w_kvtier.py one for one.
"""
import asyncio
import logging
import os
import random
import shutil
import threading
import time

import torch

from common import (CHUNK_TOKENS, GIB, MIB, SHAPES, drop_file_cache, emit, gbps, l1_rounds, now, stats,
                    threads_info, tokens_for, worker_args)

torch.set_num_threads(1)  # as the reference run (baselines.md 3c)
logging.disable(logging.WARNING)  # LMCache logs every backend start at INFO

from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.event_manager import EventManager  # noqa: E402
from lmcache.v1.memory_management import MemoryFormat  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.pin_monitor import PinMonitor  # noqa: E402
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend  # noqa: E402
from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend  # noqa: E402
from lmcache.v1.storage_backend.storage_manager import StorageManager  # noqa: E402
from lmcache.v1.token_database import ChunkedTokenDatabase  # noqa: E402

DISK_IO_THREADS = 4  # LocalDiskBackend's default (_DEFAULT_THREAD_COUNT), stated in the output


def check(cond, msg):
    if not cond:
        raise SystemExit(f"lmcache worker: {msg}")


def gb(nbytes):
    return nbytes / GIB  # LMCache's size keys are in GB meaning GiB


def config(**kw):
    base = dict(chunk_size=CHUNK_TOKENS, local_cpu=True, lmcache_instance_id="bench-compare")
    base.update(kw)
    return LMCacheEngineConfig.from_defaults(**base)


def metadata(shape, role=None):
    s = SHAPES[shape]
    m = LMCacheMetadata(model_name="bench_model", world_size=1, local_world_size=1, worker_id=0,
                        local_worker_id=0, kv_dtype=torch.bfloat16,
                        kv_shape=(s["layers"], 2, CHUNK_TOKENS, s["kv_heads"], s["head_dim"]))
    if role:
        m.role = role
    return m


def obj_shape(shape):
    s = SHAPES[shape]
    return torch.Size([2, s["layers"], CHUNK_TOKENS, s["kv_heads"] * s["head_dim"]])


def chunk_tensor(shape, fill=0):
    return torch.full(obj_shape(shape), fill, dtype=torch.bfloat16)


def cpu_backend(shape, budget_bytes):
    cfg = config(max_local_cpu_size=gb(budget_bytes))
    PinMonitor.GetOrCreate(cfg)
    return LocalCPUBackend(config=cfg, metadata=metadata(shape)), cfg


def keys_of(db, tokens):
    return [r[2] for r in db.process_tokens(tokens)]


def put_chunk(backend, cpu, shape, key, src):
    """allocate + copy_ + submit_put_task, then drop the caller's reference (what
    StorageManager.batched_put does after submitting)."""
    obj = cpu.allocate(obj_shape(shape), torch.bfloat16, MemoryFormat.KV_2LTD)
    check(obj is not None, "allocate() returned None (pool full)")
    obj.tensor.copy_(src)
    backend.submit_put_task(key, obj)
    obj.ref_count_down()


def get_chunk(backend, key, out):
    obj = backend.get_blocking(key)
    check(obj is not None, "get_blocking() missed a stored key")
    out.copy_(obj.tensor)
    obj.ref_count_down()


def w_l1(a):
    cb = SHAPES[a.shape]["bytes"]
    n = a.chunks
    cpu, cfg = cpu_backend(a.shape, int(a.budget_gib * GIB))
    db = ChunkedTokenDatabase(cfg, metadata(a.shape))
    srcs = [chunk_tensor(a.shape, i % 100) for i in range(n)]
    outs = [chunk_tensor(a.shape) for _ in range(n)]
    keys = [keys_of(db, tokens_for(10_000 + i, CHUNK_TOKENS))[0] for i in range(n)]
    return l1_rounds(
        a, n, cb,
        store=lambda i: put_chunk(cpu, cpu, a.shape, keys[i], srcs[i]),
        retrieve=lambda i: get_chunk(cpu, keys[i], outs[i]),
        verify=lambda: check(torch.equal(outs[n - 1], srcs[n - 1]), "retrieved bytes differ"),
        clear=cpu.clear)


def w_lookup(a):
    cb = SHAPES[a.shape]["bytes"]
    n_tok = a.prompt_tokens
    n_chunks = n_tok // CHUNK_TOKENS
    toks = tokens_for(1, n_tok)
    cfg = config(max_local_cpu_size=gb(n_chunks * cb + 256 * MIB))
    PinMonitor.GetOrCreate(cfg)
    meta = metadata(a.shape, role="worker")
    sm = StorageManager(cfg, meta, EventManager())
    db = ChunkedTokenDatabase(cfg, meta)
    cpu = sm.local_cpu_backend
    src = chunk_tensor(a.shape, 3)
    keys = keys_of(db, toks)
    check(len(keys) == n_chunks, f"{len(keys)} keys for {n_chunks} chunks")
    for k in keys:
        put_chunk(cpu, cpu, a.shape, k, src)
    variants = {"list": toks, "torch_int64": torch.tensor(toks, dtype=torch.int64)}
    out = {}
    for name, t in variants.items():
        lat, hash_lat, contains_lat = [], [], []
        for rep in range(a.reps + 2):
            t0 = now()
            ks = keys_of(db, t)
            t1 = now()
            hit, _ = sm.batched_contains(ks)
            t2 = now()
            check(hit == n_chunks, f"batched_contains hit {hit} of {n_chunks}")
            if rep >= 2:
                lat.append((t2 - t0) * 1e3)
                hash_lat.append((t1 - t0) * 1e3)
                contains_lat.append((t2 - t1) * 1e3)
        out[f"lookup_ms_{name}"] = stats(lat)
        out[f"process_tokens_ms_{name}"] = stats(hash_lat)
        out[f"batched_contains_ms_{name}"] = stats(contains_lat)
    out["prompt_tokens"] = n_tok
    out["chunks"] = n_chunks
    sm.close()
    return out


class LoopThread:
    """The asyncio loop LocalDiskBackend's workers post to, running in a thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.t = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.t.start()

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.t.join(5)


def disk_backend(d_dir, cpu, odirect, disk_bytes, loop):
    cfg = config(local_disk=d_dir, max_local_disk_size=gb(disk_bytes),
                 extra_config={"use_odirect": odirect, "disk_io_threads": DISK_IO_THREADS})
    return LocalDiskBackend(config=cfg, loop=loop, local_cpu_backend=cpu, dst_device="cpu")


def wait_on_disk(disk, keys, timeout=600):
    t_end = time.monotonic() + timeout
    while not all(disk.contains(k) for k in keys):
        check(time.monotonic() < t_end, "disk puts not visible after timeout")
        time.sleep(0.0005)


def w_disk(a):
    cb = SHAPES[a.shape]["bytes"]
    dpc = a.doc_chunks
    docs = a.chunks // dpc
    n = docs * dpc
    cpu, cfg = cpu_backend(a.shape, int(a.budget_gib * GIB))
    db = ChunkedTokenDatabase(cfg, metadata(a.shape))
    doc_keys = [keys_of(db, tokens_for(20_000 + d, dpc * CHUNK_TOKENS)) for d in range(docs)]
    srcs = [chunk_tensor(a.shape, i % 100) for i in range(min(n, 8))]
    out = chunk_tensor(a.shape)
    res = {}
    lt = LoopThread()
    for odirect in (False, True):
        tag = "odirect" if odirect else "buffered"
        put, get1, getb = [], [], []
        for rep in range(a.reps):
            d_dir = os.path.join(a.disk_dir, f"lmcache-{tag}-{rep}")
            shutil.rmtree(d_dir, ignore_errors=True)
            os.makedirs(d_dir)
            os.sync()
            disk = disk_backend(d_dir, cpu, odirect, 2 * n * cb + 64 * MIB, lt.loop)
            all_keys = [k for ks in doc_keys for k in ks]
            t0 = now()
            for i, k in enumerate(all_keys):
                put_chunk(disk, cpu, a.shape, k, srcs[i % len(srcs)])
            wait_on_disk(disk, all_keys)
            put.append(gbps(n * cb, now() - t0))
            # Cold: fsync (LMCache never fsyncs its buffered writes) + FADV_DONTNEED.
            drop_file_cache(d_dir)
            t0 = now()
            for i, k in enumerate(all_keys):
                get_chunk(disk, k, out)
            get1.append(gbps(n * cb, now() - t0))
            check(torch.equal(out, srcs[(n - 1) % len(srcs)]), "bytes read back differ")
            drop_file_cache(d_dir)
            secs = 0.0
            for ks in doc_keys:
                t = now()
                objs = disk.batched_get_blocking(ks)
                for o in objs:
                    check(o is not None, "batched_get_blocking missed a key")
                    out.copy_(o.tensor)
                    o.ref_count_down()
                secs += now() - t
            getb.append(gbps(n * cb, secs))
            disk.close()
            cpu.clear()
            shutil.rmtree(d_dir, ignore_errors=True)
            os.sync()
        res[tag] = {"put_gbps": stats(put), "cold_get_blocking_gbps": stats(get1),
                    "cold_batched_get_gbps": stats(getb)}
    lt.stop()
    res.update(chunks=n, doc_chunks=dpc, cpu_pool_bytes=int(a.budget_gib * GIB),
               disk_io_threads=DISK_IO_THREADS, fsync_on_put=False)
    return res


def w_prefetch(a):
    cb = SHAPES[a.shape]["bytes"]
    n = a.chunks
    half = n // 2
    toks = tokens_for(30_000, n * CHUNK_TOKENS)
    src = chunk_tensor(a.shape, 7)
    outs = torch.empty((n,) + tuple(obj_shape(a.shape)), dtype=torch.bfloat16)
    out = {"total_ms": [], "gbps": []}
    for rep in range(a.reps):
        d_dir = os.path.join(a.disk_dir, f"lmcache-pf-{rep}")
        shutil.rmtree(d_dir, ignore_errors=True)
        os.makedirs(d_dir)
        cfg = config(max_local_cpu_size=gb(int(a.budget_gib * GIB)), local_disk=d_dir,
                     max_local_disk_size=gb(2 * n * cb + 64 * MIB),
                     extra_config={"disk_io_threads": DISK_IO_THREADS})
        PinMonitor.GetOrCreate(cfg)
        meta = metadata(a.shape, role="worker")
        sm = StorageManager(cfg, meta, EventManager())
        db = ChunkedTokenDatabase(cfg, meta)
        infos = [(r[2], r[0], r[1]) for r in db.process_tokens(toks)]
        keys = [k for k, _, _ in infos]
        cpu = sm.storage_backends["LocalCPUBackend"]
        disk = sm.storage_backends["LocalDiskBackend"]
        objs = []
        for k in keys:
            o = cpu.allocate(obj_shape(a.shape), torch.bfloat16, MemoryFormat.KV_2LTD)
            o.tensor.copy_(src)
            objs.append(o)
        sm.batched_put(keys, objs)  # to LocalCPU and LocalDisk; drops our references
        wait_on_disk(disk, keys)
        for k in keys[half:]:  # second half only on disk
            check(cpu.remove(k), "could not remove a tail chunk from LocalCPUBackend")
        drop_file_cache(d_dir)
        # What LMCacheEngine.retrieve does with its storage manager: prefix block mapping
        # over the tiers, then one batched_get per tier (disk reads on its thread pool).
        t0 = now()
        mapping = sm.get_block_mapping(infos)
        got = 0
        for loc, blocks in mapping.items():
            mo = sm.batched_get([k for k, _, _ in blocks], location=loc)
            for (k, s, e), o in zip(blocks, mo):
                check(o is not None, f"batched_get from {loc} missed a key")
                outs[s // CHUNK_TOKENS].copy_(o.tensor)
                o.ref_count_down()
                got += 1
        dt = now() - t0
        check(got == n, f"retrieved {got} of {n} chunks; mapping {[(l, len(b)) for l, b in mapping.items()]}")
        check(torch.equal(outs[-1], src), "bytes differ")
        out["total_ms"].append(dt * 1e3)
        out["gbps"].append(gbps(n * cb, dt))
        out["mapping"] = {loc: len(b) for loc, b in mapping.items()}
        sm.close()
        shutil.rmtree(d_dir, ignore_errors=True)
    return {"total_ms": stats(out["total_ms"]), "gbps": stats(out["gbps"]), "chunks": n,
            "l1_chunks": half, "block_mapping": out["mapping"], "disk_io_threads": DISK_IO_THREADS,
            "path": "get_block_mapping + batched_get per tier (LMCacheEngine.retrieve's storage path)"}


def w_ldqa(a):
    cb = SHAPES[a.shape]["bytes"]
    dpc = a.doc_chunks
    budget = int(a.budget_gib * GIB)
    docs = max(2, int(a.working_set_factor * budget) // (dpc * cb))
    toks = [tokens_for(40_000 + d, dpc * CHUNK_TOKENS) for d in range(docs)]
    src = chunk_tensor(a.shape, 5)
    out = chunk_tensor(a.shape)
    cpu, cfg = cpu_backend(a.shape, budget)
    db = ChunkedTokenDatabase(cfg, metadata(a.shape))

    def store(keys, start):
        for k in keys[start:]:
            if cpu.contains(k):
                continue
            o = cpu.allocate(obj_shape(a.shape), torch.bfloat16, MemoryFormat.KV_2LTD)
            if o is None:  # nothing evictable: stop, as LMCache's store does
                return
            o.tensor.copy_(src)
            cpu.submit_put_task(k, o)
            o.ref_count_down()

    def run(rep, as_vllm):
        """One shuffle. as_vllm: look up as LMCacheEngine.lookup(pin=True) does for vLLM's
        lookup server (pin the hits, then touch_cache(): the hit keys move to the recent end,
        the prompt's head last), and unpin after the retrieve (lookup_unpin). Without it,
        batched_contains neither pins nor refreshes recency, so the CPU pool keeps insertion
        order: what this row measured before (docs/benchmarks.md)."""
        cpu.clear()
        for d in range(docs):
            store(keys_of(db, toks[d]), 0)
        order = [d for d in range(docs) for _ in range(a.queries)]
        random.Random(rep).shuffle(order)
        req = hit = 0
        rbytes, rsecs = 0, 0.0
        t0 = now()
        for d in order:
            keys = keys_of(db, toks[d])
            h = cpu.batched_contains(keys, pin=as_vllm)
            if as_vllm:
                cpu.touch_cache()
            req += dpc * CHUNK_TOKENS
            hit += h * CHUNK_TOKENS
            # LMCacheEngine.lookup, .retrieve and .store each run process_tokens on the
            # prompt; kvtier's lookup, retrieve and store each hash it too. Same here.
            if h:
                t = now()
                for k in keys_of(db, toks[d])[:h]:
                    get_chunk(cpu, k, out)
                rsecs += now() - t
                rbytes += h * cb
                if as_vllm:
                    for k in keys[:h]:
                        cpu.unpin(k)
            if h < dpc:
                store(keys_of(db, toks[d]), h)  # recomputed KV stored again
        qsecs = now() - t0
        return hit / req, gbps(len(order) * dpc * cb, qsecs), (gbps(rbytes, rsecs) if rsecs else 0.0)

    res = {}
    for as_vllm, suffix in ((True, ""), (False, "_no_touch")):
        runs = [run(rep, as_vllm) for rep in range(a.reps)]
        res["hit_rate" + suffix] = stats([r[0] for r in runs])
        res["query_gbps" + suffix] = stats([r[1] for r in runs])
        res["retrieve_gbps" + suffix] = stats([r[2] for r in runs])
    res.update(docs=docs, doc_chunks=dpc, queries_per_doc=a.queries, budget_bytes=budget,
               lookup="batched_contains(pin=True) + touch_cache(), unpin after retrieve (vLLM's lookup path); "
                      "_no_touch: batched_contains without pin")
    return res


def main():
    a = worker_args()
    r = globals()["w_" + a.workload](a)
    import lmcache

    r.update(system="lmcache", workload=a.workload, shape=a.shape, threads=threads_info(),
             lmcache_version=getattr(lmcache, "__version__", "0.5.6"))
    emit(r)
    os._exit(0)  # LMCache leaves non-daemon threads (PinMonitor, event loops) running


if __name__ == "__main__":
    main()
