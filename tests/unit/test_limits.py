"""Limits: even spreading (no 1 s window over quota), token correction, pauses; fake clocks, no real sleeps
except the two small real-clock thread/loop tests."""

from __future__ import annotations

import asyncio
import heapq
import math
import random
import threading
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any, Protocol

import pytest

from airflow_provider_llmq.core.pacing.limits import (
    DEFAULT_MAX_TOKENS,
    PROMPT_OVERHEAD_TOKENS,
    AsyncLimiter,
    LimiterStats,
    Pacer,
    Reservation,
    ThreadLimiter,
    estimate_prompt_tokens,
    estimate_request_tokens,
)

KINDS = ["pacer", "thread", "async"]
HORIZON = 60.0
Admission = tuple[float, int]  # (time, tokens)


class Pausable(Protocol):
    def pause_until(self, deadline: float) -> None: ...
    def pause_for(self, seconds: float) -> None: ...


Event = tuple[float, Callable[[Pausable], None]]  # at this simulated time, do this to the limiter


class FakeClock:
    """A clock whose sleep advances it, firing scheduled events it passes (a pause 'from another thread')."""

    def __init__(self) -> None:
        self.now = 0.0
        self.events: list[tuple[float, Callable[[], None]]] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        target = self.now + seconds
        while self.events and self.events[0][0] <= target:
            at, action = self.events.pop(0)
            self.now = max(self.now, at)
            action()
        self.now = target


