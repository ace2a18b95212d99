"""Tests of kvtier.transfer's layouts and copies (paged caches <-> chunk payloads) on CPU.

Every cache element is distinct (an arange), so a block copied from the wrong place, a
layer or plane in the wrong slot, or a chunk cut at the wrong block changes the compared
bytes. The expected payloads are built from each layout's *definition* (which element is K
of token t, head h, in block b) with plain indexing, not with the module's views."""

import sys

import pytest

torch = pytest.importorskip("torch")

from kvtier.transfer import (  # noqa: E402
    HostStaging,
    PagedLayers,
    detect_vllm_layout,
    dtype_code,
)

L, NB, BS, H, D = 3, 16, 4, 2, 8  # layers, blocks per layer, block size, kv heads, head dim
LAT = 12  # MLA latent width


def distinct(shape, layer, dtype=torch.float32):
    n = 1
    for s in shape:
        n *= s
    return torch.arange(1, n + 1, dtype=torch.float64).add_(layer * n).to(dtype).view(*shape)


# -- each layout, and the token data it defines -------------------------------------------
# kv(layer_tensor, plane, block, token, head) -> the D (or LAT) values of that token and head.


def flash_caches():
    return [distinct((2, NB, BS, H, D), li) for li in range(L)]


def flash_kv(t, p, b, tok, h):
    return t[p, b, tok, h]


def flashinfer_caches():
    return [distinct((NB, 2, BS, H, D), li) for li in range(L)]


def flashinfer_kv(t, p, b, tok, h):
    return t[b, p, tok, h]


def cpu_caches(bs=BS):
    return [distinct((NB, H, bs, 2 * D), li) for li in range(L)]


def cpu_kv(t, p, b, tok, h):
    # Per (block, head): block_size rows of K, then block_size rows of V, each D wide.
    rows = t[b, h].reshape(-1).view(2, t.shape[2], D)
    return rows[p, tok]


def mla_caches():
    return [distinct((NB, BS, LAT), li) for li in range(L)]


def mla_kv(t, p, b, tok, h):
    assert p == 0 and h == 0
    return t[b, tok]


def mla4_caches():
    # vLLM 0.32's CPU MLA backend: a heads dim of 1 before the block's tokens.
    return [distinct((NB, 1, BS, LAT), li) for li in range(L)]


def mla4_kv(t, p, b, tok, h):
    assert p == 0 and h == 0
    return t[b, 0, tok]


VLLM = {
    "flash": (flash_caches, flash_kv, 2, H, D),
    "flashinfer": (flashinfer_caches, flashinfer_kv, 2, H, D),
    "cpu": (cpu_caches, cpu_kv, 2, H, D),
    "mla": (mla_caches, mla_kv, 1, 1, LAT),
    "mla4": (mla4_caches, mla4_kv, 1, 1, LAT),
}


def vllm_paged(name, caches, bpc):
    _, _, _, h, d = VLLM[name]
    return PagedLayers.vllm(
        caches, block_size=BS, num_kv_heads=h, head_size=d, num_blocks=NB, mla=name.startswith("mla"), blocks_per_chunk=bpc
    )


def expected_payload(caches, kv, planes, heads, block_ids, bpc, bs=BS):
    """The documented layer-major layout, spelled out: chunks of bpc blocks (the last may be
    shorter); within a chunk [layer][plane][token][head][dim]."""
    out = []
    for c0 in range(0, len(block_ids), bpc):
        chunk = block_ids[c0 : c0 + bpc]
        for t in caches:
            for p in range(planes):
                for b in chunk:
                    for tok in range(bs):
                        for h in range(heads):
                            out.append(kv(t, p, b, tok, h).reshape(-1))
    return torch.cat(out)


IDS = [9, 2, 14, 5, 0, 11, 7]  # 7 blocks, out of order: with 3 per chunk, a partial last chunk


