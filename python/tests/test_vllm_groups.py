"""vLLM's KV-cache groups as kvtier stores them (python/kvtier/vllm/groups.py): which group
kinds are accepted, the per-group layout tags, and the hit every group can load."""

from __future__ import annotations

import random
from types import SimpleNamespace as NS

import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, SlidingWindowSpec  # noqa: E402

from kvtier.vllm.groups import LAYER_MAJOR, KvGroup, hybrid_hit, kv_groups, window_boundaries  # noqa: E402

C = 16  # tokens per chunk


def full_spec():
    return FullAttentionSpec(block_size=C, num_kv_heads=2, head_size=8, dtype=torch.float32)


def sliding_spec(window):
    return SlidingWindowSpec(block_size=C, num_kv_heads=2, head_size=8, dtype=torch.float32, sliding_window=window)


def config(*specs_and_layers):
    return NS(kv_cache_groups=[NS(kv_cache_spec=s, layer_names=list(ls)) for s, ls in specs_and_layers])


def names(*idx):
    return [f"model.layers.{i}.self_attn.attn" for i in idx]


def test_a_single_full_attention_group_keeps_the_default_layout_tag():
    (g,) = kv_groups(config((full_spec(), names(0, 1, 2))), "m")
    assert not g.sliding and g.layout_tag() == LAYER_MAJOR and g.window_start(1000, C) == 0
    # No config from vLLM (older versions, tests): one full-attention group.
    (g,) = kv_groups(None, "m")
    assert g.layout_tag() == LAYER_MAJOR


def test_hybrid_groups_get_tags_of_their_own_that_name_their_layers():
    gs = kv_groups(config((full_spec(), names(5)), (sliding_spec(64), names(3, 0)), (sliding_spec(64), names(1, 4))), "m")
    assert [g.kind for g in gs] == ["full", "sliding", "sliding"]
    assert [g.window for g in gs] == [0, 64, 64]
    assert gs[1].layer_names == tuple(names(0, 3))  # model order
    tags = [g.layout_tag() for g in gs]
    assert len(set(tags)) == 3 and all(t.startswith(LAYER_MAJOR + ";kv-group=") for t in tags)
    assert tags[1] == "layer-major;kv-group=1/3;sliding64;layers=0,3"


def test_unsupported_group_kinds_fail_naming_the_model_and_the_group():
    mamba = MambaSpec(block_size=C, shapes=((2, 2),), dtypes=(torch.float32,))
    with pytest.raises(ValueError, match=r"model tiny-jamba: KV-cache group 1 \(MambaSpec"):
        kv_groups(config((full_spec(), names(0)), (mamba, names(1))), "tiny-jamba")


def test_window_start_is_the_chunk_of_the_first_token_the_window_needs():
    g = KvGroup(1, 2, "sliding", 40, ())
    assert g.window_start(160, C) == (160 - 39) // C == 7
    assert g.window_start(32, C) == 0
    # vLLM keeps tokens boundary - window + 1 .. on: with a window of 33 before token 48,
    # token 16 on, so chunk 0 is not needed.
    assert KvGroup(1, 2, "sliding", 33, ()).window_start(48, C) == 1
    assert KvGroup(0, 2, "full", 0, ()).skipped_tokens(1000) == 0


