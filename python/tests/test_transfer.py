"""Tests of kvtier.transfer (paged caches <-> chunk payloads) on CPU with vLLM-shaped caches.

Every cache element is distinct (an arange), so a block copied from the wrong place, a
layer in the wrong slot or a chunk cut at the wrong block changes the compared bytes. The
expected payloads are built by a plain loop over the documented layout, not with the
module's own views. Skipped where torch is not installed; the e2e venv has it."""

import sys

import pytest

torch = pytest.importorskip("torch")

from kvtier.transfer import HostStaging, PagedLayers, dtype_code  # noqa: E402

L, NB, BS, H, D = 3, 16, 4, 2, 8  # layers, blocks per layer, block size, kv heads, head dim


def vllm_caches(base=0.0):
    """Per layer, vLLM's flash-attention layout [2, num_blocks, block_size, heads, head_dim]."""
    n = 2 * NB * BS * H * D
    return [torch.arange(n, dtype=torch.float32).add_(base + li * n).view(2, NB, BS, H, D) for li in range(L)]


def cpu_caches():
    """Per layer, vLLM's CPU layout [num_blocks, heads, block_size, 2 * head_dim]."""
    n = NB * H * BS * 2 * D
    return [torch.arange(n, dtype=torch.float32).add_(li * n).view(NB, H, BS, 2 * D) for li in range(L)]


def block_of(cache, block, block_dim):
    return cache.select(block_dim, block)


def expected_payload(caches, block_ids, bpc, block_dim):
    """The documented layout, spelled out: chunks of bpc blocks (the last may be shorter);
    within a chunk, for each layer, that layer's blocks in order, each block whole."""
    parts = []
    for c0 in range(0, len(block_ids), bpc):
        chunk = block_ids[c0 : c0 + bpc]
        for cache in caches:
            for b in chunk:
                parts.append(block_of(cache, b, block_dim).reshape(-1))
    return torch.cat(parts)


IDS = [9, 2, 14, 5, 0, 11, 7]  # 7 blocks, out of order: with 3 per chunk, a partial last chunk


def gathered(bpc, ids=IDS):
    """vLLM-layout caches, their PagedLayers, and the payload of blocks ``ids``."""
    src = vllm_caches()
    paged = PagedLayers(src, block_dim=1, blocks_per_chunk=bpc)
    payload = torch.empty(paged.payload_numel(len(ids)))
    paged.gather(ids, payload)
    return src, paged, payload


def zero_caches():
    return [torch.zeros(2, NB, BS, H, D) for _ in range(L)]


@pytest.mark.parametrize("bpc", [1, 3, 4, 7, 8])
def test_gather_writes_the_documented_payload_layout(bpc):
    caches = vllm_caches()
    paged = PagedLayers(caches, block_dim=1, blocks_per_chunk=bpc)
    assert paged.block_shape == (2, BS, H, D)
    payload = torch.full((paged.payload_numel(len(IDS)),), -1.0)
    assert paged.gather(IDS, payload) == []  # nothing to keep alive on CPU
    want = expected_payload(caches, IDS, bpc, block_dim=1)
    assert torch.equal(payload, want)
    # The comparison sees a misplaced block (every element is distinct).
    swapped = expected_payload(caches, [IDS[1], IDS[0]] + IDS[2:], bpc, block_dim=1)
    assert not torch.equal(payload, swapped)


def test_partial_last_chunk_is_layer_major_on_its_own():
    caches, paged, payload = gathered(3)
    per_block = 2 * BS * H * D
    full = 2 * L * 3 * per_block  # two full chunks
    tail = payload[full:].view(L, 1, 2, BS, H, D)  # one block left: (layers, 1, *block)
    for li in range(L):
        assert torch.equal(tail[li, 0], caches[li][:, IDS[6]])
    # The last full chunk ends with the last layer's last block of that chunk.
    assert torch.equal(payload[full - per_block : full].view(2, BS, H, D), caches[L - 1][:, IDS[5]])


@pytest.mark.parametrize("bpc", [1, 3, 8])
def test_scatter_puts_every_block_back_and_touches_nothing_else(bpc):
    src, paged, payload = gathered(bpc)
    dst = zero_caches()
    dst_ids = [1, 3, 4, 6, 8, 10, 15]
    PagedLayers(dst, block_dim=1, blocks_per_chunk=bpc).scatter(payload, dst_ids)
    for li in range(L):
        for s, d in zip(IDS, dst_ids):
            assert torch.equal(dst[li][:, d], src[li][:, s]), (li, s, d)
        others = [b for b in range(NB) if b not in dst_ids]
        assert not dst[li][:, others].any()


@pytest.mark.parametrize("bpc", [1, 3, 4])
def test_scatter_from_an_offset_fills_only_the_asked_blocks(bpc):
    """A payload holding a whole prefix fills only the blocks after those computed locally."""
    src, paged, payload = gathered(bpc)
    dst = zero_caches()
    into = PagedLayers(dst, block_dim=1, blocks_per_chunk=bpc)
    into.scatter(payload, [12, 13, 14], first=2)  # payload blocks 2, 3, 4
    for li in range(L):
        for s, d in zip(IDS[2:5], [12, 13, 14]):
            assert torch.equal(dst[li][:, d], src[li][:, s])
        assert not dst[li][:, :12].any() and not dst[li][:, 15].any()
    with pytest.raises(ValueError, match="outside a payload"):
        into.scatter(payload, [0, 1], first=6)