@pytest.mark.parametrize("name", list(VLLM))
@pytest.mark.parametrize("bpc", [1, 3, 4, 7, 8])
def test_gather_writes_the_layer_major_payload_for_every_vllm_layout(name, bpc):
    make, kv, planes, heads, _ = VLLM[name]
    caches = make()
    paged = vllm_paged(name, caches, bpc)
    assert paged.layout == f"vllm-{name.rstrip('4')}"  # mla4: the 4-D form of "mla"
    payload = torch.full((paged.payload_numel(len(IDS)),), -1.0)
    paged.gather(IDS, payload)
    want = expected_payload(caches, kv, planes, heads, IDS, bpc)
    assert torch.equal(payload, want)
    # The comparison sees a misplaced block (every element is distinct).
    swapped = expected_payload(caches, kv, planes, heads, [IDS[1], IDS[0]] + IDS[2:], bpc)
    assert not torch.equal(payload, swapped)


@pytest.mark.parametrize("name", list(VLLM))
@pytest.mark.parametrize("bpc", [1, 3, 8])
def test_scatter_puts_every_block_back_and_touches_nothing_else(name, bpc):
    make, kv, planes, heads, _ = VLLM[name]
    src = make()
    paged = vllm_paged(name, src, bpc)
    payload = torch.empty(paged.payload_numel(len(IDS)))
    paged.gather(IDS, payload)
    dst = [torch.zeros_like(t) for t in src]
    dst_ids = [1, 3, 4, 6, 8, 10, 15]
    vllm_paged(name, dst, bpc).scatter(payload, dst_ids)
    for li in range(L):
        for s, d in zip(IDS, dst_ids):
            for p in range(planes):
                for tok in range(BS):
                    for h in range(heads):
                        assert torch.equal(kv(dst[li], p, d, tok, h), kv(src[li], p, s, tok, h)), (li, s, d)
        others = [b for b in range(NB) if b not in dst_ids]
        for b in others:
            for p in range(planes):
                assert not kv(dst[li], p, b, 0, 0).any() and not kv(dst[li], p, b, BS - 1, heads - 1).any()
    # Nothing else in the tensors changed: the non-zeros are exactly the scattered blocks.
    for t in dst:
        assert int((t != 0).sum()) == len(dst_ids) * paged.block_numel


@pytest.mark.parametrize("bpc", [1, 3, 4])
def test_scatter_from_an_offset_fills_only_the_asked_blocks(bpc):
    """A payload holding a whole prefix fills only the blocks after those computed locally
    (the first one possibly in the middle of a chunk)."""
    src = flash_caches()
    paged = vllm_paged("flash", src, bpc)
    payload = torch.empty(paged.payload_numel(len(IDS)))
    paged.gather(IDS, payload)
    dst = [torch.zeros_like(t) for t in src]
    into = vllm_paged("flash", dst, bpc)
    into.scatter(payload, [12, 13, 14], first=2)  # payload blocks 2, 3, 4
    for li in range(L):
        for s, d in zip(IDS[2:5], [12, 13, 14]):
            assert torch.equal(dst[li][:, d], src[li][:, s])
        assert not dst[li][:, :12].any() and not dst[li][:, 15].any()
    with pytest.raises(ValueError, match="outside the payload"):
        into.scatter(payload, [0, 1], first=6)


def test_layer_by_layer_moves_only_that_layer():
    src = flash_caches()
    paged = vllm_paged("flash", src, 3)
    payload = torch.full((paged.payload_numel(len(IDS)),), -1.0)
    want = expected_payload(src, flash_kv, 2, H, IDS, 3)
    paged.gather_layer(1, IDS, payload)
    n = src[1].numel()
    layer1 = (want > n) & (want <= 2 * n)  # values of layer 1 lie in (n, 2n]
    assert torch.equal(payload[layer1], want[layer1])
    assert (payload[~layer1] == -1).all()
    dst = [torch.zeros_like(t) for t in src]
    vllm_paged("flash", dst, 3).scatter_layer(1, want, IDS)
    assert torch.equal(dst[1][:, IDS], src[1][:, IDS])
    assert not dst[0].any() and not dst[2].any()


