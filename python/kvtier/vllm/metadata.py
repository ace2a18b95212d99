"""What the scheduler side tells the worker side each step (pickled between processes)."""

from __future__ import annotations

import dataclasses

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclasses.dataclass
class LoadSpec:
    """Blocks of one request to fill from kvtier before (or while) the step computes."""

    req_id: str
    tokens: list[int]  # the prompt up to the end of the last chunk to load
    salt: str | None
    block_ids: list[int]  # vLLM blocks to fill, in prompt order
    first_block: int  # index (in the prompt) of block_ids[0]
    tiers: list[int] | None = None  # tier of each chunk to load (from the lookup), when known


@dataclasses.dataclass
class SaveSpec:
    """The full chunks of one request's prompt to store once this step has computed them."""

    req_id: str
    tokens: list[int]  # the prompt's full chunks
    salt: str | None
    block_ids: list[int]  # the blocks holding them, in prompt order


@dataclasses.dataclass
class KvTierConnectorMetadata(KVConnectorMetadata):
    """One step's loads and saves."""

    loads: list[LoadSpec] = dataclasses.field(default_factory=list)
    saves: list[SaveSpec] = dataclasses.field(default_factory=list)
    num_tokens: int = 0  # tokens the step computes (all requests): the workers time it
