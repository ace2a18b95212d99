"""Lookups across processes, without blocking vLLM's scheduler.

In embedded mode the KV lives in the worker processes, while vLLM asks the scheduler-side
connector (in the EngineCore process) how many tokens are stored. Each worker serves lookups
of its engine on a private Unix socket (:class:`LookupServer`,
``<lookup_socket_dir>/kvtier-<hash of engine id>-<rank>.sock``, mode 0600, authenticated
with a key derived from the engine id); the scheduler asks every rank and takes the minimum
(:class:`RankClients`). :func:`worker_call` is the same channel for tests and operators.

:class:`AsyncLookups` runs lookups on a small thread pool: the scheduler waits for answers
at most a budget per scheduler step (shared by the requests asked in that step), and a lookup
unanswered past its deadline counts as a miss.
"""

from __future__ import annotations

import array
import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Listener
from typing import Any

logger = logging.getLogger("vllm.kvtier")


def socket_path(sock_dir: str | None, engine_id: str, rank: int) -> str:
    """The lookup socket of one worker rank."""
    d = sock_dir or tempfile.gettempdir()
    tag = hashlib.sha256(engine_id.encode()).hexdigest()[:16]
    return os.path.join(str(d), f"kvtier-{tag}-{rank}.sock")


def authkey(engine_id: str) -> bytes:
    """The shared key of one vLLM instance's lookup sockets."""
    return hashlib.sha256(b"kvtier-lookup:" + engine_id.encode()).digest()


def lookup_with_tiers(engine: Any, tokens: list[int], salt: str | None) -> tuple[int, list[int]]:
    """An engine's (or server client's) stored prefix and the tier of each of its chunks."""
    d = engine.lookup_detail(tokens, salt)
    return int(d["hit_tokens"]), list(d["tiers"])


def pack_tokens(tokens: list[int]) -> bytes:
    """Token ids as u32 bytes (a fraction of a pickled list)."""
    return array.array("I", tokens).tobytes()


def unpack_tokens(payload: bytes) -> list[int]:
    """The inverse of :func:`pack_tokens`."""
    toks = array.array("I")
    toks.frombytes(payload)
    return toks.tolist()


class LookupServer:
    """Answers the scheduler's lookups from a worker's embedded engine (daemon threads: one
    accepting, one per connection). Requests are ``(op, payload, salt)``, answers
    ``("ok", value)`` or ``("err", message)``. ``before`` runs before every question about
    the engine's contents (the worker waits there for its stores in flight)."""

    def __init__(self, engine: Any, path: str, key: bytes, info: Callable[[], dict] | None = None,
                 before: Callable[[], None] | None = None):
        self.engine = engine
        self.info = info or dict
        self.before = before
        self.path = path
        if os.path.exists(path):
            os.unlink(path)
        self.listener: Listener | None = Listener(path, family="AF_UNIX", authkey=key)
        os.chmod(path, 0o600)
        threading.Thread(target=self._accept, name="kvtier-lookup", daemon=True).start()

    def _accept(self):
        while True:
            listener = self.listener
            if listener is None:
                return
            try:
                conn = listener.accept()
            except Exception:  # listener closed, or a client failed authentication
                if self.listener is None:
                    return
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _answer(self, op: str, payload: Any, salt: str | None) -> Any:
        if self.before is not None and op in ("lookup", "lookup_detail", "stats", "flush"):
            self.before()
        if op == "lookup":
            return self.engine.lookup(unpack_tokens(payload), salt)
        if op == "lookup_detail":
            return lookup_with_tiers(self.engine, unpack_tokens(payload), salt)
        if op == "stats":
            return self.engine.stats()
        if op == "flush":
            return self.engine.flush(float(payload or 30.0))
        if op == "chunk_keys":
            return self.engine.chunk_keys(list(payload), salt)
        if op == "connector":
            return self.info()
        if op == "identity":
            return self.engine.identity()
        raise ValueError(f"unknown op {op!r}")

    def _serve(self, conn):
        with conn:
            while True:
                try:
                    op, payload, salt = conn.recv()
                except (EOFError, OSError):
                    return
                try:
                    conn.send(("ok", self._answer(op, payload, salt)))
                except (EOFError, OSError):
                    return  # the client went away (e.g. it gave up on a slow lookup)
                except Exception as e:  # answer with the error, keep serving
                    try:
                        conn.send(("err", str(e)))
                    except OSError:
                        return

    def close(self):
        """Stops accepting and removes the socket file."""
        listener, self.listener = self.listener, None
        try:
            if listener is not None:
                listener.close()
            os.unlink(self.path)
        except OSError:
            pass