def test_layer_by_layer_moves_only_that_layer():
    src = vllm_caches()
    paged = PagedLayers(src, block_dim=1, blocks_per_chunk=3)
    payload = torch.full((paged.payload_numel(len(IDS)),), -1.0)
    want = expected_payload(src, IDS, 3, block_dim=1)
    ids = paged.block_index(IDS)
    paged.gather_layer(1, ids, payload)
    layer1 = torch.zeros_like(payload, dtype=torch.bool)
    layer1[want >= src[1].numel()] = True
    layer1[want >= 2 * src[1].numel()] = False  # values of layer 1 lie in [n, 2n)
    assert torch.equal(payload[layer1], want[layer1])
    assert (payload[~layer1] == -1).all()
    dst = zero_caches()
    PagedLayers(dst, block_dim=1, blocks_per_chunk=3).scatter_layer(1, want, IDS)
    assert torch.equal(dst[1][:, IDS], src[1][:, IDS])
    assert not dst[0].any() and not dst[2].any()


def test_payload_blocks_across_chunks_and_into_the_partial_one():
    src, paged, payload = gathered(3)
    for start, stop in [(0, 7), (1, 2), (2, 5), (4, 7), (6, 7), (3, 3)]:
        got = paged.payload_blocks(payload, 2, start, stop)
        assert got.shape == (stop - start, 2, BS, H, D)
        for i, b in enumerate(IDS[start:stop]):
            assert torch.equal(got[i], src[2][:, b])
    one_chunk = paged.payload_blocks(payload, 0, 3, 5)
    assert one_chunk.untyped_storage().data_ptr() == payload.untyped_storage().data_ptr()


def test_cpu_backend_layout_round_trips():
    src = cpu_caches()
    paged = PagedLayers(src, blocks_per_chunk=2)
    assert paged.block_shape == (H, BS, 2 * D) and paged.num_blocks == NB
    payload = torch.empty(paged.payload_numel(5))
    paged.gather([4, 1, 0, 12, 7], payload)
    assert torch.equal(payload, expected_payload(src, [4, 1, 0, 12, 7], 2, block_dim=0))
    dst = [torch.zeros_like(t) for t in src]
    PagedLayers(dst, blocks_per_chunk=2).scatter(payload, [2, 3, 5, 6, 8])
    for li in range(L):
        assert torch.equal(dst[li][[2, 3, 5, 6, 8]], src[li][[4, 1, 0, 12, 7]])


def test_payload_chunks_are_the_engines_chunks():
    """Chunk i of a payload is bytes [i * chunk_bytes, (i + 1) * chunk_bytes): storing two
    chunks and retrieving a one-chunk prefix gives the first chunk's blocks back."""
    kvtier = pytest.importorskip("kvtier")
    bpc = 2
    eng = kvtier.Engine(
        {"chunk_size": bpc * BS, "max_local_cpu_size": 0.01, "local_cpu_huge_pages": False},
        layers=L, kv_heads=H, head_dim=D, dtype="f32",
    )
    src = vllm_caches()
    paged = PagedLayers(src, block_dim=1, blocks_per_chunk=bpc)
    assert paged.block_nbytes == BS * eng.bytes_per_token
    ids = [3, 8, 1, 12]
    payload = torch.empty(paged.payload_numel(4))
    paged.gather(ids, payload)
    tokens = list(range(100, 100 + 4 * BS))
    assert eng.store(tokens, payload)["new_chunks"] == 2
    out = torch.empty(paged.payload_numel(2))
    assert eng.retrieve(tokens[: 2 * BS], out) == 2 * BS
    dst = zero_caches()
    PagedLayers(dst, block_dim=1, blocks_per_chunk=bpc).scatter(out, [5, 6])
    for li in range(L):
        assert torch.equal(dst[li][:, 5], src[li][:, 3]) and torch.equal(dst[li][:, 6], src[li][:, 8])


def test_host_staging_hands_out_back_to_back_payloads():
    paged = PagedLayers(vllm_caches(), block_dim=1, blocks_per_chunk=3)
    staging = HostStaging(paged)
    a, b = staging.payloads([4, 2])
    assert a.numel() == paged.payload_numel(4) and b.numel() == paged.payload_numel(2)
    assert b.data_ptr() == a.data_ptr() + a.numel() * a.element_size()
    (c,) = staging.payloads([1])
    assert c.data_ptr() == a.data_ptr()  # reused, not reallocated
    (d,) = staging.payloads([20])  # grows; the earlier views stay valid
    assert d.numel() == paged.payload_numel(20) and a.numel() == paged.payload_numel(4)


def test_bad_input_is_a_clear_error():
    caches = vllm_caches()
    paged = PagedLayers(caches, block_dim=1, blocks_per_chunk=3)
    with pytest.raises(ValueError, match="payload of 2 blocks for 3 block ids"):
        paged.gather([1, 2, 3], torch.empty(paged.payload_numel(2)))
    with pytest.raises(ValueError, match="dtype"):
        paged.gather([1], torch.empty(paged.payload_numel(1), dtype=torch.float16))
    with pytest.raises(ValueError, match="whole number of blocks"):
        paged.scatter(torch.empty(paged.payload_numel(1) + 1), [1])
    with pytest.raises(ValueError, match="all layers must match"):
        PagedLayers([caches[0], caches[1][:, :8]], block_dim=1)
    with pytest.raises(ValueError, match="block_dim"):
        PagedLayers(caches, block_dim=5)
    with pytest.raises(ValueError, match="unsupported KV cache dtype"):
        dtype_code(torch.int64)
    assert dtype_code(torch.bfloat16) == "bf16"


def test_transfer_does_not_import_vllm():
    import subprocess

    code = "import sys, kvtier.transfer; sys.exit(any(m.split('.')[0] == 'vllm' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