def test_partial_last_chunk_is_layer_major_on_its_own():
    caches = flash_caches()
    paged = vllm_paged("flash", caches, 3)
    payload = torch.empty(paged.payload_numel(len(IDS)))
    paged.gather(IDS, payload)
    chunks = paged.split(payload)
    assert [(c.index, c.blocks) for c in chunks] == [(0, 3), (1, 3), (2, 1)]
    tail = chunks[2].buf.view(L, 2, BS, H, D)  # one block: (layers, planes, tokens, H, D)
    for li in range(L):
        assert torch.equal(tail[li], caches[li][:, IDS[6]])
    full = chunks[1].buf.view(L, 2, 3 * BS, H, D)  # tokens of the chunk's 3 blocks in a row
    assert torch.equal(full[2, 1, BS : 2 * BS], caches[2][1, IDS[4]])


# -- SGLang host pools --------------------------------------------------------------------

PS, PAGES = 4, 16  # page size, pages


def sglang_buffer(layout, mla):
    size = PS * PAGES
    e = LAT if mla else D
    shapes = {
        (False, "layer_first"): (2, L, size, H, D),
        (False, "page_first"): (2, size, L, H, D),
        (False, "page_first_direct"): (2, PAGES, L, PS, H, D),
        (True, "layer_first"): (L, size, 1, e),
        (True, "page_first"): (size, L, 1, e),
        (True, "page_first_direct"): (PAGES, L, PS, 1, e),
    }
    return distinct(shapes[(mla, layout)], 0)


def sglang_kv(buf, layout, mla, li, p, page, tok, h):
    """SGLang's definitions: token slot s = page * PS + tok."""
    s = page * PS + tok
    if not mla:
        return {
            "layer_first": lambda: buf[p, li, s, h],
            "page_first": lambda: buf[p, s, li, h],
            "page_first_direct": lambda: buf[p, page, li, tok, h],
        }[layout]()
    return {
        "layer_first": lambda: buf[li, s, 0],
        "page_first": lambda: buf[s, li, 0],
        "page_first_direct": lambda: buf[page, li, tok, 0],
    }[layout]()


@pytest.mark.parametrize("mla", [False, True])
@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
def test_sglang_host_layouts_gather_and_scatter(layout, mla):
    buf = sglang_buffer(layout, mla)
    paged = PagedLayers.sglang_host(buf, layout=layout, page_size=PS, num_layers=L, mla=mla, blocks_per_chunk=2)
    assert paged.block_shape == ((1, PS, 1, LAT) if mla else (2, PS, H, D))
    pages = [5, 0, 9, 3, 12]
    payload = torch.empty(paged.payload_numel(len(pages)))
    paged.gather(pages, payload)
    planes, heads = (1, 1) if mla else (2, H)
    want = []
    for c0 in range(0, len(pages), 2):
        for li in range(L):
            for p in range(planes):
                for pg in pages[c0 : c0 + 2]:
                    for tok in range(PS):
                        for h in range(heads):
                            want.append(sglang_kv(buf, layout, mla, li, p, pg, tok, h).reshape(-1))
    assert torch.equal(payload, torch.cat(want))
    dst = torch.zeros_like(buf)
    PagedLayers.sglang_host(dst, layout=layout, page_size=PS, num_layers=L, mla=mla, blocks_per_chunk=2).scatter(
        payload, [1, 2, 4, 6, 8]
    )
    for s, d in zip(pages, [1, 2, 4, 6, 8]):
        for li in range(L):
            for p in range(planes):
                for tok in range(PS):
                    assert torch.equal(sglang_kv(dst, layout, mla, li, p, d, tok, 0), sglang_kv(buf, layout, mla, li, p, s, tok, 0))
    assert int((dst != 0).sum()) == 5 * L * paged.block_numel  # nothing but the 5 pages


# -- the same payload across layouts, block sizes and engines -----------------------------


def tokens_of(paged, ids):
    """Canonical (L, P, tokens, H, D) of the blocks ``ids`` through the module's views (used
    only to compare two layouts after a round trip; the layouts are checked above)."""
    return torch.stack([v[:, ids].flatten(1, 2) for v in paged.views])


