"""Client-side limits: requests/min, tokens/min and a global pause, spread evenly over time.

Azure OpenAI enforces per-minute quotas over 1-10 s windows (RPM/60 per second), so a limiter that
lets a whole minute's quota out at once draws 429s. :class:`Pacer` is a GCRA (virtual scheduling)
pacer: a request of cost ``c`` gets the slot ``t = max(now, tat)`` and moves ``tat`` to
``t + c * 60 / rate``, so requests leave evenly spaced, never in a burst, and idle time earns no credit.
(The schedule is kept as reserved *units* on a line, so that a pause or a run-time rate change moves
the slots already promised along with it.)
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
WAKE_INTERVAL = 0.1
"""Once a pacer's rate changes at run time, waiters re-check their slot at least this often."""


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
    """A committed slot: ``slot`` is when it was due when reserved; ``request_unit`` / ``token_unit``
    are its place on the pacer's two schedules, so a later pause or rate cut moves it along with them."""

    slot: float
    request_unit: float
    token_unit: float


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


class _Schedule:
    """One budget (requests or tokens) as a line: unit ``u`` becomes due at ``t0 + (u - v0) / rate``.

    A reservation keeps its unit, not its time, so moving the line moves every pending slot with it:
    a pause shifts the line later; a rate change pivots it, re-spacing the pending slots at the new
    rate. Not thread-safe: the pacer's lock guards it. ``rate is None`` means unlimited.
    """

    __slots__ = ("next", "rate", "t0", "v0")

    def __init__(self, per_minute: float | None, name: str) -> None:
        interval = _interval(per_minute, name)
        self.rate = 1.0 / interval if interval else None  # units per second
        self.t0 = self.v0 = 0.0
        self.next = -math.inf  # first unit not yet reserved

    def unit_at(self, t: float) -> float:
        return -math.inf if self.rate is None else self.v0 + (t - self.t0) * self.rate

    def time_of(self, unit: float) -> float:
        return -math.inf if self.rate is None else self.t0 + (unit - self.v0) / self.rate

    def shift(self, seconds: float) -> None:
        self.t0 += seconds

    def set_rate(self, per_minute: float | None, name: str, pivot: float) -> None:
        """Units due before ``pivot`` keep their times (or come a little later); later ones follow the
        new rate from ``pivot``: a slower rate re-spaces them later, a faster one earlier."""
        interval = _interval(per_minute, name)
        rate = 1.0 / interval if interval else None
        if rate == self.rate:
            return
        if rate is None:
            self.rate = None
            return
        if self.rate is None:  # units reserved while unlimited are due at once: start a fresh line
            self.t0, self.v0, self.rate, self.next = pivot, 0.0, rate, -math.inf
            return
        self.v0 = self.unit_at(pivot)
        self.t0, self.rate = pivot, rate


