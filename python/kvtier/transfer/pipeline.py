"""Per-layer pipelined copies between host chunks and the paged caches, ordered against the
compute stream.

Ordering model (each arrow is an event recorded on one stream and waited on by the other):

*Loads* (host chunks -> cache blocks), on the load stream::

    compute: record(start)                      # in start_load_kv, before the forward pass
    load:    wait(start)                        # the blocks' previous users are done
    load:    [H2D chunks -> device buffer]      # CUDA only: one DMA per run of chunks
    load:    scatter layer 0; record(ev[0])     # ready[0] set once issued
    load:    scatter layer 1; record(ev[1]) ...
    compute: wait(ev[i])                        # in wait_for_layer_load(i), before attention i

*Saves* (cache blocks -> host chunks), on the save stream::

    compute: record(ev_i)                       # in save_kv_layer(i): layer i is computed
    save:    wait(ev_i); gather layer i         # into the device buffer (CUDA) or the host
    ...
    save:    [D2H device buffer -> host chunks]; record(done)
    host:    synchronize(done)                  # in wait_for_save, before the engine stores

The host memory of a step (staging buffer, held or claimed pool chunks) is reused or
released only after the host has synchronised with the last copy using it
(:meth:`LoadStep.finish`, :meth:`SaveStep.finish`). Device buffers belong to their side
stream, so their memory is only ever reused in that stream's order.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

import torch

from .paged import Chunk, PagedLayers, Piece

DEFAULT_DEVICE_STAGING_BYTES = 256 << 20


@dataclasses.dataclass
class LoadPlan:
    """Host chunks of one request to copy into cache blocks: request blocks
    ``first .. first + len(block_ids)`` go to the cache blocks ``block_ids``; with ``end``
    (a request token inside the last block), only the tokens before it (the rest of that
    block is the forward pass's to compute)."""

    chunks: list[Chunk]
    first: int
    block_ids: Sequence[int]
    end: int | None = None


@dataclasses.dataclass
class SavePlan:
    """Host chunks of one request to fill from its cache blocks: chunk ``c`` gets the
    request blocks ``c.index * blocks_per_chunk ..`` whose cache blocks are listed in
    ``block_ids`` (all the request's blocks in prompt order; the chunks may be any of them)."""

    chunks: list[Chunk]
    block_ids: Sequence[int]


class Transfer:
    """Moves chunk payloads between host memory and a model's paged caches, one layer at a
    time, on two side streams (loads, saves) ordered against the compute stream with events.
    ``streams`` is a :mod:`.streams` implementation for the caches' device. Through CUDA,
    copies go through device buffers of at most ``device_staging_bytes`` per direction
    (bigger steps are copied in groups)."""

    def __init__(self, paged: PagedLayers, streams: Any, *, device_staging_bytes: int = DEFAULT_DEVICE_STAGING_BYTES):
        self.paged = paged
        self.streams = streams
        self.device_staging_bytes = int(device_staging_bytes)
        self.load_stream = streams.new_stream()
        self.save_stream = streams.new_stream()
        self._bufs: dict[str, torch.Tensor] = {}

    def begin_load(self) -> "LoadStep":
        """Starts a step's loads (on the compute thread, before the forward pass)."""
        return LoadStep(self)

    def begin_save(self, plans: Sequence[SavePlan]) -> "SaveStep":
        """Starts a step's saves (on the compute thread)."""
        return SaveStep(self, plans)

    def close(self) -> None:
        """Drops the device buffers and stops the streams' threads (after the last finish)."""
        self._bufs.clear()
        close = getattr(self.streams, "close", None)
        if close is not None:
            close()

    # -- helpers for the steps ---------------------------------------------------------------

    def _buffer(self, kind: str, stream: Any, nbytes: int) -> torch.Tensor:
        """The device buffer of one direction, grown to ``nbytes`` (the old one is freed in
        its stream's order)."""
        buf = self._bufs.get(kind)
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[kind] = self.streams.empty(nbytes, stream)
        return buf

    def _ids(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Host int64 block ids, checked against the caches."""
        ids = torch.as_tensor(list(block_ids), dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.paged.num_blocks):
            raise ValueError(
                f"block ids must be in 0..{self.paged.num_blocks - 1}, got {int(ids.min())}..{int(ids.max())}"
            )
        return ids

    def _groups(self, chunks: Sequence[Chunk]) -> list[list[int]]:
        """Indices of ``chunks`` in consecutive groups of at most device_staging_bytes each
        (a chunk larger than that is a group on its own)."""
        groups: list[list[int]] = []
        size = 0
        for i, c in enumerate(chunks):
            n = c.buf.numel() * c.buf.element_size()
            if not groups or size + n > self.device_staging_bytes:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += n
        return groups


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _device_chunks(chunks: Sequence[Chunk], buf: torch.Tensor) -> list[Chunk]:
    """The chunks' twins, back to back in the device byte buffer ``buf``."""
    out, off = [], 0
    for c in chunks:
        n = _nbytes(c.buf)
        out.append(dataclasses.replace(c, buf=buf[off : off + n]))
        off += n
    return out


def _copy_runs(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """``dst[i] <- src[i]`` byte for byte, non-blocking, one copy per run of buffers lying
    back to back on both sides (a staging buffer's chunks are one DMA)."""
    i = 0
    while i < len(dst):
        d0, s0 = dst[i].view(torch.uint8), src[i].view(torch.uint8)
        n = _nbytes(d0)
        d_end, s_end = d0.data_ptr() + n, s0.data_ptr() + n
        j = i + 1
        while j < len(dst):
            d, s = dst[j].view(torch.uint8), src[j].view(torch.uint8)
            same = (
                d.data_ptr() == d_end
                and s.data_ptr() == s_end
                and d.untyped_storage().data_ptr() == d0.untyped_storage().data_ptr()
                and s.untyped_storage().data_ptr() == s0.untyped_storage().data_ptr()
            )
            if not same:
                break
            d_end += _nbytes(d)
            s_end += _nbytes(s)
            n += _nbytes(d)
            j += 1
        if j == i + 1:
            d0.copy_(s0, non_blocking=True)
        else:
            d0.as_strided((n,), (1,), d0.storage_offset()).copy_(
                s0.as_strided((n,), (1,), s0.storage_offset()), non_blocking=True
            )
        i = j


class LoadStep:
    """One step's loads. Made on the compute thread; :meth:`issue` may run on another thread
    (e.g. after a slow retrieval) while the forward pass waits per layer."""

    def __init__(self, xfer: Transfer):
        self._x = xfer
        s = xfer.streams
        self._start = s.event()
        s.record(self._start, s.compute())
        n = xfer.paged.num_layers
        #: ``ready[i]`` is set once layer i's copies are issued (or nothing will be).
        self.ready = [threading.Event() for _ in range(n)]
        self._events: list[Any] = [None] * n
        self._done: Any = None
        self._issued = False

    def issue(self, plans: Sequence[LoadPlan]) -> None:
        """Issues the copies of every plan, layer by layer, marking each layer ready. Once
        per step; on an error the layers not issued are marked ready with nothing to wait
        for (the caller reports their blocks as failed)."""
        if self._issued:
            raise RuntimeError("LoadStep.issue called twice")
        self._issued = True
        try:
            self._issue(plans)
        finally:
            for r in self.ready:
                r.set()

    def abort(self) -> None:
        """Nothing will be loaded: lets the forward pass through."""
        self._issued = True
        for r in self.ready:
            r.set()

    def _issue(self, plans: Sequence[LoadPlan]) -> None:
        x, s, paged = self._x, self._x.streams, self._x.paged
        pieces: list[Piece] = []
        ids_list: list[int] = []
        for plan in plans:
            n = len(plan.block_ids)
            if n:
                pieces += paged.pieces(plan.chunks, plan.first, n, plan.end)
                ids_list += list(plan.block_ids)
        if not pieces:
            return
        ids = x._ids(ids_list)
        stream = x.load_stream
        s.wait(stream, self._start)
        L = paged.num_layers
        if not s.device_staging:
            for li in range(L):
                s.launch(stream, f"scatter {li}", lambda li=li: paged.scatter_layer_from(li, pieces, ids))
                self._mark(li, stream)
            return
        # One chunk per piece: group the pieces so each group's chunks fit the device buffer.
        groups = x._groups([p.chunk for p in pieces])
        buf = x._buffer("load", stream, max(sum(_nbytes(pieces[i].chunk.buf) for i in g) for g in groups))
        dev_ids: dict[str, torch.Tensor] = {}
        s.launch(stream, "index", lambda: dev_ids.__setitem__("ids", s.index(ids)))
        off = 0
        for gi, g in enumerate(groups):
            host = [pieces[i].chunk for i in g]
            dev = _device_chunks(host, buf)
            dev_pieces = [dataclasses.replace(pieces[i], chunk=d) for d, i in zip(dev, g)]
            n = sum(p.hi - p.lo for p in dev_pieces)
            s.launch(stream, f"h2d {gi}", lambda dev=dev, host=host: _copy_runs([d.buf for d in dev], [h.buf for h in host]))
            last = gi == len(groups) - 1
            for li in range(L):
                s.launch(
                    stream,
                    f"scatter {li}",
                    lambda li=li, dp=dev_pieces, o=off, n=n: paged.scatter_layer_from(li, dp, dev_ids["ids"][o : o + n]),
                )
                if last:
                    self._mark(li, stream)
            off += n

    def _mark(self, li: int, stream: Any) -> None:
        s = self._x.streams
        ev = s.event()
        s.record(ev, stream)
        self._events[li] = ev
        self._done = ev
        self.ready[li].set()

    def wait_layer(self, layer: int) -> None:
        """On the compute thread: returns once layer ``layer``'s copies are issued and makes
        the compute stream wait for them."""
        self.ready[layer].wait()
        ev = self._events[layer]
        if ev is not None:
            s = self._x.streams
            s.wait(s.compute(), ev)

    def wait_all(self) -> None:
        """:meth:`wait_layer` for every layer."""
        for li in range(len(self.ready)):
            self.wait_layer(li)

    def finish(self) -> None:
        """Blocks the host until every copy of the step is done (its host memory can then be
        reused or released)."""
        for r in self.ready:
            r.wait()
        if self._done is not None:
            self._x.streams.synchronize(self._done)


class SaveStep:
    """One step's saves: layers are staged as they are computed (:meth:`stage_layer`), the
    rest and the device-to-host copies in :meth:`finish`."""

    def __init__(self, xfer: Transfer, plans: Sequence[SavePlan]):
        self._x = xfer
        paged = xfer.paged
        bpc = paged.blocks_per_chunk
        self._host: list[Chunk] = []
        ids_list: list[int] = []
        for plan in plans:
            for c in plan.chunks:
                b0 = c.index * bpc
                blk = list(plan.block_ids[b0 : b0 + c.blocks])
                if len(blk) != c.blocks:
                    raise ValueError(f"chunk {c.index} needs blocks {b0}..{b0 + c.blocks}, the request has {len(plan.block_ids)}")
                self._host.append(c)
                ids_list += blk
        self._ids = xfer._ids(ids_list)
        self._dev_ids: dict[str, torch.Tensor] = {}
        #: Layers staged so far.
        self.staged: set[int] = set()
        s = xfer.streams
        self._stream = xfer.save_stream
        total = sum(_nbytes(c.buf) for c in self._host)
        # Layer by layer only when the whole step fits the device buffer (else: in finish).
        self._early = bool(self._host) and (not s.device_staging or total <= xfer.device_staging_bytes)
        self._dev: list[Chunk] | None = None
        if self._early and s.device_staging:
            self._dev = _device_chunks(self._host, xfer._buffer("save", self._stream, total))

    @property
    def empty(self) -> bool:
        """Nothing to save."""
        return not self._host

    def stage_layer(self, layer: int) -> bool:
        """On the compute thread, once layer ``layer`` is computed: queues its gather behind
        the compute stream's work so far. False when it is left to :meth:`finish`."""
        if not self._early or layer in self.staged:
            return False
        s = self._x.streams
        ev = s.event()
        s.record(ev, s.compute())
        s.wait(self._stream, ev)
        self._launch_index()
        dst = self._dev if self._dev is not None else self._host
        paged, ids = self._x.paged, self._dev_ids
        s.launch(self._stream, f"gather {layer}", lambda: paged.gather_layer_into(layer, dst, ids["ids"]))
        self.staged.add(layer)
        return True

    def _launch_index(self) -> None:
        if "issued" in self._dev_ids:
            return
        self._dev_ids["issued"] = self._ids
        s, ids = self._x.streams, self._ids
        self._x.streams.launch(self._stream, "index", lambda: self._dev_ids.__setitem__("ids", s.index(ids)))

    def finish(self) -> list[int]:
        """On the compute thread: stages the layers not staged yet, copies to the host and
        waits for it all; afterwards the host chunks hold the payloads. Returns the layers
        staged here."""
        if not self._host:
            return []
        x, s, paged = self._x, self._x.streams, self._x.paged
        late = [li for li in range(paged.num_layers) if li not in self.staged]
        if self._early:
            if late:  # one wait and one launch for all of them (the forward pass is over)
                ev = s.event()
                s.record(ev, s.compute())
                s.wait(self._stream, ev)
                self._launch_index()
                dst, ids = self._dev if self._dev is not None else self._host, self._dev_ids

                def gather_late():
                    for li in late:
                        paged.gather_layer_into(li, dst, ids["ids"])

                s.launch(self._stream, "gather late", gather_late)
                self.staged.update(late)
            if self._dev is not None:
                dev, host = self._dev, self._host
                s.launch(self._stream, "d2h", lambda: _copy_runs([h.buf for h in host], [d.buf for d in dev]))
        else:
            # Too big for the device buffer: gather and copy out group by group (the stream
            # orders each group's gathers after the previous group's copy out of the buffer).
            ev = s.event()
            s.record(ev, s.compute())
            s.wait(self._stream, ev)
            self._launch_index()
            groups = x._groups(self._host)
            buf = x._buffer("save", self._stream, max(sum(_nbytes(self._host[i].buf) for i in g) for g in groups))
            off = 0
            for gi, g in enumerate(groups):
                host = [self._host[i] for i in g]
                dev = _device_chunks(host, buf)
                n = sum(c.blocks for c in host)

                def gather_all(dev=dev, o=off, n=n):
                    for li in range(paged.num_layers):
                        paged.gather_layer_into(li, dev, self._dev_ids["ids"][o : o + n])

                s.launch(self._stream, f"gather group {gi}", gather_all)
                s.launch(self._stream, f"d2h {gi}", lambda dev=dev, host=host: _copy_runs([h.buf for h in host], [d.buf for d in dev]))
                off += n
            self.staged.update(late)
        done = s.event()
        s.record(done, self._stream)
        s.synchronize(done)
        return late
