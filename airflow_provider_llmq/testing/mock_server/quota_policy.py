"""What every quota policy of the mock server shares: the decision on one request, the policy's
interface, a continuously refilling bucket, and the formats of rate headers and retry hints."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

RetryHint = Literal["ms", "seconds", "both", "none"]
RETRY_HINTS: tuple[str, ...] = ("ms", "seconds", "both", "none")
EPSILON = 1e-9  # float dust in bucket levels must not refuse a request that exactly fits


@dataclass(frozen=True)
class Decision:
    """What to do with one request.

    :param allowed: serve it (True) or answer 429 (False).
    :param headers: rate headers to send with the answer, the retry hint included on a 429.
    :param wait: seconds until this request would have fitted (0 when allowed); the truth, whether or
        not the hint tells it.
    """

    allowed: bool
    headers: dict[str, str] = field(default_factory=dict)
    wait: float = 0.0


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: ``17ms`` below a second, ``1.5s`` below a minute, then ``6m0s``/``1h2m3s``."""
    seconds = max(0.0, seconds)
    if seconds < 1.0:
        return f"{math.ceil(seconds * 1000)}ms"
    hours, rest = divmod(seconds, 3600.0)
    minutes, secs = divmod(rest, 60.0)
    text = f"{round(secs, 3):g}s"
    if hours or minutes:
        text = f"{int(minutes)}m{text}"
    if hours:
        text = f"{int(hours)}h{text}"
    return text


def retry_headers(wait: float, hint: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    if hint in ("ms", "both"):
        headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
    if hint in ("seconds", "both"):
        headers["Retry-After"] = str(max(1, math.ceil(wait)))
    return headers


def positive(value: float, name: str) -> float:
    value = float(value)
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value


class QuotaPolicy(ABC):
    """A quota the server enforces. Subclasses say how long a request must wait to fit, how it uses
    the quota, and which headers describe the quota; :meth:`admit` puts that together."""

    def __init__(self, retry_hint: str = "ms") -> None:
        if retry_hint not in RETRY_HINTS:
            raise ValueError(f"retry_hint must be one of {RETRY_HINTS}, got {retry_hint!r}")
        self.retry_hint = retry_hint
        self.origin: float | None = None  # time of the first request: schedules and windows count from it

    def admit(self, now: float, tokens: int = 0) -> Decision:
        """Admit (and charge) a request of ``tokens`` estimated tokens arriving at ``now``, or refuse it."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        self._start(now)
        self.advance(now)
        wait = self.wait(now, tokens)
        if wait <= 0:
            self.consume(now, tokens)
            return Decision(True, self.headers(now))
        return Decision(False, {**self.headers(now), **retry_headers(wait, self.retry_hint)}, wait)

    def _start(self, now: float) -> None:
        if self.origin is None:
            self.origin = now
            self.on_start(now)

    def on_start(self, now: float) -> None:  # noqa: B027 (an optional hook)
        """Called once, at the first request."""

    @abstractmethod
    def advance(self, now: float) -> None:
        """Bring the quota up to ``now`` (refill buckets, roll windows)."""

    @abstractmethod
    def wait(self, now: float, tokens: int) -> float:
        """Seconds until a request of ``tokens`` fits; 0 when it fits now. Changes nothing."""

    @abstractmethod
    def consume(self, now: float, tokens: int) -> None:
        """Charge an admitted request."""

    def headers(self, now: float) -> dict[str, str]:
        """Rate headers sent on every answer; none by default."""
        return {}


class Bucket:
    """A continuously refilling bucket; the level may go below 0 after one oversized request (debt)."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.level = capacity
        self.at: float | None = None

    def advance(self, now: float) -> None:
        if self.at is not None and now > self.at:
            self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now if self.at is None else max(self.at, now)

    def wait(self, cost: float) -> float:
        # a request bigger than the whole bucket fits once the bucket is full, or it never would
        need = min(cost, self.capacity) - self.level
        return 0.0 if need <= EPSILON else need / self.rate

    def time_to_full(self) -> float:
        return max(0.0, self.capacity - self.level) / self.rate
