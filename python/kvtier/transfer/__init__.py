"""Moves KV between paged attention caches and kvtier chunk payloads (torch only).

This package imports no serving engine: the vLLM connector uses it, and so can the GPU
check script (``e2e/gpu/check.py``) or another engine's connector on a machine without vLLM.

Payload layout
--------------
A payload is kvtier's **layer-major** chunk layout (``docs/key-spec.md``, layout tag
``layer-major``), the same for every cache layout, device and block size. A request's
tokens are cut into chunks of ``blocks_per_chunk`` blocks (``blocks_per_chunk *
block_size`` tokens); the last chunk may hold fewer blocks (a *partial last chunk*), and a
prompt's *tail* (its last chunk when the prompt ends inside a block: engines with
``save_unfull_chunk`` store it under a key of exactly its tokens) holds just its ``T``
tokens, its last block partly. A chunk of ``T`` tokens is the C-contiguous array::

    chunk[layer][plane][token][head][dim]        shape (L, P, T, H, D), the cache dtype

``P`` is 2 (K then V) for ordinary attention and 1 for MLA (``H`` 1, ``D`` = kv_lora_rank +
rope dim). A payload is its chunks back to back, one flat contiguous buffer: exactly what
``kvtier.Engine.store`` and ``retrieve`` take (chunk ``i`` is bytes ``[i * chunk_bytes,
(i + 1) * chunk_bytes)``).

Because the payload does not depend on the cache's layout or block size, a chunk stored from
vLLM's CPU cache (``(num_blocks, H, block_size, 2*D)``, 128-token blocks) loads into vLLM's
GPU cache (``(2, num_blocks, block_size, H, D)``, 16-token blocks) or an SGLang host pool,
and back; all share one key identity (tag ``layer-major``).

Modules
-------
- :mod:`.layouts`: the known cache layouts as canonical per-layer views
  ``(P, num_blocks, block_size, H, D)`` (vLLM flash/flashinfer/CPU/MLA, SGLang host
  layer-first/page-first/page-first-direct).
- :mod:`.paged`: :class:`PagedLayers`, gather and scatter between caches and payloads on
  the caches' device.
- :mod:`.streams`: the stream/event ordering model (CUDA streams, or threads for CPU).
- :mod:`.pipeline`: :class:`Transfer`, per-layer pipelined loads and saves between host
  chunks and the caches, ordered against the compute stream.
- :mod:`.host`: host memory for payloads (a staging buffer pinned once, or kvtier's L1 pool
  registered with CUDA).
"""

from .host import ClaimedChunks, HeldChunks, HostStaging, PoolMemory, host_tensor
from .layouts import DTYPE_CODES, SGLANG_LAYOUTS, VLLM_LAYOUTS, detect_vllm_layout, dtype_code, sglang_host_views, vllm_view
from .paged import Chunk, PagedLayers, Piece
from .pipeline import DEFAULT_DEVICE_STAGING_BYTES, LoadPlan, LoadStep, SavePlan, SaveStep, Transfer
from .streams import CudaStreams, ThreadStreams, TransferError

__all__ = [
    "DEFAULT_DEVICE_STAGING_BYTES",
    "DTYPE_CODES",
    "SGLANG_LAYOUTS",
    "VLLM_LAYOUTS",
    "Chunk",
    "ClaimedChunks",
    "CudaStreams",
    "HeldChunks",
    "HostStaging",
    "LoadPlan",
    "LoadStep",
    "PagedLayers",
    "Piece",
    "PoolMemory",
    "SavePlan",
    "SaveStep",
    "ThreadStreams",
    "Transfer",
    "TransferError",
    "detect_vllm_layout",
    "dtype_code",
    "host_tensor",
    "sglang_host_views",
    "streams_for",
    "vllm_view",
]


def streams_for(device) -> "CudaStreams | ThreadStreams":
    """The streams implementation for caches on ``device``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return CudaStreams(device)
    if device.type == "cpu":
        return ThreadStreams()
    raise ValueError(f"kvtier transfers support cpu and cuda caches, not {device.type}")
