"""kvtier side of bench/compare: the same workloads as w_lmcache.py through kvtier's Python
bindings (kvtier.Engine), on CPU torch tensors, in its own process.

Workloads (selected with --workload):
  l1        store / retrieve one chunk per call (Engine.store / Engine.retrieve)
  lookup    Engine.lookup of a 128K-token prompt whose 512 chunks are all stored
  disk      durable writes to the disk tier (store, then flush = every chunk fdatasync'd),
            then cold reads through a fresh Engine over the same directory
  prefetch  a prompt whose first half is in L1 and second half on disk: prefetch + retrieve
  ldqa      long-doc-qa at a fixed L1 budget: hit rate and throughput
"""
import os
import random
import shutil

import torch

import kvtier
from common import (CHUNK_TOKENS, GIB, MIB, SHAPES, drop_file_cache, emit, gbps, l1_rounds, now, stats,
                    threads_info, tokens_for, worker_args)

torch.set_num_threads(1)  # as the LMCache reference run (baselines.md 3c)


def engine(shape, **cfg):
    s = SHAPES[shape]
    conf = {"chunk_size": CHUNK_TOKENS}
    for k, v in cfg.items():
        conf[k] = f"{int(v)}B" if k in ("max_local_cpu_size", "max_local_disk_size") else v
    return kvtier.Engine(conf, model="bench/compare", layers=s["layers"], kv_heads=s["kv_heads"],
                         head_dim=s["head_dim"], dtype="bf16")


def chunk_tensor(shape, fill=0):
    s = SHAPES[shape]
    return torch.full((2, s["layers"], CHUNK_TOKENS, s["kv_heads"] * s["head_dim"]), fill,
                      dtype=torch.bfloat16)


def check(cond, msg):
    if not cond:
        raise SystemExit(f"kvtier worker: {msg}")


def w_l1(a):
    cb = SHAPES[a.shape]["bytes"]
    n = a.chunks
    srcs = [chunk_tensor(a.shape, i % 100) for i in range(n)]
    outs = [chunk_tensor(a.shape) for _ in range(n)]
    toks = [tokens_for(10_000 + i, CHUNK_TOKENS) for i in range(n)]
    eng = engine(a.shape, max_local_cpu_size=a.budget_gib * GIB)

    def store_ok(i, r):
        check(r["new_chunks"] == 1, f"store did not take chunk {i}: {r}")

    def retrieve_ok(i, got):
        check(got == CHUNK_TOKENS, f"retrieve of chunk {i} returned {got} tokens")

    return l1_rounds(
        a, n, cb,
        store=lambda i: eng.store(toks[i], srcs[i]),
        retrieve=lambda i: eng.retrieve(toks[i], outs[i]),
        verify=lambda: check(torch.equal(outs[n - 1], srcs[n - 1]), "retrieved bytes differ from stored bytes"),
        clear=eng.clear, store_ok=store_ok, retrieve_ok=retrieve_ok)


