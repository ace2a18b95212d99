"""Moves KV between paged attention caches and kvtier chunk payloads (torch only).

This module imports no serving engine: the vLLM connector uses it, and so can a GPU check
script or another engine's connector on a machine without vLLM.

Paged caches
------------
A model's KV cache is one tensor per attention layer (model order), all of one shape, dtype
and device, with one dimension that indexes fixed-size *blocks* of ``block_size`` tokens:

- vLLM's CPU backend: ``(num_blocks, heads, block_size, 2 * head_dim)``, ``block_dim=0``;
- vLLM's flash-attention layout: ``(2, num_blocks, block_size, heads, head_dim)``,
  ``block_dim=1`` (K and V planes first).

:class:`PagedLayers` views every layer block-major. A *block* of a layer is everything the
layer's tensor holds for one block index (shape :attr:`PagedLayers.block_shape`, e.g.
``(2, block_size, heads, head_dim)`` for the flash-attention layout), in the cache's own
element order. Blocks are always copied whole, so the copies do not depend on how a backend
orders tokens, heads and K/V inside a block; a payload is only meaningful to caches of the
same layout (the connector's key identity carries a layout tag for that reason).

Payload layout
--------------
A request's blocks ``b[0] .. b[n-1]`` (in prompt order) are cut into chunks of
``blocks_per_chunk`` consecutive blocks; the last chunk may hold fewer (a *partial last
chunk*). A chunk of ``k`` blocks is the C-contiguous tensor ``(num_layers, k, *block_shape)``:
for each layer in model order, that layer's ``k`` blocks one after the other. A *payload* is
its chunks back to back, as one flat (1-D) contiguous tensor of :meth:`PagedLayers.payload_numel`
elements in the cache dtype: exactly the buffer ``kvtier.Engine.store`` and ``retrieve``
take (chunk ``i`` is bytes ``[i * chunk_bytes, (i + 1) * chunk_bytes)``). With ``L`` layers,
``B`` elements per block, ``bpc`` blocks per chunk, ``c = n // bpc`` and ``r = n % bpc``::

    payload[: c * L * bpc * B].view(c, L, bpc, *block_shape)   # the full chunks
    payload[c * L * bpc * B :].view(L, r, *block_shape)        # the partial last chunk

Layer-major chunks let one layer's blocks be staged as soon as that layer is computed, and
loaded into the cache before the next layer's attention needs them (per-layer pipelining:
:meth:`PagedLayers.gather_layer` and :meth:`PagedLayers.scatter_layer` move one layer).

Devices: the payload lives on the host; the caches may be on CPU or CUDA. On CUDA the copies
are issued ``non_blocking`` on the current stream, so the payload should be pinned
(:class:`HostStaging` pins it) and the caller orders streams and synchronises before the
payload is read or reused.
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


def dtype_code(dtype: torch.dtype) -> str:
    """kvtier's name for a cache dtype; ValueError for one kvtier cannot store."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(f"unsupported KV cache dtype {dtype}") from None


