"""Tests of the kvtier Python bindings (numpy only; torch tests skip without torch)."""

import array
import contextlib
import gc
import json
import threading
import time

import numpy as np
import pytest

import kvtier

SHAPE = dict(layers=2, kv_heads=2, head_dim=8, dtype="f16")  # 2*2*2*8*2 = 128 B/token


def make(cfg, **kw):
    args = dict(SHAPE)
    args.update(kw)
    return kvtier.Engine(cfg, model="test/model", **args)


def payload(eng, n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n * eng.bytes_per_token // 2).astype(np.float16)


# -- key spec ---------------------------------------------------------------------------


def _tokens(v):
    if isinstance(v, dict) and "range" in v:
        return list(range(*v["range"]))
    return v


def test_chunk_keys_match_golden_vectors(repo_root):
    data = json.loads((repo_root / "docs" / "key-vectors.json").read_text())
    assert data["key_spec_version"] == kvtier.KEY_SPEC_VERSION
    assert len(data["vectors"]) >= 10
    for v in data["vectors"]:
        got = kvtier.chunk_keys(
            v["identity"], v["chunk_size"], v["save_unfull_chunk"], v["cache_salt"], _tokens(v["tokens"])
        )
        assert got == v["keys"], v["name"]


def test_engine_chunk_keys_agree_with_module_function(small_cfg):
    eng = make(small_cfg)
    toks = list(range(100))
    ident = eng.identity()
    assert eng.chunk_keys(toks) == kvtier.chunk_keys(ident, 16, False, None, toks)
    assert len(eng.chunk_keys(toks)) == 6
    assert eng.chunk_keys(toks, salt="a") != eng.chunk_keys(toks)


def test_bad_identity_is_a_value_error():
    with pytest.raises(ValueError, match="identity"):
        kvtier.chunk_keys({"model_name": "x"}, 4, False, None, [1, 2, 3])


# -- store / lookup / retrieve ------------------------------------------------------------


def test_store_lookup_retrieve_roundtrip(small_cfg):
    eng = make(small_cfg)
    assert eng.chunk_size == 16 and eng.bytes_per_token == 128
    toks = list(range(1000, 1100))  # 6 full chunks = 96 tokens, tail of 4 dropped
    kv = payload(eng, len(toks))
    assert eng.lookup(toks) == 0
    rep = eng.store(toks, kv)
    assert rep["stored_tokens"] == 96 and rep["new_chunks"] == 6
    assert eng.lookup(toks) == 96
    assert eng.lookup(toks[:50]) == 48
    assert eng.lookup([7] + toks[1:]) == 0
    d = eng.lookup_detail(toks)
    assert d["hit_chunks"] == 6 and d["tiers"] == [0] * 6
    out = np.zeros_like(kv)
    assert eng.retrieve(toks, out) == 96
    n = 96 * eng.bytes_per_token // 2
    assert np.array_equal(out[:n], kv[:n])
    assert not out[n:].any()
    # storing again: everything present
    assert eng.store(toks, kv)["present_chunks"] == 6


def test_any_dtype_and_numpy_tokens(small_cfg):
    eng = make(small_cfg)
    toks = np.arange(32, dtype=np.int64)
    raw = np.frombuffer(np.random.default_rng(1).bytes(32 * 128), dtype=np.uint8).copy()
    eng.store(toks, raw.view(np.float32))  # any dtype: bytes are what count
    out = np.empty(32 * 128, dtype=np.uint8)
    assert eng.retrieve(toks.astype(np.uint32), out) == 32
    assert np.array_equal(out, raw)
    out2 = bytearray(32 * 128)
    assert eng.retrieve(list(toks), out2) == 32
    assert bytes(out2) == raw.tobytes()


def test_token_inputs_give_the_same_keys_and_bad_ids_are_value_errors(small_cfg):
    # tokens_fast(): an exact list's ints read from their digits (one or two 30-bit digits),
    # int numpy arrays / CPU torch tensors read in place; everything else takes the generic
    # path. All must agree: list keys against a numpy array's at every digit boundary, small
    # cached ints, bools.
    from kvtier import _native
    assert _native.token_list_reader() == "digits", "the int layout check failed on this CPython"
    eng = make(small_cfg)
    edges = [0, 1, 5, 255, 256, 257, 2**15, 2**29, 2**30 - 1, 2**30, 2**30 + 1, 2**31,
             2**32 - 2, 2**32 - 1, 123456]
    toks = (edges + [7, 2**32 - 1, 0, 123456]) * 16
    want = eng.chunk_keys(np.asarray(toks, dtype=np.uint32))
    assert eng.chunk_keys(toks) == want
    flags = [True, False] * 32
    assert eng.chunk_keys(flags) == eng.chunk_keys(np.asarray(flags, dtype=np.uint32))
    same = [tuple(toks), np.asarray(toks, dtype=np.uint32), np.asarray(toks, dtype=np.int64),
            np.asarray(toks, dtype=np.uint64), np.asarray(toks, dtype=np.int64)[::1]]
    torch = None
    try:
        import torch
    except ImportError:
        pass
    if torch is not None:
        same += [torch.tensor(toks, dtype=torch.int64)]
    for t in same:
        assert eng.chunk_keys(t) == want, type(t)
    bad = [[-1], [2**32], [5, -2**31], [2**62], [2**64], [-2**70],
           np.array([-1]), np.array([2**32], dtype=np.int64)]
    if torch is not None:
        bad.append(torch.tensor([-5]))
    for t in bad:
        with pytest.raises((ValueError, OverflowError)):
            eng.lookup(t)
    with pytest.raises(TypeError):
        eng.lookup(["x"])


def test_retrieve_writes_in_place_without_copy(small_cfg):
    eng = make(small_cfg)
    toks = list(range(64))
    kv = payload(eng, 64, seed=3).reshape(64, -1)
    eng.store(toks, kv)
    big = np.zeros((2, 64, kv.shape[1]), dtype=np.float16)
    view = big[1]  # a C-contiguous view into `big`
    assert eng.retrieve(toks, view) == 64
    assert np.array_equal(big[1], kv) and not big[0].any()


def test_partial_prefix_only(small_cfg):
    eng = make(small_cfg)
    a = list(range(64))
    eng.store(a, payload(eng, 64))
    b = a[:40] + [9999] * 24  # shares 2.5 chunks -> 2 chunks reusable
    assert eng.lookup(b) == 32
    out = np.zeros(64 * 64, dtype=np.float16)
    assert eng.retrieve(b, out) == 32


def test_salt_separates_tenants(small_cfg):
    eng = make(small_cfg)
    toks = list(range(32))
    eng.store(toks, payload(eng, 32), salt="tenant-a")
    assert eng.lookup(toks, salt="tenant-a") == 32
    assert eng.lookup(toks, salt="tenant-b") == 0
    assert eng.lookup(toks) == 0
    assert eng.remove_salt("tenant-a") >= 2
    assert eng.lookup(toks, salt="tenant-a") == 0


# -- errors -----------------------------------------------------------------------------


def test_non_contiguous_is_rejected_clearly(small_cfg):
    eng = make(small_cfg)
    kv = payload(eng, 64).reshape(64, -1)
    with pytest.raises(BufferError, match="contiguous"):
        eng.store(list(range(64)), kv[:, ::2])
    with pytest.raises(BufferError, match="contiguous"):
        eng.retrieve(list(range(64)), np.zeros((64, 128), np.float16)[:, ::2])


def test_read_only_output_is_rejected(small_cfg):
    eng = make(small_cfg)
    ro = np.zeros(64 * 64, np.float16)
    ro.setflags(write=False)
    with pytest.raises(BufferError, match="writable"):
        eng.retrieve(list(range(64)), ro)
    with pytest.raises(BufferError):
        eng.retrieve(list(range(64)), b"\0" * 8192)


def test_engine_errors_carry_the_engine_message(small_cfg):
    eng = make(small_cfg)
    with pytest.raises(kvtier.KvTierError, match="KV payload is 10 bytes"):
        eng.store(list(range(32)), np.zeros(10, np.uint8))
    with pytest.raises(kvtier.KvTierError, match="output buffer"):
        eng.retrieve(list(range(32)), np.zeros(10, np.uint8))
    with pytest.raises(kvtier.KvTierError, match="cache_salt"):
        eng.lookup([1, 2], salt="x" * 200)
    assert issubclass(kvtier.KvTierError, RuntimeError)


def test_bad_config_key(small_cfg):
    with pytest.raises(kvtier.KvTierError, match="no_such_key"):
        make({"no_such_key": 1})
    with pytest.raises(kvtier.KvTierError, match="max_local_disk_size"):
        make({"local_disk": "/tmp/x"})
    with pytest.raises(ValueError, match="layers"):
        kvtier.Engine(small_cfg)
    with pytest.raises(TypeError):
        kvtier.Engine(42, **SHAPE)
    with pytest.raises(TypeError):
        make(small_cfg).lookup("abc")


def test_server_mode_reports_clearly():
    try:
        eng = make({"server": "unix:/nonexistent/kvtier.sock"})
    except kvtier.KvTierError as e:
        msg = str(e)
        assert "server" in msg
    else:  # a client build: connecting to a missing socket must fail
        pytest.fail(f"connected to a missing server: {eng!r}")
    with pytest.raises(ValueError, match="server"):
        make({"server": "unix:/x", "chunk_size": 16})


# -- config sources ---------------------------------------------------------------------


def test_config_from_yaml_file(tmp_path):
    p = tmp_path / "kvtier.yaml"
    p.write_text("chunk_size: 32\nmax_local_cpu_size: 0.015625\nlocal_cpu_huge_pages: false\n")
    assert make(str(p)).chunk_size == 32
    assert make(p).chunk_size == 32  # PathLike
    with pytest.raises(kvtier.KvTierError, match="reading config file"):
        make(str(tmp_path / "missing.yaml"))


def test_config_from_environment(tmp_path, monkeypatch):
    p = tmp_path / "k.yaml"
    p.write_text("chunk_size: 32\nmax_local_cpu_size: 0.015625\nlocal_cpu_huge_pages: false\n")
    monkeypatch.setenv("KVTIER_CONFIG_FILE", str(p))
    monkeypatch.setenv("KVTIER_CHUNK_SIZE", "64")
    assert make(None).chunk_size == 64


# -- prefetch, stats, metrics, disk tier ---------------------------------------------------


def test_prefetch_handle(small_cfg):
    eng = make(small_cfg)
    toks = list(range(48))
    eng.store(toks, payload(eng, 48))
    h = eng.prefetch(toks)
    assert isinstance(h, kvtier.PrefetchHandle)
    assert h.wait() == 48
    assert h.wait(timeout=0.1) == 48  # idempotent
    assert eng.prefetch([5, 6, 7] * 20).wait(1.0) == 0


def test_stats_and_metrics(small_cfg):
    eng = make(small_cfg)
    toks = list(range(32))
    eng.store(toks, payload(eng, 32))
    eng.lookup(toks)
    s = eng.stats()
    assert isinstance(s, dict)
    assert s["lookups"] >= 1 and s["hit_tokens"] >= 32
    assert s["tiers"][0]["checksum_failures"] == 0
    assert "kvtier" in eng.metrics_text()
    assert "Engine(" in repr(eng)


def test_disk_tier_survives_a_new_engine(tmp_path, small_cfg):
    cfg = dict(small_cfg, local_disk=str(tmp_path / "disk"), max_local_disk_size=0.0625)
    eng = make(cfg)
    toks = list(range(2000, 2064))
    kv = payload(eng, 64, seed=9)
    eng.store(toks, kv)
    assert eng.flush(10.0)
    del eng
    gc.collect()
    eng2 = make(cfg)  # empty L1, same disk
    d = eng2.lookup_detail(toks)
    assert d["hit_tokens"] == 64 and set(d["tiers"]) == {1}
    out = np.zeros_like(kv)
    assert eng2.retrieve(toks, out) == 64
    assert np.array_equal(out, kv)
    st = eng2.stats()
    assert st["tiers"][1]["hits"] >= 4 and st["tiers"][1]["checksum_failures"] == 0


def test_corrupt_disk_chunk_is_detected(tmp_path, small_cfg):
    cfg = dict(small_cfg, local_disk=str(tmp_path / "disk"), max_local_disk_size=0.0625)
    eng = make(cfg)
    toks = list(range(64))
    eng.store(toks, payload(eng, 64))
    assert eng.flush(10.0)
    del eng
    gc.collect()
    files = sorted(p for p in (tmp_path / "disk").rglob("*") if p.is_file() and p.stat().st_size > 4096)
    assert files
    for f in files:
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0xFF
        f.write_bytes(bytes(b))
    eng2 = make(cfg)
    out = np.zeros(64 * 64, np.float16)
    got = eng2.retrieve(toks, out)
    assert got < 64
    assert eng2.stats()["tiers"][1]["checksum_failures"] >= 1


def _ticks_mid_call(work):
    """Runs ``work()`` on this thread while another Python thread records a timestamp per
    loop turn; returns (the turns in the middle half of the call, the call's seconds). The
    middle half leaves out the bytecodes around the call, where the two threads take turns
    on the GIL whatever the call does."""
    stamps = array.array("d")
    stop = threading.Event()
    started = threading.Event()

    def ticker():
        started.set()
        while not stop.is_set():
            stamps.append(time.perf_counter())

    t = threading.Thread(target=ticker)
    t.start()
    started.wait()
    try:
        t0 = time.perf_counter()
        work()
        t1 = time.perf_counter()
    finally:
        stop.set()
        t.join()
    q = (t1 - t0) / 4
    return sum(1 for s in stamps if t0 + q <= s <= t1 - q), t1 - t0


def test_gil_is_released_during_engine_work(small_cfg):
    """During ONE long native call, another Python thread must run about as often as it does
    while this thread spins a pure-Python loop for as long (the baseline: the two threads take
    turns on the GIL). A call that held the GIL would stop it for the whole call."""
    # 8 KiB/token: 16384 tokens = 128 MiB, one retrieve of 0.1-0.4 s.
    eng = make(dict(small_cfg, max_local_cpu_size=0.1875), kv_heads=8, head_dim=128)
    toks = np.arange(16384, dtype=np.uint32)
    kv = np.ones(16384 * eng.bytes_per_token, np.uint8)
    assert eng.store(toks, kv)["stored_tokens"] == 16384
    out = np.zeros_like(kv)
    eng.retrieve(toks, out)  # first touch of `out`, outside the measurement

    def spin(seconds):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    native = shared = 0
    for _ in range(3):  # alternate rounds on a shared machine; sum them
        ticks, secs = _ticks_mid_call(lambda: eng.retrieve(toks, out))
        native += ticks
        shared += _ticks_mid_call(lambda: spin(secs))[0]
    assert out.all()
    assert shared > 0
    assert native > 0.25 * shared, (
        f"another thread ran {native} loop turns in the middle of retrieve, {shared} beside "
        "a pure-Python loop as long: retrieve holds the GIL"
    )


# -- torch (only where installed, e.g. the e2e venv) ---------------------------------------


def test_torch_tensors_any_dtype(small_cfg):
    torch = pytest.importorskip("torch")
    eng = make(small_cfg)
    toks = torch.arange(64)
    kv = torch.randn(64, 64, dtype=torch.bfloat16)  # 64 tokens x 128 bytes
    eng.store(toks, kv)
    out = torch.zeros_like(kv)
    assert eng.retrieve(toks, out) == 64
    assert torch.equal(out, kv)
    with pytest.raises(BufferError, match="contiguous"):
        eng.store(toks, kv.t())


# -- server mode (needs a `kvtier` binary with `serve`: $KV_SERVE_BIN or on PATH) ----------


def _serve_bin():
    import os
    import shutil

    b = os.environ.get("KV_SERVE_BIN") or shutil.which("kvtier")
    return b if b and os.path.exists(b) else None


@contextlib.contextmanager
def _served(tmp_path, config):
    """A `kvtier serve` with `config` (YAML text) on a socket under tmp_path: yields the
    socket path, stops the server (fails or skips the test when there is no binary)."""
    import os
    import subprocess
    import time

    b = _serve_bin()
    if b is None:
        if os.environ.get("KVTIER_REQUIRE_TEST_SERVERS", "") not in ("", "0"):
            pytest.fail("no kvtier binary: set KV_SERVE_BIN (required: KVTIER_REQUIRE_TEST_SERVERS is set)")
        pytest.skip("no kvtier binary (set KV_SERVE_BIN)")
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(config)
    sock = tmp_path / "kvtier.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    proc = subprocess.Popen([b, "serve", "--config", str(cfg), "--socket", str(sock)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if sock.exists():
                break
            if proc.poll() is not None:
                pytest.fail(f"kvtier serve exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        yield sock
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # never leave the server running
            proc.kill()
            proc.wait()


def test_server_mode_shares_one_cache(tmp_path):
    with _served(tmp_path, "chunk_size: 16\nmax_local_cpu_size: 0.0625\nlocal_cpu_huge_pages: false\n") as sock:
        a = kvtier.Engine({"server": f"unix:{sock}"}, model="test/model", **SHAPE)
        b2 = kvtier.Engine({"server": str(sock)}, model="test/model", **SHAPE)
        assert a.server and a.chunk_size == 16 and a.bytes_per_token == 128
        assert a.save_unfull_chunk is False  # the server's setting (its default)
        toks = list(range(500, 564))
        kv = payload(a, 64, seed=5)
        assert a.store(toks, kv)["stored_tokens"] == 64
        assert b2.lookup(toks) == 64  # another client sees it
        out = np.zeros_like(kv)
        assert b2.retrieve(toks, out) == 64 and np.array_equal(out, kv)
        assert b2.prefetch(toks).wait(5.0) == 64
        assert isinstance(b2.stats(), dict)
        with pytest.raises(kvtier.KvTierError):
            b2.metrics_text()
        for call in (b2.pool_region, lambda: b2.acquire(toks), lambda: b2.begin_store(toks)):
            with pytest.raises(kvtier.KvTierError, match="embedded engines"):
                call()


def test_a_server_that_keeps_tails_says_so_and_its_clients_store_and_find_them(tmp_path):
    """`save_unfull_chunk` is the server's: its clients' lookups and chunk keys count a
    prompt's partial last chunk, keyed by exactly its tokens."""
    tails = "chunk_size: 16\nmax_local_cpu_size: 0.0625\nlocal_cpu_huge_pages: false\nsave_unfull_chunk: true\n"
    with _served(tmp_path, tails) as sock:
        a = kvtier.Engine({"server": f"unix:{sock}"}, model="test/model", **SHAPE)
        assert a.save_unfull_chunk is True
        toks = list(range(500, 537))  # 2 chunks and a 5-token tail
        assert len(a.chunk_keys(toks)) == 3
        kv = payload(a, len(toks), seed=6)
        assert a.store(toks, kv)["new_chunks"] == 3
        assert a.lookup(toks) == 37 and a.lookup(toks[:36]) == 32  # the tail's key is its exact tokens
        out = np.zeros_like(kv)
        assert a.retrieve(toks, out) == 37 and np.array_equal(out, kv)


def test_embedded_engines_say_whether_they_keep_tails(small_cfg):
    assert make(small_cfg).save_unfull_chunk is False
    eng = make(dict(small_cfg, save_unfull_chunk=True))
    assert eng.save_unfull_chunk is True
    toks = list(range(100, 137))
    assert eng.store(toks, payload(eng, len(toks)))["new_chunks"] == 3 and eng.lookup(toks) == 37


def test_embedded_engine_serves_admin_endpoints_when_admin_port_is_set(small_cfg):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = dict(small_cfg)
    cfg["admin_port"] = port
    eng = make(cfg)
    toks = list(range(64))
    eng.store(toks, payload(eng, len(toks)))
    assert eng.lookup(toks) == 64
    base = f"http://127.0.0.1:{port}"
    assert json.loads(urllib.request.urlopen(base + "/health", timeout=5).read())["status"] == "ok"
    metrics = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    assert "kvtier_hit_tokens_total 64" in metrics


def test_remove_forgets_a_prompt_in_every_tier(small_cfg):
    eng = make(small_cfg)
    toks = list(range(200, 264))
    eng.store(toks, payload(eng, len(toks)))
    assert eng.lookup(toks) == 64
    assert eng.remove(toks[:32]) == 2  # the first two chunks
    assert eng.lookup(toks) == 0
    assert eng.remove(toks[:32]) == 0


# -- stable ABI ---------------------------------------------------------------------------


def test_the_native_module_is_built_for_the_stable_abi():
    """One wheel (cp310-abi3) for every CPython >= 3.10: the GPU machines' 3.12 loads the
    wheel CI builds on 3.11."""
    import kvtier._native as native

    assert native.__file__.endswith(".abi3.so"), native.__file__


def test_tokens_of_every_list_shape_agree(small_cfg):
    """Exact lists are read through their item array; list subclasses, bools, int
    subclasses and numpy scalars inside a list take the generic path: all must agree."""
    eng = make(small_cfg)
    toks = list(range(3, 3 + 64))
    want = eng.chunk_keys(toks)

    class Toks(list):
        pass

    class Tok(int):
        pass

    assert eng.chunk_keys(Toks(toks)) == want
    assert eng.chunk_keys([Tok(t) for t in toks]) == want
    assert eng.chunk_keys([np.int64(t) for t in toks]) == want
    assert eng.chunk_keys([True] + toks[1:]) == eng.chunk_keys([1] + toks[1:])
    assert eng.chunk_keys([]) == []
    with pytest.raises(TypeError):
        eng.lookup(toks[:10] + [1.5])


def test_any_buffer_object_is_a_payload(small_cfg):
    eng = make(small_cfg)
    toks = list(range(32))
    raw = np.random.default_rng(4).bytes(32 * eng.bytes_per_token)
    eng.store(toks, array.array("B", raw))
    out = memoryview(bytearray(len(raw)))
    assert eng.retrieve(toks, out) == 32 and out.tobytes() == raw
    with pytest.raises(BufferError, match="writable"):
        eng.retrieve(toks, raw)  # bytes are read-only


# -- pool memory in place: acquire / begin_store (zero-copy GPU transfers) ------------------


def _write(addr, data):
    import ctypes

    ctypes.memmove(addr, data, len(data))


def _read(addr, n):
    import ctypes

    return ctypes.string_at(addr, n)


def test_begin_store_fills_pool_buffers_in_place(small_cfg):
    eng = make(small_cfg)
    base, size = eng.pool_region()
    assert size == int(small_cfg["max_local_cpu_size"] * 2**30) // 4096 * 4096
    toks = list(range(500, 500 + 48))  # 3 chunks
    raw = np.random.default_rng(5).bytes(48 * eng.bytes_per_token)
    cb = 16 * eng.bytes_per_token
    eng.store(toks[:16], raw[:cb])  # chunk 0 already stored
    s = eng.begin_store(toks)
    assert [(a, b) for a, b, _, _ in s.slots] == [(16, 32), (32, 48)]  # only the new chunks
    for start, end, addr, n in s.slots:
        assert n == cb and base <= addr and addr + n <= base + size
        _write(addr, raw[start * eng.bytes_per_token : end * eng.bytes_per_token])
    assert eng.lookup(toks) == 16  # nothing new is visible before the commit
    rep = s.commit()
    assert rep["new_chunks"] == 2 and rep["present_chunks"] == 1 and rep["stored_tokens"] == 48
    assert s.slots == []
    out = bytearray(len(raw))
    assert eng.retrieve(toks, out) == 48 and bytes(out) == raw
    with pytest.raises(kvtier.KvTierError, match="already committed"):
        s.commit()


def test_an_aborted_store_stores_nothing_and_frees_its_claims(small_cfg):
    eng = make(small_cfg)
    toks = list(range(64))
    s = eng.begin_store(toks)
    assert len(s.slots) == 4
    s.abort()
    s.abort()  # idempotent
    assert eng.lookup(toks) == 0
    s2 = eng.begin_store(toks)  # the claims are free again
    assert len(s2.slots) == 4
    del s2  # dropped unfinished: aborted
    assert eng.lookup(toks) == 0 and len(eng.begin_store(toks).slots) == 4


def test_acquire_holds_the_stored_prefix_in_place(small_cfg):
    eng = make(small_cfg)
    base, size = eng.pool_region()
    toks = list(range(900, 900 + 40))  # 2 full chunks + a tail
    raw = np.random.default_rng(6).bytes(40 * eng.bytes_per_token)
    eng.store(toks, raw)
    with eng.acquire(toks) as held:
        assert held.hit_tokens == 32
        got = held.chunks
        assert [(a, b) for a, b, _, _ in got] == [(0, 16), (16, 32)]
        for start, end, addr, n in got:
            assert base <= addr and addr + n <= base + size
            assert _read(addr, n) == raw[start * eng.bytes_per_token : end * eng.bytes_per_token]
        # Held chunks are not evicted by a clear: readers keep their bytes.
        eng.clear()
        assert _read(got[0][2], 8) == raw[:8]
    assert held.chunks == []
    miss = eng.acquire([1, 2, 3] * 20)
    assert miss.hit_tokens == 0 and miss.chunks == []



# -- windows (first_chunk) and other identities (for_identity) ---------------------------

SERVE_CFG = "chunk_size: 16\nmax_local_cpu_size: 0.0625\nlocal_cpu_huge_pages: false\n"


def _sliding_identity(eng):
    """The engine's identity with another layout tag and one layer: a sliding-window KV
    group of the same model, as the vLLM connector would name it."""
    ident = eng.identity()
    group = dict(ident["layout"]["groups"][0], num_layers=1)
    return dict(ident, layout=dict(ident["layout"], tag="sliding-window-512", groups=[group]))


def _l1_chunks(eng):
    return eng.stats()["tiers"][0]["usage"]["chunks"]


def test_first_chunk_stores_and_reads_a_window(small_cfg):
    eng = make(small_cfg)
    bpt = eng.bytes_per_token
    toks = list(range(2000, 2100))  # 6 full chunks (96 tokens) and a 4-token tail
    raw = np.frombuffer(np.random.default_rng(9).bytes(100 * bpt), dtype=np.uint8)
    w = 3 * 16  # chunk 3's first token: where the window's bytes start
    rep = eng.store(toks, raw[w * bpt :], first_chunk=3)
    assert rep["stored_tokens"] == 96 and rep["new_chunks"] == 3
    assert eng.lookup(toks) == 0  # chunk 0 is absent: no prefix
    assert eng.lookup(toks, first_chunk=3) == 96
    assert eng.lookup(toks, first_chunk=2) == 32  # nothing from chunk 2: its first token
    assert eng.lookup_detail(toks, first_chunk=3) == {
        "hit_tokens": 96, "hit_chunks": 3, "tiers": [0, 0, 0], "start_token": 48}
    assert eng.lookup_detail(toks, first_chunk=2)["hit_chunks"] == 0
    assert eng.lookup_detail(toks)["start_token"] == 0
    out = np.zeros((100 - w) * bpt, dtype=np.uint8)
    assert eng.retrieve(toks, out, first_chunk=3) == 96
    assert np.array_equal(out[: 48 * bpt], raw[w * bpt : 96 * bpt]) and not out[48 * bpt :].any()
    with eng.acquire(toks, first_chunk=4) as held:
        assert held.hit_tokens == 96
        assert [(a, b) for a, b, _, _ in held.chunks] == [(64, 80), (80, 96)]
        assert _read(held.chunks[0][2], 16 * bpt) == raw[64 * bpt : 80 * bpt].tobytes()
    # A window of a longer prompt: only the chunks not stored yet are claimed.
    longer = toks + list(range(5000, 5028))  # 8 chunks
    s = eng.begin_store(longer, first_chunk=5)
    assert [(a, b) for a, b, _, _ in s.slots] == [(96, 112), (112, 128)]
    s.abort()
    # The chunk count is an empty window; past it is an error; first_chunk is keyword-only.
    assert eng.lookup(toks, first_chunk=6) == 96
    with pytest.raises(kvtier.KvTierError, match="first_chunk 7 is past the 6 chunks"):
        eng.lookup(toks, first_chunk=7)
    with pytest.raises(kvtier.KvTierError, match="from chunk 3"):
        eng.store(toks, raw, first_chunk=3)  # the whole prompt's bytes: not the window's
    with pytest.raises(TypeError):
        eng.lookup(toks, None, 3)


def test_for_identity_shares_the_tiers_and_pool(small_cfg):
    eng = make(small_cfg)
    sw = eng.for_identity(_sliding_identity(eng))
    assert sw.identity()["layout"]["tag"] == "sliding-window-512"
    assert sw.bytes_per_token == eng.bytes_per_token // 2 and sw.chunk_size == eng.chunk_size
    assert sw.pool_region() == eng.pool_region() and sw.server is None
    toks = list(range(3000, 3064))
    assert sw.chunk_keys(toks) != eng.chunk_keys(toks)  # the identity is in every key
    before = _l1_chunks(eng)
    kv = payload(sw, len(toks), seed=3)
    assert sw.store(toks, kv)["new_chunks"] == 4
    assert _l1_chunks(eng) == before + 4  # the parent's tiers hold them
    assert sw.lookup(toks) == 64 and eng.lookup(toks) == 0
    out = np.zeros_like(kv)
    assert sw.retrieve(toks, out) == 64 and np.array_equal(out, kv)
    with pytest.raises(ValueError, match="identity"):
        eng.for_identity({"model_name": "x"})


def test_server_mode_for_identity_and_windows(tmp_path):
    with _served(tmp_path, SERVE_CFG) as sock:
        a = kvtier.Engine({"server": f"unix:{sock}"}, model="test/model", **SHAPE)
        sw = a.for_identity(_sliding_identity(a))
        assert sw.server == a.server and sw.bytes_per_token == 64
        reader = kvtier.Engine({"server": str(sock)}, identity=_sliding_identity(a))
        bpt = sw.bytes_per_token
        toks = list(range(700, 800))  # 6 chunks + a tail
        raw = np.frombuffer(np.random.default_rng(4).bytes(100 * bpt), dtype=np.uint8)
        rep = sw.store(toks, raw[32 * bpt :], first_chunk=2)
        assert rep["stored_tokens"] == 96 and rep["new_chunks"] == 4
        assert reader.lookup(toks) == 0 and a.lookup(toks, first_chunk=2) == 32
        assert reader.lookup(toks, first_chunk=2) == 96
        assert reader.lookup_detail(toks, first_chunk=3) == {
            "hit_tokens": 96, "hit_chunks": 3, "tiers": [0, 0, 0], "start_token": 48}
        out = np.zeros((100 - 32) * bpt, dtype=np.uint8)
        assert reader.retrieve(toks, out, first_chunk=2) == 96
        assert np.array_equal(out[: 64 * bpt], raw[32 * bpt : 96 * bpt])
        assert a.stats()["tiers"][0]["usage"]["chunks"] == 4  # one server, one cache
        with pytest.raises(kvtier.KvTierError, match="past the 6 chunks"):
            reader.retrieve(toks, out, first_chunk=7)
