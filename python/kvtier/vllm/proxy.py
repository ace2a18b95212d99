"""A prefill/decode disaggregating proxy for vLLM instances running the kvtier connector.

Usage::

    python -m kvtier.vllm.proxy --port 8000 \\
        --prefill http://10.0.0.1:8100 --decode http://10.0.0.2:8200 [--prefill ... --decode ...]

For each ``POST /v1/completions`` or ``/v1/chat/completions`` (streaming or not) it sends the
request to a prefill instance (``kv_role`` ``kv_producer``) with ``max_tokens`` 1 and
``kv_transfer_params: {"do_remote_decode": true}``, then the original request with the
``kv_transfer_params`` the prefill answer carried to a decode instance (``kv_consumer``),
whose answer (or stream) it returns. Instances are picked round robin among the healthy ones;
``GET /health`` on each is polled. A failed prefill does not fail the request: the decoder
gets it without parameters and recomputes the prompt (counted, logged, and shown in
``GET /proxy/stats``); no decode instance left is a 503 that says so.

It is for tests and simple deployments; production routers that already do
prefill/decode disaggregation (llm-d, vLLM production-stack, Dynamo) pass
``kv_transfer_params`` from the prefill response to the decode request the same way.
Built on aiohttp (an async HTTP server and client with streaming, already installed with
vLLM).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import time

import aiohttp
from aiohttp import web

logger = logging.getLogger("kvtier.proxy")

ROUTES = ("/v1/completions", "/v1/chat/completions")


class Pool:
    """Backends of one role, picked round robin among the healthy ones."""

    def __init__(self, role: str, urls: list[str]):
        self.role = role
        self.urls = [u.rstrip("/") for u in urls]
        self.healthy = {u: True for u in self.urls}
        self.failures = dict.fromkeys(self.urls, 0)
        self._rr = itertools.cycle(self.urls)

    def pick(self, any_if_none_healthy: bool = False) -> str | None:
        """The next healthy backend; when none is, None, or (``any_if_none_healthy``) the
        next one anyway: health is only as fresh as the last probe."""
        for _ in range(len(self.urls)):
            u = next(self._rr)
            if self.healthy[u]:
                return u
        return next(self._rr) if any_if_none_healthy and self.urls else None

    def mark(self, url: str, ok: bool, why: str = "") -> None:
        """Records a backend's state; logs each change."""
        if self.healthy.get(url) != ok:
            if ok:
                logger.info("%s backend %s is healthy again", self.role, url)
            else:
                logger.warning("%s backend %s failed: %s", self.role, url, why)
        self.healthy[url] = ok
        if not ok:
            self.failures[url] += 1


