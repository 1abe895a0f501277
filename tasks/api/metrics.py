"""The API's Prometheus metrics, served at ``GET /metrics`` (text format, no auth).

| metric | labels | what |
|---|---|---|
| ``clipmask_api_requests_total`` | ``method``, ``route``, ``status`` | requests answered |
| ``clipmask_api_request_seconds`` (histogram) | ``method``, ``route`` | time to the end of the answer |
| ``clipmask_api_requests_in_flight`` | | requests being answered now |

``route`` is the route's template (``/v1/masks/{mask_id}``), never the path itself, so ids do not
grow the label set; a path no route matches counts as ``unmatched``.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Latency buckets, seconds: an accepted request takes milliseconds, a ``?wait=`` up to a minute.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ApiMetrics:
    """The metrics of one server, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("clipmask_api_requests_total", "HTTP requests answered", ["method", "route", "status"],
                                registry=self.registry)
        self.seconds = Histogram("clipmask_api_request_seconds", "Seconds to answer a request", ["method", "route"],
                                 buckets=BUCKETS, registry=self.registry)
        self.in_flight = Gauge("clipmask_api_requests_in_flight", "Requests being answered", registry=self.registry)

    def endpoint(self, _request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class Measured:
    """ASGI middleware: count and time every HTTP request into ``metrics``."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.seconds.labels(scope["method"], route).observe(time.perf_counter() - started)
