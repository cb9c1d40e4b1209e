"""The aiohttp application: OpenAI / Azure OpenAI chat-completions routes, faults, limits, counters.

All state lives on the server's event loop thread and is only touched there (the runners marshal
``stats`` / ``reset`` / ``configure`` onto the loop), so the hot path needs no locks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from collections import Counter
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from ..token_authority import TOKEN_PREFIX, check_token
from .faults import ANSWER_KINDS, Fault, MockConfig, expected_answer, jitter_ms, plan, prompt_hash
from .packing import parse_pack
from .quotas import QuotaPolicy, build_policy
from .structured import answer_text
from .tokens import cached_prefix_tokens, count_messages, count_text, within_max_tokens

STATE: web.AppKey[MockState] = web.AppKey("llmq_mock_state")
AZURE_V1_PREFIX = "/openai/v1"  # Azure's v1 API: OpenAI's paths, the deployment as the body's model
_JSON = "application/json"
_STATUS_CODES = {400: "invalid_request_error", 408: "timeout", 409: "conflict", 429: "rate_limit_exceeded"}
_WAIT_HEADERS = ("retry-after", "retry-after-ms")
_STANDARD_HEADERS = frozenset(
    {"host", "user-agent", "accept", "accept-encoding", "content-type", "content-length", "connection"}
)
_INSUFFICIENT_QUOTA = {
    "code": "insufficient_quota",
    "message": "You exceeded your current quota, please check your plan and billing details.",
    "type": "insufficient_quota",
    "param": None,
}
_REFUSAL = "I'm sorry, but I can't help with that request."
_CONTENT_FILTER = {
    "code": "content_filter",
    "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management "
    "policy.",
    "status": 400,
    "innererror": {"code": "ResponsibleAIPolicyViolation"},
}
_CONTEXT_LENGTH = {
    "code": "context_length_exceeded",
    "message": "This model's maximum context length is 8192 tokens. However, your messages resulted in "
    "more tokens. Please reduce the length of the messages.",
    "type": "invalid_request_error",
}


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    """An OpenAI-shaped error answer, so clients exercise their real error parsing."""
    body = {"error": {"code": code, "message": message, **extra}}
    return web.Response(status=status, body=json.dumps(body), content_type=_JSON, headers=headers)


def _rate_limited(
    retry_after_ms: int | None, retry_after_s: int | None = None, why: str = "Rate limit reached"
) -> web.Response:
    headers = {}
    if retry_after_s is None and retry_after_ms is not None:
        retry_after_s = max(1, math.ceil(retry_after_ms / 1000))
    if retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s)
    if retry_after_ms is not None:
        headers["retry-after-ms"] = str(retry_after_ms)
    return _error(
        429,
        "rate_limit_exceeded",
        f"{why}. Please retry after the delay given in Retry-After.",
        headers,
        type="requests",
    )


def _tokens(text: str) -> int:
    """The completion's tokens: the word/punctuation count of :mod:`.tokens`."""
    return count_text(text)


def _prompt_tokens(messages: list[Any]) -> int:
    """The prompt's tokens: each message's text and its chat framing (see :mod:`.tokens`)."""
    return count_messages(_content_text(m.get("content")) for m in messages if isinstance(m, dict))


def usage(messages: list[Any], completion_tokens: int) -> dict[str, Any]:
    """A chat answer's ``usage``, with the prompt tokens served from the prompt cache."""
    texts = [_content_text(m.get("content")) for m in messages if isinstance(m, dict)]
    prompt_tokens = count_messages(texts)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_prefix_tokens(texts)},
    }


def _content_text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a multimodal list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


