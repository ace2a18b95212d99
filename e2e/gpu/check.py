#!/usr/bin/env python3
"""GPU check of kvtier's transfer path (kvtier.transfer): correctness, then bandwidth.

Needs only CUDA torch and an installed kvtier wheel (no vLLM, no network); ``check.sh``
installs the wheel and runs this. With ``--device cpu`` the same code paths run on CPU
caches in seconds (CI's smoke run: python/tests/test_gpu_check.py).

What it checks (all through a real ``kvtier.Engine`` and both host staging modes: a staging
buffer pinned once, and the engine's L1 pool registered with cudaHostRegister):

1. round trip: blocks stored from a paged cache (vLLM's GPU layout) load into another cache
   at other block ids, byte for byte; and across devices and layouts: stored from vLLM's
   CPU layout (128-token blocks) on the host, loaded into the GPU cache (16-token blocks),
   and back.
2. concurrency: ``--iterations`` steps (1,000 by default) of a save then a load while the
   compute (default) stream writes other blocks and, delayed by a sleep kernel, the saved
   blocks themselves: every load must read exactly what the compute stream wrote before the
   save (0 mismatches). A canary run with the stream waits removed shows the test can see
   races (its mismatch count is reported, not judged).
3. bandwidth: store (gather + device-to-host into kvtier memory) and load (host-to-device +
   scatter) of 4, 32 and 80 MiB chunks (Llama-3-8B geometry: 32 layers, 8 KV heads, head
   dim 128, fp16, 16-token blocks), against a same-run plain torch copy of the same bytes
   between a device tensor and pinned host memory; alternating rounds, medians and spread.
   Also the engine-inclusive figures (store: + Engine.store/commit; load: + retrieve/acquire).

Exit codes: 0 all good; 1 a correctness failure (mismatches); 2 the environment cannot run
the check (no CUDA, kvtier not importable); 3 correct but below the bandwidth target
(store and load >= 0.8 x the pinned copy at 32 MiB chunks). The JSON report is written in
every case (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

EXIT_OK, EXIT_MISMATCH, EXIT_ENV, EXIT_SLOW = 0, 1, 2, 3
TARGET_RATIO = 0.8
TARGET_SIZE_MIB = 32


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu-report.json"))
    p.add_argument("--iterations", type=int, default=None, help="concurrency steps per staging mode")
    p.add_argument("--sizes", default=None, help="chunk sizes in MiB, comma-separated (default 4,32,80)")
    p.add_argument("--rounds", type=int, default=None, help="bandwidth rounds per size and mode")
    p.add_argument("--budget-s", type=float, default=270.0, help="stop optional work past this")
    p.add_argument("--modes", default="pinned,pool", help="host staging modes to check")
    p.add_argument("--cpu-device-staging", action="store_true",
                   help="with --device cpu: copy through 'device' buffers as on CUDA (tests the GPU code path)")
    return p.parse_args(argv)


class Check:
    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.report: dict = {"ok": False, "exit_code": None, "device": args.device, "targets": {
            "concurrency_mismatches": 0,
            "ratio_vs_pinned_copy": TARGET_RATIO,
            "ratio_at_chunk_mib": TARGET_SIZE_MIB,
        }}
        self.cuda = args.device == "cuda"
        self.modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def over_budget(self, share: float = 1.0) -> bool:
        return self.elapsed() > self.args.budget_s * share

    # -- environment ----------------------------------------------------------------------

    def environment(self) -> bool:
        env = self.report["env"] = {"python": sys.version.split()[0], "platform": platform.platform()}
        try:
            import torch

            env["torch"] = torch.__version__
            env["torch_cuda"] = torch.version.cuda
        except Exception as e:  # noqa: BLE001
            env["error"] = f"torch is not importable: {e}"
            return False
        try:
            import kvtier
            import kvtier._native as native
            import kvtier.transfer  # noqa: F401

            env["kvtier"] = os.path.dirname(kvtier.__file__)
            env["kvtier_native"] = os.path.basename(native.__file__)
        except Exception as e:  # noqa: BLE001
            env["error"] = f"kvtier is not importable (install the wheel: e2e/gpu/check.sh): {e}"
            return False
        if self.cuda:
            if not torch.cuda.is_available():
                env["error"] = "CUDA is not available to torch (use --device cpu for the smoke run)"
                return False
            props = torch.cuda.get_device_properties(0)
            env["gpu"] = props.name
            env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            env["capability"] = f"{props.major}.{props.minor}"
            env["has_sleep_kernel"] = hasattr(torch.cuda, "_sleep")
        return True

    # -- helpers ----------------------------------------------------------------------------

    def streams(self):
        """The transfer streams for the caches' device (see --cpu-device-staging)."""
        from kvtier.transfer import streams_for

        s = streams_for(self.device())
        if self.args.cpu_device_staging and not self.cuda:
            s.device_staging = True
        return s

    def device(self):
        import torch

        return torch.device("cuda:0" if self.cuda else "cpu")

    def sync(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def engine(self, geo, chunk_tokens, pool_gib):
        import kvtier

        cfg = {"chunk_size": chunk_tokens, "max_local_cpu_size": pool_gib, "local_cpu_huge_pages": True}
        return kvtier.Engine(cfg, model="kvtier/gpu-check", layers=geo["L"], kv_heads=geo["H"],
                             head_dim=geo["D"], dtype="f16")

    def flash_caches(self, geo, nb, seed):
        """vLLM's GPU layout: per layer (2, num_blocks, block_size, H, D)."""
        import torch

        g = torch.Generator(device=self.device()).manual_seed(seed)
        return [torch.randn(2, nb, geo["BS"], geo["H"], geo["D"], generator=g, device=self.device(),
                            dtype=torch.float16) for _ in range(geo["L"])]

    def paged(self, caches, geo, bpc):
        from kvtier.transfer import PagedLayers

        return PagedLayers.vllm(caches, block_size=geo["BS"], num_kv_heads=geo["H"], head_size=geo["D"],
                                blocks_per_chunk=bpc)

    # -- 1. round trips -------------------------------------------------------------------------

    def round_trips(self) -> bool:
        import torch
        from kvtier.transfer import HostStaging, LoadPlan, PagedLayers, PoolMemory, SavePlan, Transfer

        geo = {"L": 4, "H": 4, "D": 64, "BS": 16}
        bpc, nb = 8, 64  # 128-token chunks
        out = self.report["round_trip"] = {}
        ok = True
        for mode in self.modes:
            eng = self.engine(geo, bpc * geo["BS"], 0.25)
            src = self.flash_caches(geo, nb, 1)
            dst = [torch.zeros_like(t) for t in src]
            sp, dp = self.paged(src, geo, bpc), self.paged(dst, geo, bpc)
            xs, xd = Transfer(sp, self.streams()), Transfer(dp, self.streams())
            pool = PoolMemory(eng, sp, bpc * geo["BS"], cuda_register=self.cuda) if mode == "pool" else None
            src_ids = list(range(3, 3 + 24))[::-1]  # 24 blocks = 3 chunks, descending
            dst_ids = list(range(30, 54))
            tokens = list(range(1000, 1000 + 24 * geo["BS"]))
            self._store(eng, xs, pool, tokens, src_ids, sp)
            self._load(eng, xd, pool, tokens, dst_ids, dp)
            good = all(torch.equal(dst[li][:, dst_ids], src[li][:, src_ids]) for li in range(geo["L"]))
            untouched = all(not dst[li][:, :30].any() for li in range(geo["L"]))
            out[mode] = {"bytes_equal": good, "other_blocks_untouched": untouched}
            ok &= good and untouched
            xs.close(), xd.close()
            if pool is not None:
                pool.close()
            del eng

        # Across devices and layouts: vLLM CPU layout (128-token blocks) <-> this device's
        # flash layout (16-token blocks), one engine, one payload layout.
        eng = self.engine(geo, 128, 0.25)
        cpu_src = [torch.randn(16, geo["H"], 128, 2 * geo["D"], dtype=torch.float16) for _ in range(geo["L"])]
        cpu = PagedLayers.vllm(cpu_src, block_size=128, num_kv_heads=geo["H"], head_size=geo["D"])
        staging = HostStaging(torch.float16, pin=self.cuda)
        tokens = list(range(5000, 5000 + 3 * 128))
        (payload,) = staging.payloads([cpu.payload_numel(3)])
        cpu.gather([7, 2, 11], payload)
        eng.store(tokens, payload)
        gpu_dst = [torch.zeros(2, 64, 16, geo["H"], geo["D"], dtype=torch.float16, device=self.device())
                   for _ in range(geo["L"])]
        gp = self.paged(gpu_dst, geo, 8)
        xg = Transfer(gp, self.streams())
        gids = list(range(40, 64))
        self._load(eng, xg, None, tokens, gids, gp)
        cross = all(
            torch.equal(gp.views[li][:, gids].flatten(1, 2).cpu(), cpu.views[li][:, [7, 2, 11]].flatten(1, 2))
            for li in range(geo["L"])
        )
        # ... and back: stored from the device, loaded into the CPU layout.
        eng.clear()
        self._store(eng, xg, None, tokens, gids, gp)
        cpu_dst = [torch.zeros_like(t) for t in cpu_src]
        cd = PagedLayers.vllm(cpu_dst, block_size=128, num_kv_heads=geo["H"], head_size=geo["D"])
        (back,) = staging.payloads([cd.payload_numel(3)])
        assert eng.retrieve(tokens, back) == len(tokens)
        cd.scatter(back, [0, 1, 2])
        back_ok = all(torch.equal(cpu_dst[li][[0, 1, 2]], cpu_src[li][[7, 2, 11]]) for li in range(geo["L"]))
        out["cpu_layout_to_device_and_back"] = {"to_device": cross, "back": back_ok}
        xg.close()
        return ok and cross and back_ok

    def _store(self, eng, xfer, pool, tokens, ids, paged):
        """Stores the request's blocks ``ids`` (whole chunks) through a SaveStep."""
        from kvtier.transfer import HostStaging, SavePlan

        if pool is not None:
            claim = pool.begin_store(tokens, None)
            step = xfer.begin_save([SavePlan(claim.chunks, ids)])
            step.finish()
            return claim.commit()
        staging = HostStaging(paged.dtype, pin=self.cuda)
        (payload,) = staging.payloads([paged.payload_numel(len(ids))])
        step = xfer.begin_save([SavePlan(paged.split(payload), ids)])
        step.finish()
        return eng.store(tokens, payload)

    def _load(self, eng, xfer, pool, tokens, ids, paged):
        from kvtier.transfer import HostStaging, LoadPlan

        load = xfer.begin_load()
        if pool is not None:
            held = pool.acquire(tokens, None)
            load.issue([LoadPlan(held.chunks, 0, ids)])
            load.wait_all()
            load.finish()
            held.release()
            return
        staging = HostStaging(paged.dtype, pin=self.cuda)
        (payload,) = staging.payloads([paged.payload_numel(len(ids))])
        got = eng.retrieve(tokens, payload)
        assert got == len(tokens), f"retrieved {got} of {len(tokens)} tokens"
        load.issue([LoadPlan(paged.split(payload), 0, ids)])
        load.wait_all()
        load.finish()
        self.sync()

    # -- 2. concurrency -------------------------------------------------------------------------

    def concurrency(self) -> bool:
        out = self.report["concurrency"] = {}
        iters = self.args.iterations if self.args.iterations is not None else (1000 if self.cuda else 20)
        ok = True
        for i, mode in enumerate(self.modes):
            # Each mode gets its share of the concurrency budget (45% of the whole).
            res = self._race_loop(mode, iters, budget_s=self.args.budget_s * 0.45 / len(self.modes))
            out[mode] = res
            ok &= res["mismatches"] == 0 and res["iterations"] > 0
        if self.cuda and not self.over_budget(0.6):
            out["canary_without_waits"] = self._race_loop(self.modes[0], 50, budget_s=20, broken=True)
        return ok

    def _race_loop(self, mode, iters, budget_s, broken=False):
        import random

        import torch
        from kvtier.transfer import PoolMemory, Transfer

        if self.cuda:
            geo, nb = {"L": 8, "H": 8, "D": 128, "BS": 16}, 512
        else:  # the smoke run: the same steps on small CPU caches
            geo, nb = {"L": 4, "H": 2, "D": 64, "BS": 16}, 96
        bpc, n_req = 4, 8  # 64-token chunks; 8 blocks (2 chunks) per request
        chunk_tokens = bpc * geo["BS"]
        eng = self.engine(geo, chunk_tokens, 0.5 if self.cuda else 0.05)
        dev = self.device()
        src = self.flash_caches(geo, nb, 11)
        dst = self.flash_caches(geo, nb, 12)
        sp, dp = self.paged(src, geo, bpc), self.paged(dst, geo, bpc)
        streams = self.streams()
        if broken:  # the canary: copies no longer wait for the compute stream, nor it for them
            streams.wait = lambda stream, event: None
        # Alternate steps through device buffers that hold the whole step (saves staged layer
        # by layer in the forward pass) and ones smaller than a chunk (copied chunk by chunk).
        pairs = [(Transfer(sp, streams, device_staging_bytes=cap), Transfer(dp, streams, device_staging_bytes=cap))
                 for cap in (64 << 20, sp.block_nbytes * bpc)]
        pool = PoolMemory(eng, sp, chunk_tokens, cuda_register=self.cuda) if mode == "pool" else None
        rng = random.Random(7)
        sleep = getattr(torch.cuda, "_sleep", None) if self.cuda else None
        mismatches, done, t0 = 0, 0, time.monotonic()
        first_bad, staged_early = None, 0
        for it in range(iters):
            if time.monotonic() - t0 > budget_s:
                break
            blocks = rng.sample(range(nb), 3 * n_req)
            # Index tensors made first: a later host-to-device copy of a Python list would
            # make the host wait for the compute stream and hide the races looked for.
            r_src, r_dst, other = (torch.tensor(blocks[i * n_req : (i + 1) * n_req], device=dev) for i in range(3))
            tokens = [rng.randrange(1 << 31) for _ in range(n_req * geo["BS"])]
            fresh = [torch.randn(2, n_req, geo["BS"], geo["H"], geo["D"], device=dev, dtype=torch.float16)
                     for _ in range(geo["L"])]
            want = [f.clone() for f in fresh]
            xs, xd = pairs[it % 2]
            plans = self._save_plans(eng, xs, pool, tokens, blocks[:n_req], sp)
            step = xs.begin_save(plans[0])
            # The step computes the request's KV late (behind a sleep kernel) while writing
            # other blocks; each layer is saved right after it is written.
            for li in range(geo["L"]):
                if sleep is not None:
                    sleep(50000)  # ~25 us: an unordered copy would overtake the write
                src[li].index_copy_(1, r_src, fresh[li])
                src[li].index_fill_(1, other, -3.0)
                staged_early += step.stage_layer(li)
            step.finish()
            for li in range(geo["L"]):  # the next step reuses the blocks
                src[li].index_fill_(1, r_src, 0.0)
            self._commit(eng, plans, tokens)
            # Load into other blocks: their previous user writes them first (late), attention
            # reads each layer after waiting for it; the compute stream keeps writing others.
            for li in range(geo["L"]):
                if sleep is not None:
                    sleep(50000)
                dst[li].index_fill_(1, r_dst, 7.0)
            load = xd.begin_load()
            held = self._issue_load(eng, xd, pool, load, tokens, blocks[n_req : 2 * n_req], dp)
            seen = []
            for li in range(geo["L"]):
                load.wait_layer(li)
                seen.append(dst[li].index_select(1, r_dst))
                dst[li].index_fill_(1, other, 1.0)
            load.finish()
            if held is not None:
                held.release()
            self.sync()
            bad = sum(0 if torch.equal(seen[li], want[li]) else 1 for li in range(geo["L"]))
            if bad:
                mismatches += 1
                first_bad = first_bad if first_bad is not None else it
            done += 1
            if it % 50 == 49:
                eng.clear()
        for xs, xd in pairs:
            xs.close(), xd.close()
        if pool is not None:
            pool.close()
        return {"iterations": done, "mismatches": mismatches, "first_mismatch": first_bad,
                "seconds": round(time.monotonic() - t0, 2), "broken_ordering": broken,
                "layers_staged_in_the_forward_pass": staged_early}

    def _save_plans(self, eng, xs, pool, tokens, ids, paged):
        from kvtier.transfer import HostStaging, SavePlan

        if pool is not None:
            claim = pool.begin_store(tokens, None)
            return [SavePlan(claim.chunks, ids)], claim
        if not hasattr(self, "_staging"):
            self._staging = HostStaging(paged.dtype, pin=self.cuda)
        (payload,) = self._staging.payloads([paged.payload_numel(len(ids))])
        return [SavePlan(paged.split(payload), ids)], payload

    def _commit(self, eng, plans, tokens):
        _, handle = plans
        if hasattr(handle, "commit"):
            rep = handle.commit()
        else:
            rep = eng.store(tokens, handle)
        return rep

    def _issue_load(self, eng, xd, pool, load, tokens, ids, paged):
        from kvtier.transfer import HostStaging, LoadPlan

        if pool is not None:
            held = pool.acquire(tokens, None)
            load.issue([LoadPlan(held.chunks, 0, ids)])
            return held
        if not hasattr(self, "_load_staging"):
            self._load_staging = HostStaging(paged.dtype, pin=self.cuda)
        (payload,) = self._load_staging.payloads([paged.payload_numel(len(ids))])
        eng.retrieve(tokens, payload)
        load.issue([LoadPlan(paged.split(payload), 0, ids)])
        return None

    # -- 3. bandwidth ---------------------------------------------------------------------------

    def bandwidth(self) -> bool:
        import torch

        sizes = [float(s) for s in (self.args.sizes or ("4,32,80" if self.cuda else "0.25,1")).split(",")]
        rounds = self.args.rounds or (5 if self.cuda else 2)
        geo = {"L": 32, "H": 8, "D": 128, "BS": 16} if self.cuda else {"L": 4, "H": 2, "D": 64, "BS": 16}
        bpt = geo["L"] * 2 * geo["H"] * geo["D"] * 2  # bytes per token
        rows = self.report["bandwidth"] = []
        total_target = 256 << 20 if self.cuda else 4 << 20  # bytes moved per round
        for size in sizes:
            chunk_bytes = int(size * (1 << 20))
            tokens_per_chunk = chunk_bytes // bpt
            if tokens_per_chunk % geo["BS"] or tokens_per_chunk == 0:
                raise ValueError(f"{size} MiB is not a whole number of {geo['BS']}-token blocks here")
            bpc = tokens_per_chunk // geo["BS"]
            n_chunks = max(2, -(-total_target // chunk_bytes))
            nb = n_chunks * bpc
            for mode in self.modes:
                if self.over_budget(0.95):
                    rows.append({"chunk_mib": size, "mode": mode, "skipped": "time budget"})
                    continue
                rows.append(self._bandwidth_case(geo, size, bpc, n_chunks, nb, mode, rounds))
                torch.cuda.empty_cache() if self.cuda else None
        target = [r for r in rows if r.get("chunk_mib") == TARGET_SIZE_MIB and "d2h_ratio" in r]
        return all(r["d2h_ratio"] >= TARGET_RATIO and r["h2d_ratio"] >= TARGET_RATIO for r in target)

    def _bandwidth_case(self, geo, size, bpc, n_chunks, nb, mode, rounds):
        import random

        import torch
        from kvtier.transfer import HostStaging, LoadPlan, PoolMemory, SavePlan, Transfer

        dev = self.device()
        chunk_tokens = bpc * geo["BS"]
        total = n_chunks * chunk_tokens
        nbytes = n_chunks * int(size * (1 << 20))
        eng = self.engine(geo, chunk_tokens, max(0.25, 2.5 * nbytes / 2**30))
        src = self.flash_caches(geo, nb, 21)
        dst = [torch.empty_like(t) for t in src]
        sp, dp = self.paged(src, geo, bpc), self.paged(dst, geo, bpc)
        xs = Transfer(sp, self.streams(), device_staging_bytes=nbytes)
        xd = Transfer(dp, self.streams(), device_staging_bytes=nbytes)
        pool = PoolMemory(eng, sp, chunk_tokens, cuda_register=self.cuda) if mode == "pool" else None
        staging = HostStaging(torch.float16, pin=self.cuda)
        ids = list(range(nb))
        random.Random(3).shuffle(ids)
        # The baseline: the same bytes, one plain copy per chunk between a device tensor and
        # pinned host memory.
        chunk_elems = int(size * (1 << 20)) // 2
        base_dev = torch.randn(n_chunks, chunk_elems, device=dev, dtype=torch.float16)
        base_host = torch.empty(n_chunks, chunk_elems, dtype=torch.float16, pin_memory=self.cuda)

        def baseline(direction):
            self.sync()
            t = time.perf_counter()
            for i in range(n_chunks):
                if direction == "d2h":
                    base_host[i].copy_(base_dev[i], non_blocking=True)
                else:
                    base_dev[i].copy_(base_host[i], non_blocking=True)
            self.sync()
            return time.perf_counter() - t

        res = {k: [] for k in ("d2h", "store", "h2d", "load", "base_d2h", "base_h2d")}
        rng = random.Random(5)
        for r in range(rounds + 1):  # round 0 warms up (allocations, first registrations)
            tokens = [rng.randrange(1 << 31) for _ in range(total)]
            b_d2h = baseline("d2h")
            # store: gather + D2H into kvtier memory (d2h), then into the engine (store)
            self.sync()
            t = time.perf_counter()
            if pool is not None:
                claim = pool.begin_store(tokens, None)
                xs.begin_save([SavePlan(claim.chunks, ids)]).finish()
                t1 = time.perf_counter()
                rep = claim.commit()
            else:
                (payload,) = staging.payloads([sp.payload_numel(nb)])
                xs.begin_save([SavePlan(sp.split(payload), ids)]).finish()
                t1 = time.perf_counter()
                rep = eng.store(tokens, payload)
            t2 = time.perf_counter()
            if rep["new_chunks"] != n_chunks:
                raise RuntimeError(f"stored {rep['new_chunks']} of {n_chunks} chunks: {rep}")
            b_h2d = baseline("h2d")
            # load: out of kvtier memory (retrieve / acquire), then H2D + scatter (h2d)
            self.sync()
            u = time.perf_counter()
            load = xd.begin_load()
            held = None
            if pool is not None:
                held = pool.acquire(tokens, None)
                chunks = held.chunks
            else:
                (payload,) = staging.payloads([dp.payload_numel(nb)])
                eng.retrieve(tokens, payload)
                chunks = dp.split(payload)
            u1 = time.perf_counter()
            load.issue([LoadPlan(chunks, 0, ids)])
            load.wait_all()
            load.finish()
            self.sync()
            u2 = time.perf_counter()
            if held is not None:
                held.release()
            if r == 0:
                ok = all(torch.equal(dst[li][:, ids], src[li][:, ids]) for li in range(geo["L"]))
                if not ok:
                    raise RuntimeError("bandwidth round trip changed the bytes")
            else:
                res["d2h"].append(t1 - t), res["store"].append(t2 - t)
                res["h2d"].append(u2 - u1), res["load"].append(u2 - u)
                res["base_d2h"].append(b_d2h), res["base_h2d"].append(b_h2d)
            eng.clear()
        xs.close(), xd.close()
        if pool is not None:
            pool.close()

        def gbps(key):
            v = sorted(nbytes / s / 1e9 for s in res[key])
            return {"median": round(statistics.median(v), 2), "min": round(v[0], 2), "max": round(v[-1], 2)}

        row = {"chunk_mib": size, "mode": mode, "chunks_per_round": n_chunks, "bytes_per_round": nbytes,
               "rounds": rounds}
        for k in res:
            row[f"{k}_gbps"] = gbps(k)
        row["d2h_ratio"] = round(row["d2h_gbps"]["median"] / row["base_d2h_gbps"]["median"], 3)
        row["h2d_ratio"] = round(row["h2d_gbps"]["median"] / row["base_h2d_gbps"]["median"], 3)
        row["store_ratio"] = round(row["store_gbps"]["median"] / row["base_d2h_gbps"]["median"], 3)
        row["load_ratio"] = round(row["load_gbps"]["median"] / row["base_h2d_gbps"]["median"], 3)
        return row

    # -- run ------------------------------------------------------------------------------------

    def run(self) -> int:
        code = EXIT_OK
        try:
            if not self.environment():
                return self.finish(EXIT_ENV)
            ok = self.round_trips()
            ok = self.concurrency() and ok
            if not ok:
                code = EXIT_MISMATCH
            fast = self.bandwidth()
            if code == EXIT_OK and not fast and self.cuda:
                code = EXIT_SLOW
            return self.finish(code)
        except Exception as e:  # noqa: BLE001 - reported, then a failure
            self.report["error"] = f"{type(e).__name__}: {e}"
            self.report["traceback"] = traceback.format_exc()
            return self.finish(EXIT_MISMATCH)

    def finish(self, code: int) -> int:
        self.report["exit_code"] = code
        self.report["ok"] = code == EXIT_OK
        self.report["elapsed_s"] = round(self.elapsed(), 1)
        path = self.args.out
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.report, f, indent=2)
        print(summary(self.report))
        print(f"[gpu-check] report: {path}; exit {code}")
        return code


def summary(rep: dict) -> str:
    """A few human lines from the report."""
    lines = [f"[gpu-check] device {rep.get('device')}: {rep.get('env', {}).get('gpu', '')} "
             f"torch {rep.get('env', {}).get('torch', '?')}"]
    if "error" in rep.get("env", {}):
        lines.append(f"[gpu-check] environment: {rep['env']['error']}")
    for k, v in rep.get("round_trip", {}).items():
        lines.append(f"[gpu-check] round trip {k}: {v}")
    for k, v in rep.get("concurrency", {}).items():
        lines.append(f"[gpu-check] concurrency {k}: {v['mismatches']} mismatches in {v['iterations']} steps"
                     f" ({v['seconds']} s)")
    for r in rep.get("bandwidth", []):
        if "skipped" in r:
            lines.append(f"[gpu-check] {r['chunk_mib']} MiB {r['mode']}: skipped ({r['skipped']})")
            continue
        lines.append(
            f"[gpu-check] {r['chunk_mib']:>5} MiB {r['mode']:>6}: d2h {r['d2h_gbps']['median']} GB/s "
            f"(x{r['d2h_ratio']} of copy {r['base_d2h_gbps']['median']}), h2d {r['h2d_gbps']['median']} GB/s "
            f"(x{r['h2d_ratio']} of copy {r['base_h2d_gbps']['median']}); with the engine: store "
            f"{r['store_gbps']['median']}, load {r['load_gbps']['median']} GB/s"
        )
    if "error" in rep:
        lines.append(f"[gpu-check] error: {rep['error']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    return Check(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
