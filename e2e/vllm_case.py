"""One vLLM process of the end-to-end test (called by vllm_e2e.py).

Usage: vllm_case.py SPEC.json RESULT.json. SPEC: {"model", "connector": "none"|"kvtier"|
"example", "extra": {...}, "engine_id", "prompts": {name: [token ids]}, "steps": [[label,
prompt name or a list of names (one batch: vLLM schedules them together), max_tokens(,
{"kv_transfer_params": {...}})], ...], "kv_role", "keys_of": prompt name or null, "llm": {extra LLM(...)
keyword arguments, e.g. disable_hybrid_kv_cache_manager: false}, "logprobs": top-k or 0,
"warmup": false to skip the warm-up, "l1_after": true to record
the L1 tier's stored bytes and chunks after each step (embedded), "kv_events": a loopback port to publish vLLM's KV events on,
collected here and decoded with vLLM's own types}. RESULT: per step the token ids, the sampled tokens'
logprobs (when asked), num_cached_tokens and wall seconds, plus the kvtier worker's stats."""

import json
import os
import sys
import time


def since(after, before):
    """Counters ``after`` minus ``before`` (nested dicts too); worst cases are kept as they are."""
    out = {}
    for k, v in after.items():
        b = (before or {}).get(k)
        if isinstance(v, dict):
            out[k] = since(v, b if isinstance(b, dict) else {})
        elif isinstance(v, (int, float)) and not k.startswith("max") and isinstance(b, (int, float)):
            out[k] = v - b
        else:
            out[k] = v
    return out


class EventSubscriber:
    """Collects the KV-event batches vLLM publishes on ``port`` and decodes each with vLLM's
    own msgspec ``KVEventBatch`` (what routers' decoders mirror)."""

    def __init__(self, port: int):
        import threading

        import zmq

        self.batches, self.decode_failures, self.events = 0, 0, []
        self.last_arrival = time.monotonic()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.RCVTIMEO, 200)
        self._sock.bind(f"tcp://127.0.0.1:{port}")
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import msgspec
        import zmq
        from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch

        dec = msgspec.msgpack.Decoder(type=KVEventBatch)

        def h(x):  # a block hash: 64-bit int (vLLM's default) or bytes
            return x.hex() if isinstance(x, bytes) else str(x)

        while not self._stop:
            try:
                _topic, _seq, payload = self._sock.recv_multipart()
            except zmq.Again:
                continue
            self.batches += 1
            self.last_arrival = time.monotonic()
            try:
                batch = dec.decode(payload)
            except Exception:
                self.decode_failures += 1
                continue
            for e in batch.events:
                if isinstance(e, BlockStored):
                    self.events.append({"type": "stored", "medium": e.medium, "hashes": [h(x) for x in e.block_hashes],
                                        "parent": None if e.parent_block_hash is None else h(e.parent_block_hash),
                                        "token_ids": list(e.token_ids), "block_size": e.block_size})
                elif isinstance(e, BlockRemoved):
                    self.events.append({"type": "removed", "medium": e.medium, "hashes": [h(x) for x in e.block_hashes]})
                else:
                    self.events.append({"type": "cleared"})

    def settle(self, quiet_s: float = 0.15) -> int:
        """Waits until no batch arrived for ``quiet_s`` (the previous request's events have
        landed: vLLM publishes them with the step that produced them); returns how many
        events were received so far."""
        time.sleep(quiet_s)
        while time.monotonic() - self.last_arrival < quiet_s:
            time.sleep(0.02)
        return len(self.events)

    def close(self) -> dict:
        time.sleep(1.0)  # the last step's batch
        self._stop = True
        self._thread.join()
        self._sock.close(0)
        self._ctx.term()
        return {"batches": self.batches, "decode_failures": self.decode_failures, "events": self.events}


