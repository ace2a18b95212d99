"""Tests of the disaggregating proxy's failure handling (kvtier.vllm.proxy) against backends
that are not there (closed loopback ports). The end-to-end suite runs it in front of real
prefill and decode vLLM servers. Skipped where vLLM is not installed."""

import asyncio
import socket

import pytest

pytest.importorskip("vllm")
aiohttp = pytest.importorskip("aiohttp")

from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from kvtier.vllm.proxy import Proxy  # noqa: E402


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def run(coro):
    return asyncio.run(coro)


async def with_client(proxy, fn):
    client = TestClient(TestServer(proxy.app()))
    await client.start_server()
    try:
        return await fn(client)
    finally:
        await client.close()


def test_pools_must_not_be_empty():
    with pytest.raises(ValueError, match="at least one --prefill and one --decode"):
        Proxy([], [closed_port_url()], timeout_s=5, health_interval_s=0)


def test_a_body_that_is_not_json_is_a_400():
    proxy = Proxy([closed_port_url()], [closed_port_url()], timeout_s=5, health_interval_s=0)

    async def go(client):
        r = await client.post("/v1/completions", data=b"not json", headers={"Content-Type": "application/json"})
        return r.status, await r.json()

    status, body = run(with_client(proxy, go))
    assert status == 400 and "JSON object" in body["error"]


def test_dead_backends_fail_fast_and_are_reported():
    pre, dec = closed_port_url(), closed_port_url()
    proxy = Proxy([pre], [dec], timeout_s=5, health_interval_s=0)

    async def go(client):
        req = {"model": "m", "prompt": "hello", "max_tokens": 4}
        first = await client.post("/v1/completions", json=req)
        second = await client.post("/v1/chat/completions", json=dict(req, messages=[]))
        stats = await (await client.get("/proxy/stats")).json()
        health = await client.get("/health")
        return first.status, await first.json(), second.status, await second.json(), stats, health.status

    s1, b1, s2, b2, stats, health = run(with_client(proxy, go))
    # The prefill failure does not fail the request; the decode failure does, naming it.
    assert s1 == 502 and dec in b1["error"]
    # Both backends are now known dead: no decode instance left is a 503 that says so.
    assert s2 == 503 and "no healthy decode instance" in b2["error"]
    assert stats["prefill_failed"] == 2 and stats["decode_failed"] == 1 and stats["no_decoder"] == 1
    # A prefill instance marked down is still tried when it is the only one (a stale mark
    # must not turn every request into a recompute): two attempts, two failures.
    assert stats["backends"]["prefill"][pre] == {"healthy": False, "failures": 2}
    assert health == 503
