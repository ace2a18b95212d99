"""Tests of kvtier.transfer's per-layer pipeline and its ordering against the compute stream.

The CUDA path (device buffers, side streams, events) runs here on a simulated device
(``sim_streams.SimStreams``): work is deferred and then run as early or as late as the
recorded events allow, with CPU tensors standing in for device memory, so a missing or
misplaced wait shows up as wrong bytes. The CPU path runs on real threads (ThreadStreams).
"""

import threading
import time

import pytest

torch = pytest.importorskip("torch")

from kvtier.transfer import LoadPlan, PagedLayers, SavePlan, ThreadStreams, Transfer  # noqa: E402

from sim_streams import SimStreams  # noqa: E402

L, NB, BS, H, D = 4, 24, 4, 2, 8
BPC = 2
POLICIES = ["side_first", "compute_first", "random"]


def caches(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, NB, BS, H, D, generator=g) for _ in range(L)]


def paged_of(cs):
    return PagedLayers.vllm(cs, block_size=BS, num_kv_heads=H, head_size=D, blocks_per_chunk=BPC)


def host_chunks(paged, n_blocks, separate=False):
    """Host chunk buffers for n_blocks: one flat staging buffer, or one tensor per chunk
    (like held pool chunks)."""
    if not separate:
        return paged.split(torch.zeros(paged.payload_numel(n_blocks)))
    chunks = paged.split(torch.zeros(paged.payload_numel(n_blocks)))
    for c in chunks:
        c.buf = torch.zeros(c.buf.numel() * 4, dtype=torch.uint8)  # bytes, in its own allocation
    return chunks


def payload_of(src_paged, ids, separate=False):
    """Host chunks holding the blocks ``ids`` of ``src_paged`` (gathered directly on CPU)."""
    chunks = host_chunks(src_paged, len(ids), separate)
    ids_t = torch.as_tensor(ids)
    for li in range(L):
        src_paged.gather_layer_into(li, chunks, ids_t)
    return chunks


# -- loads ----------------------------------------------------------------------------------


def run_load(streams, *, first=0, ids_src=(9, 2, 14, 5, 0, 11, 7), ids_dst=None, separate=False, staging=1 << 30):
    """One step: the blocks' previous user writes them on the compute stream, then the load
    (issued from another thread), then per layer: wait, attention reads the blocks."""
    src = caches(1)
    dst = caches(2)
    src_paged, dst_paged = paged_of(src), paged_of(dst)
    chunks = payload_of(src_paged, list(ids_src), separate)
    n = len(ids_src) - first
    ids_dst = list(ids_dst or range(10, 10 + n))
    x = Transfer(dst_paged, streams, device_staging_bytes=staging)
    comp = streams.compute()
    junk = torch.full((2, n, BS, H, D), 7.0)

    def previous_user():  # e.g. the previous step's kernels on recycled blocks
        for li in range(L):
            dst[li][:, ids_dst] = junk

    streams.launch(comp, "previous user", previous_user)
    load = x.begin_load()
    t = threading.Thread(
        target=lambda: (time.sleep(0.05), load.issue([LoadPlan(chunks, first, ids_dst)])), daemon=True
    )
    t.start()
    seen = {}
    for li in range(L):
        load.wait_layer(li)

        def attention(li=li):
            seen[li] = dst[li][:, ids_dst].clone()

        streams.launch(comp, f"attention {li}", attention)
    t.join()
    load.finish()
    if hasattr(streams, "drain"):
        streams.drain()
    want = [src[li][:, list(ids_src)[first:]] for li in range(L)]
    return seen, want, dst, x


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("separate", [False, True])
def test_loads_are_in_place_before_each_layers_attention(policy, separate):
    sim = SimStreams(policy, seed=3)
    seen, want, dst, x = run_load(sim, separate=separate)
    for li in range(L):
        assert torch.equal(seen[li], want[li]), f"attention {li} read blocks the load had not written"
        assert torch.equal(dst[li][:, 10 : 10 + 7], want[li])
    # Issue order on the load stream: wait for the compute stream, copy in, then per layer
    # scatter + event; the compute stream waits for layer i's event before attention i.
    load_ops = [(k, w) for s, k, w in sim.issued if s == x.load_stream.name]
    assert load_ops[0][0] == "wait"
    kinds = [w for k, w in load_ops if k == "fn"]
    assert kinds[:2] == ["index", "h2d 0"] and kinds[2:] == [f"scatter {li}" for li in range(L)]
    comp = [(k, w) for s, k, w in sim.issued if s == "compute"]
    for li in range(L):
        i = comp.index(("fn", f"attention {li}"))
        assert comp[i - 1][0] == "wait", f"attention {li} is not preceded by a wait"


