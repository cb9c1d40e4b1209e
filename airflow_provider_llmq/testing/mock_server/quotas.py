"""Quota policies the mock server enforces: who is refused with a 429, and which rate headers go out.

Pure classes on an explicit clock (``now`` in seconds, any origin), so a test drives them with a fake
clock and the server with ``time.monotonic()``. Not thread-safe: like :class:`MockState`, a policy is
only touched on the server's event loop. Built from JSON-able dicts (the server's config format) by
:func:`build_policy`; a handler asks ``policy.admit(now, tokens)`` before doing any work and sends
``decision.headers`` with the answer, a 200 when ``decision.allowed`` and a 429 otherwise.

What each policy imitates:

- ``token_bucket``: a requests/s bucket refilling continuously; its 429 carries a short
  ``retry-after-ms`` (the time until the next request fits), or no hint at all (``retry_hint="none"``).
- ``azure``: Azure OpenAI's per-deployment quotas, enforced over short fixed windows (RPM/6 requests
  per 10 s window, TPM/6 tokens); every answer carries ``x-ratelimit-remaining-requests`` /
  ``-tokens`` and a 429 carries ``retry-after-ms`` and ``Retry-After`` (whole seconds, rounded up).
- ``openai``: OpenAI's buckets for requests and tokens with ``x-ratelimit-limit-*`` (per minute),
  ``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*`` (time until the bucket is full again,
  formatted like ``20ms``, ``1.5s``, ``6m0s``).
- ``schedule``: a requests/s bucket whose rate changes at given offsets from the first request.
- ``tokens_per_minute``: a tokens bucket (estimated prompt + max_tokens per request).
- ``all``: several of them at once; a request must fit every one and only then uses any of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .quota_policy import (
    EPSILON,
    Bucket,
    QuotaPolicy,
    format_duration,
    positive,
)

__all__ = [
    "AllOf",
    "AzureWindows",
    "OpenAIBuckets",
    "ScheduledBucket",
    "TokenBucket",
    "TokensPerMinute",
    "build_policy",
]


class TokenBucket(QuotaPolicy):
    """Requests per second through a bucket of ``burst`` requests (default a tenth of a second's worth).

    :param rate: requests per second.
    :param burst: bucket size in requests; None for ``max(1, rate / 10)``.
    :param retry_hint: ``ms`` (a short ``retry-after-ms``), ``seconds``, ``both`` or ``none``.
    """

    def __init__(self, rate: float, burst: float | None = None, retry_hint: str = "ms") -> None:
        super().__init__(retry_hint)
        rate = positive(rate, "rate")
        capacity = max(1.0, rate / 10.0) if burst is None else positive(burst, "burst")
        self.bucket = Bucket(rate, capacity)

    @property
    def rate(self) -> float:
        return self.bucket.rate

    def set_rate(self, now: float, rate: float) -> None:
        """Change the refill rate from ``now`` on (the level earned so far is kept)."""
        self.bucket.advance(now)
        self.bucket.rate = positive(rate, "rate")

    def advance(self, now: float) -> None:
        self.bucket.advance(now)

    def wait(self, now: float, tokens: int) -> float:
        return self.bucket.wait(1.0)

    def consume(self, now: float, tokens: int) -> None:
        self.bucket.level -= 1.0


class ScheduledBucket(TokenBucket):
    """A requests/s bucket whose rate follows ``steps`` (``(offset_s, rate)``, offsets from the first
    request), e.g. ``[(0, 200), (10, 80)]``: a quota another tenant starts sharing mid-run."""

    def __init__(
        self, steps: Sequence[tuple[float, float]], burst: float | None = None, retry_hint: str = "ms"
    ) -> None:
        ordered = sorted((float(t), positive(r, "rate")) for t, r in steps)
        if not ordered or ordered[0][0] > 0:
            raise ValueError("steps must start at offset 0 or earlier, e.g. [[0, 200], [10, 80]]")
        self.steps = ordered
        super().__init__(self.rate_at(0.0), burst, retry_hint)

    def rate_at(self, offset: float) -> float:
        rate = self.steps[0][1]
        for at, value in self.steps:
            if at <= offset:
                rate = value
        return rate

    def advance(self, now: float) -> None:
        assert self.origin is not None
        # refill piecewise, so a step's new rate applies from its own time, not from this request's
        for at, rate in self.steps:
            when = self.origin + at
            if self.bucket.at is not None and self.bucket.at < when <= now and rate != self.bucket.rate:
                self.set_rate(when, rate)
        self.bucket.advance(now)


class TokensPerMinute(QuotaPolicy):
    """Tokens per minute through a bucket of ``burst_seconds`` worth of tokens (default 1 s).

    The cost of a request is what the handler estimates before serving it (prompt + max_tokens), as
    the real services count it.
    """

    def __init__(self, tokens_per_minute: float, burst_seconds: float = 1.0, retry_hint: str = "ms") -> None:
        super().__init__(retry_hint)
        per_second = positive(tokens_per_minute, "tokens_per_minute") / 60.0
        self.tokens_per_minute = float(tokens_per_minute)
        self.bucket = Bucket(per_second, per_second * positive(burst_seconds, "burst_seconds"))

    def advance(self, now: float) -> None:
        self.bucket.advance(now)

    def wait(self, now: float, tokens: int) -> float:
        return self.bucket.wait(float(tokens))

    def consume(self, now: float, tokens: int) -> None:
        self.bucket.level -= tokens


class AzureWindows(QuotaPolicy):
    """Azure OpenAI's quotas: RPM and TPM enforced as fixed windows of ``window`` seconds.

    Each window admits ``RPM * window / 60`` requests and ``TPM * window / 60`` tokens. Windows are
    aligned so that the first request arrives ``phase`` seconds into one. Every answer carries the
    remaining counts; a 429 carries the time to the window's end both as ``retry-after-ms`` and as a
    whole-second ``Retry-After``.
    """

    def __init__(
        self,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        window: float = 10.0,
        phase: float = 0.0,
        retry_hint: str = "both",
    ) -> None:
        super().__init__(retry_hint)
        if requests_per_minute is None and tokens_per_minute is None:
            raise ValueError("azure needs requests_per_minute and/or tokens_per_minute")
        self.window = positive(window, "window")
        if not 0 <= phase < self.window:
            raise ValueError(f"phase must be within [0, window), got {phase!r}")
        self.phase = float(phase)
        self.request_limit = (
            None
            if requests_per_minute is None
            else math.floor(positive(requests_per_minute, "requests_per_minute") * self.window / 60.0)
        )
        self.token_limit = (
            None
            if tokens_per_minute is None
            else math.floor(positive(tokens_per_minute, "tokens_per_minute") * self.window / 60.0)
        )
        self.index: int | None = None
        self.requests = self.tokens = 0

    def window_start(self, now: float) -> float:
        assert self.origin is not None
        base = self.origin - self.phase
        return base + math.floor((now - base) / self.window) * self.window

    def advance(self, now: float) -> None:
        assert self.origin is not None
        index = math.floor((now - (self.origin - self.phase)) / self.window)
        if index != self.index:
            self.index, self.requests, self.tokens = index, 0, 0

    def wait(self, now: float, tokens: int) -> float:
        full = (self.request_limit is not None and self.requests + 1 > self.request_limit) or (
            self.token_limit is not None and self.tokens + tokens > self.token_limit and self.tokens > 0
        )
        return self.window_start(now) + self.window - now if full else 0.0

    def consume(self, now: float, tokens: int) -> None:
        self.requests += 1
        self.tokens += tokens

    def headers(self, now: float) -> dict[str, str]:
        headers = {}
        if self.request_limit is not None:
            headers["x-ratelimit-remaining-requests"] = str(max(0, self.request_limit - self.requests))
        if self.token_limit is not None:
            headers["x-ratelimit-remaining-tokens"] = str(max(0, self.token_limit - self.tokens))
        return headers


class OpenAIBuckets(QuotaPolicy):
    """OpenAI's request and token limits as buckets refilling at RPM/60 and TPM/60 per second.

    A bucket holds ``burst_seconds`` of its rate (OpenAI enforces quotas over short intervals, not as a
    whole minute's burst). Headers on every answer: ``x-ratelimit-limit-*`` (per minute),
    ``x-ratelimit-remaining-*`` (whole units left in the bucket) and ``x-ratelimit-reset-*`` (time
    until the bucket is full again). OpenAI sends no ``Retry-After`` by default: ``retry_hint="none"``.
    """

    def __init__(
        self,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        burst_seconds: float = 1.0,
        retry_hint: str = "none",
    ) -> None:
        super().__init__(retry_hint)
        if requests_per_minute is None and tokens_per_minute is None:
            raise ValueError("openai needs requests_per_minute and/or tokens_per_minute")
        burst = positive(burst_seconds, "burst_seconds")
        self.limits: dict[str, tuple[float, Bucket]] = {}
        for kind, per_minute in (("requests", requests_per_minute), ("tokens", tokens_per_minute)):
            if per_minute is not None:
                rate = positive(per_minute, f"{kind}_per_minute") / 60.0
                self.limits[kind] = (float(per_minute), Bucket(rate, max(1.0, rate * burst)))

    def advance(self, now: float) -> None:
        for _, bucket in self.limits.values():
            bucket.advance(now)

    def wait(self, now: float, tokens: int) -> float:
        return max(
            bucket.wait(1.0 if kind == "requests" else float(tokens))
            for kind, (_, bucket) in self.limits.items()
        )

    def consume(self, now: float, tokens: int) -> None:
        for kind, (_, bucket) in self.limits.items():
            bucket.level -= 1.0 if kind == "requests" else tokens

    def headers(self, now: float) -> dict[str, str]:
        headers = {}
        for kind, (per_minute, bucket) in self.limits.items():
            headers[f"x-ratelimit-limit-{kind}"] = str(math.floor(per_minute))
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.level + EPSILON)))
            headers[f"x-ratelimit-reset-{kind}"] = format_duration(bucket.time_to_full())
        return headers


class AllOf(QuotaPolicy):
    """Several quotas at once (e.g. a requests bucket and a tokens/min cap): a request is admitted only
    if it fits every one, and only then charged to each; the longest wait is the hint, sent as this
    policy's own ``retry_hint`` (the parts' hints are not used)."""

    def __init__(self, policies: Sequence[QuotaPolicy], retry_hint: str = "ms") -> None:
        super().__init__(retry_hint)
        if not policies:
            raise ValueError("all needs at least one policy")
        self.policies = list(policies)

    def on_start(self, now: float) -> None:
        for policy in self.policies:
            policy._start(now)

    def advance(self, now: float) -> None:
        for policy in self.policies:
            policy.advance(now)

    def wait(self, now: float, tokens: int) -> float:
        return max(policy.wait(now, tokens) for policy in self.policies)

    def consume(self, now: float, tokens: int) -> None:
        for policy in self.policies:
            policy.consume(now, tokens)

    def headers(self, now: float) -> dict[str, str]:
        merged: dict[str, str] = {}
        for policy in self.policies:
            merged.update(policy.headers(now))
        return merged


_KINDS: dict[str, tuple[type[QuotaPolicy], frozenset[str]]] = {
    "token_bucket": (TokenBucket, frozenset({"rate", "burst", "retry_hint"})),
    "schedule": (ScheduledBucket, frozenset({"steps", "burst", "retry_hint"})),
    "tokens_per_minute": (TokensPerMinute, frozenset({"tokens_per_minute", "burst_seconds", "retry_hint"})),
    "azure": (
        AzureWindows,
        frozenset({"requests_per_minute", "tokens_per_minute", "window", "phase", "retry_hint"}),
    ),
    "openai": (
        OpenAIBuckets,
        frozenset({"requests_per_minute", "tokens_per_minute", "burst_seconds", "retry_hint"}),
    ),
}


def build_policy(config: Mapping[str, Any] | None) -> QuotaPolicy | None:
    """A policy from the server's JSON config; ``None`` or ``{}`` means no quota.

    ``{"kind": "token_bucket", "rate": 100}``,
    ``{"kind": "token_bucket", "rate": 100, "retry_hint": "none"}``,
    ``{"kind": "azure", "requests_per_minute": 3000, "window": 10}``,
    ``{"kind": "openai", "requests_per_minute": 9000, "tokens_per_minute": 2000000}``,
    ``{"kind": "schedule", "steps": [[0, 200], [10, 80]]}``,
    ``{"kind": "tokens_per_minute", "tokens_per_minute": 60000}``,
    ``{"kind": "all", "policies": [{...}, {...}]}``. Unknown kinds or fields are errors, not ignored.
    """
    if not config:
        return None
    if not isinstance(config, Mapping):
        raise ValueError(f"a quota must be a JSON object, got {type(config).__name__}")
    settings = dict(config)
    kind = settings.pop("kind", None)
    if kind == "all":
        unknown = sorted(set(settings) - {"policies", "retry_hint"})
        if unknown:
            raise ValueError(f"unknown field(s) for quota kind 'all': {', '.join(unknown)}")
        parts = [build_policy(part) for part in settings.get("policies") or []]
        return AllOf([p for p in parts if p is not None], settings.get("retry_hint", "ms"))
    if kind not in _KINDS:
        raise ValueError(f"unknown quota kind {kind!r}; expected one of {sorted([*_KINDS, 'all'])}")
    cls, allowed = _KINDS[kind]
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise ValueError(f"unknown field(s) for quota kind {kind!r}: {', '.join(unknown)}")
    if kind == "schedule":
        settings["steps"] = [(float(t), float(r)) for t, r in settings.get("steps") or []]
    try:
        return cls(**settings)
    except TypeError as exc:  # a required field missing
        raise ValueError(f"quota kind {kind!r}: {exc}") from None
