"""Client-side limits: requests/min, tokens/min and a global pause, spread evenly over time.

Azure OpenAI enforces per-minute quotas over 1-10 s windows (RPM/60 per second), so a limiter that
lets a whole minute's quota out at once draws 429s. :class:`Pacer` is a GCRA (virtual scheduling)
pacer: a request of cost ``c`` gets the slot ``t = max(now, tat)`` and moves ``tat`` to
``t + c * 60 / rate``, so requests leave evenly spaced, never in a burst, and idle time earns no credit.
Hand-written, not aiolimiter: ``aiolimiter.AsyncLimiter(rpm, 60)`` lets a whole minute's quota burst
at once, and it has no thread-safe variant and no token correction.

Token cost of a request, reserved before it is sent: ``estimate_request_tokens(system + prompt,
max_tokens)`` = estimated prompt tokens + ``max_tokens`` (``DEFAULT_MAX_TOKENS`` = 256 when unset);
once answered, ``adjust_tokens(estimated, usage.total_tokens)`` corrects the schedule.
Concurrency is the callers' job (a semaphore or a fixed pool of workers).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "PROMPT_OVERHEAD_TOKENS",
    "AsyncLimiter",
    "LimiterStats",
    "Pacer",
    "Reservation",
    "ThreadLimiter",
    "estimate_prompt_tokens",
    "estimate_request_tokens",
]

DEFAULT_MAX_TOKENS = 256
"""Completion tokens reserved for a request that sets no ``max_tokens``."""
PROMPT_OVERHEAD_TOKENS = 8
"""Per-request framing (roles, message separators, reply priming) added to the text estimate."""
_EPSILON = 1e-6  # a remaining wait below this is "now" (avoids float-dust sleeps that never end)


def estimate_prompt_tokens(text: str) -> int:
    """Rough prompt size: ~4 bytes of UTF-8 per token (= chars/4 for ASCII) + a small constant overhead."""
    return math.ceil(len(text.encode("utf-8")) / 4) + PROMPT_OVERHEAD_TOKENS


def estimate_request_tokens(text: str, max_tokens: int | None = None) -> int:
    """What a request costs against tokens/min before it is sent: prompt estimate + ``max_tokens``."""
    return estimate_prompt_tokens(text) + (DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens)


def _interval(per_minute: float | None, name: str) -> float:
    if per_minute is None:
        return 0.0
    if not per_minute > 0 or math.isinf(per_minute):
        raise ValueError(f"{name} must be a positive number or None, got {per_minute!r}")
    return 60.0 / per_minute


@dataclass(frozen=True, slots=True)
class Reservation:
    """A committed slot: ``slot`` on the pacer's clock, and the pacer's pause shift when it was taken."""

    slot: float
    shift: float


@dataclass(frozen=True, slots=True)
class LimiterStats:
    requests: int  # admitted (reserved) requests
    tokens_reserved: int  # sum of the estimated costs
    tokens_adjustment: int  # sum of (actual - estimated) reported by adjust_tokens
    pauses: int  # pauses that moved the deadline
    pause_remaining: float  # seconds until the current pause ends (0 when not paused)

    @property
    def tokens(self) -> int:
        """Tokens accounted for: estimates corrected by the reported usage."""
        return self.tokens_reserved + self.tokens_adjustment


class Pacer:
    """The pure scheduling core: computes when a request may go and updates state; never waits.

    Thread-safe (a short lock around arithmetic only, never held while waiting), so one pacer may be
    shared by threads and by event loops. A pause *freezes* the schedule: slots pending when it starts
    are pushed back by its length, so they stay evenly spaced after it instead of bursting at its end.
    """

    def __init__(
        self,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._req_interval = _interval(requests_per_minute, "requests_per_minute")  # seconds / request
        self._tok_interval = _interval(tokens_per_minute, "tokens_per_minute")  # seconds / token
        self.clock = clock
        self._lock = threading.Lock()
        self._req_tat = self._tok_tat = self._paused_until = -math.inf
        self._shift = 0.0
        self._requests = self._tokens = self._adjustment = self._pauses = 0

    def reserve(self, tokens: int = 0) -> Reservation:
        """Commit the next free slot to a request of ``tokens`` estimated tokens."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        with self._lock:
            now = self.clock()
            slot = max(now, self._paused_until, self._req_tat, self._tok_tat)
            self._req_tat = slot + self._req_interval
            self._tok_tat = slot + tokens * self._tok_interval
            self._requests += 1
            self._tokens += tokens
            return Reservation(slot, self._shift)

    def remaining(self, reservation: Reservation) -> float:
        """Seconds until ``reservation`` may go, counting pauses that began after it was reserved."""
        with self._lock:
            due = max(reservation.slot + self._shift - reservation.shift, self._paused_until)
            delay = due - self.clock()
        return delay if delay > _EPSILON else 0.0

    def adjust_tokens(self, estimated: int, actual: int) -> None:
        """Correct a reservation by the real usage: over-use delays later requests, under-use refunds.

        A refund never moves the schedule before now: idle or refunded capacity cannot pile up into a burst.
        """
        delta = actual - estimated
        with self._lock:
            self._adjustment += delta
            if self._tok_interval:
                self._tok_tat += delta * self._tok_interval
                if delta < 0:
                    self._tok_tat = max(self._tok_tat, self.clock())

    def pause_until(self, deadline: float) -> None:
        """Admit nothing before ``deadline`` (pacer clock); a later one extends, an earlier one is ignored."""
        with self._lock:
            start = max(self.clock(), self._paused_until)
            if deadline <= start:
                return
            extra = deadline - start
            self._paused_until = deadline
            self._shift += extra
            self._req_tat = max(self._req_tat, start) + extra
            self._tok_tat = max(self._tok_tat, start) + extra
            self._pauses += 1

    def pause_for(self, seconds: float) -> None:
        """Pause every request for ``seconds`` from now (e.g. a 429's Retry-After)."""
        self.pause_until(self.clock() + seconds)

    def snapshot(self) -> LimiterStats:
        with self._lock:
            pause = max(0.0, self._paused_until - self.clock())
            return LimiterStats(self._requests, self._tokens, self._adjustment, self._pauses, pause)


