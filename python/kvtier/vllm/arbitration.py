"""Load or recompute: per request, load only the stored prefix whose expected load time beats
recomputing it.

Both sides of the comparison are measured online, from real work:

* the *prefill rate* (tokens per second of forward pass) from vLLM's steps: the scheduler
  knows how many tokens each step computed, the workers report how long its forward pass took
  (in the per-step connector stats, :mod:`.stats`);
* each tier's *load cost* (seconds per chunk) from the workers' loads: a load is timed and
  charged to the slowest tier it read from, per chunk read from that tier (the faster tiers'
  share is small next to it; L1 loads are charged to L1).

Both are exponential moving averages. A request's plan: its stored chunks come from known
tiers (the lookup says which); loading the first ``k`` of the ``n`` stored chunks costs the
sum of their tiers' costs, and the ``n - k`` others are recomputed at the prefill rate. The
plan takes the ``k`` with the smallest total (ties: load more). Because chunks come in tier
order (fast tiers hold the prefix more often than not), this loads an L1/disk part and
recomputes a slow remote tail when that is faster.

Modes (``kvtier.arbitration``): ``off`` loads every stored chunk; ``auto`` (default) plans
once both rates have been measured and loads everything until then; ``always`` plans from
the start, with the priors ``arbitration_prefill_tok_s`` and ``arbitration_chunk_ms`` until
measurements replace them.
"""

from __future__ import annotations

import threading

MODES = ("off", "auto", "always")

#: Weight of a new observation in the moving averages.
EMA_WEIGHT = 0.3
#: Steps computing fewer tokens say little about the prefill rate (fixed costs dominate).
MIN_STEP_TOKENS = 256


class CostModel:
    """The measured prefill rate and per-tier chunk load costs (thread safe)."""

    def __init__(self, prior_prefill_tok_s: float | None = None, prior_chunk_s: float | None = None):
        self._lock = threading.Lock()
        self.prefill_tok_s: float | None = None
        self.chunk_s: dict[int, float] = {}
        self._prior_prefill = prior_prefill_tok_s
        self._prior_chunk = prior_chunk_s

    @staticmethod
    def _ema(old: float | None, new: float) -> float:
        return new if old is None else (1.0 - EMA_WEIGHT) * old + EMA_WEIGHT * new

    def observe_step(self, tokens: int, seconds: float) -> None:
        """A forward pass computed ``tokens`` tokens in ``seconds``."""
        if tokens < MIN_STEP_TOKENS or seconds <= 0:
            return
        with self._lock:
            self.prefill_tok_s = self._ema(self.prefill_tok_s, tokens / seconds)

    def observe_load(self, tier: int, chunks: int, seconds: float) -> None:
        """``chunks`` chunks read from ``tier`` (the slowest of the load) took ``seconds``."""
        if chunks <= 0 or seconds < 0:
            return
        with self._lock:
            self.chunk_s[tier] = self._ema(self.chunk_s.get(tier), seconds / chunks)

    def rates(self, use_priors: bool) -> tuple[float | None, dict[int, float]]:
        """The prefill rate and the per-tier costs known now (with the priors if asked)."""
        with self._lock:
            rate = self.prefill_tok_s if self.prefill_tok_s is not None else (self._prior_prefill if use_priors else None)
            return rate, dict(self.chunk_s)

    def tier_cost(self, costs: dict[int, float], tier: int, use_priors: bool) -> float | None:
        """Seconds per chunk of ``tier``: measured, else the prior when allowed."""
        if tier in costs:
            return costs[tier]
        return self._prior_chunk if use_priors else None


class Arbiter:
    """Decides per request how many stored chunks to load; counts its decisions."""

    def __init__(self, mode: str, model: CostModel):
        if mode not in MODES:
            raise ValueError(f"kvtier connector: arbitration must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.model = model
        self._lock = threading.Lock()
        #: Decisions: every stored chunk loaded because loading wins (``load``), some loaded
        #: and the rest recomputed (``partial``), all recomputed (``recompute``), loaded
        #: unplanned because a rate is not measured yet (``unmeasured``) or arbitration is off.
        self.decisions = {"load": 0, "partial": 0, "recompute": 0, "unmeasured": 0, "off": 0}

    def _count(self, what: str) -> None:
        with self._lock:
            self.decisions[what] += 1

    def take_decisions(self) -> dict[str, int]:
        """The decisions counted since the last call."""
        with self._lock:
            d, self.decisions = self.decisions, dict.fromkeys(self.decisions, 0)
            return d

    def plan(self, tiers: list[int], chunk_tokens: int) -> int:
        """How many of the stored chunks (their tiers in prefix order) to load."""
        n = len(tiers)
        if n == 0:
            return 0
        if self.mode == "off":
            self._count("off")
            return n
        priors = self.mode == "always"
        rate, costs = self.model.rates(priors)
        per_chunk = [self.model.tier_cost(costs, t, priors) for t in tiers]
        if rate is None or rate <= 0 or any(c is None for c in per_chunk):
            self._count("unmeasured")
            return n
        recompute_chunk = chunk_tokens / rate
        # total(k) = load(first k) + recompute(n - k); keep the best, ties to loading more.
        best_k, best, load = 0, n * recompute_chunk, 0.0
        for k in range(1, n + 1):
            load += per_chunk[k - 1]
            total = load + (n - k) * recompute_chunk
            if total <= best:
                best_k, best = k, total
        self._count("load" if best_k == n else "recompute" if best_k == 0 else "partial")
        return best_k