def worker_call(engine_id: str, op: str, payload: Any = None, salt: str | None = None,
                rank: int = 0, lookup_socket_dir: str | None = None) -> Any:
    """Asks a running worker's connector (embedded mode) for ``stats`` (engine),
    ``connector`` (loaded/saved tokens, load failures), ``flush``,
    ``chunk_keys`` (payload: tokens), ``identity`` or ``lookup`` (payload: tokens).
    For tests and operators; ``engine_id`` is the ``--kv-transfer-config`` engine_id."""
    path = socket_path(lookup_socket_dir, engine_id, rank)
    with Client(path, family="AF_UNIX", authkey=authkey(engine_id)) as c:
        c.send((op, pack_tokens(payload) if op == "lookup" else payload, salt))
        status, val = c.recv()
    if status != "ok":
        raise RuntimeError(val)
    return val


class RankClients:
    """The scheduler's connections to the workers' lookup sockets, one set per lookup
    thread (a request and its answer must not interleave with another thread's)."""

    def __init__(self, engine_id: str, num_ranks: int, sock_dir: str | None, connect_timeout_s: float,
                 detail: bool = False):
        self._detail = detail  # answers carry the tier of each stored chunk
        self._engine_id = engine_id
        self._num_ranks = num_ranks
        self._sock_dir = sock_dir
        self._connect_timeout_s = connect_timeout_s
        self._tls = threading.local()

    def _client(self, rank: int):
        clients = getattr(self._tls, "clients", None)
        if clients is None:
            clients = self._tls.clients = {}
        c = clients.get(rank)
        if c is None:
            path = socket_path(self._sock_dir, self._engine_id, rank)
            deadline = time.monotonic() + self._connect_timeout_s
            while True:  # the workers may not have registered their caches yet
                try:
                    c = Client(path, family="AF_UNIX", authkey=authkey(self._engine_id))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            clients[rank] = c
        return c

    def _drop(self) -> None:
        # After a timeout or an error a connection may still owe an answer: never reuse it.
        for c in getattr(self._tls, "clients", {}).values():
            try:
                c.close()
            except OSError:
                pass
        self._tls.clients = {}

    def lookup(self, tokens: list[int], salt: str | None, deadline: float) -> int | tuple[int, list[int]]:
        """The minimum over the ranks of their stored prefix (with ``detail``: and the tier
        of each of its chunks, the slowest over the ranks). The question goes to every rank
        before any answer is read, so the ranks look up in parallel. TimeoutError when a rank
        has not answered by ``deadline`` (monotonic)."""
        payload = pack_tokens(tokens)
        op = "lookup_detail" if self._detail else "lookup"
        try:
            conns = []
            for r in range(self._num_ranks):
                c = self._client(r)
                c.send((op, payload, salt))
                conns.append((r, c))
            best: int | None = None
            tiers: list[int] | None = None
            for r, c in conns:
                if not c.poll(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"worker rank {r} did not answer the lookup before its deadline")
                status, val = c.recv()
                if status != "ok":
                    raise RuntimeError(f"worker rank {r}: {val}")
                hit, rank_tiers = (int(val[0]), list(val[1])) if self._detail else (int(val), None)
                best = hit if best is None else min(best, hit)
                if rank_tiers is not None:
                    tiers = rank_tiers if tiers is None else [max(a, b) for a, b in zip(tiers, rank_tiers)]
            if not self._detail:
                return best or 0
            return best or 0, tiers or []
        except BaseException:
            self._drop()
            raise


