"""Copies between a model's paged caches and chunk payloads on the caches' own device."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .layouts import detect_vllm_layout, sglang_host_views, vllm_view

# Word types the byte copies run in: the widest that divides a token row of one head.
_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


@dataclasses.dataclass
class Chunk:
    """One chunk of a request's payload: ``blocks`` blocks starting at request block
    ``index * blocks_per_chunk``, held in ``buf`` (flat, contiguous, the chunk's layer-major
    bytes; any dtype whose size divides them: the cache dtype, or ``torch.uint8``).

    A prompt's *tail* (its trailing partial chunk, stored under a key of exactly its tokens)
    holds ``tokens`` tokens, fewer than ``blocks * block_size``: its last block is partial
    and ``buf`` is ``[layer][plane][tokens][head][dim]``, just shorter."""

    index: int
    blocks: int
    buf: torch.Tensor
    tokens: int | None = None  # tokens held when the last block is partial (None: whole blocks)


@dataclasses.dataclass
class Piece:
    """Blocks ``lo .. hi`` (within the chunk) of ``chunk``; with ``end``, only the chunk's
    tokens before ``end`` (a token offset in the chunk, inside block ``hi - 1``): the last
    block is written partially."""

    chunk: Chunk
    lo: int
    hi: int
    end: int | None = None


class PagedLayers:
    """A model's paged KV caches, one canonical view per layer (see :mod:`.layouts`):
    ``(planes, num_blocks, block_size, heads, head_dim)``, all of one shape, dtype and
    device. Gathers blocks into chunk payloads and scatters them back, on the caches' device
    (a payload given here must be on that device: :class:`~.pipeline.Transfer` moves
    payloads between host and device). Nothing is copied at construction."""

    def __init__(self, views: Sequence[torch.Tensor], *, blocks_per_chunk: int = 1, layout: str = "canonical"):
        if not views:
            raise ValueError("PagedLayers needs at least one layer")
        first = views[0]
        if first.dim() != 5:
            raise ValueError(
                f"a canonical layer view is (planes, num_blocks, block_size, heads, head_dim), got {tuple(first.shape)}"
            )
        for i, t in enumerate(views):
            if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
                raise ValueError(
                    f"layer {i} is {tuple(t.shape)} {t.dtype} on {t.device}, layer 0 "
                    f"{tuple(first.shape)} {first.dtype} on {first.device}: all layers must match"
                )
        if int(blocks_per_chunk) < 1:
            raise ValueError(f"blocks_per_chunk must be >= 1, got {blocks_per_chunk}")
        #: The layout the views were made from (a name from :mod:`.layouts`).
        self.layout = layout
        #: Canonical per-layer views of the caches.
        self.views: list[torch.Tensor] = list(views)
        #: Consecutive blocks per kvtier chunk.
        self.blocks_per_chunk = int(blocks_per_chunk)
        p, _, bs, h, d = first.shape
        #: Shape of one layer's block in a payload: (planes, block_size, heads, head_dim).
        self.block_shape: tuple[int, int, int, int] = (int(p), int(bs), int(h), int(d))
        #: Elements (cache dtype) of one layer's block.
        self.block_numel = int(p * bs * h * d)
        row = int(d) * first.element_size()
        self._word_size, self._word = next((n, w) for n, w in _WORDS if row % n == 0)
        self._row_words = row // self._word_size
        # The views as words (the last dim is contiguous in every layout): dtype-free copies.
        self._wviews = [self._words(v) for v in views]

    # -- construction from serving engines' layouts --------------------------------------

    @classmethod
    def vllm(
        cls,
        layers: Sequence[torch.Tensor],
        *,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        num_blocks: int | None = None,
        mla: bool = False,
        layout: str | None = None,
        blocks_per_chunk: int = 1,
    ) -> "PagedLayers":
        """vLLM's per-layer KV cache tensors (model order); the layout is detected from the
        first tensor's shape unless given (see :func:`.layouts.detect_vllm_layout`)."""
        if not layers:
            raise ValueError("PagedLayers needs at least one layer")
        layout = layout or detect_vllm_layout(
            layers[0].shape,
            block_size=block_size,
            num_kv_heads=num_kv_heads,
            head_size=head_size,
            num_blocks=num_blocks,
            mla=mla,
        )
        return cls([vllm_view(t, layout) for t in layers], blocks_per_chunk=blocks_per_chunk, layout=f"vllm-{layout}")

    @classmethod
    def sglang_host(
        cls,
        kv_buffer: torch.Tensor,
        *,
        layout: str,
        page_size: int,
        num_layers: int,
        mla: bool = False,
        blocks_per_chunk: int = 1,
    ) -> "PagedLayers":
        """An SGLang host KV pool's ``kv_buffer`` (pages are the blocks)."""
        views = sglang_host_views(kv_buffer, layout=layout, page_size=page_size, num_layers=num_layers, mla=mla)
        return cls(views, blocks_per_chunk=blocks_per_chunk, layout=f"sglang-{layout}")

    # -- geometry ----------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """Layers, in model order."""
        return len(self.views)

    @property
    def num_blocks(self) -> int:
        """Blocks in each layer's cache."""
        return int(self.views[0].shape[1])

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self.block_shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The caches' dtype."""
        return self.views[0].dtype

    @property
    def device(self) -> torch.device:
        """The caches' device."""
        return self.views[0].device

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block over all layers (a block's share of a payload)."""
        return self.num_layers * self.block_numel * self.views[0].element_size()

    def payload_numel(self, n_blocks: int) -> int:
        """Elements (cache dtype) of the payload of ``n_blocks`` blocks."""
        return n_blocks * self.num_layers * self.block_numel

    @property
    def chunk_tokens(self) -> int:
        """Tokens of a full chunk."""
        return self.blocks_per_chunk * self.block_size

    def tokens_numel(self, n_tokens: int) -> int:
        """Elements (cache dtype) of the payload of ``n_tokens`` tokens (a whole prompt,
        its tail included)."""
        return int(n_tokens) * self.num_layers * (self.block_numel // self.block_size)

    def chunk_token_count(self, c: Chunk) -> int:
        """Tokens ``c`` holds."""
        return c.blocks * self.block_size if c.tokens is None else int(c.tokens)

    def block_index(self, block_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """``block_ids`` as the int64 index tensor on the caches' device the copies take,
        checked to be in range (an out-of-range index is a device-side assert on CUDA)."""
        if isinstance(block_ids, torch.Tensor) and block_ids.device.type != "cpu":
            return block_ids.to(device=self.device, dtype=torch.long)  # checked by whoever made it
        ids = torch.as_tensor(block_ids, dtype=torch.long)
        if ids.dim() != 1:
            raise ValueError(f"block ids must be 1-D, got shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_blocks):
            raise ValueError(f"block ids must be in 0..{self.num_blocks - 1}, got {ids.min().item()}..{ids.max().item()}")
        return ids.to(self.device)

    # -- payloads and chunks -------------------------------------------------------------------

    def split(self, payload: torch.Tensor, n_blocks: int | None = None, first_chunk: int = 0) -> list[Chunk]:
        """A flat payload as its chunks (the last may hold fewer blocks); ``n_blocks``
        defaults to all the payload holds."""
        flat = self._flat(payload)
        per_block = self.block_nbytes // flat.element_size()
        have = flat.numel() // per_block
        if flat.numel() % per_block:
            raise ValueError(
                f"a payload of {flat.numel()} elements is not a whole number of blocks "
                f"({per_block} elements per block over {self.num_layers} layers)"
            )
        n = have if n_blocks is None else int(n_blocks)
        if n > have:
            raise ValueError(f"a payload of {have} blocks cannot hold {n}")
        bpc, chunks, off, b, i = self.blocks_per_chunk, [], 0, 0, int(first_chunk)
        while b < n:
            k = min(bpc, n - b)
            size = k * per_block
            chunks.append(Chunk(i, k, flat[off : off + size]))
            off, b, i = off + size, b + k, i + 1
        return chunks

    def split_tokens(self, payload: torch.Tensor, n_tokens: int, first_chunk: int = 0) -> list[Chunk]:
        """The chunks of the first ``n_tokens`` tokens of a flat payload laid out as a
        prompt's chunks back to back (chunk ``i`` at ``i * chunk bytes``); when ``n_tokens``
        is not a whole number of chunks the last is a tail of the remaining tokens."""
        flat = self._flat(payload)
        per_token = self.block_nbytes // self.block_size // flat.element_size()
        n = int(n_tokens)
        if n < 0 or flat.numel() < n * per_token:
            raise ValueError(f"a payload of {flat.numel() // per_token} tokens cannot hold {n}")
        ct, bs, chunks, t, i = self.chunk_tokens, self.block_size, [], 0, int(first_chunk)
        while t < n:
            k = min(ct, n - t)
            buf = flat[t * per_token : (t + k) * per_token]
            chunks.append(Chunk(i, -(-k // bs), buf, None if k % bs == 0 else k))
            t, i = t + k, i + 1
        return chunks

    def pieces(self, chunks: Sequence[Chunk], first: int, n: int, end: int | None = None) -> list[Piece]:
        """The parts of ``chunks`` holding request blocks ``first .. first + n`` (in order);
        with ``end`` (a request token in block ``first + n - 1``), only the tokens before it.
        ValueError when the chunks do not hold them all."""
        bpc, bs, out, want = self.blocks_per_chunk, self.block_size, [], first
        stop = (first + n) * bs if end is None else int(end)
        if n and not (first + n - 1) * bs < stop <= (first + n) * bs:
            raise ValueError(f"token {stop} is not in block {first + n - 1}, the last of blocks {first}..{first + n}")
        for c in chunks:
            start = c.index * bpc
            lo, hi = max(want, start), min(first + n, start + c.blocks)
            if lo >= hi:
                continue
            if lo != want:
                break
            # The tokens of this piece: up to the block end, the chunk's data, the request's end.
            held = start * bs + self.chunk_token_count(c)
            last = min(hi * bs, held, stop)
            if last <= (hi - 1) * bs:  # the chunk's data stops before block hi - 1
                break
            out.append(Piece(c, lo - start, hi - start, None if last == hi * bs else last - start * bs))
            want = hi
            if last < hi * bs:  # a partial block ends the piece: nothing may follow it
                break
        if want != first + n:
            raise ValueError(f"blocks {first}..{first + n} are outside the payload's chunks (covered up to {want})")
        return out

    # -- copies (on the caches' device, issued on the current stream) -------------------------

    def gather_layer_into(self, layer: int, chunks: Sequence[Chunk], ids: torch.Tensor) -> None:
        """Copies layer ``layer`` of the blocks ``ids`` (the chunks' blocks, in chunk order)
        into the chunks' buffers (a tail takes only its tokens of its last block)."""
        self._check_ids(ids, sum(c.blocks for c in chunks))
        v, off = self._wviews[layer], 0
        # A strided view (vLLM CPU's and HND layouts keep the blocks outermost) is gathered
        # block-first: PyTorch's index_select along an inner dim of such a view first copies
        # the whole layer's cache (measured 230 ms per layer for a 2 GiB cache, vs 4 ms).
        by_block = None if v.is_contiguous() else v.transpose(0, 1)  # (blocks, P, BS, H, Dw)
        for group, tail in self._segments([Piece(ch, 0, ch.blocks) for ch in chunks]):
            if tail:
                c = group[0].chunk
                self._gather_tail(layer, c, ids[off : off + c.blocks], v, by_block)
                off += c.blocks
                continue
            for run_buf, c, k in self._runs(group):
                dst = self._run_view(run_buf, c, k)[:, layer]  # (c, P, k, BS, H, Dw)
                rid = ids[off : off + c * k]
                if by_block is not None:
                    rows = by_block.index_select(0, rid)  # (c * k, P, BS, H, Dw)
                    dst.copy_(rows.view(c, k, *rows.shape[1:]).transpose(1, 2))
                elif c == 1:
                    torch.index_select(v, 1, rid, out=dst[0])
                else:
                    p = self.block_shape[0]
                    dst.copy_(v.index_select(1, rid).view(p, c, k, *dst.shape[3:]).transpose(0, 1))
                off += c * k

    def scatter_layer_from(self, layer: int, pieces: Sequence[Piece], ids: torch.Tensor) -> None:
        """Writes layer ``layer`` of the pieces' blocks (in order) into the cache blocks
        ``ids``; a piece ending inside a block writes only that block's tokens before its
        end (the block's other tokens are left as they are)."""
        self._check_ids(ids, sum(p.hi - p.lo for p in pieces))
        v, off, planes = self._wviews[layer], 0, self.block_shape[0]
        for group, tail in self._segments(pieces):
            if tail:
                p = group[0]
                self._scatter_tail(layer, p, ids[off : off + p.hi - p.lo], v)
                off += p.hi - p.lo
                continue
            for run_buf, c, k, lo, hi in self._runs(group, with_range=True):
                src = self._run_view(run_buf, c, k)[:, layer]  # (c, P, k, BS, H, Dw)
                if c == 1:
                    s = src[0][:, lo:hi]
                    n = hi - lo
                else:
                    s = src.transpose(0, 1).reshape(planes, c * k, *src.shape[3:])
                    n = c * k
                v.index_copy_(1, ids[off : off + n], s)
                off += n

    def _token_view(self, c: Chunk, layer: int) -> torch.Tensor:
        """Layer ``layer`` of chunk ``c`` as words ``(P, tokens, H, Dw)``."""
        p, _, h, _ = self.block_shape
        t = self.chunk_token_count(c)
        buf = self._words(c.buf.reshape(-1))
        if buf.numel() != self.num_layers * p * t * h * self._row_words:
            raise ValueError(
                f"chunk {c.index} holds {buf.numel() * self._word_size} bytes, {t} tokens need "
                f"{self.num_layers * p * t * h * self._row_words * self._word_size}"
            )
        return buf.view(self.num_layers, p, t, h, self._row_words)[layer]

    def _gather_tail(self, layer: int, c: Chunk, rid: torch.Tensor, v: torch.Tensor, by_block) -> None:
        """A chunk whose last block is partial: its blocks' rows, then only its tokens."""
        p, bs, h, _ = self.block_shape
        dst = self._token_view(c, layer)  # (P, T, H, Dw)
        t = dst.shape[1]
        if by_block is not None:
            rows = by_block.index_select(0, rid).transpose(0, 1)  # (P, k, BS, H, Dw)
        else:
            rows = v.index_select(1, rid)
        kf, r = divmod(t, bs)
        if kf:
            dst[:, : kf * bs].view(p, kf, bs, h, self._row_words).copy_(rows[:, :kf])
        if r:
            dst[:, kf * bs :].copy_(rows[:, kf, :r])

    def _scatter_tail(self, layer: int, piece: Piece, ids: torch.Tensor, v: torch.Tensor) -> None:
        """A piece ending inside a block: its whole blocks, then that block's first tokens."""
        p, bs, h, _ = self.block_shape
        src = self._token_view(piece.chunk, layer)  # (P, T, H, Dw)
        end = self._piece_end(piece)
        whole = end // bs - piece.lo  # blocks written whole
        if whole > 0:
            part = src[:, piece.lo * bs : (piece.lo + whole) * bs].view(p, whole, bs, h, self._row_words)
            v.index_copy_(1, ids[:whole], part)
        r = end - (piece.lo + whole) * bs
        if r:
            v[:, :, :r].index_copy_(1, ids[whole : whole + 1], src[:, end - r : end].unsqueeze(1))

    def _piece_end(self, piece: Piece) -> int:
        """Token offset in its chunk where a piece's data ends."""
        end = piece.hi * self.block_size if piece.end is None else int(piece.end)
        return min(end, self.chunk_token_count(piece.chunk))

    def _segments(self, pieces: Sequence[Piece]):
        """Pieces in order, as (pieces, tail): runs of whole-block pieces of whole-block
        chunks (tail False), and one by one the others (tail True: a piece ending inside a
        block, or any piece of a chunk whose last block is partial)."""
        group: list[Piece] = []
        bs = self.block_size
        for p in pieces:
            if self._piece_end(p) != p.hi * bs or self.chunk_token_count(p.chunk) != p.chunk.blocks * bs:
                if group:
                    yield group, False
                    group = []
                yield [p], True
            else:
                group.append(p)
        if group:
            yield group, False

    def gather_layer(
        self, layer: int, block_ids: torch.Tensor | Sequence[int], payload: torch.Tensor, n_tokens: int | None = None
    ) -> None:
        """Copies layer ``layer`` of the blocks ``block_ids`` (a request's blocks in prompt
        order) into their places in ``payload`` (``payload_numel(len(block_ids))``
        elements, on the caches' device). With ``n_tokens``, the payload holds that many
        tokens (``tokens_numel(n_tokens)`` elements; the last block may be partial)."""
        ids = self.block_index(block_ids)
        chunks = self._payload_chunks(payload, ids.numel(), n_tokens)
        self.gather_layer_into(layer, chunks, ids)

    def gather(
        self, block_ids: torch.Tensor | Sequence[int], payload: torch.Tensor, n_tokens: int | None = None
    ) -> None:
        """:meth:`gather_layer` for every layer."""
        ids = self.block_index(block_ids)
        chunks = self._payload_chunks(payload, ids.numel(), n_tokens)
        for li in range(self.num_layers):
            self.gather_layer_into(li, chunks, ids)

    def scatter_layer(
        self,
        layer: int,
        payload: torch.Tensor,
        block_ids: torch.Tensor | Sequence[int],
        first: int = 0,
        n_tokens: int | None = None,
        end: int | None = None,
    ) -> None:
        """Writes layer ``layer`` of the payload's blocks ``first .. first + len(block_ids)``
        into the cache blocks ``block_ids`` (so a payload holding a whole prefix can fill
        only the blocks after those computed locally). ``n_tokens``: the payload holds that
        many tokens (default: whole blocks); ``end``: the request token to stop before (in
        the last block; its later tokens are left as they are)."""
        ids = self.block_index(block_ids)
        self.scatter_layer_from(layer, self._pieces_of(payload, first, ids.numel(), n_tokens, end), ids)

    def scatter(
        self,
        payload: torch.Tensor,
        block_ids: torch.Tensor | Sequence[int],
        first: int = 0,
        n_tokens: int | None = None,
        end: int | None = None,
    ) -> None:
        """:meth:`scatter_layer` for every layer."""
        ids = self.block_index(block_ids)
        pieces = self._pieces_of(payload, first, ids.numel(), n_tokens, end)
        for li in range(self.num_layers):
            self.scatter_layer_from(li, pieces, ids)

    # -- internals ---------------------------------------------------------------------------

    def _payload_chunks(self, payload: torch.Tensor, n_blocks: int, n_tokens: int | None = None) -> list[Chunk]:
        chunks = self._chunks_of(payload, n_tokens)
        have = sum(c.blocks for c in chunks)
        if have != n_blocks:
            raise ValueError(f"a payload of {have} blocks for {n_blocks} block ids")
        nbytes = payload.numel() * payload.element_size()
        if n_tokens is not None and nbytes != self.tokens_numel(n_tokens) * self.views[0].element_size():
            raise ValueError(f"a payload of {nbytes} bytes for {n_tokens} tokens")
        return chunks

    def _pieces_of(
        self, payload: torch.Tensor, first: int, n: int, n_tokens: int | None, end: int | None
    ) -> list[Piece]:
        return self.pieces(self._chunks_of(payload, n_tokens), first, n, end)

    def _flat(self, payload: torch.Tensor) -> torch.Tensor:
        """A payload (cache dtype or bytes, contiguous) as one flat tensor."""
        if payload.dtype not in (self.dtype, torch.uint8):
            raise ValueError(f"payload dtype {payload.dtype} differs from the caches' {self.dtype}")
        if not payload.is_contiguous():
            raise ValueError("a payload must be contiguous")
        return payload.view(-1)

    def _chunks_of(self, payload: torch.Tensor, n_tokens: int | None) -> list[Chunk]:
        """The payload's chunks: whole blocks, or ``n_tokens`` tokens (a tail last)."""
        return self.split(payload) if n_tokens is None else self.split_tokens(payload, n_tokens)

    def _check_ids(self, ids: torch.Tensor, n: int) -> None:
        if ids.numel() != n:
            raise ValueError(f"{ids.numel()} block ids for {n} blocks")
        if ids.device != self.device:
            raise ValueError(f"block ids on {ids.device}, caches on {self.device}")

    def _words(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (cache dtype or bytes, last dim contiguous) reinterpreted as copy words."""
        if t.device != self.device:
            raise ValueError(
                f"a payload on {t.device} for caches on {self.device}: PagedLayers copies on the caches' "
                "device (kvtier.transfer.Transfer moves payloads between host and device)"
            )
        b = t.view(torch.uint8) if t.dtype != torch.uint8 else t
        try:
            return b.view(self._word)
        except RuntimeError as e:
            raise ValueError(f"a buffer at a {self._word_size}-byte misaligned address or stride: {e}") from None

    def _run_view(self, run_buf: torch.Tensor, c: int, k: int) -> torch.Tensor:
        p, bs, h, _ = self.block_shape
        return run_buf.view(c, self.num_layers, p, k, bs, h, self._row_words)

    def _runs(self, pieces: Sequence[Piece], with_range: bool = False):
        """Groups pieces into runs the copies can batch: consecutive whole chunks of equal
        size lying back to back in memory. Yields (words, chunks, blocks per chunk[, lo, hi])."""
        i = 0
        while i < len(pieces):
            p = pieces[i]
            if not p.chunk.buf.is_contiguous():
                raise ValueError(f"chunk {p.chunk.index}'s buffer is not contiguous")
            buf = self._words(p.chunk.buf.reshape(-1))
            k = p.chunk.blocks
            if buf.numel() != self._run_numel(k):
                raise ValueError(
                    f"chunk {p.chunk.index} holds {buf.numel() * self._word_size} bytes, "
                    f"{k} blocks need {self._run_numel(k) * self._word_size}"
                )
            whole = p.lo == 0 and p.hi == k
            j = i + 1
            if whole:
                end = buf.data_ptr() + buf.numel() * self._word_size
                while j < len(pieces):
                    q = pieces[j]
                    if not (q.lo == 0 and q.hi == q.chunk.blocks == k and q.chunk.buf.is_contiguous()):
                        break
                    if q.chunk.buf.device != buf.device or q.chunk.buf.data_ptr() != end:
                        break
                    if q.chunk.buf.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr():
                        break
                    end += buf.numel() * self._word_size
                    j += 1
            c = j - i
            if c > 1:
                buf = buf.as_strided((c * buf.numel(),), (1,), buf.storage_offset())
            yield (buf, c, k, p.lo, p.hi) if with_range else (buf, c, k)
            i = j

    def _run_numel(self, k: int) -> int:
        p, bs, h, _ = self.block_shape
        return self.num_layers * p * k * bs * h * self._row_words