@pytest.mark.parametrize("policy", POLICIES)
def test_a_load_starting_mid_chunk_and_spanning_groups(policy):
    """Blocks 3.. of a 7-block payload (the first in the middle of chunk 1), through a
    device buffer that holds one chunk at a time."""
    sim = SimStreams(policy, seed=5)
    one_chunk = BPC * L * 2 * BS * H * D * 4
    seen, want, dst, x = run_load(sim, first=3, staging=one_chunk)
    for li in range(L):
        assert torch.equal(seen[li], want[li])
    assert sum(1 for s, k, w in sim.issued if w.startswith("h2d")) == 3  # chunks 1, 2, 3


def test_the_simulator_catches_a_missing_wait(monkeypatch):
    """The ordering tests can fail: without the compute stream's waits, attention reads
    stale blocks (compute first); without the load stream's wait, the previous user's
    writes land after the load (side first)."""
    sim = SimStreams("compute_first")
    real_wait = sim.wait
    monkeypatch.setattr(sim, "wait", lambda stream, ev: None if stream is sim.compute() else real_wait(stream, ev))
    seen, want, _, _ = run_load(sim)
    assert not all(torch.equal(seen[li], want[li]) for li in range(L))

    sim = SimStreams("side_first")
    real_wait2 = sim.wait
    monkeypatch.setattr(sim, "wait", lambda stream, ev: None if stream is not sim.compute() else real_wait2(stream, ev))
    _, want, dst, _ = run_load(sim)
    assert not torch.equal(dst[0][:, 10:17], want[0])


def test_loads_on_threads_for_cpu_caches():
    streams = ThreadStreams()
    seen, want, dst, x = run_load(streams, separate=True)
    for li in range(L):
        assert torch.equal(seen[li], want[li])
    x.close()


def test_a_failed_issue_lets_the_forward_pass_through():
    sim = SimStreams()
    x = Transfer(paged_of(caches(0)), sim)
    load = x.begin_load()
    chunks = host_chunks(x.paged, 2)
    with pytest.raises(ValueError, match="outside the payload"):
        load.issue([LoadPlan(chunks, 1, [3, 4, 5])])  # 3 blocks from a 2-block payload
    for li in range(L):
        load.wait_layer(li)  # does not hang
    load.finish()


# -- saves ----------------------------------------------------------------------------------


def run_save(streams, *, ids=(3, 8, 1, 12, 20, 6, 17), separate=False, staging=1 << 30, hooks=True, subset=None):
    """One step: per layer, compute writes the layer's new KV into the blocks, then
    save_kv_layer; wait_for_save; afterwards the next step overwrites the blocks."""
    cs = caches(4)
    paged = paged_of(cs)
    ids = list(ids)
    chunks = host_chunks(paged, len(ids), separate)
    if subset is not None:  # only some chunks are new (a pool store claims only those)
        chunks = [c for c in chunks if c.index in subset]
    x = Transfer(paged, streams, device_staging_bytes=staging)
    comp = streams.compute()
    g = torch.Generator().manual_seed(9)
    fresh = [torch.randn(2, len(ids), BS, H, D, generator=g) for _ in range(L)]
    save = x.begin_save([SavePlan(chunks, ids)])
    early = []
    for li in range(L):
        def attention(li=li):
            cs[li][:, ids] = fresh[li]

        streams.launch(comp, f"attention {li}", attention)
        if hooks:
            early.append(save.stage_layer(li))
    late = save.finish()

    def next_step():  # the blocks are reused once the step is over
        for li in range(L):
            cs[li][:, ids] = -1.0

    streams.launch(comp, "next step", next_step)
    if hasattr(streams, "drain"):
        streams.drain()
    # What the chunks must hold: the fresh KV, in the layer-major layout.
    ref = [torch.zeros_like(t) for t in cs]
    for li in range(L):
        ref[li][:, ids] = fresh[li]
    want = host_chunks(paged, len(ids))
    ref_paged = paged_of(ref)
    for li in range(L):
        ref_paged.gather_layer_into(li, want, torch.as_tensor(ids))
    if subset is not None:
        want = [c for c in want if c.index in subset]
    return chunks, want, early, late, x


def same(chunks, want):
    return all(torch.equal(c.buf.view(torch.uint8), w.buf.view(torch.uint8)) for c, w in zip(chunks, want))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("separate", [False, True])