class VirtualTime:
    """Virtual time for asyncio: sleepers wake in time order; the clock jumps to each wake time."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0

    def __call__(self) -> float:
        return self.now

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (when, self._seq, action))
        self._seq += 1

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.at(self.now + seconds, lambda: future.set_result(None))
        await future

    def run(self, coros: list[Coroutine[Any, Any, None]]) -> None:
        async def main() -> None:
            tasks = [asyncio.ensure_future(c) for c in coros]
            while not all(t.done() for t in tasks):
                for _ in range(3):  # let every woken task run to its next sleep
                    await asyncio.sleep(0)
                if self._heap:
                    when, _, action = heapq.heappop(self._heap)
                    self.now = max(self.now, when)
                    action()
            for t in tasks:
                t.result()

        asyncio.run(main())


def simulate(
    kind: str,
    rpm: float | None,
    tpm: float | None,
    cost: Callable[[], int],
    events: list[Event] | None = None,
    callers: int = 64,
    latency: float = 0.3,
) -> list[Admission]:
    """Admissions in [0, HORIZON) with callers that always want more than the limits allow.

    pacer: discrete-event simulation of ``callers`` concurrent callers on the bare Pacer protocol;
    thread: one ThreadLimiter caller acquiring back to back (fake sleep advances the clock);
    async: ``callers`` asyncio tasks on an AsyncLimiter in virtual time.
    """
    admitted: list[Admission] = []
    events = events or []
    if kind == "pacer":
        clock = FakeClock()
        pacer = Pacer(rpm, tpm, clock)
        heap: list[tuple[float, int, str, Any]] = []
        seq = iter(range(10**9))
        for _ in range(callers):
            heapq.heappush(heap, (0.0, next(seq), "reserve", None))
        for at, action in events:
            heapq.heappush(heap, (at, next(seq), "event", action))
        while heap and heap[0][0] < HORIZON:
            clock.now, _, what, payload = heapq.heappop(heap)
            if what == "event":
                payload(pacer)
            elif what == "reserve":
                tokens = cost()
                heapq.heappush(heap, (clock.now, next(seq), "admit", (pacer.reserve(tokens), tokens)))
            else:
                reservation, tokens = payload
                delay = pacer.remaining(reservation)
                if delay > 0:
                    heapq.heappush(heap, (clock.now + delay, next(seq), "admit", payload))
                else:
                    admitted.append((clock.now, tokens))
                    heapq.heappush(heap, (clock.now + latency, next(seq), "reserve", None))
    elif kind == "thread":
        clock = FakeClock()
        limiter = ThreadLimiter(rpm, tpm, clock=clock, sleep=clock.sleep)
        clock.events = [(at, partial(action, limiter)) for at, action in sorted(events, key=lambda e: e[0])]
        while len(admitted) < 100_000:  # bounded even if a broken limiter never sleeps
            tokens = cost()
            limiter.acquire(tokens)
            if clock.now >= HORIZON:
                break
            admitted.append((clock.now, tokens))
    else:
        vt = VirtualTime()
        alimiter = AsyncLimiter(rpm, tpm, clock=vt, sleep=vt.sleep)
        for at, action in events:
            vt.at(at, partial(action, alimiter))

        async def worker() -> None:
            while True:
                tokens = cost()
                await alimiter.acquire(tokens)
                if vt.now >= HORIZON:
                    return
                admitted.append((vt.now, tokens))
                await vt.sleep(latency)

        vt.run([worker() for _ in range(callers)])
    return sorted(admitted)


def max_window(admitted: list[Admission], weighted: bool = False, width: float = 1.0) -> int:
    """Most requests (or tokens) admitted in any window [t, t + width) starting at an admission."""
    best, total, j = 0, 0, 0
    for i, (start, _) in enumerate(admitted):
        while j < len(admitted) and admitted[j][0] < start + width:
            total += admitted[j][1] if weighted else 1
            j += 1
        best = max(best, total)
        total -= admitted[i][1] if weighted else 1
    return best


def varied_costs(seed: int = 7) -> Callable[[], int]:
    """Estimated prompt tokens + max_tokens (default 256 when unset), as a caller would reserve."""
    rng = random.Random(seed)
    return lambda: estimate_request_tokens("x" * rng.randint(0, 2000), rng.choice([None, 50, 400]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rpm", [600, 90, 3000])
def test_rpm_spread_evenly_over_a_minute(kind: str, rpm: int) -> None:
    admitted = simulate(kind, rpm, None, lambda: 1)
    assert abs(len(admitted) - rpm) <= 0.02 * rpm
    assert max_window(admitted) <= math.ceil(rpm / 60) + 1
    assert admitted[0][0] == 0.0  # an idle limiter admits at once


@pytest.mark.parametrize("kind", KINDS)
def test_tpm_spread_evenly_with_varied_costs(kind: str) -> None:
    tpm = 60_000
    admitted = simulate(kind, None, tpm, varied_costs())
    tokens = sum(c for _, c in admitted)
    biggest = max(c for _, c in admitted)
    assert abs(tokens - tpm) <= 0.02 * tpm
    assert max_window(admitted, weighted=True) <= math.ceil(tpm / 60) + biggest
    assert len({c for _, c in admitted}) > 10  # costs really varied


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("cost", "expected"), [(10, 600), (500, 120)])
def test_binding_limit_wins(kind: str, cost: int, expected: int) -> None:
    # 600 RPM = one per 0.1 s; 60k TPM = 1000 tokens/s: cost 10 -> RPM binds, cost 500 -> TPM binds
    admitted = simulate(kind, 600, 60_000, lambda: cost)
    assert abs(len(admitted) - expected) <= 0.02 * expected


@pytest.mark.parametrize("kind", KINDS)
def test_pause_holds_everyone_then_resumes_evenly(kind: str) -> None:
    admitted = simulate(kind, 600, None, lambda: 1, events=[(10.05, lambda lim: lim.pause_for(5.0))])
    times = [t for t, _ in admitted]
    assert not [t for t in times if 10.05 <= t < 15.05]
    assert min(t for t in times if t >= 10.05) >= 15.05
    assert max_window(admitted) <= 11  # pending slots were pushed back, not released in a burst at 15.05
    assert abs(len(admitted) - 550) <= 0.02 * 550


def test_pause_only_extends() -> None:
    clock = FakeClock()
    pacer = Pacer(None, None, clock)
    pacer.pause_until(10.0)
    pacer.pause_until(5.0)  # earlier: ignored
    pacer.pause_for(1.0)  # earlier: ignored
    reservation = pacer.reserve()
    assert pacer.remaining(reservation) == 10.0
    assert pacer.snapshot().pauses == 1
    assert pacer.snapshot().pause_remaining == 10.0
    pacer.pause_until(12.0)  # later: extends, also for a request already reserved
    assert pacer.remaining(reservation) == 12.0
    clock.now = 12.0
    assert pacer.remaining(reservation) == 0.0
    assert pacer.snapshot().pause_remaining == 0.0


def test_thread_request_reserved_before_a_pause_waits_for_it() -> None:
    clock = FakeClock()
    limiter = ThreadLimiter(60, clock=clock, sleep=clock.sleep)
    assert limiter.acquire() == 0.0
    clock.events = [(0.5, lambda: limiter.pause_until(5.5))]  # another thread's 429, mid-sleep
    limiter.acquire()  # reserved slot 1.0 before the pause
    assert clock.now >= 5.5
    assert clock.now == pytest.approx(6.0)  # the pause froze the schedule: slot 1.0 + 5.0


def test_acquire_gives_up_between_naps_and_before_reserving() -> None:
    """The run's patience is spent while a request waits for its slot: it returns then, not at the
    slot (which may be minutes away at the slowest rate), and a later one does not even reserve."""
    clock = FakeClock()
    limiter = ThreadLimiter(6, clock=clock, sleep=clock.sleep)  # a slot every 10 s
    limiter.pacer.set_requests_per_minute(6)  # as the adaptive rate does: waiters nap, then re-check
    spent = False
    limiter.acquire(give_up=lambda: spent)  # the first slot is now
    started = clock.now

    def patience() -> bool:
        return clock.now - started >= 0.3

    waited = limiter.acquire(give_up=patience)  # its slot is 10 s away
    assert 0.3 <= waited < 0.5 and clock.now < 1.0
    spent = True
    requests = limiter.snapshot().requests
    assert limiter.acquire(give_up=lambda: spent) == 0.0
    assert limiter.snapshot().requests == requests  # nothing reserved

    vt = VirtualTime()
    async_limiter = AsyncLimiter(6, clock=vt, sleep=vt.sleep)
    async_limiter.pacer.set_requests_per_minute(6)
    done: list[float] = []

    async def request() -> None:
        await async_limiter.acquire(give_up=lambda: vt.now >= 0.3)
        done.append(vt.now)

    vt.run([request(), request()])
    assert done[0] == 0.0 and 0.3 <= done[1] < 0.5


def test_async_request_reserved_before_a_pause_waits_for_it() -> None:
    vt = VirtualTime()
    limiter = AsyncLimiter(60, clock=vt, sleep=vt.sleep)
    admitted: list[float] = []

    async def request() -> None:
        await limiter.acquire()
        admitted.append(vt.now)

    async def hit_429() -> None:
        await vt.sleep(0.5)
        limiter.pause_for(5.0)

    vt.run([request(), request(), hit_429()])
    assert admitted[0] == 0.0
    assert admitted[1] >= 5.5
    assert admitted[1] == pytest.approx(6.0)


def test_adjust_tokens_refund_and_overuse() -> None:
    clock = FakeClock()
    limiter = ThreadLimiter(None, 6000, clock=clock, sleep=clock.sleep)  # 100 tokens/s
    assert limiter.acquire(100) == 0.0  # next free at 1.0
    limiter.adjust_tokens(100, 20)  # refund 80 tokens = 0.8 s
    assert limiter.acquire(100) == pytest.approx(0.2)
    limiter.adjust_tokens(100, 300)  # over-use 200 tokens = 2 s: next free at 1.2 + 2.0
    assert limiter.acquire(50) == pytest.approx(3.0)
    assert clock.now == pytest.approx(3.2)
    assert limiter.snapshot() == LimiterStats(3, 250, 120, 0, 0.0)
    assert limiter.snapshot().tokens == 370


def test_refund_never_moves_the_schedule_before_now() -> None:
    clock = FakeClock()
    pacer = Pacer(None, 6000, clock)  # 100 tokens/s
    pacer.reserve(100)
    clock.now = 0.5
    pacer.adjust_tokens(1000, 0)  # a huge refund must not become credit...
    pacer.adjust_tokens(100, 200)  # ...that swallows a later over-use of 1 s
    first = pacer.reserve(100)
    assert pacer.remaining(first) == pytest.approx(1.0)
    second = pacer.reserve(100)
    assert second.slot - first.slot == pytest.approx(1.0)


def test_unlimited_never_waits_but_counts() -> None:
    def no_sleep(seconds: float) -> None:
        raise AssertionError("unlimited limiter slept")

    limiter = ThreadLimiter(sleep=no_sleep)
    for _ in range(1000):
        assert limiter.acquire(10_000) == 0.0
    assert limiter.snapshot().requests == 1000
    assert limiter.snapshot().tokens_reserved == 10_000_000


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf")])
def test_rejects_bad_rates(bad: float) -> None:
    with pytest.raises(ValueError, match="requests_per_minute"):
        ThreadLimiter(bad)
    with pytest.raises(ValueError, match="tokens_per_minute"):
        AsyncLimiter(None, bad)


def test_rejects_negative_cost() -> None:
    with pytest.raises(ValueError):
        Pacer(60).reserve(-1)


def test_estimates() -> None:
    assert estimate_prompt_tokens("") == PROMPT_OVERHEAD_TOKENS
    assert estimate_prompt_tokens("abcd" * 100) == 100 + PROMPT_OVERHEAD_TOKENS
    assert estimate_prompt_tokens("abcde") == 2 + PROMPT_OVERHEAD_TOKENS  # rounds up
    assert estimate_request_tokens("abcd") == 1 + PROMPT_OVERHEAD_TOKENS + DEFAULT_MAX_TOKENS
    assert estimate_request_tokens("abcd", max_tokens=10) == 1 + PROMPT_OVERHEAD_TOKENS + 10
    assert DEFAULT_MAX_TOKENS == 256


def test_thread_limiter_real_threads_share_slots_safely() -> None:
    limiter = ThreadLimiter(60_000)  # one per millisecond, real clock
    start = time.monotonic()
    deadline = start + 0.2
    admitted: list[float] = []
    lock = threading.Lock()

    def work() -> None:
        while True:
            limiter.acquire()
            now = time.monotonic()
            if now >= deadline:
                return
            with lock:
                admitted.append(now)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert 50 <= len(admitted) <= 201  # slots are 1 ms apart from start: at most 200 (+1 rounding) in 0.2 s
    total = limiter.snapshot().requests
    assert total == len(admitted) + len(threads)
    after: Reservation = limiter.pacer.reserve()
    assert after.slot >= start + total * 0.001 - 1e-9  # every reservation got its own slot


def test_async_limiter_is_not_bound_to_one_event_loop() -> None:
    limiter = AsyncLimiter(60_000)  # created outside any loop, real clock

    async def burst(n: int) -> None:
        for _ in range(n):
            await limiter.acquire(1)

    asyncio.run(burst(5))
    asyncio.run(burst(5))  # a second loop
    threads = [threading.Thread(target=asyncio.run, args=(burst(10),)) for _ in range(2)]  # two loops at once
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert limiter.snapshot().requests == 30
    assert limiter.snapshot().tokens_reserved == 30
