"""vLLM's KV-cache groups as kvtier stores them.

With the hybrid KV cache manager (HMA) on, vLLM gives each kind of attention its own group
of layers with its own block table: full-attention layers keep a block for every token,
sliding-window layers only those of the last ``window`` tokens (the earlier ones are
vLLM's null block). kvtier keeps one identity per group (the layout tag names the group,
its kind and its layers, so the groups' keys never meet) and, for a sliding-window group,
only the chunks a hit needs: the window before a hit boundary. A prefix hit of ``b``
tokens is usable only when every full-attention group holds the chunks before ``b`` and
every sliding-window group holds those of its window before ``b`` (:func:`hybrid_hit`).

Group types kvtier cannot store (recurrent state of Mamba/linear attention, chunked local
attention, cross attention, ...) fail at start-up with the model and group named: never
wrong KV."""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any, Callable, Sequence

#: The layout tag of a model with one KV-cache group (every layer, every token).
LAYER_MAJOR = "layer-major"


@dataclasses.dataclass(frozen=True)
class KvGroup:
    """One vLLM KV-cache group: its index, kind, window and layers (vLLM's names)."""

    index: int
    count: int  # groups of the model
    kind: str  # "full" or "sliding"
    window: int  # tokens a sliding-window layer keeps: its window (and any extra retained; 0: full)
    layer_names: tuple[str, ...]
    block_size: int = 0  # vLLM's block size in this group (0: not given)

    @property
    def sliding(self) -> bool:
        """Whether only the window before a hit boundary is stored and loaded."""
        return self.kind == "sliding"

    def layout_tag(self) -> str:
        """The identity's layout tag: the default for a single group; otherwise it names the
        group and the model layers it holds, so each group has keys of its own."""
        if self.count == 1 and not self.sliding:
            return LAYER_MAJOR
        layers = ",".join(str(layer_number(n)) for n in self.layer_names)
        kind = f"sliding{self.window}" if self.sliding else "full"
        return f"{LAYER_MAJOR};kv-group={self.index}/{self.count};{kind};layers={layers}"

    def window_start(self, boundary: int, chunk: int) -> int:
        """The first chunk a hit ending at token ``boundary`` needs from this group: 0 for
        full attention; for a sliding window, the chunk holding token ``boundary - window + 1``
        (vLLM keeps the blocks of the last ``window - 1`` tokens before a hit boundary)."""
        return self.skipped_tokens(boundary) // chunk

    def window_chunks(self, boundaries: Sequence[int], chunk: int) -> set[int]:
        """The chunks this group stores so that a hit may end at any of ``boundaries``:
        every chunk before the last for full attention; for a sliding window, the window
        before each boundary."""
        if not boundaries:
            return set()
        if not self.sliding:
            return set(range(max(boundaries) // chunk))
        return {i for b in boundaries for i in range(self.window_start(b, chunk), b // chunk)}

    def skipped_tokens(self, computed: int) -> int:
        """The leading tokens whose blocks vLLM has given back (its null block in their
        place) once ``computed`` tokens are computed: none for full attention."""
        if not self.sliding:
            return 0
        return max(0, computed - self.window + 1)


def group_identity(identity: dict, group: KvGroup) -> dict:
    """The engine identity of one group: the model's, with the group's layout tag and
    layer count (a single group keeps the model's identity as it is)."""
    if group.count == 1 and not group.sliding:
        return identity
    out = copy.deepcopy(identity)
    out["layout"]["tag"] = group.layout_tag()
    out["layout"]["groups"][0]["num_layers"] = len(group.layer_names)
    return out


def layer_number(name: str) -> int:
    """The layer index in a vLLM layer name (``model.layers.12.self_attn.attn`` -> 12)."""
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else 0


def layer_order(name: str) -> tuple[int, str]:
    """A sort key putting vLLM layer names in model order."""
    return (layer_number(name), name)


def kv_groups(kv_cache_config: Any, model: str) -> list[KvGroup]:
    """The model's KV-cache groups (one full-attention group when vLLM gives no config).
    ValueError naming the model and the group for a kind kvtier cannot store."""
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    if not groups:
        return [KvGroup(0, 1, "full", 0, ())]
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    try:
        from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs
    except ImportError:  # pragma: no cover - older vLLM
        UniformTypeKVCacheSpecs = ()
    out = []
    for i, g in enumerate(groups):
        spec = g.kv_cache_spec
        if UniformTypeKVCacheSpecs and isinstance(spec, UniformTypeKVCacheSpecs):
            spec = spec.first_spec
        names = tuple(sorted(g.layer_names, key=layer_order))
        bs = int(getattr(spec, "block_size", 0) or 0)
        if isinstance(spec, SlidingWindowSpec):
            # Extra retained tokens (multi-token prediction) stay allocated below the window.
            keep = int(spec.sliding_window) + int(getattr(spec, "extra_retained_tokens", 0) or 0)
            out.append(KvGroup(i, len(groups), "sliding", keep, names, bs))
        elif isinstance(spec, FullAttentionSpec):
            # A block for every prompt token (MLA, sinks too). With HMA off a sliding-window
            # layer is one of these: it keeps every token (spec.sliding_window is only a note
            # for the model runner).
            out.append(KvGroup(i, len(groups), "full", 0, names, bs))
        else:
            raise ValueError(
                f"kvtier connector: model {model}: KV-cache group {i} ({type(spec).__name__}, layers "
                f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}) is not supported: kvtier stores "
                "full-attention and sliding-window attention KV only (not recurrent/Mamba state, chunked "
                "local or cross attention). Serve this model without the kvtier connector"
            )
    return out


def window_boundaries(n_save: int, usable: int, checkpoint: int) -> list[int]:
    """Where a stored prompt lets later hits end, so where its sliding-window groups keep
    the window before: the last full chunk (a longer prompt extending it), the last before
    its final token (its repeat), and every multiple of ``checkpoint`` tokens (a prompt
    sharing only a prefix of it; 0: none)."""
    out = {b for b in (usable, n_save) if b > 0}
    if checkpoint > 0:
        out.update(range(checkpoint, n_save + 1, checkpoint))
    return sorted(out)


def hybrid_hit(groups: Sequence[KvGroup], lookup: Callable[[KvGroup, int, int], int], n_tokens: int,
               chunk: int, checkpoint: int = 0) -> int:
    """The longest chunk-aligned prefix, at most ``n_tokens`` long, that every group can
    load: ``lookup(group, boundary, first_chunk)`` answers how far (absolute token) the
    group's stored chunks run contiguously from ``first_chunk`` within the first
    ``boundary`` tokens. Full-attention groups bound the hit from the start of the prompt;
    each sliding-window group then needs the chunks of its window before the boundary,
    which exist where a stored prompt ended (:func:`window_boundaries`): the bound itself
    is tried, then the multiples of ``checkpoint`` below it, longest first (a handful of
    lookups, not one per chunk)."""
    b = (n_tokens // chunk) * chunk
    for g in groups:
        if not g.sliding and b > 0:
            b = min(b, (lookup(g, b, 0) // chunk) * chunk)
    if b <= 0:
        return 0
    candidates = [b]
    if checkpoint > 0:
        candidates += range((b - 1) // checkpoint * checkpoint, 0, -checkpoint)
    for c in candidates:
        if all(lookup(g, c, g.window_start(c, chunk)) >= c for g in groups if g.sliding):
            return c
    return 0


def check_hybrid(groups: Sequence[KvGroup], settings: Any, model: str) -> None:
    """ValueError (naming the model and what to change) for the settings a hybrid model
    cannot run with yet."""
    if not is_hybrid(groups):
        return
    kinds = ", ".join(f"{g.index}: {g.kind}{g.window if g.sliding else ''}" for g in groups)
    what = f"kvtier connector: model {model} runs with {len(groups)} KV-cache groups ({kinds})"
    if settings.disaggregated:
        raise ValueError(f"{what}: prefill/decode disaggregation ({settings.kv_role}) is not supported for it "
                         "yet; start vLLM with --disable-hybrid-kv-cache-manager to hand over every layer's KV")
    if settings.staging == "pool":
        raise ValueError(f"{what}: staging 'pool' is not supported for it; use staging: pinned (the default)")
    for g in groups:
        if g.block_size and g.block_size != settings.block_size:
            raise ValueError(f"{what}: group {g.index} has blocks of {g.block_size} tokens, not the "
                             f"configured {settings.block_size}; kvtier needs one block size for every group")


def is_hybrid(groups: Sequence[KvGroup]) -> bool:
    """Whether the hybrid KV cache manager gave the model more than one group (or a group
    that keeps only a window): loads then go group by group, asynchronously."""
    return len(groups) > 1 or any(g.sliding for g in groups)


class HybridEngines:
    """The engines of a hybrid model's groups (one identity each, over the same tiers),
    answering lookups as one engine: the prefix every group can load (:func:`hybrid_hit`).
    Everything else (stats, flush, ...) is the cache's, so the first engine answers."""

    def __init__(self, groups: Sequence[KvGroup], engines: Sequence[Any], chunk: int, checkpoint: int = 0):
        self.groups = list(groups)
        self.engines = list(engines)
        self.chunk = chunk
        self.checkpoint = checkpoint  # tokens between the windows stored for prefix hits

    def lookup(self, tokens: Sequence[int], salt: str | None = None) -> int:
        """The longest chunk-aligned prefix of ``tokens`` every group can load."""
        def group_lookup(g: KvGroup, boundary: int, first_chunk: int) -> int:
            return int(self.engines[g.index].lookup(tokens[:boundary], salt, first_chunk=first_chunk))

        return hybrid_hit(self.groups, group_lookup, len(tokens), self.chunk, self.checkpoint)

    def lookup_detail(self, tokens: Sequence[int], salt: str | None = None) -> dict:
        """:meth:`lookup`'s answer in ``lookup_detail``'s shape; no tier per chunk (a
        hybrid load is not split by tier)."""
        hit = self.lookup(tokens, salt)
        return {"hit_tokens": hit, "hit_chunks": hit // self.chunk, "tiers": [], "start_token": 0}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engines[0], name)