def test_saves_see_each_layers_fresh_kv(policy, separate):
    sim = SimStreams(policy, seed=7)
    chunks, want, early, late, x = run_save(sim, separate=separate)
    assert same(chunks, want), "a gather read the blocks before (or after) the compute stream wrote them"
    assert early == [True] * L and late == []
    # Issue order: per layer, the compute stream records after attention i, the save stream
    # waits for that event, then gathers layer i; the copy out is last.
    save_ops = [(k, w) for s, k, w in sim.issued if s == x.save_stream.name]
    gathers = [w for k, w in save_ops if k == "fn" and w.startswith("gather")]
    assert gathers == [f"gather {li}" for li in range(L)]
    assert [w for k, w in save_ops if k == "fn"][-1] == "d2h"
    for li in range(L):
        gi = save_ops.index(("fn", f"gather {li}"))
        assert save_ops[gi - 1][0] == "wait" or save_ops[gi - 2][0] == "wait"


@pytest.mark.parametrize("policy", POLICIES)
def test_saves_without_hooks_and_in_groups(policy):
    one_chunk = BPC * L * 2 * BS * H * D * 4
    sim = SimStreams(policy, seed=11)
    chunks, want, early, late, _ = run_save(sim, hooks=False)
    assert same(chunks, want) and late == list(range(L))
    sim = SimStreams(policy, seed=12)
    chunks, want, early, late, _ = run_save(sim, staging=one_chunk)  # too big: all in finish
    assert same(chunks, want) and early == [False] * L and late == list(range(L))
    assert sum(1 for s, k, w in sim.issued if w.startswith("d2h")) == 4  # 4 chunks, one at a time


@pytest.mark.parametrize("policy", POLICIES)
def test_a_save_of_only_some_chunks(policy):
    sim = SimStreams(policy, seed=13)
    chunks, want, *_ = run_save(sim, separate=True, subset={1, 3})
    assert [c.index for c in chunks] == [1, 3] and same(chunks, want)


def test_the_simulator_catches_a_gather_before_the_layer_is_computed(monkeypatch):
    sim = SimStreams("side_first")
    monkeypatch.setattr(sim, "wait", lambda stream, ev: None)
    chunks, want, *_ = run_save(sim)
    assert not same(chunks, want)


def test_saves_on_threads_for_cpu_caches():
    streams = ThreadStreams()
    chunks, want, early, late, x = run_save(streams, separate=True)
    assert same(chunks, want) and early == [True] * L
    x.close()


def test_a_failing_background_copy_is_raised_where_the_host_waits():
    streams = ThreadStreams()
    x = Transfer(paged_of(caches(0)), streams)
    chunks = host_chunks(x.paged, 2)
    chunks[0].buf = chunks[0].buf[:-1]  # wrong size: the gather on the worker thread fails
    save = x.begin_save([SavePlan(chunks, [1, 2, 3, 4])])
    save.stage_layer(0)
    from kvtier.transfer import TransferError

    with pytest.raises(TransferError, match="background KV copy failed"):
        save.finish()
    x.close()


# -- the L1 pool registered with CUDA -------------------------------------------------------


class FakeCudart:
    def __init__(self, rc=0):
        self.rc, self.calls = rc, []

    def cudaHostRegister(self, ptr, size, flags):
        self.calls.append(("register", ptr, size, flags))
        return self.rc

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return 0


def test_the_pool_is_registered_once_and_unregistered_on_close(monkeypatch):
    kvtier = pytest.importorskip("kvtier")
    from kvtier.transfer import PoolMemory

    eng = kvtier.Engine({"chunk_size": BPC * BS, "max_local_cpu_size": 0.01, "local_cpu_huge_pages": False},
                        layers=L, kv_heads=H, head_dim=D, dtype="f32")
    rt = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: rt)
    paged = paged_of(caches(0))
    pool = PoolMemory(eng, paged, BPC * BS, cuda_register=True)
    addr, size = eng.pool_region()
    assert rt.calls == [("register", addr, size, 0)] and pool.registered
    pool.close()
    pool.close()
    assert rt.calls[1:] == [("unregister", addr)] and not pool.registered
    rt2 = FakeCudart(rc=2)  # cudaErrorMemoryAllocation
    monkeypatch.setattr(torch.cuda, "cudart", lambda: rt2)
    with pytest.raises(RuntimeError, match="cudaHostRegister of kvtier's .* pool failed"):
        PoolMemory(eng, paged, BPC * BS, cuda_register=True)


