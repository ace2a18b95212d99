"""Paged KV cache layouts seen as one canonical block view per layer.

Every layout this module knows is turned, per layer, into a view (no copy) of shape
``(planes, num_blocks, block_size, heads, head_dim)``: ``planes`` is 2 (K, V) for ordinary
attention and 1 for MLA's latent cache (``heads`` 1, ``head_dim`` = kv_lora_rank + rope dim).
``view[p, b]`` is plane ``p`` of block ``b``, tokens in order, in the ``[token][head][dim]``
order of kvtier's layer-major payload, whatever the strides of the cache underneath.

vLLM (one tensor per attention layer, the shape ``register_kv_caches`` hands over):

=================  ========================================  =========================
name               layer tensor                              note
=================  ========================================  =========================
``flash``          ``(2, num_blocks, block_size, H, D)``     FlashAttention, FlexAttention (GPU)
``flashinfer``     ``(num_blocks, 2, block_size, H, D)``     FlashInfer, Triton (GPU); any strides
``cpu``            ``(num_blocks, H, block_size, 2 * D)``    the CPU backend: per (block, head),
                                                             ``block_size`` K rows then V rows
``mla``            ``(num_blocks, block_size, latent)`` or   MLA: one latent plane (the
                   ``(num_blocks, 1, block_size, latent)``   4-D form: vLLM 0.32's CPU MLA)
=================  ========================================  =========================

SGLang's host (CPU) KV pools, ``size`` token slots, page ``p`` = slots ``[p*ps, (p+1)*ps)``:

=====================  ==========================================  ================================
layout                 MHA ``kv_buffer``                           MLA ``kv_buffer``
=====================  ==========================================  ================================
``layer_first``        ``(2, layers, size, H, D)``                 ``(layers, size, 1, latent)``
``page_first``         ``(2, size, layers, H, D)``                 ``(size, layers, 1, latent)``
``page_first_direct``  ``(2, pages, layers, page_size, H, D)``     ``(pages, layers, page_size, 1, latent)``
=====================  ==========================================  ================================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# kvtier's dtype names (kvtier.Engine's ``dtype``) of the torch dtypes a cache may have.
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.uint8: "u8",
}
for _name, _code in (("float8_e4m3fn", "f8e4m3"), ("float8_e5m2", "f8e5m2")):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code

VLLM_LAYOUTS = ("flash", "flashinfer", "cpu", "mla")
SGLANG_LAYOUTS = ("layer_first", "page_first", "page_first_direct")


def dtype_code(dtype: torch.dtype) -> str:
    """kvtier's name for a cache dtype; ValueError for one kvtier cannot store."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(f"unsupported KV cache dtype {dtype}") from None


def detect_vllm_layout(
    shape: Sequence[int],
    *,
    block_size: int,
    num_kv_heads: int,
    head_size: int,
    num_blocks: int | None = None,
    mla: bool = False,
) -> str:
    """Which of :data:`VLLM_LAYOUTS` a vLLM layer tensor of ``shape`` has, given the model's
    geometry (for MLA: ``num_kv_heads`` 1, ``head_size`` the latent width). ValueError
    naming the shapes it knows when none fits."""
    shape = tuple(int(s) for s in shape)
    bs, h, d = int(block_size), int(num_kv_heads), int(head_size)
    nb_ok = (lambda n: n == num_blocks) if num_blocks is not None else (lambda n: n > 0)
    if mla:
        if len(shape) == 3 and nb_ok(shape[0]) and shape[1:] == (bs, d):
            return "mla"
        if len(shape) == 4 and nb_ok(shape[0]) and shape[1:] == (1, bs, d):
            return "mla"
    elif len(shape) == 5:
        if shape[0] == 2 and nb_ok(shape[1]) and shape[2:] == (bs, h, d):
            return "flash"
        if shape[1] == 2 and nb_ok(shape[0]) and shape[2:] == (bs, h, d):
            return "flashinfer"
    elif len(shape) == 4 and nb_ok(shape[0]) and shape[1:] == (h, bs, 2 * d):
        return "cpu"
    nb = num_blocks if num_blocks is not None else "num_blocks"
    known = (
        f"(NB, block_size, latent) = ({nb}, {bs}, {d}) or (NB, 1, block_size, latent) for MLA"
        if mla
        else f"(2, NB, block_size, H, D), (NB, 2, block_size, H, D) or (NB, H, block_size, 2*D) "
        f"with NB={nb}, block_size={bs}, H={h}, D={d}"
    )
    raise ValueError(f"unsupported vLLM KV cache layout: a layer tensor of shape {shape}; kvtier knows {known}")


