"""The connector with vLLM's hybrid KV cache manager on (python/kvtier/vllm/groups.py,
scheduler.py, worker.py): a model of two sliding-window layers (one group) and one
full-attention layer (another), played through the scheduler and worker hooks in vLLM
0.32's order against a real embedded engine. Sliding-window blocks leave the window during
a chunked prefill (vLLM puts its null block, id 0, in their place), loads are asynchronous
and reported per request, and only the window before a hit boundary is stored."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec  # noqa: E402

from kvtier.vllm import KvTierConnector, KvTierConnectorMetadata  # noqa: E402
from test_vllm_connector import BS, NAMES, NB, H, D, kv_of, make_config, run_step  # noqa: E402

W = 40  # the sliding window (tokens)
SLIDING, FULL = 0, 1  # group indexes: layers 0 and 1 slide, layer 2 attends to everything
N = 100  # prompt tokens: 6 full chunks of 16 and a tail


def kv_cache_config():
    full = FullAttentionSpec(block_size=BS, num_kv_heads=H, head_size=D, dtype=torch.float32)
    sliding = SlidingWindowSpec(block_size=BS, num_kv_heads=H, head_size=D, dtype=torch.float32, sliding_window=W)
    return NS(num_blocks=NB, kv_cache_groups=[NS(kv_cache_spec=sliding, layer_names=NAMES[:2]),
                                              NS(kv_cache_spec=full, layer_names=NAMES[2:])])


def skipped_blocks(computed):
    """The leading blocks vLLM has given back in the sliding-window group."""
    return max(0, computed - W + 1) // BS


@pytest.fixture(params=["embedded", "server"])
def hybrid(tmp_path, request):
    """A scheduler-side and a worker-side connector of one vLLM instance, on CPU caches of
    random KV: with embedded engines (the scheduler asks the worker's lookup socket), or
    as clients of a `kvtier serve` (the scheduler asks the server)."""
    made = []
    server = {}
    if request.param == "server":
        sock, _ = request.getfixturevalue("kvtier_serve")(
            f"chunk_size: {BS}\nmax_local_cpu_size: 0.02\nlocal_cpu_huge_pages: false\n")
        server = {"server": f"unix:{sock}"}

    def make(**extra):
        cfg = dict(max_local_cpu_size=0.01, local_cpu_huge_pages=False, lookup_socket_dir=str(tmp_path),
                   lookup_budget_ms=2000, **server, **extra)
        eid = f"hy{len(made)}"
        worker = KvTierConnector(make_config(cfg, eid), KVConnectorRole.WORKER, kv_cache_config())
        gen = torch.Generator().manual_seed(7)
        caches = {n: torch.randn(NB, H, BS, 2 * D, generator=gen) for n in NAMES}
        worker.register_kv_caches(caches)
        sched = KvTierConnector(make_config(cfg, eid), KVConnectorRole.SCHEDULER, kv_cache_config())
        made.extend([worker, sched])
        return sched, worker, caches

    yield make
    for c in made:
        c.shutdown()


def request(rid, tokens):
    return NS(request_id=rid, prompt_token_ids=list(tokens), cache_salt=None)


def new_req(rid, block_ids, computed, scheduled):
    new = NS(req_id=rid, block_ids=tuple(list(b) for b in block_ids), num_computed_tokens=computed)
    cached = NS(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[])
    return NS(scheduled_new_reqs=[new], scheduled_cached_reqs=cached, num_scheduled_tokens={rid: scheduled},
              total_num_scheduled_tokens=scheduled)


def cached_req(rid, new_block_ids, computed, scheduled):
    cached = NS(req_ids=[rid], resumed_req_ids=set(), new_block_ids=[tuple(list(b) for b in new_block_ids)],
                num_computed_tokens=[computed])
    return NS(scheduled_new_reqs=[], scheduled_cached_reqs=cached, num_scheduled_tokens={rid: scheduled},
              total_num_scheduled_tokens=scheduled)


def no_work():
    cached = NS(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[])
    return NS(scheduled_new_reqs=[], scheduled_cached_reqs=cached, num_scheduled_tokens={}, total_num_scheduled_tokens=0)


def worker_step(worker, caches, meta):
    """One step on the worker, then what vLLM's model runner asks after it."""
    run_step(worker, caches, meta)
    res = worker.get_transfer_results(set())
    return res.finished_recving, res.failed_recving


def prefill_in_two_steps(sched, worker, caches, tokens, rid="first"):
    """The prompt computed 64 + 36 tokens (chunked prefill). Returns each group's blocks."""
    req = request(rid, tokens)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    sw, full = [1, 2, 3, 4], [11, 12, 13, 14]
    metas = [sched.build_connector_meta(new_req(rid, (sw, full), 0, 64))]
    worker_step(worker, caches, metas[0])
    # Before step 2 vLLM gives back the sliding-window blocks that left the window.
    gone = skipped_blocks(64)
    sw = [0] * gone + sw[gone:] + [5, 6, 7]
    full = full + [15, 16, 17]
    metas.append(sched.build_connector_meta(cached_req(rid, ([5, 6, 7], [15, 16, 17]), 64, N - 64)))
    worker_step(worker, caches, metas[1])
    sched.request_finished_all_groups(req, (sw, full))
    return metas, sw, full


def test_sliding_window_groups_store_only_the_window_before_the_hit_boundaries(hybrid):
    sched, worker, caches = hybrid()
    tokens = list(range(10, 10 + N))
    metas, sw, full = prefill_in_two_steps(sched, worker, caches, tokens)
    # Step 1 computed chunks 0-3: of the window before the hit boundary 96 (tokens 57..95),
    # chunk 3 is done, and is saved while its blocks are still allocated.
    (s1,) = metas[0].saves
    assert (s1.group, s1.first_chunk, len(s1.tokens)) == (SLIDING, 3, 64)
    # Step 2: chunks 4-5 of the window, and every full chunk of the full-attention layer.
    by_group = {sp.group: sp for sp in metas[1].saves}
    assert (by_group[SLIDING].first_chunk, len(by_group[SLIDING].tokens)) == (4, 96)
    assert (by_group[FULL].first_chunk, len(by_group[FULL].tokens)) == (0, 96)
    lanes = worker.worker_side._lanes
    sw_engine, full_engine = lanes[SLIDING].engine, lanes[FULL].engine
    assert full_engine.lookup(tokens) == 96
    assert sw_engine.lookup(tokens) == 0  # chunks 0-2 of the sliding layers are not stored
    assert sw_engine.lookup(tokens[:96], first_chunk=3) == 96
    # Bytes: 6 chunks of 1 layer + 3 chunks of 2 layers, against 6 chunks of 3 layers.
    cpu = worker.worker_side.engine.stats()["tiers"][0]
    assert cpu["stored_chunks"] == 6 + 3
    assert cpu.get("stored_bytes", (6 * 1 + 3 * 2) * BS * 2 * H * D * 4) == (6 * 1 + 3 * 2) * BS * 2 * H * D * 4
    # The groups never share keys: each identity names its layers.
    assert sw_engine.identity()["layout"]["tag"] != full_engine.identity()["layout"]["tag"]


def test_a_repeated_prompt_loads_every_full_chunk_asynchronously_into_each_groups_blocks(hybrid):
    sched, worker, caches = hybrid()
    tokens = list(range(10, 10 + N))
    _, sw_src, full_src = prefill_in_two_steps(sched, worker, caches, tokens)
    req = request("again", tokens)
    # The hit every group can load, and vLLM is told to wait for it.
    assert sched.get_num_new_matched_tokens(req, 0) == (96, True)
    # vLLM allocates: the sliding-window group only from the window of token 96 on.
    sw_dst = [0] * skipped_blocks(96) + [31, 32, 33]
    full_dst = [41, 42, 43, 44, 45, 46]
    null_before = {n: caches[n][0].clone() for n in NAMES}
    sched.update_state_after_alloc(req, NS(get_block_ids=lambda: (sw_dst, full_dst)), 96)
    meta = sched.build_connector_meta(no_work())  # the request waits: nothing scheduled for it
    assert meta.async_loads == ["again"]
    assert sorted((sp.group, sp.first_block, sp.first_chunk) for sp in meta.loads) == [(SLIDING, 3, 3), (FULL, 0, 0)]
    done, failed = worker_step(worker, caches, meta)
    assert done == {"again"} and failed == set()
    for name in NAMES[:2]:
        for i in range(3, 6):
            assert torch.equal(caches[name][sw_dst[i]], caches[name][sw_src[i]])
        assert torch.equal(caches[name][0], null_before[name])  # vLLM's null block is never written
    for i in range(6):
        assert torch.equal(caches[NAMES[2]][full_dst[i]], caches[NAMES[2]][full_src[i]])
    assert worker.stats["loaded_tokens"] == 96 + 3 * BS
    # Reported once: the next step has nothing more to say.
    assert worker_step(worker, caches, KvTierConnectorMetadata()) == (set(), set())


def test_a_load_that_finds_a_window_chunk_gone_fails_the_request_not_its_blocks(hybrid):
    """vLLM takes hybrid models' load failures only per request (block ids repeat across
    groups): the request is reported failed, and no block id is."""
    sched, worker, caches = hybrid()
    tokens = list(range(10, 10 + N))
    prefill_in_two_steps(sched, worker, caches, tokens)
    req = request("evicted", tokens)
    assert sched.get_num_new_matched_tokens(req, 0) == (96, True)
    sw_engine = worker.worker_side._lanes[SLIDING].engine
    assert sw_engine.remove(tokens[: 5 * BS]) >= 1  # chunk 4 of the window is gone
    sched.update_state_after_alloc(req, NS(get_block_ids=lambda: ([0, 0, 0, 31, 32, 33], [41, 42, 43, 44, 45, 46])), 96)
    meta = sched.build_connector_meta(no_work())
    run_step(worker, caches, meta)
    assert worker.get_block_ids_with_load_errors() == set()
    res = worker.get_transfer_results(set())
    assert res.finished_recving == {"evicted"} and res.failed_recving == {"evicted"}


def test_a_prompt_sharing_a_prefix_that_ends_in_no_stored_window_is_a_miss(hybrid):
    sched, worker, caches = hybrid()
    tokens = list(range(10, 10 + N))
    prefill_in_two_steps(sched, worker, caches, tokens)
    # Shares the first 50 tokens: the full-attention layer holds 3 chunks there, but no
    # sliding-window layer holds the window before token 48 (nor 32, 16).
    other = tokens[:50] + list(range(900, 950))
    assert sched.get_num_new_matched_tokens(request("other", other), 0) == (0, False)
    # A longer prompt extending the first one hits where the first one's window ends.
    longer = tokens + list(range(2000, 2100))
    assert sched.get_num_new_matched_tokens(request("longer", longer), 0) == (96, True)


def test_checkpoint_windows_let_a_prompt_sharing_only_a_prefix_hit(hybrid):
    """With a window kept before every checkpoint (64 tokens here), another question over
    the first 70 tokens of a stored prompt loads up to the checkpoint it reaches."""
    sched, worker, caches = hybrid(window_checkpoint_tokens=64)
    tokens = list(range(10, 10 + N))
    metas, _, _ = prefill_in_two_steps(sched, worker, caches, tokens)
    # Step 1 (tokens 0..63) saved the window before the checkpoint 64: chunks 1-3.
    (s1,) = metas[0].saves
    assert (s1.group, s1.first_chunk, len(s1.tokens)) == (SLIDING, 1, 64)
    other = tokens[:70] + list(range(900, 930))
    req = request("other", other)
    assert sched.get_num_new_matched_tokens(req, 0) == (64, True)
    sw_dst, full_dst = [0] * skipped_blocks(64) + [51, 52, 53], [55, 56, 57, 58]
    sched.update_state_after_alloc(req, NS(get_block_ids=lambda: (sw_dst, full_dst)), 64)
    meta = sched.build_connector_meta(no_work())
    assert worker_step(worker, caches, meta) == ({"other"}, set())
    for name in NAMES[:2]:
        for i, src in zip(range(1, 4), [2, 3, 4]):  # the first prompt's blocks 1-3
            assert torch.equal(caches[name][sw_dst[i]], caches[name][src])


def test_hybrid_models_refuse_what_they_cannot_run_with_yet():
    vc = make_config({"kvtier.max_local_cpu_size": 0.01, "kvtier.local_cpu_huge_pages": False}, "hy-refuse")
    vc.kv_transfer_config.kv_role = "kv_producer"
    with pytest.raises(ValueError, match=r"test/tiny runs with 2 KV-cache groups .*disaggregation"):
        KvTierConnector(vc, KVConnectorRole.SCHEDULER, kv_cache_config())
    vc = make_config({"kvtier.max_local_cpu_size": 0.01, "staging": "pool"}, "hy-refuse2")
    with pytest.raises(ValueError, match="staging 'pool' is not supported"):
        KvTierConnector(vc, KVConnectorRole.SCHEDULER, kv_cache_config())