def test_pool_chunks_move_through_the_pipeline_without_a_staging_copy():
    """Saves fill claimed L1 buffers in place and loads read held L1 chunks in place: the
    bytes the engine returns are the gathered blocks, and they load back."""
    kvtier = pytest.importorskip("kvtier")
    from kvtier.transfer import PoolMemory

    eng = kvtier.Engine({"chunk_size": BPC * BS, "max_local_cpu_size": 0.01, "local_cpu_huge_pages": False},
                        layers=L, kv_heads=H, head_dim=D, dtype="f32")
    src, dst = caches(1), caches(2)
    sp, dp = paged_of(src), paged_of(dst)
    pool = PoolMemory(eng, sp, BPC * BS, cuda_register=False)
    tokens = list(range(40, 40 + 3 * BPC * BS))
    ids = [5, 9, 2, 17, 11, 4]
    for policy in ("side_first", "compute_first"):
        eng.clear()
        sim = SimStreams(policy)
        claim = pool.begin_store(tokens, None)
        assert [c.index for c in claim.chunks] == [0, 1, 2]
        Transfer(sp, sim).begin_save([SavePlan(claim.chunks, ids)]).finish()
        assert claim.commit()["new_chunks"] == 3
        out = torch.empty(sp.payload_numel(len(ids)))
        assert eng.retrieve(tokens, out) == len(tokens)
        want = torch.empty_like(out)
        sp.gather(ids, want)
        assert torch.equal(out, want)
        held = pool.acquire(tokens, None)
        x = Transfer(dp, sim)
        load = x.begin_load()
        load.issue([LoadPlan(held.chunks, 1, [20, 21, 22, 23, 0])])  # blocks 1.. of the prompt
        load.wait_all()
        load.finish()
        held.release()
        sim.drain()
        for li in range(L):
            assert torch.equal(dst[li][:, [20, 21, 22, 23, 0]], src[li][:, ids[1:]])


# -- a prompt's tail (its partial last chunk) through the pipeline ---------------------------

TAIL = 6 * BS + 2  # 7 blocks, the last holding 2 tokens: chunks of 2, 2, 2 blocks and a 1-block tail


def tail_chunks(paged, n_tokens, separate):
    chunks = paged.split_tokens(torch.zeros(paged.tokens_numel(n_tokens)), n_tokens)
    if separate:
        for c in chunks:
            c.buf = torch.zeros(c.buf.numel() * 4, dtype=torch.uint8)
    return chunks


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("staging", [1 << 30, BPC * L * 2 * BS * H * D * 4])
def test_a_tail_loads_every_token_but_the_final_one(policy, separate, staging):
    """A decoder's load: every token of the prompt before its final one, the last block in
    part. The final token's slot keeps what the block's previous user left (the forward
    pass writes it), through the device buffer too (in groups when it holds one chunk)."""
    sim = SimStreams(policy, seed=17)
    src, dst = caches(1), caches(2)
    sp, dp = paged_of(src), paged_of(dst)
    ids_src = [9, 2, 14, 5, 0, 11, 7]
    chunks = tail_chunks(sp, TAIL, separate)
    assert chunks[-1].tokens == 2 and chunks[-1].blocks == 1
    for li in range(L):
        sp.gather_layer_into(li, chunks, torch.as_tensor(ids_src))
    ids_dst = list(range(10, 17))
    x = Transfer(dp, sim, device_staging_bytes=staging)
    comp = sim.compute()
    sim.launch(comp, "previous user", lambda: [dst[li].__setitem__((slice(None), ids_dst), 7.0) for li in range(L)])
    load = x.begin_load()
    load.issue([LoadPlan(chunks, 0, ids_dst, TAIL - 1)])
    load.wait_all()
    load.finish()
    sim.drain()
    for li in range(L):
        got = dst[li][:, ids_dst].flatten(1, 2)  # (planes, tokens, H, D)
        want = src[li][:, ids_src].flatten(1, 2)
        assert torch.equal(got[:, : TAIL - 1], want[:, : TAIL - 1])
        assert (got[:, TAIL - 1 :] == 7.0).all()  # the final token's slot and the block's unused ones


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("separate", [False, True])
def test_a_tail_is_saved_with_its_tokens_only(policy, separate):
    """A prefill instance's save of the whole prompt: the tail chunk holds exactly its
    tokens of the partial last block, per layer as each is computed."""
    sim = SimStreams(policy, seed=19)
    cs = caches(4)
    paged = paged_of(cs)
    ids = [3, 8, 1, 12, 20, 6, 17]
    chunks = tail_chunks(paged, TAIL, separate)
    x = Transfer(paged, sim)
    save = x.begin_save([SavePlan(chunks, ids)])
    for li in range(L):
        assert save.stage_layer(li)
    save.finish()
    sim.drain()
    want = paged.split_tokens(torch.zeros(paged.tokens_numel(TAIL)), TAIL)
    for li in range(L):
        paged.gather_layer_into(li, want, torch.as_tensor(ids))
    assert same(chunks, want)
    tail = want[-1].buf.view(L, 2, 2, H, D)  # (layers, planes, 2 tokens, heads, dim)
    assert torch.equal(tail[1], cs[1][:, 17, :2])