def test_a_chunk_round_trips_across_layouts_and_block_sizes():
    """vLLM CPU cache (8-token blocks) -> vLLM GPU flash cache (4-token blocks) -> SGLang
    page-first host pool (16-token pages) -> vLLM CPU again: one payload for all, chunks of
    16 tokens."""
    cpu_src = [distinct((NB, H, 8, 2 * D), li) for li in range(L)]
    cpu = PagedLayers.vllm(cpu_src, block_size=8, num_kv_heads=H, head_size=D, blocks_per_chunk=2)
    payload = torch.empty(cpu.payload_numel(4))  # 4 blocks of 8 = 2 chunks of 16 tokens
    cpu.gather([3, 9, 1, 6], payload)

    gpu_dst = [torch.zeros(2, NB, 4, H, D) for _ in range(L)]
    gpu = PagedLayers.vllm(gpu_dst, block_size=4, num_kv_heads=H, head_size=D, blocks_per_chunk=4)
    gpu.scatter(payload, [8, 0, 15, 2, 11, 12, 13, 14])  # 8 blocks of 4 tokens
    assert torch.equal(tokens_of(gpu, [8, 0, 15, 2, 11, 12, 13, 14]), tokens_of(cpu, [3, 9, 1, 6]))

    sg = torch.zeros(2, 16 * 4, L, H, D)
    pages = PagedLayers.sglang_host(sg, layout="page_first", page_size=16, num_layers=L)
    back = torch.empty_like(payload)
    gpu.gather([8, 0, 15, 2, 11, 12, 13, 14], back)
    assert torch.equal(back, payload)
    pages.scatter(back, [2, 0])
    again = torch.empty_like(payload)
    pages.gather([2, 0], again)
    assert torch.equal(again, payload)
    cpu_dst = [torch.zeros_like(t) for t in cpu_src]
    PagedLayers.vllm(cpu_dst, block_size=8, num_kv_heads=H, head_size=D, blocks_per_chunk=2).scatter(again, [0, 1, 2, 3])
    for li in range(L):
        assert torch.equal(cpu_dst[li][[0, 1, 2, 3]], cpu_src[li][[3, 9, 1, 6]])


def test_payload_chunks_are_the_engines_chunks():
    """Chunk i of a payload is bytes [i * chunk_bytes, (i + 1) * chunk_bytes): storing two
    chunks and retrieving a one-chunk prefix gives the first chunk's blocks back."""
    kvtier = pytest.importorskip("kvtier")
    bpc = 2
    eng = kvtier.Engine(
        {"chunk_size": bpc * BS, "max_local_cpu_size": 0.01, "local_cpu_huge_pages": False},
        layers=L, kv_heads=H, head_dim=D, dtype="f32",
    )
    src = flash_caches()
    paged = vllm_paged("flash", src, bpc)
    assert paged.block_nbytes == BS * eng.bytes_per_token
    ids = [3, 8, 1, 12]
    payload = torch.empty(paged.payload_numel(4))
    paged.gather(ids, payload)
    tokens = list(range(100, 100 + 4 * BS))
    assert eng.store(tokens, payload)["new_chunks"] == 2
    out = torch.empty(paged.payload_numel(2))
    assert eng.retrieve(tokens[: 2 * BS], out) == 2 * BS
    dst = [torch.zeros_like(t) for t in src]
    vllm_paged("flash", dst, bpc).scatter(out, [5, 6])
    for li in range(L):
        assert torch.equal(dst[li][:, 5], src[li][:, 3]) and torch.equal(dst[li][:, 6], src[li][:, 8])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.uint8] + ([torch.float8_e4m3fn] if hasattr(torch, "float8_e4m3fn") else []))
def test_copies_are_bytewise_for_every_dtype(dtype):
    src = [torch.randint(0, 255, (2, NB, BS, H, D), dtype=torch.uint8).view(dtype) if dtype.itemsize == 1
           else torch.randn(2, NB, BS, H, D).to(dtype) for _ in range(L)]
    paged = PagedLayers.vllm(src, block_size=BS, num_kv_heads=H, head_size=D, blocks_per_chunk=2)
    payload = torch.empty(paged.payload_numel(3), dtype=dtype)
    paged.gather([4, 7, 1], payload)
    dst = [torch.zeros_like(t) for t in src]
    PagedLayers.vllm(dst, block_size=BS, num_kv_heads=H, head_size=D, blocks_per_chunk=2).scatter(payload, [0, 1, 2])
    for li in range(L):
        assert torch.equal(dst[li][:, [0, 1, 2]].view(torch.uint8), src[li][:, [4, 7, 1]].view(torch.uint8))


