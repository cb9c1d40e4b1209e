"""Configuration, deterministic answers and fault plans of the mock server.

Everything here is a pure function of (prompt, attempt number, config): a test can predict exactly
what the server does with a row (its answer, which attempt fails and how) without asking the server,
and an answer that lands on the wrong row or lost its system prompt is caught by comparing strings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .quotas import build_policy

DEFAULT_FAULT_KINDS = ("500", "429", "reset", "malformed")
#: 200 answers of unusual shapes, built around the prompt's normal answer:
#: ``filtered`` (finish_reason content_filter, empty content), ``tool_calls`` (content null, one
#: tool call), ``refusal`` (content null, a refusal text), ``length`` (empty content cut by
#: max_tokens), ``length_text`` (the answer, finish_reason length), ``parts`` (the answer as a list of
#: text parts), ``drip`` (the normal answer, its body sent one byte every N ms: ``[[drip:500]]``)
ANSWER_KINDS = frozenset({"filtered", "tool_calls", "refusal", "length", "length_text", "parts", "drip"})
#: kinds that fail on every attempt (the API never accepts the prompt), not only on the first ones;
#: ``redirect`` is a 307 to ``MockConfig.redirect_url``, ``quota`` a 429 ``insufficient_quota``,
#: ``echo`` a 400 (``[[echo:404]]``: that status) whose error code quotes the non-standard request
#: headers and whose message quotes them all,
#: header, secrets included, as some gateways do
PERMANENT_KINDS = frozenset({"content_filter", "context_length", "redirect", "quota", "echo"}) | ANSWER_KINDS
_NAMED_KINDS = frozenset({"reset", "malformed", "empty"}) | PERMANENT_KINDS
#: kinds of ``MockConfig.noise`` besides the 5xx statuses
NOISE_KINDS = frozenset({"429", "429_no_hint", "reset"})
#: ms per byte of a ``drip`` answer without a value
DEFAULT_DRIP_MS = 1000

# [[500]] [[500x2]] [[429:ms=300]] [[429:s=86400x99]] [[resetx2]] [[slow:3000]] [[content_filter]]
# [[redirect]] [[quota]] [[echo]] [[drip:500]] [[tool_calls]] ...
_MARKER = re.compile(
    r"\[\[(\d{3}|reset|malformed|empty|slow|content_filter|context_length|redirect|quota|echo|filtered"
    r"|tool_calls|refusal|length_text|length|parts|drip)"
    r"(?::(?:(ms|s)=)?(\d+))?(?:x(\d+))?\]\]"
)
# [[long:300]]: the answer goes on for 300 more tokens (a model more talkative than any estimate)
_LONG_MARKER = re.compile(r"\[\[long:(\d+)\]\]")
# headers a prompt asks its fault answers to carry, verbatim: [[retry-after=0]],
# [[retry-after-ms=-250]], [[retry-after=Wed, 21 Oct 2015 07:28:00 GMT]], [[x-should-retry=false]],
# [[x-ratelimit-remaining-requests=0]] (a quota's bucket at zero: evidence for the client's limiter).
# A retry-after marker replaces the fault's own wait headers (a 429 sends none but those given).
HEADER_MARKERS = ("retry-after", "retry-after-ms", "x-should-retry", "x-ratelimit-remaining-requests")
_MARKER_NAMES = "|".join(map(re.escape, sorted(HEADER_MARKERS, key=len, reverse=True)))  # -ms first
_HEADER_MARKER = re.compile(rf"\[\[({_MARKER_NAMES})=([^\]]*)\]\]", re.IGNORECASE)


def set_fields(config: Any, changes: dict[str, Any], what: str) -> None:
    """Set a config dataclass's fields at runtime; an unknown name is an error, not a silently
    ignored typo."""
    unknown = sorted(set(changes) - {f.name for f in fields(config)})
    if unknown:
        raise ValueError(f"unknown {what} field(s): {', '.join(unknown)}")
    for name, value in changes.items():
        setattr(config, name, value)


@dataclass
class MockConfig:
    """Every knob of the mock server; all of them can be changed at runtime (``configure``).

    Rates are fractions of *distinct prompts* (not of requests) so that a retried row meets the same
    fate on every run with the same ``seed``: a soak test knows in advance which rows must end as
    errors and which must recover.
    """

    api_key: str = "mock-key"
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    rps: float | None = None
    max_concurrency: int | None = None
    seed: int = 0
    fault_rate: float = 0.0
    fault_kinds: list[str] = field(default_factory=lambda: list(DEFAULT_FAULT_KINDS))
    fault_attempts: int = 1
    slow_rate: float = 0.0
    slow_ms: float = 0.0
    content_filter_rate: float = 0.0
    #: Azure deployments that exist; empty means every deployment name is accepted
    deployments: list[str] = field(default_factory=list)
    #: ``{"after": N, "count": M}``: after N answered chat requests the next M get 401
    auth_fail: dict[str, int] | None = None
    #: retry-after-ms sent with a ``[[429]]`` marker or a 429 from ``fault_kinds``
    retry_after_ms: int = 200
    #: where a ``[[redirect]]`` answer points (its ``Location``); None: a path on this server
    redirect_url: str | None = None
    #: a quota the server enforces, with its rate headers and 429s (``quotas.build_policy``), e.g.
    #: ``{"kind": "token_bucket", "rate": 100}``; None: none. Its clock starts at the first request
    #: after it is set or the stats are reset.
    quota: dict[str, Any] | None = None
    #: noise on every request, on top of any quota: the share of requests answered with each kind,
    #: drawn per request (prompt and attempt), so a retry can meet it again as on a real gateway.
    #: Kinds: ``"429"`` (with ``retry_after_ms``), ``"429_no_hint"``, a 5xx such as ``"500"`` or
    #: ``"503"``, ``"reset"``; e.g. ``{"429": 0.02, "500": 0.02}``
    noise: dict[str, float] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse settings the server could only misinterpret silently (typos in kinds, bad rates)."""
        for kind in self.fault_kinds:
            if not (kind in _NAMED_KINDS or re.fullmatch(r"\d{3}", str(kind))):
                raise ValueError(f"unknown fault kind {kind!r}")
        if not self.fault_kinds and self.fault_rate:
            raise ValueError("fault_rate needs at least one fault kind")
        for name in ("fault_rate", "slow_rate", "content_filter_rate"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if self.auth_fail is not None and not {"after", "count"} <= set(self.auth_fail):
            raise ValueError('auth_fail must look like {"after": N, "count": M}')
        noise = self.noise or {}
        for kind, share in noise.items():
            if kind not in NOISE_KINDS and not re.fullmatch(r"5\d\d", str(kind)):
                raise ValueError(f"unknown noise kind {kind!r} (429, 429_no_hint, 5xx, reset)")
            if not 0.0 <= float(share) <= 1.0:
                raise ValueError(f"noise share of {kind!r} must be within [0, 1]")
        if sum(float(share) for share in noise.values()) > 1.0:
            raise ValueError("noise shares add up to more than 1")
        build_policy(self.quota)  # an unknown kind or field is refused now, not at the first request

    def update(self, **changes: Any) -> None:
        """Apply runtime changes; an unknown name is an error, not a silently ignored typo."""
        backup = asdict(self)
        set_fields(self, changes, "config")
        try:
            self.validate()
        except ValueError:
            for name, value in backup.items():
                setattr(self, name, value)
            raise

    def public_dict(self) -> dict[str, Any]:
        """The config as JSON-able dict without the key (admin answers and logs must not leak it)."""
        data = asdict(self)
        data.pop("api_key")
        return data


@dataclass(frozen=True)
class Fault:
    """What the server does instead of a normal answer (``kind``), plus the headers to send:
    the 429 wait headers, and any the prompt asked for with a header marker."""

    kind: str
    retry_after_s: int | None = None
    retry_after_ms: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    drip_ms: int | None = None
    status: int | None = None  # of an ``echo`` answer


def prompt_hash(prompt: str) -> str:
    """Key of the per-prompt attempt counter (hex sha256): stats never hold prompt text."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def normalise_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """``None`` and ``{}`` mean the same request, so they must give the same answer."""
    return dict(params or {})


def expected_answer(
    model: str | None, system_prompt: str | None, prompt: str, params: dict[str, Any] | None = None
) -> str:
    """The answer the server gives for this request: tests compare it with what landed on a row.

    ``model`` is the Azure deployment (Azure route) or the body's ``model`` (OpenAI route);
    ``params`` is the body minus ``messages``, ``model`` and ``stream``.
    """
    blob = json.dumps([model, system_prompt, prompt, normalise_params(params)], sort_keys=True)
    digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
    answer = f"answer:{digest} len={len(prompt)}"
    longer = _LONG_MARKER.search(prompt)
    return answer + " more" * int(longer.group(1)) if longer else answer


def _prompt_draw(prompt: str, seed: int) -> tuple[float, int]:
    """A uniform draw in [0, 1) and the full hash, both fixed by (seed, prompt)."""
    h = int(hashlib.sha256(f"{seed}|{prompt}".encode()).hexdigest(), 16)
    return (h >> 192) / float(1 << 64), h


def planned_fault(prompt: str, config: MockConfig) -> str | None:
    """The rate-driven fate of a prompt: ``"content_filter"``, ``"slow"``, a fault kind or None.

    Markers inside the prompt are not considered (they are visible in the text). The rates take
    disjoint slices of one uniform draw, so a prompt is never picked by two of them.
    """
    u, h = _prompt_draw(prompt, config.seed)
    edge = config.content_filter_rate
    if u < edge:
        return "content_filter"
    edge += config.fault_rate
    if u < edge:
        return str(config.fault_kinds[h % len(config.fault_kinds)])
    edge += config.slow_rate
    if u < edge:
        return "slow"
    return None


def jitter_ms(prompt: str, config: MockConfig) -> float:
    """Per-prompt latency jitter: deterministic so benchmark runs are comparable."""
    if not config.latency_jitter_ms:
        return 0.0
    _, h = _prompt_draw(prompt, config.seed)
    return config.latency_jitter_ms * ((h >> 64) & 0xFFFF) / 65536.0


def header_markers(prompt: str) -> tuple[tuple[str, str], ...]:
    """The headers a prompt's markers ask its fault answers to carry (names lower-cased)."""
    return tuple((m.group(1).lower(), m.group(2).strip()) for m in _HEADER_MARKER.finditer(prompt))


def _make_fault(kind: str, unit: str | None, value: int | None, config: MockConfig) -> Fault:
    if kind == "drip":
        return Fault(kind, drip_ms=value if value is not None else DEFAULT_DRIP_MS)
    if kind == "echo":
        return Fault(kind, status=value or 400)
    if kind != "429":
        return Fault(kind)
    if unit == "s" and value is not None:
        return Fault(kind, retry_after_s=value)
    ms = value if value is not None else config.retry_after_ms
    return Fault(kind, retry_after_s=max(1, math.ceil(ms / 1000)), retry_after_ms=ms)


def plan(prompt: str, attempt: int, config: MockConfig, noise: bool = True) -> tuple[float, Fault | None]:
    """Extra delay (ms) and the fault, if any, for the ``attempt``-th request carrying ``prompt``.

    Markers win over rates; ``slow`` adds delay on every attempt; the first marker active on this
    attempt decides the fault; permanent kinds fail on every attempt. ``noise=False``: the prompt is
    an item of a pack, whose request meets the noise once, not once per item.
    """
    delay = 0.0
    fault: Fault | None = None
    for m in _MARKER.finditer(prompt):
        kind, unit, value, times = m.group(1), m.group(2), m.group(3), m.group(4)
        if kind == "slow":
            delay += float(value or 0)
            continue
        active = kind in PERMANENT_KINDS or attempt <= int(times or 1)
        if fault is None and active:
            fault = _make_fault(kind, unit, int(value) if value else None, config)
    rate_kind = (
        planned_fault(prompt, config)
        if (config.fault_rate or config.slow_rate or config.content_filter_rate)
        else None
    )
    if rate_kind == "slow":
        delay += config.slow_ms
    elif (
        rate_kind is not None
        and fault is None
        and (rate_kind in PERMANENT_KINDS or attempt <= config.fault_attempts)
    ):
        fault = _make_fault(rate_kind, None, None, config)
    if fault is None and config.noise and noise:
        fault = _noise(prompt, attempt, config)
    if fault is not None:
        headers = header_markers(prompt)
        if headers:
            fault = dataclasses.replace(fault, headers=headers)
    return delay, fault


def _noise(prompt: str, attempt: int, config: MockConfig) -> Fault | None:
    """The noise this request meets, if any: a draw fixed by (seed, prompt, attempt)."""
    h = int(hashlib.sha256(f"noise|{config.seed}|{attempt}|{prompt}".encode()).hexdigest()[:16], 16)
    u = h / float(1 << 64)
    edge = 0.0
    for kind, share in sorted((config.noise or {}).items()):
        edge += float(share)
        if u < edge:
            if kind == "429_no_hint":
                return Fault("429")
            return _make_fault(kind, None, None, config)
    return None
