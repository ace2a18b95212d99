"""What the scheduler side tells the worker side each step (pickled between processes)."""

from __future__ import annotations

import dataclasses

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclasses.dataclass
class LoadSpec:
    """Blocks of one request to fill from kvtier before (or while) the step computes."""

    req_id: str
    tokens: list[int]  # the prompt up to the end of the last chunk to load (its tail: all of it)
    salt: str | None
    block_ids: list[int]  # vLLM blocks to fill, in prompt order (the last may be filled partly)
    first_block: int  # index (in the prompt) of block_ids[0]
    tiers: list[int] | None = None  # tier of each chunk to load (from the lookup), when known
    end: int | None = None  # fill the prompt's tokens before this one (None: all of ``tokens``)
    block_hashes: list | None = None  # KV events on: vLLM's hashes of the full blocks of ``tokens``
    group: int = 0  # vLLM's KV-cache group the blocks belong to (hybrid models)
    first_chunk: int = 0  # the first chunk to read (a sliding-window group: its window's first)
    async_load: bool = False  # the request waits for this load (reported in get_finished)

    @property
    def num_tokens(self) -> int:
        """The prompt tokens in place once the load is done."""
        return len(self.tokens) if self.end is None else self.end


@dataclasses.dataclass
class SaveSpec:
    """The chunks of one request's prompt to store once this step has computed them."""

    req_id: str
    tokens: list[int]  # the prompt's full chunks (a prefill instance: the whole prompt, tail too)
    salt: str | None
    block_ids: list[int]  # the blocks holding them, in prompt order (the last may be partial)
    block_hashes: list | None = None  # KV events on: vLLM's hashes of the full blocks of ``tokens``
    group: int = 0  # vLLM's KV-cache group the blocks belong to (hybrid models)
    first_chunk: int = 0  # chunks before this one are not stored (a sliding window's earlier ones)


@dataclasses.dataclass
class KvTierConnectorMetadata(KVConnectorMetadata):
    """One step's loads and saves."""

    loads: list[LoadSpec] = dataclasses.field(default_factory=list)
    saves: list[SaveSpec] = dataclasses.field(default_factory=list)
    num_tokens: int = 0  # tokens the step computes (all requests): the workers time it
    async_loads: list[str] = dataclasses.field(default_factory=list)  # requests waiting for this step's loads