def w_lookup(a):
    import numpy as np

    cb = SHAPES[a.shape]["bytes"]
    n_tok = a.prompt_tokens
    n_chunks = n_tok // CHUNK_TOKENS
    toks = tokens_for(1, n_tok)
    eng = engine(a.shape, max_local_cpu_size=n_chunks * cb + 256 * MIB)
    # One chunk of payload repeated: store() accepts the chunked tokens' bytes; lookup only
    # needs the chunks present, not distinct contents. Built chunk by chunk (prefix stores)
    # so the source is a single chunk tensor instead of a 2 GiB buffer.
    src = chunk_tensor(a.shape, 3)
    big = torch.empty((n_chunks, cb // 2), dtype=torch.bfloat16)
    big.view(n_chunks, -1)[:] = src.view(1, -1)
    r = eng.store(toks, big)
    del big
    check(r["new_chunks"] == n_chunks, f"store of the prompt took {r['new_chunks']} of {n_chunks} chunks")
    variants = {"list": toks, "numpy_int64": np.asarray(toks, dtype=np.int64),
                "torch_int64": torch.tensor(toks, dtype=torch.int64)}
    out = {}
    for name, t in variants.items():
        lat = []
        for rep in range(a.reps + 2):
            t0 = now()
            hit = eng.lookup(t)
            dt = now() - t0
            check(hit == n_tok, f"lookup ({name}) hit {hit} of {n_tok} tokens")
            if rep >= 2:
                lat.append(dt * 1e3)
        out[f"lookup_ms_{name}"] = stats(lat)
    out["prompt_tokens"] = n_tok
    out["chunks"] = n_chunks
    return out


def doc_payload(shape, chunks, fill):
    cb = SHAPES[shape]["bytes"]
    return torch.full((chunks, cb // 2), fill, dtype=torch.bfloat16)


def w_disk(a):
    cb = SHAPES[a.shape]["bytes"]
    dpc = a.doc_chunks
    docs = a.chunks // dpc
    n = docs * dpc
    payloads = [doc_payload(a.shape, dpc, d % 100) for d in range(min(docs, 2))]
    toks = [tokens_for(20_000 + d, dpc * CHUNK_TOKENS) for d in range(docs)]
    out = doc_payload(a.shape, dpc, 0)
    w, rd, rd_chunks = [], [], []
    for rep in range(a.reps):
        d_dir = os.path.join(a.disk_dir, f"kvtier-{rep}")
        shutil.rmtree(d_dir, ignore_errors=True)
        os.makedirs(d_dir)
        os.sync()
        # Writer: L1 = the same CPU budget LMCache's LocalCPUBackend gets for its disk
        # runs; the write queue is long enough that no store is skipped (which would make
        # the figure look better than the device allows).
        # power_loss: each put is fdatasync'd before it is acknowledged, which is what the
        # report compares (kvtier's default, process_crash, acknowledges without a flush).
        eng = engine(a.shape, max_local_cpu_size=a.budget_gib * GIB, local_disk=d_dir,
                     max_local_disk_size=2 * n * cb + 64 * MIB, write_queue_chunks=n + 8,
                     local_disk_durability="power_loss")
        t0 = now()
        for d in range(docs):
            r = eng.store(toks[d], payloads[d % len(payloads)])
            check(r["new_chunks"] == dpc, f"store of doc {d}: {r}")
        ok = eng.flush(600.0)
        secs = now() - t0
        check(ok, "flush() timed out: disk writes still queued")
        disk = [t for t in eng.stats()["tiers"] if t.get("name") == "disk"]
        check(len(disk) == 1 and disk[0]["stored_chunks"] == n,
              f"disk tier holds {disk and disk[0]['stored_chunks']} of {n} chunks after flush "
              f"(rep {rep}; disk tier stats: {disk and {k: v for k, v in disk[0].items() if k != 'usage'}})")
        del eng
        w.append(gbps(n * cb, secs))
        drop_file_cache(d_dir)
        # Reader: a fresh engine over the same directory, CPU tier off (L1 only stages I/O),
        # so every chunk comes from disk.
        eng = engine(a.shape, local_cpu=False, max_local_cpu_size=max(2 * dpc * cb, 64 * MIB),
                     local_disk=d_dir, max_local_disk_size=2 * n * cb + 64 * MIB)
        got_chunks, secs = 0, 0.0
        for d in range(docs):
            t0 = now()
            got = eng.retrieve(toks[d], out)
            secs += now() - t0
            got_chunks += got // CHUNK_TOKENS
            check(torch.equal(out[-1], payloads[d % len(payloads)][-1]), f"doc {d}: bytes read back differ")
        check(got_chunks == n, f"cold read found {got_chunks} of {n} chunks on disk")
        rd.append(gbps(n * cb, secs))
        rd_chunks.append(got_chunks)
        del eng
        shutil.rmtree(d_dir, ignore_errors=True)
        os.sync()
    return {"durable_write_gbps": stats(w), "cold_read_gbps": stats(rd), "chunks": n,
            "doc_chunks": dpc, "writer_l1_bytes": int(a.budget_gib * GIB),
            "disk_tier_details": disk[0]["details"]}


def w_prefetch(a):
    cb = SHAPES[a.shape]["bytes"]
    n = a.chunks
    half = n // 2
    toks = tokens_for(30_000, n * CHUNK_TOKENS)
    payload = doc_payload(a.shape, n, 7)
    out = doc_payload(a.shape, n, 0)
    pre = doc_payload(a.shape, half, 0)
    res = {"total_ms": [], "gbps": [], "prefetch_wait_ms": [], "retrieve_ms": [], "l1_hits_before": []}
    for rep in range(a.reps):
        d_dir = os.path.join(a.disk_dir, f"kvtier-pf-{rep}")
        shutil.rmtree(d_dir, ignore_errors=True)
        os.makedirs(d_dir)
        cfg = dict(max_local_cpu_size=a.budget_gib * GIB, local_disk=d_dir,
                   max_local_disk_size=2 * n * cb + 64 * MIB, write_queue_chunks=n + 8)
        eng = engine(a.shape, **cfg)
        r = eng.store(toks, payload)
        check(r["new_chunks"] == n, f"store: {r}")
        check(eng.flush(600.0), "flush timed out")
        disk = [t for t in eng.stats()["tiers"] if t.get("name") == "disk"]
        check(len(disk) == 1 and disk[0]["stored_chunks"] == n,
              f"disk tier holds {disk and disk[0]['stored_chunks']} of {n} chunks after flush")
        del eng
        # Restart over the same directory, then bring the first half into L1 by reading it
        # (reads from a lower tier are promoted to L1): first `half` chunks in L1, the rest
        # only on disk, as in LMCache's run.
        eng = engine(a.shape, **cfg)
        got = eng.retrieve(toks[: half * CHUNK_TOKENS], pre)
        check(got == half * CHUNK_TOKENS, f"warming the L1 half read {got} tokens")
        detail = eng.lookup_detail(toks)
        res["l1_hits_before"].append(detail.get("tiers"))
        drop_file_cache(d_dir)
        t0 = now()
        h = eng.prefetch(toks)
        n_pf = h.wait(60.0)
        t1 = now()
        got = eng.retrieve(toks, out)
        t2 = now()
        check(n_pf == n * CHUNK_TOKENS, f"prefetch brought {n_pf} of {n * CHUNK_TOKENS} tokens")
        check(got == n * CHUNK_TOKENS, f"retrieve after prefetch got {got} tokens")
        check(torch.equal(out[-1], payload[-1]), "bytes differ after prefetch")
        res["total_ms"].append((t2 - t0) * 1e3)
        res["gbps"].append(gbps(n * cb, t2 - t0))
        res["prefetch_wait_ms"].append((t1 - t0) * 1e3)
        res["retrieve_ms"].append((t2 - t1) * 1e3)
        del eng
        shutil.rmtree(d_dir, ignore_errors=True)
    return {"total_ms": stats(res["total_ms"]), "gbps": stats(res["gbps"]),
            "prefetch_wait_ms": stats(res["prefetch_wait_ms"]), "retrieve_ms": stats(res["retrieve_ms"]),
            "chunks": n, "l1_chunks": half, "tiers_before": res["l1_hits_before"][0]}


def w_ldqa(a):
    cb = SHAPES[a.shape]["bytes"]
    dpc = a.doc_chunks
    budget = int(a.budget_gib * GIB)
    docs = max(2, int(a.working_set_factor * budget) // (dpc * cb))
    toks = [tokens_for(40_000 + d, dpc * CHUNK_TOKENS) for d in range(docs)]
    payload = doc_payload(a.shape, dpc, 5)
    out = doc_payload(a.shape, dpc, 0)
    hit_rates, q_gbps, r_gbps = [], [], []
    for rep in range(a.reps):
        eng = engine(a.shape, max_local_cpu_size=budget)
        for d in range(docs):
            eng.store(toks[d], payload)
        order = [d for d in range(docs) for _ in range(a.queries)]
        random.Random(rep).shuffle(order)
        req = hit = 0
        rbytes, rsecs = 0, 0.0
        t0 = now()
        for d in order:
            h = eng.lookup(toks[d])
            req += dpc * CHUNK_TOKENS
            hit += h
            if h:
                t = now()
                got = eng.retrieve(toks[d], out)
                rsecs += now() - t
                rbytes += got // CHUNK_TOKENS * cb
            if h < dpc * CHUNK_TOKENS:
                eng.store(toks[d], payload)  # recomputed KV stored again
        qsecs = now() - t0
        hit_rates.append(hit / req)
        q_gbps.append(gbps(len(order) * dpc * cb, qsecs))
        r_gbps.append(gbps(rbytes, rsecs) if rsecs else 0.0)
        del eng
    return {"hit_rate": stats(hit_rates), "query_gbps": stats(q_gbps), "retrieve_gbps": stats(r_gbps),
            "docs": docs, "doc_chunks": dpc, "queries_per_doc": a.queries, "budget_bytes": budget}


def main():
    a = worker_args()
    r = globals()["w_" + a.workload](a)
    r.update(system="kvtier", workload=a.workload, shape=a.shape, threads=threads_info(),
             kvtier_version=getattr(kvtier, "__version__", None))
    emit(r)


if __name__ == "__main__":
    main()
