"""The host side of transfers: a staging buffer pinned once, or kvtier's own L1 pool.

Two ways to put chunk payloads in host memory:

- :class:`HostStaging` (``staging: pinned``): one buffer, pinned when the caches are on a
  GPU, reused every step. Stores copy it into kvtier (``Engine.store``), loads copy out of
  kvtier into it (``Engine.retrieve``): one host copy per direction on top of the DMA.
- :class:`PoolMemory` (``staging: pool``, embedded engines): the engine's L1 pool itself,
  registered with CUDA once (``cudaHostRegister`` through torch) so the DMA engines read and
  write it directly. A load copies held L1 chunks (``Engine.acquire``) straight to the
  device; a store fills claimed pool buffers (``Engine.begin_store``) straight from the
  device and only checksums them at commit. No host copy, and only new chunks move.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import torch

from .paged import Chunk, PagedLayers


class HostStaging:
    """A host staging buffer reused across steps (no page faults per request), pinned once
    when ``pin``. It grows to the largest step seen; views handed out earlier stay valid
    (they keep the old buffer)."""

    def __init__(self, dtype: torch.dtype, *, pin: bool):
        self._dtype = dtype
        self._pin = pin
        self._buf: torch.Tensor | None = None

    @property
    def pinned(self) -> bool:
        """Whether the buffer is page-locked."""
        return self._pin

    def payloads(self, numels: Sequence[int]) -> list[torch.Tensor]:
        """One flat payload per entry of ``numels`` (elements), back to back in the buffer.
        Their previous contents are undefined."""
        total = sum(numels)
        if self._buf is None or self._buf.numel() < total:
            self._buf = torch.empty(max(total, 1), dtype=self._dtype, device="cpu", pin_memory=self._pin)
        views, off = [], 0
        for n in numels:
            views.append(self._buf[off : off + n])
            off += n
        return views


def host_tensor(address: int, nbytes: int) -> torch.Tensor:
    """A CPU byte tensor over memory kvtier owns (a pool chunk). It does not keep that
    memory alive: keep the handle that does (held chunks, a store session) until every copy
    reading or writing the tensor is done."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8)


def _chunks(paged: PagedLayers, entries: Sequence[tuple[int, int, int, int]], chunk_tokens: int) -> list[Chunk]:
    """Chunks from (token_start, token_end, address, nbytes) entries of the bindings (a
    prompt's tail may end inside a block)."""
    out = []
    per_token = paged.block_nbytes // paged.block_size
    for start, end, addr, nbytes in entries:
        tokens = end - start
        if start % chunk_tokens or not 0 < tokens <= chunk_tokens:
            raise ValueError(
                f"chunk tokens {start}..{end} are not a chunk (or a prompt's tail) of {chunk_tokens}-token chunks"
            )
        if nbytes != tokens * per_token:
            raise ValueError(f"a pool chunk of {nbytes} bytes for {tokens} tokens of {per_token}")
        blocks = -(-tokens // paged.block_size)
        partial = tokens % paged.block_size != 0  # a tail ending inside a block
        out.append(Chunk(start // chunk_tokens, blocks, host_tensor(addr, nbytes), tokens if partial else None))
    return out


class HeldChunks:
    """The stored prefix of a prompt, held in L1 (unevictable) until :meth:`release`."""

    def __init__(self, handle: Any, chunks: list[Chunk]):
        self._handle = handle
        #: The held chunks, in prompt order (chunk 0 first), as host tensors over L1.
        self.chunks = chunks
        #: Tokens of the held prefix.
        self.hit_tokens: int = handle.hit_tokens

    def release(self) -> None:
        """Lets the engine evict the chunks again (after the copies reading them are done)."""
        self.chunks = []
        self._handle.release()


class ClaimedChunks:
    """Pool buffers for the chunks of a prompt not stored yet; :meth:`commit` stores them,
    :meth:`abort` gives them back."""

    def __init__(self, session: Any, chunks: list[Chunk]):
        self._session = session
        #: The claimed chunks (only the new ones), as host tensors over pool buffers to fill.
        self.chunks = chunks

    def commit(self) -> dict:
        """Checksums and stores the filled buffers; the engine's store report."""
        self.chunks = []
        return self._session.commit()

    def abort(self) -> None:
        """Releases the claims and buffers; nothing is stored."""
        self.chunks = []
        self._session.abort()


class PoolMemory:
    """An embedded engine's L1 pool as the host side of transfers, registered with CUDA
    once when ``cuda_register`` (the registration pins the whole pool: its memory is
    resident from then on)."""

    def __init__(self, engine: Any, paged: PagedLayers, chunk_tokens: int, *, cuda_register: bool):
        self._engine = engine
        self._paged = paged
        self._chunk_tokens = int(chunk_tokens)
        self._registered: int | None = None
        address, nbytes = engine.pool_region()
        #: Where the pool is mapped, and its size.
        self.region = (int(address), int(nbytes))
        if cuda_register:
            cudart = torch.cuda.cudart()
            rc = cudart.cudaHostRegister(address, nbytes, 0)
            if int(rc) != 0:
                raise RuntimeError(
                    f"cudaHostRegister of kvtier's {nbytes}-byte L1 pool failed ({rc}); use staging: pinned, "
                    "or a smaller max_local_cpu_size (the whole pool is page-locked)"
                )
            self._registered = int(address)

    @property
    def registered(self) -> bool:
        """Whether the pool is page-locked for CUDA."""
        return self._registered is not None

    def acquire(self, tokens: Any, salt: str | None) -> HeldChunks:
        """Holds the stored prefix of ``tokens`` (loading it into L1 from lower tiers)."""
        h = self._engine.acquire(tokens, salt)
        try:
            return HeldChunks(h, _chunks(self._paged, h.chunks, self._chunk_tokens))
        except Exception:
            h.release()
            raise

    def begin_store(self, tokens: Any, salt: str | None) -> ClaimedChunks:
        """Claims pool buffers for the chunks of ``tokens`` not stored yet."""
        s = self._engine.begin_store(tokens, salt)
        try:
            return ClaimedChunks(s, _chunks(self._paged, s.slots, self._chunk_tokens))
        except Exception:
            s.abort()
            raise

    def close(self) -> None:
        """Unregisters the pool from CUDA (after every copy touching it is done)."""
        if self._registered is not None:
            torch.cuda.cudart().cudaHostUnregister(self._registered)
            self._registered = None