def request_result(name: str, out) -> dict:
    """What a step records of one request's output."""
    o = out.outputs[0]
    return {
        "prompt": name,
        "tokens": list(o.token_ids),
        "num_cached_tokens": out.num_cached_tokens,
        "kv_transfer_params": getattr(out, "kv_transfer_params", None),
        # The sampled token's logprob at each position: tiny random models often repeat
        # one token, so equal tokens alone prove little.
        "logprobs": [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)] if o.logprobs else None,
    }


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kw = dict(
        model=spec["model"],
        dtype="float32",
        max_model_len=16384,
        max_num_batched_tokens=16384,
        enforce_eager=True,
        enable_prefix_caching=False,
        disable_hybrid_kv_cache_manager=True,
        seed=0,
    )
    kw.update(spec.get("llm") or {})
    conn = spec["connector"]
    if conn == "kvtier":
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KvTierConnector",
            kv_connector_module_path="kvtier.vllm",
            kv_role=spec.get("kv_role", "kv_both"),
            engine_id=spec["engine_id"],
            kv_load_failure_policy="recompute",
            kv_connector_extra_config=spec["extra"],
        )
    elif conn == "example":
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="ExampleConnector", kv_role="kv_both", kv_connector_extra_config=spec["extra"]
        )
    events = None
    if spec.get("kv_events"):
        from vllm.config import KVEventsConfig

        # vLLM's publisher binds only wildcard endpoints (tcp://*:P) and connects to a host
        # address: the subscriber binds loopback first and vLLM's PUB connects to it.
        events = EventSubscriber(spec["kv_events"])
        kw["kv_events_config"] = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                                endpoint=f"tcp://127.0.0.1:{spec['kv_events']}", topic="kv")
    llm = LLM(**kw)
    prompts = spec["prompts"]
    # Warm-up: a short prompt of other tokens (its first-request costs are not measured).
    for _ in range(2 if spec.get("warmup", True) else 0):
        llm.generate([{"prompt_token_ids": [5] * 300}], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)
    before = None
    embedded = conn == "kvtier" and "kvtier.server" not in spec["extra"]
    if embedded:  # the connector's counters after the warm-up (which may hit too)
        from kvtier.vllm import worker_call

        sock_dir = spec["extra"].get("kvtier.lookup_socket_dir") or spec["extra"].get("lookup_socket_dir")
        before = worker_call(spec["engine_id"], "connector", lookup_socket_dir=sock_dir)
    steps = []
    for label, name, max_tokens, *opt in spec["steps"]:
        # An optional 4th element: {"kv_transfer_params": {...}} (prefill/decode disaggregation).
        ktp = (opt[0] if opt else {}).get("kv_transfer_params")
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            logprobs=spec.get("logprobs") or None,
                            extra_args={"kv_transfer_params": ktp} if ktp is not None else None)
        # KV events on: the index a router would consult for this request is everything
        # published before it (the step records how many events that was).
        seen = events.settle() if events is not None else None
        names = name if isinstance(name, list) else [name]
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": prompts[n]} for n in names], sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        per = [request_result(n, out) for n, out in zip(names, outs)]
        stored = None
        if embedded and spec.get("l1_after"):  # what the step stored (its stores land before a stats answer)
            from kvtier.vllm import worker_call

            tier = worker_call(spec["engine_id"], "stats", lookup_socket_dir=sock_dir)["tiers"][0]
            stored = {"stored_bytes": tier["stored_bytes"], "stored_chunks": tier["stored_chunks"]}
        if isinstance(name, list):  # a batch: one result per prompt
            steps.append({"label": label, "prompt": names, "seconds": dt, "batch": per, "events_before": seen,
                          "l1_after": stored})
        else:
            steps.append(dict(per[0], label=label, seconds=dt, events_before=seen, l1_after=stored))
        print(f"[case] {label}: {dt:.3f}s cached={[r['num_cached_tokens'] for r in per]}", flush=True)
    result = {"steps": steps}
    if events is not None:
        result["kv_events"] = events.close()
    if conn == "kvtier" and "kvtier.server" not in spec["extra"]:
        from kvtier.vllm import worker_call

        eid = spec["engine_id"]
        sock_dir = spec["extra"].get("kvtier.lookup_socket_dir") or spec["extra"].get("lookup_socket_dir")
        worker_call(eid, "flush", 60.0, lookup_socket_dir=sock_dir)
        result["stats"] = worker_call(eid, "stats", lookup_socket_dir=sock_dir)
        after = worker_call(eid, "connector", lookup_socket_dir=sock_dir)
        result["connector"] = since(after, before)  # the steps only
        t = result["connector"].get("timing")
        if t:  # the hooks' share of the forward passes of the steps
            t["connector_fraction"] = t["connector_s"] / t["step_s"] if t["step_s"] > 0 else 0.0
        if spec.get("keys_of"):
            result["keys"] = worker_call(eid, "chunk_keys", prompts[spec["keys_of"]], lookup_socket_dir=sock_dir)
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