def test_host_staging_hands_out_back_to_back_payloads():
    staging = HostStaging(torch.float32, pin=False)
    a, b = staging.payloads([40, 20])
    assert a.numel() == 40 and b.numel() == 20
    assert b.data_ptr() == a.data_ptr() + 40 * 4
    (c,) = staging.payloads([10])
    assert c.data_ptr() == a.data_ptr()  # reused, not reallocated
    (d,) = staging.payloads([200])  # grows; the earlier views stay valid
    assert d.numel() == 200 and a.numel() == 40


def test_layout_detection_and_bad_input_are_clear_errors():
    g = dict(block_size=BS, num_kv_heads=H, head_size=D)
    assert detect_vllm_layout((2, NB, BS, H, D), num_blocks=NB, **g) == "flash"
    assert detect_vllm_layout((NB, 2, BS, H, D), num_blocks=NB, **g) == "flashinfer"
    assert detect_vllm_layout((NB, H, BS, 2 * D), num_blocks=NB, **g) == "cpu"
    assert detect_vllm_layout((NB, BS, LAT), num_blocks=NB, block_size=BS, num_kv_heads=1, head_size=LAT, mla=True) == "mla"
    assert detect_vllm_layout((NB, 1, BS, LAT), num_blocks=NB, block_size=BS, num_kv_heads=1, head_size=LAT, mla=True) == "mla"
    with pytest.raises(ValueError, match="unsupported vLLM KV cache layout"):
        detect_vllm_layout((NB, 2, BS, LAT), num_blocks=NB, block_size=BS, num_kv_heads=1, head_size=LAT, mla=True)
    with pytest.raises(ValueError, match="unsupported vLLM KV cache layout"):
        detect_vllm_layout((NB, BS, H * D), num_blocks=NB, **g)
    with pytest.raises(ValueError, match="unsupported vLLM KV cache layout"):
        detect_vllm_layout((2, NB, BS, H, D), num_blocks=NB + 1, **g)
    caches = flash_caches()
    paged = vllm_paged("flash", caches, 3)
    with pytest.raises(ValueError, match="payload of 2 blocks for 3 block ids"):
        paged.gather([1, 2, 3], torch.empty(paged.payload_numel(2)))
    with pytest.raises(ValueError, match="dtype"):
        paged.gather([1], torch.empty(paged.payload_numel(1), dtype=torch.float16))
    with pytest.raises(ValueError, match="whole number of blocks"):
        paged.scatter(torch.empty(paged.payload_numel(1) + 1), [1])
    with pytest.raises(ValueError, match="block ids must be in"):
        paged.scatter(torch.empty(paged.payload_numel(1)), [NB])
    with pytest.raises(ValueError, match="all layers must match"):
        PagedLayers([c for c in caches[:1]] + [caches[1][:, :8]])
    with pytest.raises(ValueError, match="unsupported KV cache dtype"):
        dtype_code(torch.int64)
    with pytest.raises(ValueError, match="not a whole number of 3-token pages"):
        PagedLayers.sglang_host(torch.zeros(2, L, 16, H, D), layout="layer_first", page_size=3, num_layers=L)
    with pytest.raises(ValueError, match="holds 3 layers, expected 4"):
        PagedLayers.sglang_host(torch.zeros(2, L, 16, H, D), layout="layer_first", page_size=4, num_layers=4)
    assert dtype_code(torch.bfloat16) == "bf16"


def test_transfer_does_not_import_vllm():
    import subprocess

    code = "import sys, kvtier.transfer; sys.exit(any(m.split('.')[0] == 'vllm' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