def vllm_view(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The canonical ``(planes, num_blocks, block_size, H, D)`` view of one vLLM layer."""
    if layout == "flash":
        return t
    if layout == "flashinfer":
        return t.transpose(0, 1)
    if layout == "cpu":
        nb, h, bs, d2 = t.shape
        # Memory per (block, head) is block_size rows of K then block_size rows of V.
        return t.view(nb, h, 2, bs, d2 // 2).permute(2, 0, 3, 1, 4)
    if layout == "mla":
        if t.dim() == 4:  # (blocks, 1 head, block_size, latent)
            t = t.select(1, 0)
        return t.unsqueeze(0).unsqueeze(3)
    raise ValueError(f"unknown vLLM layout {layout!r}; known: {', '.join(VLLM_LAYOUTS)}")


def sglang_host_views(
    kv_buffer: torch.Tensor, *, layout: str, page_size: int, num_layers: int, mla: bool = False
) -> list[torch.Tensor]:
    """The canonical per-layer views of an SGLang host KV pool (pages are the blocks)."""
    t, ps, nl = kv_buffer, int(page_size), int(num_layers)
    if layout not in SGLANG_LAYOUTS:
        raise ValueError(f"unknown SGLang host layout {layout!r}; known: {', '.join(SGLANG_LAYOUTS)}")
    want = {
        (False, "layer_first"): 5,
        (False, "page_first"): 5,
        (False, "page_first_direct"): 6,
        (True, "layer_first"): 4,
        (True, "page_first"): 4,
        (True, "page_first_direct"): 5,
    }[(mla, layout)]
    if t.dim() != want:
        raise ValueError(f"an SGLang {'MLA' if mla else 'MHA'} {layout} buffer has {want} dims, got {tuple(t.shape)}")

    def pages(x: torch.Tensor, dim: int) -> torch.Tensor:  # split token slots into pages
        size = x.shape[dim]
        if size % ps:
            raise ValueError(f"SGLang host pool of {size} token slots is not a whole number of {ps}-token pages")
        return x.unflatten(dim, (size // ps, ps))

    layer_dim = {"layer_first": 1, "page_first": 2, "page_first_direct": 2}[layout] - (1 if mla else 0)
    if t.shape[layer_dim] != nl:
        raise ValueError(f"the buffer holds {t.shape[layer_dim]} layers, expected {nl}")
    views = []
    for li in range(nl):
        if not mla:
            if layout == "layer_first":  # (2, L, size, H, D)
                v = pages(t[:, li], 1)
            elif layout == "page_first":  # (2, size, L, H, D)
                v = pages(t[:, :, li], 1)
            else:  # (2, pages, L, ps, H, D)
                v = t[:, :, li]
        else:
            if layout == "layer_first":  # (L, size, 1, E)
                v = pages(t[li], 0).unsqueeze(0)
            elif layout == "page_first":  # (size, L, 1, E)
                v = pages(t[:, li], 0).unsqueeze(0)
            else:  # (pages, L, ps, 1, E)
                v = t[:, li].unsqueeze(0)
        views.append(v)
    if views[0].shape[2] != ps:
        raise ValueError(f"page size {views[0].shape[2]} in the buffer, expected {ps}")
    return views