class MockState:
    """Live config plus counters; ``snapshot()`` is what ``GET /_mock/stats`` returns."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.in_flight = 0  # live value, never reset
        self.reset()

    def reset(self) -> None:
        """Zero counters and per-prompt attempt numbers (a test starts from attempt 1 again)."""
        self.requests_total = 0
        self.by_status: Counter[str] = Counter()
        self.chat_requests = 0
        self.chat_routes: Counter[str] = Counter()  # which chat route each request came by
        self.max_in_flight = self.in_flight
        self.ok_per_window: Counter[int] = Counter()
        self.per_prompt: Counter[str] = Counter()
        self.keys_in_url = 0
        self.auth_failures = 0
        self.bearer_tokens = 0  # requests authorised by a token of the token authority
        self.expired_tokens = 0  # refused because their token had expired
        self.prompt_tokens_total = 0
        self.completion_tokens_total = 0
        self.cached_tokens_total = 0
        self.rps_window = -1
        self.rps_count = 0
        self.reset_auth_fail()
        self.reset_quota()

    def reset_quota(self) -> None:
        """A fresh policy from the config (its windows and schedule count from the next request)."""
        self.policy: QuotaPolicy | None = build_policy(self.config.quota)
        self.quota_throttled = 0  # 429s the quota answered
        self.admitted_per_window: Counter[int] = Counter()  # requests the quota admitted, per second
        self.admitted_tokens_per_window: Counter[int] = Counter()  # their cost in tokens, per second

    def reset_auth_fail(self) -> None:
        self.auth_fail_ok = 0
        self.auth_fail_served = 0

    def snapshot(self) -> dict[str, Any]:
        windows = sorted(self.ok_per_window)
        counts = [self.ok_per_window.get(w, 0) for w in range(windows[0], windows[-1] + 1)] if windows else []
        # first and last windows are partial; with fewer than 3 there is no full one: use them all
        inner = counts[1:-1] if len(counts) > 2 else counts
        return {
            "requests_total": self.requests_total,
            "requests_by_status": dict(self.by_status),
            "chat_requests": self.chat_requests,
            "chat_routes": dict(self.chat_routes),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "per_second": {str(w): n for w, n in sorted(self.ok_per_window.items())},
            "per_second_counts": counts,
            "max_per_second": max(counts, default=0),
            "max_per_second_after_first": max(inner, default=0),
            "requests_per_prompt": dict(self.per_prompt),
            "keys_in_url": self.keys_in_url,
            "auth_failures": self.auth_failures,
            "bearer_tokens": self.bearer_tokens,
            "expired_tokens": self.expired_tokens,
            "prompt_tokens_total": self.prompt_tokens_total,
            "completion_tokens_total": self.completion_tokens_total,
            "cached_tokens_total": self.cached_tokens_total,
            "quota": self._quota_snapshot(),
        }

    def _quota_snapshot(self) -> dict[str, Any]:
        """What the quota did: its 429s, and what it admitted in every second (gaps as zeros)."""
        windows = sorted(self.admitted_per_window)
        span = range(windows[0], windows[-1] + 1) if windows else range(0)
        admitted = [self.admitted_per_window.get(w, 0) for w in span]
        tokens = [self.admitted_tokens_per_window.get(w, 0) for w in span]
        return {
            "kind": (self.config.quota or {}).get("kind"),
            "throttled": self.quota_throttled,
            "admitted": sum(admitted),
            "tokens_admitted": sum(tokens),
            "admitted_per_second_counts": admitted,
            "admitted_tokens_per_second_counts": tokens,
            "max_admitted_per_second": max(admitted, default=0),
        }

    def finish(self, response: web.StreamResponse) -> web.StreamResponse:
        self.by_status[str(response.status)] += 1
        if response.status == 401:
            self.auth_failures += 1
        return response

    def enter_api(self, request: web.Request) -> None:
        """Count the request and whether the key sits in its URL (a client must only send headers)."""
        self.requests_total += 1
        key = self.config.api_key
        raw = request.raw_path
        if key and (key in raw or key in unquote(raw)):
            self.keys_in_url += 1

    def authorised(self, request: web.Request, azure: bool) -> bool | str:
        """True for the key (Azure: ``api-key``; OpenAI: Bearer) or an unexpired Bearer token of the
        token authority (:mod:`..token_authority`, signed with this server's key: both forms, as
        Azure takes Entra ID tokens); else False, or ``"expired"`` for an expired token."""
        key = self.config.api_key
        auth = request.headers.get("Authorization", "")
        bearer = auth[7:] if auth[:7].lower() == "bearer " else ""
        if bearer.startswith(TOKEN_PREFIX + "."):
            refused = check_token(bearer, key)
            self.bearer_tokens += refused is None
            return "expired" if refused == "expired" else refused is None
        # Azure's v1 API (/openai/v1/) takes the key in either header, as Azure does
        api_key = request.headers.get("api-key", "")
        given = api_key if azure or (api_key and _is_azure_v1(request)) else bearer
        return bool(given) and hmac.compare_digest(given.encode(), key.encode())


def _is_azure_v1(request: web.Request) -> bool:
    return request.path.startswith(AZURE_V1_PREFIX + "/")


def _unauthorised() -> web.Response:
    return _error(
        401,
        "invalid_api_key",
        "Incorrect API key provided or missing credentials. "
        "You can find your API key in the resource's Keys and Endpoint page.",
        type="invalid_request_error",
    )


def _check_access(request: web.Request, st: MockState, azure: bool) -> web.Response | None:
    """Header / URL checks shared by chat and models routes; None when the request may proceed."""
    allowed = st.authorised(request, azure)
    if allowed == "expired":
        st.expired_tokens += 1
        return _error(401, "401", "Access token has expired or is not yet valid.")
    if not allowed:
        return _unauthorised()
    if _is_azure_v1(request):
        # the v1 API has no dated versions: Azure refuses one (only preview / latest are taken)
        if request.query.get("api-version", "latest") not in ("preview", "latest"):
            return _error(
                400,
                "BadRequest",
                "API version not supported on the v1 API: remove the api-version query.",
                type="invalid_request_error",
            )
    elif azure and not request.query.get("api-version"):
        return _error(
            400,
            "invalid_api_version",
            "Missing the api-version query parameter.",
            type="invalid_request_error",
        )
    deployment = request.match_info.get("deployment")
    deployments = st.config.deployments
    if deployment is not None and deployments and deployment not in deployments:
        return _error(
            404,
            "DeploymentNotFound",
            "The API deployment for this resource does not exist. "
            "If you created the deployment within the last 5 minutes, please wait a moment.",
        )
    return None


async def chat(request: web.Request) -> web.StreamResponse:
    """Both chat-completions routes; the Azure one carries the deployment in the path."""
    st = request.app[STATE]
    st.enter_api(request)
    st.chat_requests += 1
    resource = request.match_info.route.resource
    st.chat_routes[resource.canonical if resource else request.path] += 1
    try:
        response = await _chat(request, st)
    except _Reset:
        # no HTTP answer at all: the client sees a reset / "server disconnected". aiohttp then fails
        # to write the placeholder below and ignores that quietly as a premature disconnection.
        st.by_status["reset"] += 1
        if request.transport is not None:
            request.transport.abort()
        return web.Response()
    return st.finish(response)


async def _chat(request: web.Request, st: MockState) -> web.StreamResponse:
    cfg = st.config
    azure = "deployment" in request.match_info
    denied = _check_access(request, st, azure)  # the v1 route (no deployment): either key header
    if denied is not None:
        return denied
    try:
        body = await request.json()
        messages = body["messages"]
        user = [m for m in messages if m.get("role") == "user"]
        system = next((m for m in messages if m.get("role") == "system"), None)
    except (ValueError, KeyError, TypeError, AttributeError):
        return _error(
            400,
            "invalid_request_error",
            "The request body must be JSON with a 'messages' list.",
            type="invalid_request_error",
        )
    if not user:
        return _error(
            400,
            "invalid_request_error",
            "'messages' must contain a user message.",
            type="invalid_request_error",
        )
    model = request.match_info["deployment"] if azure else body.get("model")
    if not model:
        return _error(
            400, "invalid_request_error", "you must provide a model parameter", type="invalid_request_error"
        )
    prompt = _content_text(user[-1].get("content"))
    quota_headers: dict[str, str] = {}
    if st.policy is not None:
        # before anything else counts the request: a refused one costs the server nothing, as on
        # the real services, and does not advance the prompt's fault plan
        now = time.monotonic()
        cost = _quota_cost(body, messages, model, system, prompt)
        decision = st.policy.admit(now, cost)
        if not decision.allowed:
            st.quota_throttled += 1
            return _error(
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
        return _rate_limited(50, why="Too many concurrent requests")
    st.in_flight += 1
    st.max_in_flight = max(st.max_in_flight, st.in_flight)
    try:
        af = cfg.auth_fail
        if af and st.auth_fail_ok >= int(af["after"]) and st.auth_fail_served < int(af["count"]):
            st.auth_fail_served += 1
            return _unauthorised()
        now = time.monotonic()
        window = int(now)
        if cfg.rps is not None:
            if window != st.rps_window:
                st.rps_window, st.rps_count = window, 0
            if st.rps_count >= cfg.rps:
                return _rate_limited(max(1, math.ceil((window + 1 - now) * 1000)))
            st.rps_count += 1

        extra_ms, fault = plan(prompt, attempt, cfg) if pack is None else pack.plan(cfg)
        delay = cfg.latency_ms + jitter_ms(prompt, cfg) + extra_ms
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        if fault is not None and fault.kind not in ANSWER_KINDS:
            response = _fault_response(fault, cfg, request)
            for name, value in quota_headers.items():  # rate headers come with every admitted answer
                response.headers.setdefault(name, value)
            return response

        system_prompt = _content_text(system.get("content")) if system else None
        params = {k: v for k, v in body.items() if k not in ("messages", "model", "stream")}
        if pack is None:
            answer = answer_text(model, system_prompt, prompt, params)
        else:
            answer = pack.answer(model, messages, params)
        answer, cut = within_max_tokens(answer, body)  # a model stops at max_tokens, as the real ones do
        billed = usage(messages, _tokens(answer))
        st.prompt_tokens_total += billed["prompt_tokens"]
        st.completion_tokens_total += billed["completion_tokens"]
        st.cached_tokens_total += billed["prompt_tokens_details"]["cached_tokens"]
        st.ok_per_window[int(time.monotonic())] += 1
        st.auth_fail_ok += 1
        message: dict[str, Any] = {"role": "assistant", "content": answer}
        finish_reason = "length" if cut else "stop"
        kind = fault.kind if fault is not None else None
        if kind == "filtered":
            message["content"], finish_reason = "", "content_filter"
        elif kind == "tool_calls":
            message["content"], finish_reason = None, "tool_calls"
            message["tool_calls"] = [
                {
                    "id": "call_mock",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ]
        elif kind == "refusal":
            message["content"], message["refusal"] = None, _REFUSAL
        elif kind == "length":
            message["content"], finish_reason = "", "length"
        elif kind == "length_text":
            finish_reason = "length"
        elif kind == "parts":
            half = len(answer) // 2
            message["content"] = [
                {"type": "text", "text": answer[:half]},
                {"type": "text", "text": answer[half:]},
            ]
        payload = json.dumps(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
                "usage": billed,
            }
        ).encode()
        if fault is not None and fault.kind == "drip":
            return await _drip(request, payload, fault.drip_ms or 0)
        return web.Response(body=payload, content_type=_JSON, headers=quota_headers or None)
    finally:
        st.in_flight -= 1


def _quota_cost(
    body: dict[str, Any], messages: list[Any], model: str, system: dict[str, Any] | None, prompt: str
) -> int:
    """Tokens a request costs against a tokens quota, charged before it is served as the real
    services do: the prompt's tokens plus ``max_tokens`` when given, else the completion this
    server is about to write (so the cost matches the usage it reports)."""
    prompt_tokens = _prompt_tokens(messages)
    limit = body.get("max_tokens", body.get("max_completion_tokens"))
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
        return prompt_tokens + limit
    system_prompt = _content_text(system.get("content")) if system else None
    params = {k: v for k, v in body.items() if k not in ("messages", "model", "stream")}
    return prompt_tokens + _tokens(expected_answer(model, system_prompt, prompt, params))


async def _drip(request: web.Request, payload: bytes, ms_per_byte: int) -> web.StreamResponse:
    """Headers at once, then the body one byte every ``ms_per_byte``: a client whose timeout only
    bounds each socket read never gives up on it."""
    response = web.StreamResponse(headers={"Content-Type": _JSON, "Content-Length": str(len(payload))})
    await response.prepare(request)
    try:
        for i in range(len(payload)):
            await response.write(payload[i : i + 1])
            await asyncio.sleep(ms_per_byte / 1000)
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        pass  # the client gave up, as it should
    return response


class _Reset(Exception):
    """Raised by a ``reset`` fault; ``chat`` aborts the connection instead of answering."""


def _fault_response(fault: Fault, cfg: MockConfig, request: web.Request) -> web.Response:
    response = _fault_answer(fault, cfg, request)
    if fault.headers:
        if any(name in _WAIT_HEADERS for name, _ in fault.headers):
            for name in _WAIT_HEADERS:
                response.headers.popall(name, None)
        for name, value in fault.headers:
            response.headers[name] = value
    return response


def _fault_answer(fault: Fault, cfg: MockConfig, request: web.Request) -> web.Response:
    kind = fault.kind
    if kind == "reset":
        raise _Reset
    if kind == "malformed":
        return web.Response(body='{"choices": [', content_type=_JSON)
    if kind == "empty":
        return web.Response(
            body=json.dumps({"id": "chatcmpl-empty", "object": "chat.completion", "choices": []}),
            content_type=_JSON,
        )
    if kind == "content_filter":
        return web.Response(status=400, body=json.dumps({"error": _CONTENT_FILTER}), content_type=_JSON)
    if kind == "context_length":
        return web.Response(status=400, body=json.dumps({"error": _CONTEXT_LENGTH}), content_type=_JSON)
    if kind == "quota":
        return web.Response(status=429, body=json.dumps({"error": _INSUFFICIENT_QUOTA}), content_type=_JSON)
    if kind == "echo":
        # as some gateways do: an error that quotes the request's headers, secrets included
        quoted = str(dict(request.headers))
        own = ",".join(v for k, v in request.headers.items() if k.lower() not in _STANDARD_HEADERS)
        return _error(fault.status or 400, f"rejected:{own}", f"Rejected request with headers {quoted}")
    if kind == "redirect":
        location = cfg.redirect_url or "/redirected/chat/completions"
        return web.Response(status=307, headers={"Location": location})
    status = int(kind)
    if status == 429:
        return _rate_limited(fault.retry_after_ms, fault.retry_after_s)
    code = _STATUS_CODES.get(status, "server_error")
    return _error(
        status,
        code,
        f"The server had an error while processing your request ({status}).",
        type="server_error",
    )


async def models(request: web.Request) -> web.Response:
    """Cheap authenticated call, for a connection test that must not spend tokens."""
    st = request.app[STATE]
    st.enter_api(request)
    azure = request.path.startswith("/openai/")
    response = _check_access(request, st, azure)
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


async def admin_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].snapshot())


async def admin_reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return web.json_response({"ok": True})


async def admin_config(request: web.Request) -> web.Response:
    st = request.app[STATE]
    try:
        changes = await request.json() if request.can_read_body else {}
        apply_config(st, changes)
    except (ValueError, TypeError) as exc:
        return _error(400, "invalid_config", str(exc))
    return web.json_response(st.config.public_dict())


def apply_config(st: MockState, changes: dict[str, Any]) -> None:
    """Update the live config; a new ``auth_fail`` plan starts counting from now."""
    if not isinstance(changes, dict):
        raise TypeError("config body must be a JSON object")
    st.config.update(**changes)
    if "auth_fail" in changes:
        st.reset_auth_fail()
    if "quota" in changes:
        st.reset_quota()


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
    app.router.add_get("/_mock/stats", admin_stats)
    app.router.add_post("/_mock/reset", admin_reset)
    app.router.add_post("/_mock/config", admin_config)
    from .batches import add_batch_routes  # the Files and Batches APIs (imports this module)

    add_batch_routes(app)
    return app