class Pacer:
    """The pure scheduling core: computes when a request may go and updates state; never waits.

    Thread-safe (a short lock around arithmetic only, never held while waiting), so one pacer may be
    shared by threads and by event loops. A pause *freezes* the schedule: slots pending when it starts
    are pushed back by its length, so they stay evenly spaced after it instead of bursting at its end.
    :meth:`set_requests_per_minute` changes the request rate at run time (the hook of
    :class:`~airflow_provider_llmq.core.pacing.adaptive.AdaptiveRate`), re-spacing the slots already
    promised too: after a cut, the requests waiting do not go out at the old rate.
    """

    def __init__(
        self,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._req = _Schedule(requests_per_minute, "requests_per_minute")
        self._tok = _Schedule(tokens_per_minute, "tokens_per_minute")
        self._requests_per_minute = requests_per_minute
        self.clock = clock
        self._lock = threading.Lock()
        self._paused_until = -math.inf
        self._requests = self._tokens = self._adjustment = self._pauses = 0
        self._wake = math.inf  # longest sleep between two checks of a slot: bounded once rates change

    @property
    def requests_per_minute(self) -> float | None:
        return self._requests_per_minute

    def set_requests_per_minute(self, requests_per_minute: float | None) -> None:
        """Change the request rate at run time, for slots already reserved too.

        A slower rate re-spaces pending slots from now (each only moves later). A faster one re-spaces
        them from ``WAKE_INTERVAL`` ahead (a slot due before that may come up to that much later):
        from the first call on, waiters check their slot at least that often (see :meth:`nap`), so
        none is asleep past a slot that moved earlier. Make the first call before anyone waits.
        """
        with self._lock:
            now = self.clock()
            current = self._req.rate
            new = None if requests_per_minute is None else requests_per_minute / 60.0
            self._wake = WAKE_INTERVAL
            faster = current is not None and (new is None or new > current)
            pivot = max(now + (self._wake if faster else 0.0), self._paused_until)
            self._req.set_rate(requests_per_minute, "requests_per_minute", pivot)
            self._requests_per_minute = requests_per_minute

    def reserve(self, tokens: int = 0) -> Reservation:
        """Commit the next free slot to a request of ``tokens`` estimated tokens."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        with self._lock:
            now = self.clock()
            req, tok = self._req, self._tok
            r_unit = max(req.unit_at(now), req.next)
            t_unit = max(tok.unit_at(now), tok.next)
            slot = max(now, self._paused_until, req.time_of(r_unit), tok.time_of(t_unit))
            # the units the slot really uses: waiting on one budget earns no credit on the other
            r_unit = max(r_unit, req.unit_at(slot))
            t_unit = max(t_unit, tok.unit_at(slot))
            req.next = r_unit + 1
            tok.next = t_unit + tokens
            self._requests += 1
            self._tokens += tokens
            return Reservation(slot, r_unit, t_unit)

    def remaining(self, reservation: Reservation) -> float:
        """Seconds until ``reservation`` may go, counting pauses and rate cuts that came after it."""
        with self._lock:
            due = max(
                self._req.time_of(reservation.request_unit),
                self._tok.time_of(reservation.token_unit),
                self._paused_until,
            )
            delay = due - self.clock()
        return delay if delay > _EPSILON else 0.0

    def nap(self, delay: float) -> float:
        """How long a waiter with ``delay`` left may sleep before it checks :meth:`remaining` again."""
        return min(delay, self._wake)

    def adjust_tokens(self, estimated: int, actual: int) -> None:
        """Correct a reservation by the real usage: over-use delays later requests, under-use refunds.

        A refund never moves the schedule before now: idle or refunded capacity cannot pile up into a burst.
        """
        delta = actual - estimated
        with self._lock:
            self._adjustment += delta
            tok = self._tok
            if tok.rate is not None:
                tok.next += delta
                if delta < 0:
                    tok.next = max(tok.next, tok.unit_at(self.clock()))

    def pause_until(self, deadline: float) -> None:
        """Admit nothing before ``deadline`` (pacer clock); a later one extends, an earlier one is ignored."""
        with self._lock:
            start = max(self.clock(), self._paused_until)
            if deadline <= start:
                return
            extra = deadline - start
            self._paused_until = deadline
            self._req.shift(extra)
            self._tok.shift(extra)
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

    def _reserve(self, tokens: int, give_up: Callable[[], bool] | None) -> Reservation | None:
        """The caller's slot, or None when it gave up before reserving one."""
        if give_up is not None and give_up():
            return None
        return self.pacer.reserve(tokens)

    def _next_nap(self, reservation: Reservation | None, give_up: Callable[[], bool] | None) -> float:
        """How long to sleep before the next check; 0.0 once the slot is due or the caller gives up.

        Both acquire loops drive this one decision; they differ only in how they sleep.
        """
        if reservation is None:
            return 0.0
        delay = self.pacer.remaining(reservation)  # re-checks pauses begun meanwhile
        if delay <= 0 or (give_up is not None and give_up()):
            return 0.0
        return self.pacer.nap(delay)


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

    def acquire(self, tokens: int = 0, give_up: Callable[[], bool] | None = None) -> float:
        """Block until a request of ``tokens`` estimated tokens may be sent; returns the seconds waited.

        ``give_up`` is asked before reserving and between naps: once it says True the call returns
        at once, its slot left unused (the caller then sends nothing).
        """
        reservation = self._reserve(tokens, give_up)
        waited = 0.0
        while nap := self._next_nap(reservation, give_up):
            self._sleep(nap)
            waited += nap
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

    async def acquire(self, tokens: int = 0, give_up: Callable[[], bool] | None = None) -> float:
        """Wait until a request of ``tokens`` estimated tokens may be sent; returns the seconds waited.

        ``give_up``: as for :meth:`ThreadLimiter.acquire`.
        """
        reservation = self._reserve(tokens, give_up)
        waited = 0.0
        while nap := self._next_nap(reservation, give_up):
            await self._sleep(nap)
            waited += nap
        return waited