class _Limiter:
    """What both limiters share; they differ only in how they wait."""

    def __init__(
        self,
        requests_per_minute: float | None,
        tokens_per_minute: float | None,
        clock: Callable[[], float],
    ) -> None:
        self.pacer = Pacer(requests_per_minute, tokens_per_minute, clock)

    def adjust_tokens(self, estimated: int, actual: int) -> None:
        self.pacer.adjust_tokens(estimated, actual)

    def pause_until(self, deadline: float) -> None:
        self.pacer.pause_until(deadline)

    def pause_for(self, seconds: float) -> None:
        self.pacer.pause_for(seconds)

    def snapshot(self) -> LimiterStats:
        return self.pacer.snapshot()


class ThreadLimiter(_Limiter):
    """Blocking limiter for thread pools: each caller sleeps outside any lock until its slot."""

    def __init__(
        self,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(requests_per_minute, tokens_per_minute, clock)
        self._sleep = sleep

    def acquire(self, tokens: int = 0) -> float:
        """Block until a request of ``tokens`` estimated tokens may be sent; returns the seconds waited."""
        reservation = self.pacer.reserve(tokens)
        waited = 0.0
        while (delay := self.pacer.remaining(reservation)) > 0:  # re-checks pauses begun meanwhile
            self._sleep(delay)
            waited += delay
        return waited


class AsyncLimiter(_Limiter):
    """Asyncio limiter; holds no loop-bound primitive, so any event loop (or several) may use it.

    A cancelled ``acquire`` leaves its slot unused (a short gap, never a burst).
    """

    def __init__(
        self,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(requests_per_minute, tokens_per_minute, clock)
        self._sleep = sleep

    async def acquire(self, tokens: int = 0) -> float:
        """Wait until a request of ``tokens`` estimated tokens may be sent; returns the seconds waited."""
        reservation = self.pacer.reserve(tokens)
        waited = 0.0
        while (delay := self.pacer.remaining(reservation)) > 0:  # re-checks pauses begun meanwhile
            await self._sleep(delay)
            waited += delay
        return waited