class Proxy:
    """The proxy's state: both pools, an HTTP client session, counters."""

    def __init__(self, prefill: list[str], decode: list[str], *, timeout_s: float, health_interval_s: float):
        if not prefill or not decode:
            raise ValueError("give at least one --prefill and one --decode instance")
        self.prefill = Pool("prefill", prefill)
        self.decode = Pool("decode", decode)
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.health_interval_s = health_interval_s
        self.session: aiohttp.ClientSession | None = None
        self.stats = {"requests": 0, "prefill_failed": 0, "decode_failed": 0, "no_decoder": 0}
        self._health_task: asyncio.Task | None = None

    async def start(self, _app=None) -> None:
        self.session = aiohttp.ClientSession(timeout=self.timeout)
        if self.health_interval_s > 0:  # 0: no polling, backends are judged by requests only
            self._health_task = asyncio.create_task(self._health_loop())

    async def stop(self, _app=None) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        if self.session is not None:
            await self.session.close()

    async def _health_loop(self) -> None:
        probe = aiohttp.ClientTimeout(total=5.0)  # a busy vLLM answers /health late
        while True:
            for pool in (self.prefill, self.decode):
                for url in pool.urls:
                    try:
                        async with self.session.get(url + "/health", timeout=probe) as r:
                            pool.mark(url, r.status == 200, f"/health answered {r.status}")
                    except Exception as e:  # noqa: BLE001 - any failure is "unhealthy"
                        pool.mark(url, False, f"/health: {e!r}")
            await asyncio.sleep(self.health_interval_s)

    async def _prefill(self, path: str, body: dict) -> dict | None:
        """Runs the prefill; its kv_transfer_params, or None (the decoder recomputes)."""
        # With every prefill instance marked down, still try one: a failed attempt costs what
        # skipping would (the decoder recomputes), a stale mark would cost every request.
        url = self.prefill.pick(any_if_none_healthy=True)
        if url is None:
            self.stats["prefill_failed"] += 1
            logger.warning("no healthy prefill instance: the decode instance computes the prompt")
            return None
        req = dict(body, stream=False, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
        req.pop("stream_options", None)
        if "max_completion_tokens" in req:
            req["max_completion_tokens"] = 1
        try:
            async with self.session.post(url + path, json=req) as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
                answer = await r.json()
        except Exception as e:  # noqa: BLE001 - a failed prefill costs a recompute, not the request
            self.prefill.mark(url, False, repr(e))
            self.stats["prefill_failed"] += 1
            return None
        return answer.get("kv_transfer_params")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, aiohttp.ContentTypeError):
            return web.json_response({"error": "the request body must be a JSON object"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "the request body must be a JSON object"}, status=400)
        self.stats["requests"] += 1
        params = await self._prefill(request.path, body)
        url = self.decode.pick()
        if url is None:
            self.stats["no_decoder"] += 1
            return web.json_response(
                {"error": "no healthy decode instance (see GET /proxy/stats)"}, status=503
            )
        dec = dict(body)
        if params is not None:
            dec["kv_transfer_params"] = params
        try:
            async with self.session.post(url + request.path, json=dec) as r:
                if not body.get("stream"):
                    data = await r.read()
                    return web.Response(body=data, status=r.status, content_type=r.content_type)
                out = web.StreamResponse(status=r.status, headers={"Content-Type": r.headers.get("Content-Type", "text/event-stream")})
                await out.prepare(request)
                async for piece in r.content.iter_any():
                    await out.write(piece)
                await out.write_eof()
                return out
        except Exception as e:  # noqa: BLE001
            self.decode.mark(url, False, repr(e))
            self.stats["decode_failed"] += 1
            return web.json_response({"error": f"decode instance {url} failed: {e!r}"}, status=502)

    async def health(self, _request: web.Request) -> web.Response:
        ok = self.decode.pick() is not None
        return web.json_response({"ok": ok}, status=200 if ok else 503)

    async def proxy_stats(self, _request: web.Request) -> web.Response:
        pools = {
            p.role: {u: {"healthy": p.healthy[u], "failures": p.failures[u]} for u in p.urls}
            for p in (self.prefill, self.decode)
        }
        return web.json_response(dict(self.stats, backends=pools, time=time.time()))

    def app(self) -> web.Application:
        app = web.Application()
        for route in ROUTES:
            app.router.add_post(route, self.handle)
        app.router.add_get("/health", self.health)
        app.router.add_get("/proxy/stats", self.proxy_stats)
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        return app


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m kvtier.vllm.proxy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on [default: 127.0.0.1]")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on [default: 8000]")
    ap.add_argument("--prefill", action="append", default=[], help="a prefill instance's base URL (repeat for more)")
    ap.add_argument("--decode", action="append", default=[], help="a decode instance's base URL (repeat for more)")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per backend request [default: 600]")
    ap.add_argument("--health-interval-s", type=float, default=2.0, help="backend /health polling; 0: none [default: 2]")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        proxy = Proxy(args.prefill, args.decode, timeout_s=args.timeout_s, health_interval_s=args.health_interval_s)
    except ValueError as e:
        ap.error(str(e))
    web.run_app(proxy.app(), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
