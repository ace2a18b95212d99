"""kvtier: a tiered KV-cache engine for LLM serving (Python bindings).

>>> import numpy as np, kvtier
>>> eng = kvtier.Engine({"chunk_size": 4, "max_local_cpu_size": 0.01},
...                     layers=2, kv_heads=2, head_dim=4, dtype="f16")
>>> kv = np.random.rand(8 * eng.bytes_per_token // 2).astype(np.float16)
>>> eng.store(list(range(8)), kv)["stored_tokens"]
8
>>> eng.lookup(list(range(8)))
8

``Engine(config, ...)``: ``config`` is a dict of engine keys (as in the YAML file), a path
to a YAML file, or None (``KVTIER_CONFIG_FILE`` and ``KVTIER_*`` environment variables).
``{"server": "unix:/path"}`` selects a ``kvtier serve`` server instead of an embedded engine.
KV buffers are numpy arrays or CPU torch tensors of any dtype, C-contiguous, read and written
in place. Engine errors raise :class:`KvTierError` with the engine's message.
"""

from ._native import KEY_SPEC_VERSION, Engine, KvTierError, PrefetchHandle, __version__, chunk_keys

__all__ = ["Engine", "KvTierError", "PrefetchHandle", "chunk_keys", "KEY_SPEC_VERSION", "__version__"]