_GATHER_FOOTPRINT = r"""
import resource, sys, torch
from kvtier.transfer import PagedLayers
bs, h, d, nb = 128, 2, 64, 4096  # one 512 MiB layer in vLLM's CPU layout, never touched
cache = torch.empty(nb, h, bs, 2 * d)
paged = PagedLayers.vllm([cache], block_size=bs, num_kv_heads=h, head_size=d, num_blocks=nb,
                         blocks_per_chunk=int(sys.argv[1]))
payload = torch.zeros(paged.payload_numel(4))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
paged.gather([7, 4000, 3, 1234], payload)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's")
@pytest.mark.parametrize("bpc", [1, 2])
def test_gathering_a_few_blocks_of_a_strided_cache_does_not_copy_the_whole_layer(bpc):
    # vLLM's CPU cache keeps each block's heads outermost, so the canonical view is strided;
    # an index_select along its block dim made PyTorch copy the entire layer first (230 ms
    # per layer of a 2 GiB cache, on every save). Gathering 4 blocks (2 MiB) must stay small.
    import subprocess

    out = subprocess.run([sys.executable, "-c", _GATHER_FOOTPRINT, str(bpc)], capture_output=True, text=True, check=True)
    grown_kib = int(out.stdout.strip().splitlines()[-1])
    assert grown_kib < 64 * 1024, f"peak memory grew by {grown_kib // 1024} MiB gathering 4 blocks"


# -- a prompt's tail: its partial last chunk -----------------------------------------------


def expected_tokens(caches, kv, planes, heads, block_ids, bpc, n_tokens):
    """The layer-major payload of the first ``n_tokens`` tokens of the blocks ``block_ids``,
    spelled out token by token: chunks of ``bpc * BS`` tokens, the last one (the tail) only
    as long as the tokens it has."""
    out, ct = [], bpc * BS
    for c0 in range(0, n_tokens, ct):
        toks = range(c0, min(c0 + ct, n_tokens))
        for t in caches:
            for p in range(planes):
                for g in toks:
                    for h in range(heads):
                        out.append(kv(t, p, block_ids[g // BS], g % BS, h).reshape(-1))
    return torch.cat(out)


TAIL_TOKENS = 6 * BS + 3  # 7 blocks (IDS), the last holding 3 tokens


@pytest.mark.parametrize("name", list(VLLM))
@pytest.mark.parametrize("bpc", [1, 3, 8])
def test_a_tail_is_gathered_with_only_its_tokens_for_every_vllm_layout(name, bpc):
    make, kv, planes, heads, _ = VLLM[name]
    caches = make()
    paged = vllm_paged(name, caches, bpc)
    payload = torch.full((paged.tokens_numel(TAIL_TOKENS),), -1.0)
    paged.gather(IDS, payload, n_tokens=TAIL_TOKENS)
    assert torch.equal(payload, expected_tokens(caches, kv, planes, heads, IDS, bpc, TAIL_TOKENS))
    chunks = paged.split_tokens(payload, TAIL_TOKENS)
    tail = chunks[-1]
    assert tail.blocks == -(-(TAIL_TOKENS - tail.index * bpc * BS) // BS)
    assert tail.tokens == TAIL_TOKENS - tail.index * bpc * BS and tail.tokens % BS == 3
    # The tail's bytes are exactly its tokens: the engine stores them under its own key.
    assert tail.buf.numel() == tail.tokens * L * planes * heads * VLLM[name][4]


@pytest.mark.parametrize("name", list(VLLM))
@pytest.mark.parametrize("bpc", [1, 3])
@pytest.mark.parametrize("first", [0, 2])
def test_a_tail_is_scattered_up_to_the_end_and_the_rest_of_its_block_is_left_alone(name, bpc, first):
    """A decoder loads everything but the prompt's final token: the last block gets its
    tokens before ``end`` only; the slot of the final token keeps what it had (the forward
    pass writes it), and no other block changes."""
    make, kv, planes, heads, _ = VLLM[name]
    src = make()
    paged = vllm_paged(name, src, bpc)
    payload = torch.empty(paged.tokens_numel(TAIL_TOKENS))
    paged.gather(IDS, payload, n_tokens=TAIL_TOKENS)
    dst = [torch.full_like(t, -7.0) for t in src]
    dst_ids = [1, 3, 4, 6, 8, 10, 15][first:]
    end = TAIL_TOKENS - 1
    vllm_paged(name, dst, bpc).scatter(payload, dst_ids, first=first, n_tokens=TAIL_TOKENS, end=end)
    for li in range(L):
        for g in range(first * BS, len(IDS) * BS):
            b, tok = divmod(g, BS)
            for p in range(planes):
                for h in range(heads):
                    got = kv(dst[li], p, dst_ids[b - first], tok, h)
                    if g < end:
                        assert torch.equal(got, kv(src[li], p, IDS[b], tok, h)), (li, g)
                    else:
                        assert (got == -7.0).all(), (li, g)
    for t in dst:  # nothing else was written: the loaded tokens are all that changed
        per_token = paged.block_numel // BS
        assert int((t != -7.0).sum()) == (end - first * BS) * per_token


@pytest.mark.parametrize("name", ["flash", "cpu"])
def test_a_full_last_chunk_is_loaded_in_part(name):
    """A prompt of whole chunks: a decoder loads all but its final token, so the last
    chunk's last block is written but for its final slot."""
    make, kv, planes, heads, _ = VLLM[name]
    src = make()
    paged = vllm_paged(name, src, 2)
    ids = IDS[:6]  # 3 chunks of 2 blocks
    payload = torch.empty(paged.payload_numel(6))
    paged.gather(ids, payload)
    dst = [torch.zeros_like(t) for t in src]
    vllm_paged(name, dst, 2).scatter(payload, [0, 1, 2, 3, 4, 5], end=6 * BS - 1)
    for li in range(L):
        for b in range(6):
            for tok in range(BS):
                for p in range(planes):
                    want = kv(src[li], p, ids[b], tok, 0)
                    if (b, tok) == (5, BS - 1):  # the final token: the forward pass's to write
                        want = torch.zeros_like(want)
                    assert torch.equal(kv(dst[li], p, b, tok, 0), want), (li, b, tok, p)
    with pytest.raises(ValueError, match="not in block"):  # the end must lie in the last block
        paged.scatter(payload, [0, 1], end=3 * BS)