class Store:
    """What each group holds: chunk indexes per group (keys are prefix keys, so a chunk
    stands for its whole prefix)."""

    def __init__(self, groups, checkpoint=0):
        self.groups = groups
        self.checkpoint = checkpoint
        self.held = {g.index: set() for g in groups}

    def save(self, n_tokens, chunk=C):
        """The connector's save of a prompt's full chunks: every chunk for full attention,
        for a sliding window the windows before the prompt's possible hit boundaries."""
        usable = ((n_tokens - 1) // chunk) * chunk
        bounds = window_boundaries((n_tokens // chunk) * chunk, usable, self.checkpoint)
        for g in self.groups:
            self.held[g.index] |= g.window_chunks(bounds, chunk)

    def lookup(self, g, boundary, first):
        i = first
        while i < boundary // C and i in self.held[g.index]:
            i += 1
        return i * C


def test_hybrid_hit_on_a_repeated_prompt_and_on_a_longer_one():
    gs = [KvGroup(0, 2, "full", 0, ()), KvGroup(1, 2, "sliding", 40, ())]
    st = Store(gs)
    st.save(200)  # 12 full chunks
    # The repeat: every full chunk before the last token.
    assert hybrid_hit(gs, st.lookup, 199, C) == 192
    # A longer prompt sharing the first 200 tokens (the next turn of a conversation).
    assert hybrid_hit(gs, st.lookup, 500, C) == 192
    # A prompt sharing only its first 100 tokens: the full group holds 6 chunks, but no
    # window ends there, so nothing can be loaded (never a hit the sliding layers lack).
    assert hybrid_hit(gs, st.lookup, 96, C) == 0


def test_windows_are_kept_before_the_prompts_end_and_every_checkpoint():
    assert window_boundaries(192, 176, 0) == [176, 192]
    assert window_boundaries(192, 192, 64) == [64, 128, 192]
    g = KvGroup(1, 2, "sliding", 40, ())
    # Windows of 39 tokens before 64 and 128: chunks 1-3 and 5-7.
    assert g.window_chunks([64, 128], C) == {1, 2, 3, 5, 6, 7}
    assert KvGroup(0, 2, "full", 0, ()).window_chunks([64, 128], C) == set(range(8))


def test_hybrid_hit_falls_back_to_the_last_checkpoint_a_shared_prefix_reaches():
    gs = [KvGroup(0, 2, "full", 0, ()), KvGroup(1, 2, "sliding", 40, ())]
    st = Store(gs, checkpoint=64)
    st.save(300)  # a document and a question
    # Another question over the first 200 tokens: the full layer holds 12 chunks of it, the
    # sliding one the windows before 64, 128 and 192 (and before the first prompt's end).
    assert hybrid_hit(gs, st.lookup, 240, C, checkpoint=64) == 192
    st.held[1] -= {10}  # a chunk of the window before 192 is gone (evicted)
    assert hybrid_hit(gs, st.lookup, 240, C, checkpoint=64) == 128
    # Without checkpoints only the prompt's end has a window: the shared prefix is a miss.
    st0 = Store(gs)
    st0.save(300)
    assert hybrid_hit(gs, st0.lookup, 240, C) == 0
    assert hybrid_hit(gs, st0.lookup, 299, C) == 288


def test_hybrid_hit_asks_a_handful_of_lookups_not_one_per_chunk():
    gs = [KvGroup(0, 2, "full", 0, ()), KvGroup(1, 2, "sliding", 40, ())]
    st = Store(gs, checkpoint=64 * C)
    st.save(100_000)
    calls = []

    def counting(g, b, first):
        calls.append(b)
        return st.lookup(g, b, first)

    other = 90_000  # shares 90,000 tokens: the window is at the checkpoint below
    assert hybrid_hit(gs, counting, other, C, checkpoint=64 * C) == (other // (64 * C)) * 64 * C
    assert len(calls) <= 3


def test_hybrid_hit_matches_a_brute_force_model():
    rng = random.Random(5)
    for _ in range(300):
        window = rng.choice([16, 40, 64])
        checkpoint = rng.choice([0, 32, 64, 80])
        gs = [KvGroup(0, 3, "full", 0, ()), KvGroup(1, 3, "sliding", window, ()), KvGroup(2, 3, "sliding", window, ())]
        st = Store(gs, checkpoint)
        for _ in range(rng.randrange(0, 4)):
            st.save(rng.randrange(1, 400))
        for g in gs:  # random evictions
            st.held[g.index] -= {i for i in list(st.held[g.index]) if rng.random() < 0.1}
        n = rng.randrange(1, 400)
        # The full-attention bound, then that bound or the checkpoints below it: the longest
        # one whose every group holds what a hit there needs.
        bound = 0
        while bound + C <= n and bound // C in st.held[0]:
            bound += C
        want = 0
        for b in range(C, bound + 1, C):
            ok = all(all(i in st.held[g.index] for i in range(g.window_start(b, C), b // C)) for g in gs)
            if ok and (b == bound or (checkpoint and b % checkpoint == 0)):
                want = b
        assert hybrid_hit(gs, st.lookup, n, C, checkpoint) == want


def test_the_connector_refuses_unsupported_groups_at_start_up():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvtier.vllm import KvTierConnector
    from test_vllm_connector import make_config

    vc = make_config({"kvtier.max_local_cpu_size": 0.01, "kvtier.local_cpu_huge_pages": False}, "groups-test")
    mamba = MambaSpec(block_size=C, shapes=((2, 2),), dtypes=(torch.float32,))
    with pytest.raises(ValueError, match=r"model test/tiny: KV-cache group 0 \(MambaSpec"):
        KvTierConnector(vc, KVConnectorRole.SCHEDULER, config((mamba, names(0))))
    with pytest.raises(ValueError, match=r"group 1 has blocks of 32 tokens, not the configured 16"):
        big = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=8, dtype=torch.float32)
        KvTierConnector(vc, KVConnectorRole.SCHEDULER, config((sliding_spec(64), names(0)), (big, names(1))))