class PagedLayers:
    """A model's paged KV caches, one tensor per layer in model order, viewed block-major.

    ``block_dim`` is the dimension of each layer's tensor that indexes blocks;
    ``blocks_per_chunk`` how many consecutive blocks make one kvtier chunk. The layers
    must share shape, dtype and device. Nothing is copied: writes go to the caches.
    """

    def __init__(self, layers: Sequence[torch.Tensor], *, block_dim: int = 0, blocks_per_chunk: int = 1):
        if not layers:
            raise ValueError("PagedLayers needs at least one layer")
        first = layers[0]
        if not 0 <= block_dim < first.ndim:
            raise ValueError(f"block_dim {block_dim} out of range for a {first.ndim}-d cache")
        for i, t in enumerate(layers):
            if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
                raise ValueError(
                    f"layer {i} is {tuple(t.shape)} {t.dtype} on {t.device}, layer 0 "
                    f"{tuple(first.shape)} {first.dtype} on {first.device}: all layers must match"
                )
        if blocks_per_chunk < 1:
            raise ValueError(f"blocks_per_chunk must be >= 1, got {blocks_per_chunk}")
        #: The layers with the block dimension first (views of the caches).
        self.layers: list[torch.Tensor] = [t.movedim(block_dim, 0) if block_dim else t for t in layers]
        #: Consecutive blocks per kvtier chunk.
        self.blocks_per_chunk = int(blocks_per_chunk)
        #: Shape of one layer's block (the layer's shape without the block dimension).
        self.block_shape: tuple[int, ...] = tuple(self.layers[0].shape[1:])
        #: Elements of one layer's block.
        self.block_numel = 1
        for d in self.block_shape:
            self.block_numel *= d

    @property
    def num_layers(self) -> int:
        """Layers, in model order."""
        return len(self.layers)

    @property
    def num_blocks(self) -> int:
        """Blocks in each layer's cache."""
        return int(self.layers[0].shape[0])

    @property
    def dtype(self) -> torch.dtype:
        """The caches' dtype (and every payload's)."""
        return self.layers[0].dtype

    @property
    def device(self) -> torch.device:
        """The caches' device."""
        return self.layers[0].device

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block over all layers (a block's share of a payload)."""
        return self.num_layers * self.block_numel * self.layers[0].element_size()

    def payload_numel(self, n_blocks: int) -> int:
        """Elements of the payload of ``n_blocks`` blocks (any partial last chunk included)."""
        return n_blocks * self.num_layers * self.block_numel

    def block_index(self, block_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """``block_ids`` as the int64 index tensor on the caches' device the copies take
        (make it once when one set of blocks is moved layer by layer)."""
        if isinstance(block_ids, torch.Tensor) and block_ids.dtype == torch.long and block_ids.device == self.device:
            return block_ids
        return torch.as_tensor(block_ids, dtype=torch.long, device=self.device)

    # -- payload views -----------------------------------------------------------------------

    def _flat(self, payload: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The payload as 1-D, and how many blocks it holds."""
        if payload.dtype != self.dtype:
            raise ValueError(f"payload dtype {payload.dtype} differs from the caches' {self.dtype}")
        if not payload.is_contiguous():
            raise ValueError("a payload must be contiguous")
        flat = payload.view(-1)
        per_block = self.num_layers * self.block_numel
        if flat.numel() % per_block:
            raise ValueError(
                f"a payload of {flat.numel()} elements is not a whole number of blocks "
                f"({per_block} elements per block over {self.num_layers} layers)"
            )
        return flat, flat.numel() // per_block

    def _segments(self, flat: torch.Tensor, n_blocks: int) -> list[tuple[int, torch.Tensor]]:
        """The payload's chunk runs: (first block, view (chunks, layers, k, *block)) for the
        full chunks and for a partial last chunk."""
        bpc = self.blocks_per_chunk
        full, rest = divmod(n_blocks, bpc)
        split = self.payload_numel(full * bpc)
        segs = []
        if full:
            segs.append((0, flat[:split].view(full, self.num_layers, bpc, *self.block_shape)))
        if rest:
            segs.append((full * bpc, flat[split:].view(1, self.num_layers, rest, *self.block_shape)))
        return segs

    def payload_blocks(self, payload: torch.Tensor, layer: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Layer ``layer``'s blocks ``start .. stop`` of a payload, shape
        ``(stop - start, *block_shape)``: a view when they lie in one chunk, otherwise a
        copy of only the chunks they span."""
        flat, n = self._flat(payload)
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise ValueError(f"blocks {start}..{stop} are outside a payload of {n} blocks")
        parts = []
        for seg_first, seg in self._segments(flat, n):
            k = seg.shape[2]
            seg_stop = seg_first + seg.shape[0] * k
            lo, hi = max(start, seg_first), min(stop, seg_stop)
            if lo >= hi:
                continue
            c0, c1 = (lo - seg_first) // k, (hi - seg_first + k - 1) // k
            blocks = seg[c0:c1, layer].flatten(0, 1)  # (chunks * k, *block)
            off = seg_first + c0 * k
            parts.append(blocks[lo - off : hi - off])
        if not parts:
            return flat[:0].view(0, *self.block_shape)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    # -- gather: caches -> payload -----------------------------------------------------------

    def gather_layer(self, layer: int, block_ids: torch.Tensor | Sequence[int], payload: torch.Tensor) -> torch.Tensor | None:
        """Copies layer ``layer`` of the blocks ``block_ids`` (the request's blocks in prompt
        order) into their places in ``payload`` (``payload_numel(len(block_ids))`` elements).
        On CUDA the copy is asynchronous on the current stream and the device-side temporary
        is returned: keep it alive until that stream is synchronised. Otherwise None."""
        ids = self.block_index(block_ids)
        flat, n = self._flat(payload)
        if n != ids.numel():
            raise ValueError(f"a payload of {n} blocks for {ids.numel()} block ids")
        blocks = self.layers[layer].index_select(0, ids)
        cuda = blocks.device.type == "cuda"
        for first, seg in self._segments(flat, n):
            c, k = seg.shape[0], seg.shape[2]
            src = blocks[first : first + c * k].view(c, k, *self.block_shape)
            seg[:, layer].copy_(src, non_blocking=cuda)
        return blocks if cuda else None

    def gather(self, block_ids: torch.Tensor | Sequence[int], payload: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`gather_layer` for every layer; returns the CUDA temporaries to keep alive."""
        ids = self.block_index(block_ids)
        keep = [self.gather_layer(li, ids, payload) for li in range(self.num_layers)]
        return [t for t in keep if t is not None]

    # -- scatter: payload -> caches ----------------------------------------------------------

    def scatter_layer(self, layer: int, payload: torch.Tensor, block_ids: torch.Tensor | Sequence[int], first: int = 0) -> None:
        """Writes layer ``layer`` of the payload's blocks ``first .. first + len(block_ids)``
        into the cache blocks ``block_ids`` (so a payload holding a whole prefix can fill only
        the blocks after those computed locally, or only those that were loaded). On CUDA the
        host-to-device copy is asynchronous on the current stream."""
        ids = self.block_index(block_ids)
        src = self.payload_blocks(payload, layer, first, first + ids.numel())
        if self.device.type == "cuda":
            src = src.to(self.device, non_blocking=True)
        self.layers[layer].index_copy_(0, ids, src)

    def scatter(self, payload: torch.Tensor, block_ids: torch.Tensor | Sequence[int], first: int = 0) -> None:
        """:meth:`scatter_layer` for every layer."""
        ids = self.block_index(block_ids)
        for li in range(self.num_layers):
            self.scatter_layer(li, payload, ids, first)


class HostStaging:
    """A host staging buffer for payloads, reused across steps (no page faults per request)
    and pinned when the caches are on CUDA so the copies can be asynchronous. It grows to the
    largest step seen; views handed out earlier stay valid (they keep the old buffer)."""

    def __init__(self, paged: PagedLayers):
        self._paged = paged
        self._buf: torch.Tensor | None = None

    def payloads(self, block_counts: Sequence[int]) -> list[torch.Tensor]:
        """One flat payload per entry of ``block_counts`` (sized for that many blocks), back
        to back in the buffer. Their previous contents are undefined."""
        sizes = [self._paged.payload_numel(n) for n in block_counts]
        total = sum(sizes)
        if self._buf is None or self._buf.numel() < total:
            pin = self._paged.device.type == "cuda"
            self._buf = torch.empty(total, dtype=self._paged.dtype, device="cpu", pin_memory=pin)
        views, off = [], 0
        for size in sizes:
            views.append(self._buf[off : off + size])
            off += size
        return views