def test_a_tail_round_trips_through_the_engine_and_only_its_own_prompt_finds_it():
    """With save_unfull_chunk, the engine stores a tail under the hash of exactly its
    tokens: the whole prompt is found and loads back; a shorter prompt sharing the tail's
    first tokens (or a longer one) finds only the full chunks."""
    kvtier = pytest.importorskip("kvtier")
    bpc = 2
    eng = kvtier.Engine(
        {"chunk_size": bpc * BS, "max_local_cpu_size": 0.01, "local_cpu_huge_pages": False, "save_unfull_chunk": True},
        layers=L, kv_heads=H, head_dim=D, dtype="f32",
    )
    assert eng.save_unfull_chunk
    src = cpu_caches()
    paged = vllm_paged("cpu", src, bpc)
    tokens = list(range(100, 100 + TAIL_TOKENS))
    payload = torch.empty(paged.tokens_numel(TAIL_TOKENS))
    paged.gather(IDS, payload, n_tokens=TAIL_TOKENS)
    assert eng.store(tokens, payload)["new_chunks"] == 4  # 3 full chunks and the tail
    assert eng.lookup(tokens) == TAIL_TOKENS
    full = 3 * bpc * BS
    assert eng.lookup(tokens[:-1]) == full  # the tail's key is not a prefix's
    assert eng.lookup(tokens + [7]) == full
    out = torch.zeros(paged.tokens_numel(TAIL_TOKENS))
    assert eng.retrieve(tokens, out) == TAIL_TOKENS and torch.equal(out, payload)
    dst = [torch.zeros_like(t) for t in src]
    vllm_paged("cpu", dst, bpc).scatter(out, [0, 1, 2, 3, 4, 5, 6], n_tokens=TAIL_TOKENS, end=TAIL_TOKENS - 1)
    for li in range(L):
        for g in range(TAIL_TOKENS - 1):
            b, tok = divmod(g, BS)
            assert torch.equal(cpu_kv(dst[li], 1, b, tok, 1), cpu_kv(src[li], 1, IDS[b], tok, 1))
    off = kvtier.Engine(
        {"chunk_size": bpc * BS, "max_local_cpu_size": 0.01, "local_cpu_huge_pages": False},
        layers=L, kv_heads=H, head_dim=D, dtype="f32",
    )
    assert not off.save_unfull_chunk
    assert off.store(tokens, payload)["new_chunks"] == 3 and off.lookup(tokens) == full
