"""The aiohttp application: OpenAI / Azure OpenAI chat-completions routes, faults, limits, counters.

All state lives on the server's event loop thread and is only touched there (the runners marshal
``stats`` / ``reset`` / ``configure`` onto the loop), so the hot path needs no locks.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from .access import check_access, unauthorised
from .admin import add_admin_routes
from .batches import add_batch_routes
from .chat_answer import answer_for, assistant_message, completion
from .fault_answers import counted_route, fault_response, over_rps
from .faults import ANSWER_KINDS, MockConfig, expected_answer, jitter_ms, plan, prompt_hash
from .packing import parse_pack
from .responses import (
    JSON,
    completion_tokens_of,
    content_text,
    error,
    prompt_tokens,
    rate_limited,
    usage,
)
from .responses_api import add_responses_routes
from .state import AZURE_V1_PREFIX, STATE, MockState


async def _chat(request: web.Request, st: MockState) -> web.StreamResponse:
    cfg = st.config
    azure = "deployment" in request.match_info
    denied = check_access(request, st, azure)  # the v1 route (no deployment): either key header
    if denied is not None:
        return denied
    try:
        body = await request.json()
        messages = body["messages"]
        user = [m for m in messages if m.get("role") == "user"]
        system = next((m for m in messages if m.get("role") == "system"), None)
    except (ValueError, KeyError, TypeError, AttributeError):
        return error(
            400,
            "invalid_request_error",
            "The request body must be JSON with a 'messages' list.",
            type="invalid_request_error",
        )
    if not user:
        return error(
            400,
            "invalid_request_error",
            "'messages' must contain a user message.",
            type="invalid_request_error",
        )
    model = request.match_info["deployment"] if azure else body.get("model")
    if not model:
        return error(
            400, "invalid_request_error", "you must provide a model parameter", type="invalid_request_error"
        )
    prompt = content_text(user[-1].get("content"))
    quota_headers: dict[str, str] = {}
    if st.policy is not None:
        # before anything else counts the request: a refused one costs the server nothing, as on
        # the real services, and does not advance the prompt's fault plan
        now = time.monotonic()
        cost = _quota_cost(body, messages, model, system, prompt)
        decision = st.policy.admit(now, cost)
        if not decision.allowed:
            st.quota_throttled += 1
            return error(
                429,
                "rate_limit_exceeded",
                "Requests to this deployment have exceeded the rate limit of your current quota. "
                "Please retry after the delay given in the retry headers.",
                decision.headers,
                type="requests",
            )
        st.admitted_per_window[int(now)] += 1
        st.admitted_tokens_per_window[int(now)] += cost
        quota_headers = decision.headers
    pack = parse_pack(body, prompt)  # several rows in one request: each item its own attempt
    if pack is None:
        key = prompt_hash(prompt)
        st.per_prompt[key] += 1
        attempt = st.per_prompt[key]
    else:
        pack.count(st.per_prompt)

    if cfg.max_concurrency is not None and st.in_flight >= cfg.max_concurrency:
        return rate_limited(50, why="Too many concurrent requests")
    st.in_flight += 1
    st.max_in_flight = max(st.max_in_flight, st.in_flight)
    try:
        af = cfg.auth_fail
        if af and st.auth_fail_ok >= int(af["after"]) and st.auth_fail_served < int(af["count"]):
            st.auth_fail_served += 1
            return unauthorised()
        capped = over_rps(st)
        if capped is not None:
            return capped

        extra_ms, fault = plan(prompt, attempt, cfg) if pack is None else pack.plan(cfg)
        delay = cfg.latency_ms + jitter_ms(prompt, cfg) + extra_ms
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        if fault is not None and fault.kind not in ANSWER_KINDS:
            response = fault_response(fault, cfg, request)
            for name, value in quota_headers.items():  # rate headers come with every admitted answer
                response.headers.setdefault(name, value)
            return response

        system_prompt = content_text(system.get("content")) if system else None
        answer, cut = answer_for(body, model, system_prompt, prompt, pack)
        billed = usage(messages, completion_tokens_of(answer))
        st.prompt_tokens_total += billed["prompt_tokens"]
        st.completion_tokens_total += billed["completion_tokens"]
        st.cached_tokens_total += billed["prompt_tokens_details"]["cached_tokens"]
        st.ok_per_window[int(time.monotonic())] += 1
        st.auth_fail_ok += 1
        message, finish_reason = assistant_message(answer, cut, fault.kind if fault is not None else None)
        payload = json.dumps(completion(model, message, finish_reason, billed)).encode()
        if fault is not None and fault.kind == "drip":
            return await _drip(request, payload, fault.drip_ms or 0)
        return web.Response(body=payload, content_type=JSON, headers=quota_headers or None)
    finally:
        st.in_flight -= 1


chat = counted_route(_chat)  # both chat-completions routes; the Azure one has the deployment in its path


def _quota_cost(
    body: dict[str, Any], messages: list[Any], model: str, system: dict[str, Any] | None, prompt: str
) -> int:
    """Tokens a request costs against a tokens quota, charged before it is served as the real
    services do: the prompt's tokens plus ``max_tokens`` when given, else the completion this
    server is about to write (so the cost matches the usage it reports)."""
    counted = prompt_tokens(messages)
    limit = body.get("max_tokens", body.get("max_completion_tokens"))
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
        return counted + limit
    system_prompt = content_text(system.get("content")) if system else None
    params = {k: v for k, v in body.items() if k not in ("messages", "model", "stream")}
    return counted + completion_tokens_of(expected_answer(model, system_prompt, prompt, params))


async def _drip(request: web.Request, payload: bytes, ms_per_byte: int) -> web.StreamResponse:
    """Headers at once, then the body one byte every ``ms_per_byte``: a client whose timeout only
    bounds each socket read never gives up on it."""
    response = web.StreamResponse(headers={"Content-Type": JSON, "Content-Length": str(len(payload))})
    await response.prepare(request)
    try:
        for i in range(len(payload)):
            await response.write(payload[i : i + 1])
            await asyncio.sleep(ms_per_byte / 1000)
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        pass  # the client gave up, as it should
    return response


async def counters(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].counters())


async def models(request: web.Request) -> web.Response:
    """Cheap authenticated call, for a connection test that must not spend tokens."""
    st = request.app[STATE]
    st.enter_api(request)
    azure = request.path.startswith("/openai/")
    response = check_access(request, st, azure)
    if response is None:
        names = st.config.deployments or ["mock-model"]
        response = web.json_response(
            {
                "object": "list",
                "data": [{"id": n, "object": "model", "created": 0, "owned_by": "llmq-mock"} for n in names],
            }
        )
    st.finish(response)
    return response


def apply_config(st: MockState, changes: dict[str, Any]) -> None:
    """Update the live config; a new ``auth_fail`` plan starts counting from now."""
    if not isinstance(changes, dict):
        raise TypeError("config body must be a JSON object")
    st.config.update(**changes)
    if "auth_fail" in changes:
        st.reset_auth_fail()
    if "quota" in changes:
        st.reset_quota()


def _apply_and_show(st: MockState, changes: dict[str, Any]) -> dict[str, Any]:
    apply_config(st, changes)
    return st.config.public_dict()


def build_app(config: MockConfig) -> web.Application:
    """The application; ``client_max_size`` is large because context-length tests send big prompts."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE] = MockState(config)
    app.router.add_post("/openai/deployments/{deployment}/chat/completions", chat)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post(f"{AZURE_V1_PREFIX}/chat/completions", chat)
    app.router.add_post("/chat/completions", chat)
    for path in ("/openai/models", f"{AZURE_V1_PREFIX}/models", "/v1/models", "/models"):
        app.router.add_get(path, models)
    add_admin_routes(app, "/_mock", STATE, _apply_and_show)
    app.router.add_get("/_mock/counters", counters)

    add_batch_routes(app)
    add_responses_routes(app)
    return app
