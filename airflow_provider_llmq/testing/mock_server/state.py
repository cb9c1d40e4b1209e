"""The mock server's live state: its config and counters, what ``GET /_mock/stats`` returns, and who
is authorised. Only touched on the server's event loop."""

from __future__ import annotations

import hmac
from collections import Counter
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from ..token_authority import TOKEN_PREFIX, check_token
from .faults import MockConfig
from .quota_policy import QuotaPolicy
from .quotas import build_policy


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

    def counters(self) -> dict[str, Any]:
        """The request counters alone (``GET /_mock/counters``): cheap to poll after millions of
        requests, where :meth:`snapshot` carries a count per prompt."""
        return {
            "requests_total": self.requests_total,
            "requests_by_status": dict(self.by_status),
            "chat_requests": self.chat_requests,
            "in_flight": self.in_flight,
        }

    def snapshot(self) -> dict[str, Any]:
        windows = sorted(self.ok_per_window)
        counts = [self.ok_per_window.get(w, 0) for w in range(windows[0], windows[-1] + 1)] if windows else []
        # first and last windows are partial; with fewer than 3 there is no full one: use them all
        inner = counts[1:-1] if len(counts) > 2 else counts
        return {
            **self.counters(),
            "chat_routes": dict(self.chat_routes),
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
        given = api_key if azure or (api_key and is_azure_v1(request)) else bearer
        return bool(given) and hmac.compare_digest(given.encode(), key.encode())


STATE: web.AppKey[MockState] = web.AppKey("llmq_mock_state")
AZURE_V1_PREFIX = "/openai/v1"  # Azure's v1 API: OpenAI's paths, the deployment as the body's model


def is_azure_v1(request: web.Request) -> bool:
    return request.path.startswith(AZURE_V1_PREFIX + "/")