@dataclasses.dataclass
class PendingLookup:
    """A lookup issued and not yet consumed by the scheduler."""

    future: concurrent.futures.Future
    deadline: float  # monotonic time after which it counts as a miss
    deferred: bool = False  # answered "ask again later" at least once


class AsyncLookups:
    """Lookups on a thread pool, answered within a per-step blocking budget.

    ``lookup(tokens, salt, deadline)`` is the blocking lookup (a rank query or a server
    client's); any error it raises is a miss. Counters in :attr:`stats`: ``sync`` (answered
    in the step that asked), ``late`` (answered in a later step), ``deferred`` (times a
    request was told to ask again), ``expired`` (misses past their deadline).
    """

    def __init__(self, lookup: Callable[[list[int], str | None, float], int], threads: int,
                 budget_s: float, deadline_s: float):
        self._lookup = lookup
        self._threads = threads
        self._budget_s = budget_s
        self._deadline_s = deadline_s
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._step_wait_left = budget_s  # blocking left in this scheduler step
        self._warned_deadline = False
        self._logged_deferred = False
        self.stats = {"sync": 0, "deferred": 0, "late": 0, "expired": 0}

    def _run(self, tokens: list[int], salt: str | None, deadline: float) -> int:
        """Runs on a lookup thread. Any failure is a miss, never a failed request."""
        try:
            return self._lookup(tokens, salt, deadline)
        except TimeoutError as e:
            # The scheduler has already counted this request a miss (its deadline is
            # earlier); this only retires the thread and its connections.
            logger.debug("kvtier lookup abandoned: %s", e)
            return 0
        except Exception as e:
            logger.warning("kvtier lookup failed, treating as a miss: %s", e)
            return 0

    def submit(self, tokens: list[int], salt: str | None) -> PendingLookup:
        """Starts a lookup; its deadline starts now."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="kvtier-lookup")
        deadline = time.monotonic() + self._deadline_s
        # The lookup thread gives up a little after the scheduler stops waiting.
        fut = self._pool.submit(self._run, tokens, salt, deadline + 1.0)
        return PendingLookup(fut, deadline)

    def answer(self, p: PendingLookup, req_id: str) -> int | None:
        """The stored prefix (0 for a miss past the deadline), or None when it is not known
        yet (vLLM asks again next step). Blocks at most what is left of this step's budget."""
        fut = p.future
        now = time.monotonic()
        wait = min(self._step_wait_left, p.deadline - now)
        if not fut.done() and wait > 0:
            concurrent.futures.wait([fut], timeout=wait)
            self._step_wait_left = max(0.0, self._step_wait_left - (time.monotonic() - now))
        if fut.done():
            self.stats["late" if p.deferred else "sync"] += 1
            return fut.result()
        if time.monotonic() >= p.deadline:
            fut.cancel()  # a queued lookup never runs; a running one is left to finish
            self.stats["expired"] += 1
            if not self._warned_deadline:
                self._warned_deadline = True
                logger.warning(
                    "kvtier: a lookup took longer than lookup_deadline_s=%.3g s (request %s); "
                    "such requests are treated as misses and recomputed (warned once)",
                    self._deadline_s,
                    req_id,
                )
            return 0
        p.deferred = True
        self.stats["deferred"] += 1
        if not self._logged_deferred:
            self._logged_deferred = True
            logger.info(
                "kvtier: lookup of request %s is slower than lookup_budget_ms=%.3g: answering "
                "asynchronously (the scheduler asks again next step)",
                req_id,
                self._budget_s * 1000.0,
            )
        return None

    def new_step(self) -> None:
        """A new scheduler step: a fresh blocking budget."""
        self._step_wait_left = self._budget_s

    def shutdown(self) -> None:
        """Drops queued lookups; running ones finish on their own."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
