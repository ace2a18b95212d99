"""The connector's KV events (issue 15): the blocks kvtier's L1 (medium CPU) and disk tier
(medium STORAGE) hold, in vLLM's own event types and block hashes, from the workers' engines through the scheduler to vLLM's
publisher; decoded with vLLM's own msgspec types."""

from __future__ import annotations

import random
from types import SimpleNamespace as NS

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

import msgspec  # noqa: E402
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402

import kvtier  # noqa: E402
from kvtier.vllm import KvTierConnector, KvTierConnectorMetadata, LoadSpec, SaveSpec  # noqa: E402
from kvtier.vllm.events import ConnectorEvents, RankVotes, WorkerEvents, external_hashes  # noqa: E402

from test_vllm_connector import (  # noqa: E402,F401 (stub_workers, worker: fixtures)
    BS, NB, StubEngine, ask_until_answered, empty_sched_output, make_config, run_step, stub_workers, worker,
)


def with_events(vc, on=True):
    vc.kv_events_config = NS(enable_kv_cache_events=on)
    return vc


def vllm_hashes(tokens):
    """Stand-ins for vLLM's block hashes (bytes, one per full block)."""
    return [bytes([7]) + i.to_bytes(4, "big") + bytes(str(tokens[i * BS]), "ascii") for i in range(len(tokens) // BS)]


def take(conn):
    ev = conn.get_kv_connector_kv_cache_events()
    return [] if ev is None else list(ev.get_all_events())


def decode_as_vllm(events):
    """Encodes a batch the way vLLM's ZMQ publisher does and decodes it with vLLM's types."""
    payload = msgspec.msgpack.encode(KVEventBatch(ts=1.0, events=events))
    return msgspec.msgpack.decode(payload, type=KVEventBatch).events


def test_a_save_announces_each_chunk_with_vllms_block_hashes_and_a_removal_withdraws_it(worker):
    conn, caches = worker(kv_events=True)
    run_step(conn, caches, KvTierConnectorMetadata())
    tokens = list(range(10, 10 + 4 * BS))
    hashes = vllm_hashes(tokens)
    meta = KvTierConnectorMetadata(saves=[SaveSpec("s", tokens, None, [3, 5, 7, 9], hashes)])
    run_step(conn, caches, meta)
    events = decode_as_vllm(take(conn))
    assert [type(e) for e in events] == [BlockStored] * 4
    for i, e in enumerate(events):
        assert e.block_hashes == [hashes[i]]
        assert e.parent_block_hash == (hashes[i - 1] if i else None)
        assert e.token_ids == tokens[i * BS : (i + 1) * BS]
        assert e.block_size == BS and e.medium == "CPU"
    assert take(conn) == []  # nothing new
    # The same prompt saved again: already held, nothing to announce.
    run_step(conn, caches, meta)
    assert take(conn) == []
    conn.worker_side.engine.remove(tokens)
    removed = decode_as_vllm(take(conn))
    assert [type(e) for e in removed] == [BlockRemoved] * 4
    assert sorted(h for e in removed for h in e.block_hashes) == sorted(hashes)
    assert all(e.medium == "CPU" for e in removed)
    assert conn.worker_side._events.known_chunks() == 0


def test_with_events_off_nothing_is_watched_or_sent(worker):
    conn, caches = worker()
    run_step(conn, caches, KvTierConnectorMetadata())
    tokens = list(range(10, 10 + 2 * BS))
    run_step(conn, caches, KvTierConnectorMetadata(saves=[SaveSpec("s", tokens, None, [1, 2], vllm_hashes(tokens))]))
    assert conn.get_kv_connector_kv_cache_events() is None
    assert conn.worker_side._events is None


def test_announced_chunks_are_exactly_those_l1_holds_under_eviction(worker):
    """Many one-chunk prompts through a small L1: after every step, the chunks an index fed
    with the events believes in are the ones L1 holds (never one a load would miss)."""
    conn, caches = worker(kv_events=True, max_local_cpu_size=0.0001)  # room for about 17 chunks of 6 KiB
    run_step(conn, caches, KvTierConnectorMetadata())
    eng = conn.worker_side.engine
    rng = random.Random(5)
    believed: set[bytes] = set()
    prompts = {}
    evictions = 0
    for step in range(60):
        tokens = [rng.randrange(4, 30000) for _ in range(BS)]
        h = vllm_hashes(tokens)
        prompts[h[0]] = tokens
        run_step(conn, caches, KvTierConnectorMetadata(saves=[SaveSpec(f"r{step}", tokens, None, [step % NB], h)]))
        for e in decode_as_vllm(take(conn)):
            if isinstance(e, BlockStored):
                believed.update(e.block_hashes)
            else:
                evictions += 1
                believed.difference_update(e.block_hashes)
        held = {hh for hh, t in prompts.items() if eng.lookup(t) == BS}
        assert believed == held, f"step {step}"
    assert evictions > 0, "the test needs evictions"


class TreeIndex:
    """A router's index as Dynamo's RadixTree keeps it: a block is taken only under a parent
    it holds, and removing a block drops the blocks after it. A stream that breaks either
    rule fails here, as Dynamo's apply_event fails."""

    def __init__(self):
        self.parent: dict = {}

    def apply(self, e) -> None:
        if isinstance(e, BlockStored):
            parent = e.parent_block_hash
            assert parent is None or parent in self.parent, "a block stored under a parent the index lacks"
            for h in e.block_hashes:
                self.parent[h] = parent
                parent = h
        else:
            for h in e.block_hashes:
                assert h in self.parent, "a removal of a block the index lacks"
                assert not any(p == h for p in self.parent.values()), "a block removed before its descendants"
                del self.parent[h]

    def prefix_blocks(self, hashes: list) -> int:
        n, parent = 0, None
        for h in hashes:
            if self.parent.get(h, "absent") != parent:
                break
            n, parent = n + 1, h
        return n


def test_announcements_are_prefix_closed_and_match_what_a_load_reads_under_eviction(worker):
    """Four-chunk prompts through an L1 that evicts the oldest chunks (a prompt's first chunk
    goes before its later ones): a tree index fed with the events never sees a block without
    its parent, and for every prompt it answers exactly the prefix a lookup finds."""
    conn, caches = worker(kv_events=True, max_local_cpu_size=0.0001)  # about 17 chunks
    run_step(conn, caches, KvTierConnectorMetadata())
    eng = conn.worker_side.engine
    rng = random.Random(11)
    index = TreeIndex()
    prompts = []
    docs = [[rng.randrange(4, 30000) for _ in range(2 * BS)] for _ in range(3)]
    for step in range(40):
        head = docs[step % 3] if step % 2 == 0 else []
        tokens = head + [rng.randrange(4, 30000) for _ in range(4 * BS - len(head))]
        prompts.append(tokens)
        h = vllm_hashes(tokens)
        spec = SaveSpec(f"r{step}", tokens, None, [(step + j) % NB for j in range(4)], h)
        run_step(conn, caches, KvTierConnectorMetadata(saves=[spec]))
        for e in decode_as_vllm(take(conn)):
            index.apply(e)
        for t in prompts:
            stored = eng.lookup(t) // BS
            assert index.prefix_blocks(vllm_hashes(t)) == stored, f"step {step}"
    assert any(eng.lookup(t) // BS < 4 for t in prompts), "the test needs evictions"


def disk_cfg(tmp_path, disk_gb):
    return dict(local_disk=str(tmp_path / "disk"), max_local_disk_size=disk_gb)


def by_medium(events):
    out: dict[str, list] = {"CPU": [], "STORAGE": []}
    for e in events:
        out[e.medium].append(e)
    return out


def take_flushed(conn):
    """The events once the engine's queued disk writes landed."""
    assert conn.worker_side.engine.flush(30.0)
    return decode_as_vllm(take(conn))


def save_and_index(conn, caches, step, tokens, index, removed) -> None:
    """Saves a four-block prompt in one step and feeds the events to each medium's index."""
    spec = SaveSpec(f"r{step}", tokens, None, [(step + j) % NB for j in range(4)], vllm_hashes(tokens))
    run_step(conn, caches, KvTierConnectorMetadata(saves=[spec]))
    for e in take_flushed(conn):
        index[e.medium].apply(e)
        removed[e.medium] += isinstance(e, BlockRemoved)


def l1_prefix(detail) -> int:
    """The leading chunks of a lookup_detail answer that L1 (tier 0) serves."""
    return next((i for i, tier in enumerate(detail["tiers"]) if tier != 0), len(detail["tiers"]))


def test_a_disk_tier_announces_its_chunks_as_storage_and_a_removal_withdraws_both_media(worker, tmp_path):
    conn, caches = worker(kv_events=True, **disk_cfg(tmp_path, 0.01))
    run_step(conn, caches, KvTierConnectorMetadata())
    tokens = list(range(10, 10 + 4 * BS))
    hashes = vllm_hashes(tokens)
    run_step(conn, caches, KvTierConnectorMetadata(saves=[SaveSpec("s", tokens, None, [3, 5, 7, 9], hashes)]))
    got = by_medium(take_flushed(conn))
    for medium in ("CPU", "STORAGE"):
        assert [type(e) for e in got[medium]] == [BlockStored] * 4, medium
        for i, e in enumerate(got[medium]):
            assert e.block_hashes == [hashes[i]]
            assert e.parent_block_hash == (hashes[i - 1] if i else None)
            assert e.token_ids == tokens[i * BS : (i + 1) * BS]
    assert take(conn) == []
    conn.worker_side.engine.remove(tokens)
    got = by_medium(decode_as_vllm(take(conn)))
    for medium in ("CPU", "STORAGE"):
        assert [type(e) for e in got[medium]] == [BlockRemoved] * 4, medium
        # Deepest first.
        assert [e.block_hashes for e in got[medium]] == [[h] for h in reversed(hashes)], medium
    for _ in range(3):  # the keys were learnt recently: forgotten two takes later
        take(conn)
    assert conn.worker_side._events.known_chunks() == 0


def test_l1_evictions_withdraw_cpu_only_and_storage_answers_what_a_lookup_finds(worker, tmp_path):
    """Four-chunk prompts through a small L1 over a disk that keeps them all: the CPU index
    follows L1 (evictions withdraw CPU blocks), the STORAGE index keeps every chunk; each
    index is a valid tree and answers exactly what its tier serves."""
    conn, caches = worker(kv_events=True, max_local_cpu_size=0.0001, **disk_cfg(tmp_path, 0.01))
    run_step(conn, caches, KvTierConnectorMetadata())
    eng = conn.worker_side.engine
    rng = random.Random(3)
    index = {"CPU": TreeIndex(), "STORAGE": TreeIndex()}
    prompts = []
    removed = {"CPU": 0, "STORAGE": 0}
    for step in range(24):
        tokens = [rng.randrange(4, 30000) for _ in range(4 * BS)]
        prompts.append(tokens)
        save_and_index(conn, caches, step, tokens, index, removed)
        for t in prompts:
            d = eng.lookup_detail(t)
            assert d["hit_chunks"] == 4, "the disk keeps every chunk"
            in_l1 = l1_prefix(d)
            assert index["CPU"].prefix_blocks(vllm_hashes(t)) == in_l1, f"step {step}"
            assert index["STORAGE"].prefix_blocks(vllm_hashes(t)) == 4, f"step {step}"
    assert removed["CPU"] > 0 and removed["STORAGE"] == 0


def test_disk_evictions_withdraw_storage_blocks_and_no_index_claims_a_miss(worker, tmp_path):
    """A small L1 over a smaller disk: both tiers evict. The STORAGE index stays a valid
    tree and never claims more than a lookup finds; the CPU index answers what L1 serves."""
    conn, caches = worker(kv_events=True, max_local_cpu_size=0.0001, **disk_cfg(tmp_path, 0.00012))
    run_step(conn, caches, KvTierConnectorMetadata())
    eng = conn.worker_side.engine
    rng = random.Random(7)
    index = {"CPU": TreeIndex(), "STORAGE": TreeIndex()}
    prompts = []
    removed = {"CPU": 0, "STORAGE": 0}
    docs = [[rng.randrange(4, 30000) for _ in range(2 * BS)] for _ in range(3)]
    for step in range(30):
        head = docs[step % 3] if step % 2 == 0 else []
        tokens = head + [rng.randrange(4, 30000) for _ in range(4 * BS - len(head))]
        prompts.append(tokens)
        save_and_index(conn, caches, step, tokens, index, removed)
        for t in prompts:
            d = eng.lookup_detail(t)
            in_l1 = l1_prefix(d)
            assert index["CPU"].prefix_blocks(vllm_hashes(t)) == in_l1, f"step {step}"
            assert index["STORAGE"].prefix_blocks(vllm_hashes(t)) <= d["hit_chunks"], f"step {step}"
    assert removed["CPU"] > 0 and removed["STORAGE"] > 0, "the test needs evictions in both tiers"
    assert any(index["STORAGE"].prefix_blocks(vllm_hashes(t)) > 0 for t in prompts[-3:])


class ScriptedEngine:
    """An engine whose tiers report what a test says (one chunk per block, keys "k<first token>")."""

    def __init__(self):
        self.changes: list = []
        self.overflowed: list = []

    def watch_residency(self, limit):
        return True

    def chunk_keys(self, tokens, salt):
        return [f"k{tokens[i]}" for i in range(0, len(tokens), BS)]

    def take_residency_changes(self):
        out = (self.overflowed, self.changes)
        self.changes, self.overflowed = [], []
        return out


def test_media_are_prefix_closed_each_on_its_own():
    eng = ScriptedEngine()
    ev = WorkerEvents(eng, BS, BS)
    tokens = [i * BS for i in range(3) for _ in range(BS)]  # chunk keys k0, k16, k32
    hashes = vllm_hashes(tokens)
    ev.learn(tokens, None, hashes)

    def step(*changes, overflowed=()):
        eng.changes, eng.overflowed = list(changes), list(overflowed)
        got = ev.take()
        return [] if got is None else [(type(e).__name__[5:], e.medium, hashes.index(e.block_hashes[0]))
                                       for e in got.get_all_events()]

    # L1 takes all three, the disk only the last two: nothing on STORAGE without its parent.
    assert step((True, "k0", "CPU"), (True, "k16", "CPU"), (True, "k32", "CPU"),
                (True, "k16", "STORAGE"), (True, "k32", "STORAGE")) == [
        ("Stored", "CPU", 0), ("Stored", "CPU", 1), ("Stored", "CPU", 2)]
    # The first chunk lands on disk: STORAGE announces it, then its waiting descendants.
    assert step((True, "k0", "STORAGE")) == [("Stored", "STORAGE", 0), ("Stored", "STORAGE", 1),
                                              ("Stored", "STORAGE", 2)]
    # L1 drops the first chunk: CPU withdraws the chain, deepest first; STORAGE keeps it.
    assert step((False, "k0", "CPU")) == [("Removed", "CPU", 2), ("Removed", "CPU", 1), ("Removed", "CPU", 0)]
    # The disk drops the middle chunk: STORAGE withdraws it and the one after it.
    assert step((False, "k16", "STORAGE")) == [("Removed", "STORAGE", 2), ("Removed", "STORAGE", 1)]
    # L1 still holds k16 and k32: the first chunk's return re-announces them on CPU.
    assert step((True, "k0", "CPU")) == [("Stored", "CPU", 0), ("Stored", "CPU", 1), ("Stored", "CPU", 2)]
    # The disk's log overflowed: only STORAGE is withdrawn.
    assert step(overflowed=["STORAGE"]) == [("Removed", "STORAGE", 0)]
    assert ev.known_chunks() == 3  # L1 holds them all
    # L1 drops everything: no tier holds the chunks, so their blocks are forgotten.
    assert step((False, "k32", "CPU"), (False, "k16", "CPU"), (False, "k0", "CPU")) == [
        ("Removed", "CPU", 2), ("Removed", "CPU", 1), ("Removed", "CPU", 0)]
    assert ev.known_chunks() == 0


def test_a_disk_write_reported_after_l1_dropped_the_chunk_is_still_announced():
    """Each medium's changes come in their own order: in one batch, L1's removal of a chunk
    is listed before the disk's store of it, long after the chunk was learnt."""
    eng = ScriptedEngine()
    ev = WorkerEvents(eng, BS, BS)
    tokens = [0] * BS
    ev.learn(tokens, None, vllm_hashes(tokens))
    eng.changes = [(True, "k0", "CPU")]
    assert [e.medium for e in ev.take().get_all_events()] == ["CPU"]
    for _ in range(3):
        assert ev.take() is None
    eng.changes = [(False, "k0", "CPU"), (True, "k0", "STORAGE")]
    got = ev.take().get_all_events()
    assert [(type(e), e.medium) for e in got] == [(BlockRemoved, "CPU"), (BlockStored, "STORAGE")]
    assert ev.known_chunks() == 1


def test_worker_log_overflow_withdraws_everything_announced():
    eng = kvtier.Engine({"max_local_cpu_size": 0.01, "local_cpu_huge_pages": False, "chunk_size": BS},
                        model="m", layers=1, kv_heads=1, head_dim=4, dtype="f32")
    ev = WorkerEvents(eng, BS, BS, limit=3)
    payload = torch.zeros(BS * 8 * 4, dtype=torch.uint8)
    first = list(range(BS))
    ev.learn(first, None, vllm_hashes(first))
    eng.store(first, payload[: eng.payload_bytes(BS)])
    got = ev.take().get_all_events()
    assert [type(e) for e in got] == [BlockStored]
    # More changes than the log holds between two takes: it starts over and says so.
    for k in range(5):
        t = list(range(1000 * (k + 1), 1000 * (k + 1) + BS))
        eng.store(t, payload[: eng.payload_bytes(BS)])
    got = ev.take().get_all_events()
    assert isinstance(got[0], BlockRemoved) and got[0].block_hashes == vllm_hashes(first)


def test_rank_votes_announce_a_chunk_once_every_rank_holds_it():
    votes = RankVotes(2)
    s = BlockStored(block_hashes=[b"a", b"b"], parent_block_hash=None, token_ids=[1, 2], block_size=1,
                    lora_id=None, medium="CPU", lora_name=None)
    r = BlockRemoved(block_hashes=[b"a", b"b"], medium="CPU")
    on_disk = BlockStored(block_hashes=[b"a", b"b"], parent_block_hash=None, token_ids=[1, 2], block_size=1,
                          lora_id=None, medium="STORAGE", lora_name=None)
    votes.add([on_disk])  # one rank's disk holds it: no vote for CPU
    votes.add([s])
    assert votes.take() == []  # one rank of two
    votes.add([s])
    assert votes.take() == [s]
    votes.add([r])
    assert votes.take() == [r]  # the first rank that drops it
    votes.add([r])
    assert votes.take() == []
    votes.add([r])  # a removal of what no rank reported: ignored
    votes.add([s, s])
    assert votes.take() == [s]
    votes.add([on_disk])  # the second rank's disk: now every rank's disk holds it
    assert votes.take() == [on_disk]


def test_scheduler_sends_block_hashes_only_with_events_on_and_publishes_the_workers_events(stub_workers):
    tokens = list(range(4, 4 + 3 * BS + 5))
    hashes = vllm_hashes(tokens)
    for on in (True, False):
        eid = f"sched-events-{on}"
        sock_dir = stub_workers(eid, [StubEngine(0, 0.0)])
        conn = KvTierConnector(with_events(make_config(dict(lookup_socket_dir=sock_dir), eid), on),
                               KVConnectorRole.SCHEDULER, None)
        req = NS(request_id="r", prompt_token_ids=tokens, cache_salt=None, block_hashes=hashes)
        n, _, _, _ = ask_until_answered(conn, req)
        assert n == 0
        out = empty_sched_output()
        out.scheduled_new_reqs = [NS(req_id="r", block_ids=([0, 1, 2, 3],), num_computed_tokens=0)]
        out.num_scheduled_tokens = {"r": len(tokens)}
        meta = conn.build_connector_meta(out)
        assert [len(sp.tokens) for sp in meta.saves] == [3 * BS]
        # As vLLM's own events carry them (64-bit ints by default: VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES).
        assert meta.saves[0].block_hashes == (external_hashes(hashes[:3]) if on else None)
        # The workers' events of the step reach vLLM's publisher through take_events.
        stored = BlockStored(block_hashes=hashes[:1], parent_block_hash=None, token_ids=tokens[:BS], block_size=BS,
                             lora_id=None, medium="CPU", lora_name=None)
        conn.update_connector_output(NS(kv_connector_stats=None, kv_cache_events=ConnectorEvents([stored])))
        assert list(conn.take_events()) == ([stored] if on else [])
        conn.shutdown()


# -- server mode: the events follow a `kvtier serve`'s own stream ---------------------------


@pytest.fixture
def served_with_events(kvtier_serve):
    """A `kvtier serve` publishing KV events on a loopback port: (socket, endpoint)."""
    import json

    events = json.dumps({"enable_kv_cache_events": True, "endpoint": "tcp://127.0.0.1:0"})
    sock, ready = kvtier_serve(f"chunk_size: {BS}\nmax_local_cpu_size: 0.02\nlocal_cpu_huge_pages: false\n",
                               "--kv-events-config", events)
    return sock, ready["kv_events"].replace("0.0.0.0", "127.0.0.1")


def take_until(conn, want: int, timeout: float = 5.0) -> list:
    """Takes events until ``want`` arrived (the server publishes every 20 ms)."""
    import time

    got: list = []
    end = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < end:
        got += decode_as_vllm(take(conn))
        time.sleep(0.02)
    return got


def test_server_mode_announces_what_the_server_holds_for_every_instance(worker, served_with_events):
    """Two instances on one `kvtier serve`: the one that saved a prompt and the one that only
    loads it both announce its chunks (medium SHARED, vLLM's hashes); a removal through
    another client of the server withdraws them from both, deepest first."""
    sock, endpoint = served_with_events
    a, ca = worker(kv_events=True, server=f"unix:{sock}", server_kv_events=endpoint, staging="pinned")
    b, cb = worker(kv_events=True, server=f"unix:{sock}", server_kv_events=endpoint, staging="pinned")
    for conn, caches in ((a, ca), (b, cb)):
        run_step(conn, caches, KvTierConnectorMetadata())
    import time

    time.sleep(0.3)  # both subscribers joined the server's stream (ZeroMQ joins asynchronously)
    tokens = list(range(40, 40 + 4 * BS))
    hashes = vllm_hashes(tokens)
    run_step(a, ca, KvTierConnectorMetadata(saves=[SaveSpec("s", tokens, None, [1, 2, 3, 4], hashes)]))
    got = take_until(a, 4)
    assert [type(e) for e in got] == [BlockStored] * 4
    assert [e.block_hashes for e in got] == [[h] for h in hashes]
    assert all(e.medium == "SHARED" for e in got)
    assert [e.parent_block_hash for e in got] == [None] + hashes[:3]
    assert take(b) == []  # b knows nothing of this prompt yet
    # b loads the prompt: the server already held it, so b announces it without a new store.
    run_step(b, cb, KvTierConnectorMetadata(loads=[LoadSpec("l", tokens, None, [5, 6, 7, 8], 0,
                                                            block_hashes=hashes)]))
    got_b = take_until(b, 4)
    assert [e.block_hashes for e in got_b] == [[h] for h in hashes] and all(e.medium == "SHARED" for e in got_b)
    # Another client removes the prompt from the server: both withdraw it, deepest first.
    other = kvtier.Engine({"server": f"unix:{sock}"}, identity=a.worker_side.engine.identity())
    assert other.remove(tokens) > 0
    for conn in (a, b):
        gone = take_until(conn, 4)
        assert [type(e) for e in gone] == [BlockRemoved] * 4
        assert [e.block_hashes for e in gone] == [[h] for h in reversed(hashes)]
