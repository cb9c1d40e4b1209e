"""What the mock answers around and instead of a model's answer: a model route's counting, a
fault's error (or a reset, or a broken body), and the 429 of the requests-per-second cap. One place
that the chat route (:mod:`.app`) and the Responses API route (:mod:`.responses_api`) share."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from .faults import Fault, MockConfig
from .responses import (
    CONTENT_FILTER,
    CONTEXT_LENGTH,
    INSUFFICIENT_QUOTA,
    JSON,
    STANDARD_HEADERS,
    STATUS_CODES,
    WAIT_HEADERS,
    error,
    rate_limited,
)
from .state import STATE, MockState

Serve = Callable[[web.Request, MockState], Awaitable[web.StreamResponse]]


def counted_route(serve: Serve) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A model route: the request counted (``chat_requests``, ``chat_routes`` by route, its status)
    around ``serve``, and a ``reset`` fault's connection aborted."""

    async def route(request: web.Request) -> web.StreamResponse:
        st = request.app[STATE]
        st.enter_api(request)
        st.chat_requests += 1
        resource = request.match_info.route.resource
        st.chat_routes[resource.canonical if resource else request.path] += 1
        try:
            response = await serve(request, st)
        except Reset:
            # no HTTP answer at all: the client sees a reset / "server disconnected". aiohttp then
            # fails to write the placeholder below and ignores that quietly as a premature disconnect.
            st.by_status["reset"] += 1
            if request.transport is not None:
                request.transport.abort()
            return web.Response()
        return st.finish(response)

    return route


def over_rps(st: MockState) -> web.Response | None:
    """The 429 of the ``rps`` cap when this second's requests are spent, else None (and counted)."""
    cfg = st.config
    if cfg.rps is None:
        return None
    now = time.monotonic()
    window = int(now)
    if window != st.rps_window:
        st.rps_window, st.rps_count = window, 0
    if st.rps_count >= cfg.rps:
        return rate_limited(max(1, math.ceil((window + 1 - now) * 1000)))
    st.rps_count += 1
    return None


class Reset(Exception):
    """Raised by a ``reset`` fault; the route aborts the connection instead of answering."""


def fault_response(fault: Fault, cfg: MockConfig, request: web.Request) -> web.Response:
    response = _answer(fault, cfg, request)
    if fault.headers:
        if any(name in WAIT_HEADERS for name, _ in fault.headers):
            for name in WAIT_HEADERS:
                response.headers.popall(name, None)
        for name, value in fault.headers:
            response.headers[name] = value
    return response


def _answer(fault: Fault, cfg: MockConfig, request: web.Request) -> web.Response:
    kind = fault.kind
    if kind == "reset":
        raise Reset
    if kind == "malformed":
        return web.Response(body='{"choices": [', content_type=JSON)
    if kind == "empty":
        return web.Response(
            body=json.dumps({"id": "chatcmpl-empty", "object": "chat.completion", "choices": []}),
            content_type=JSON,
        )
    if kind == "content_filter":
        return web.Response(status=400, body=json.dumps({"error": CONTENT_FILTER}), content_type=JSON)
    if kind == "context_length":
        return web.Response(status=400, body=json.dumps({"error": CONTEXT_LENGTH}), content_type=JSON)
    if kind == "quota":
        return web.Response(status=429, body=json.dumps({"error": INSUFFICIENT_QUOTA}), content_type=JSON)
    if kind == "echo":
        # as some gateways do: an error that quotes the request's headers, secrets included
        quoted = str(dict(request.headers))
        own = ",".join(v for k, v in request.headers.items() if k.lower() not in STANDARD_HEADERS)
        return error(fault.status or 400, f"rejected:{own}", f"Rejected request with headers {quoted}")
    if kind == "redirect":
        location = cfg.redirect_url or "/redirected/chat/completions"
        return web.Response(status=307, headers={"Location": location})
    status = int(kind)
    if status == 429:
        return rate_limited(fault.retry_after_ms, fault.retry_after_s)
    code = STATUS_CODES.get(status, "server_error")
    return error(
        status,
        code,
        f"The server had an error while processing your request ({status}).",
        type="server_error",
    )
