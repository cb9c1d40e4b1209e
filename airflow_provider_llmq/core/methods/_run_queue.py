"""Where the pooled methods' workers take their next row: a row whose attempt must wait (a retry's
backoff, a 429's hint) does not keep its worker asleep.

Each row is its plan (the generator of :mod:`~..transport.engine`): a worker advances it until it
answers or asks to wait; a waiting plan is parked with its due time and the worker takes the next
one. A parked plan comes back ahead of new rows when its wait is over, so a retried row does not
queue behind the whole read-ahead window. The waits were what capped the run under random
refusals: with the row asleep in its slot, a 5 % share of 429s held about a tenth of
``max_concurrency`` idle. Parked rows are still unanswered, so they count against the read-ahead
window as before: memory stays bounded.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections.abc import Iterable

from airflow_provider_llmq.core.transport.engine import Plan

# a woken row sorts before a new one; each class keeps its own arrival order
_WOKEN = 0
_NEW = 1
_STOP = 2


def _close_all(plans: Iterable[Plan]) -> None:
    """Ends plans that will not be advanced again (their ``finally`` blocks run now)."""
    for plan in plans:
        plan.close()


class AsyncRunQueue:
    """The async workers' queue, on the loop: parked plans wait on a timer of the loop.

    It ends the run itself: once the rows are all in (:meth:`end`) and every plan has answered, each
    worker gets ``None``.

    :param workers: the workers that take from it (each gets one ``None`` at the end).
    """

    def __init__(self, workers: int) -> None:
        self._queue: asyncio.PriorityQueue[tuple[int, int, Plan | None]] = asyncio.PriorityQueue()
        self._order = itertools.count()
        self._workers = workers
        self._timers: dict[Plan, asyncio.TimerHandle] = {}
        self._open = 0  # plans put and not yet answered, parked ones included
        self._ended = False

    def put(self, plan: Plan) -> None:
        self._open += 1
        self._queue.put_nowait((_NEW, next(self._order), plan))

    def end(self) -> None:
        """No more rows will be put."""
        self._ended = True
        self._stop_when_done()

    async def get(self) -> Plan | None:
        """The next plan to advance, or ``None`` when the run is over."""
        return (await self._queue.get())[2]

    def park(self, plan: Plan, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._timers[plan] = loop.call_later(seconds, self._wake, plan)

    def answered(self) -> None:
        self._open -= 1
        self._stop_when_done()

    def close(self) -> None:
        """The run stopped early (the caller closed it, or a worker's error ends it): parked plans
        are dropped, never sent."""
        for timer in self._timers.values():
            timer.cancel()
        plans, self._timers = list(self._timers), {}
        _close_all(plans)

    def _wake(self, plan: Plan) -> None:
        del self._timers[plan]
        self._queue.put_nowait((_WOKEN, next(self._order), plan))

    def _stop_when_done(self) -> None:
        if self._ended and self._open == 0:
            for _ in range(self._workers):
                self._queue.put_nowait((_STOP, next(self._order), None))
            self._ended = False  # once


class ThreadRunQueue:
    """The thread pool's queue: a delay queue without a timer thread. A worker that finds nothing
    ready sleeps on the condition until the earliest parked plan is due (or a new one comes).

    The caller ends the run (:meth:`stop`) once it has every answer, or when it stops early.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ready: list[tuple[int, int, Plan]] = []  # a heap: woken first, then arrival order
        self._parked: list[tuple[float, int, Plan]] = []  # a heap by due time
        self._order = itertools.count()
        self._stopped = False

    def put(self, plans: list[Plan]) -> None:
        with self._cond:
            for plan in plans:
                heapq.heappush(self._ready, (_NEW, next(self._order), plan))
            self._cond.notify(len(plans))

    def park(self, plan: Plan, seconds: float) -> None:
        with self._cond:
            if self._stopped:  # the run is over: the row is dropped, never sent
                plan.close()
                return
            heapq.heappush(self._parked, (time.monotonic() + seconds, next(self._order), plan))
            # an idle worker may be asleep until a later due time, or without one
            self._cond.notify()

    def get(self) -> Plan | None:
        """The next plan to advance (a woken one first), or ``None`` once the run is stopped."""
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                while self._parked and self._parked[0][0] <= now:
                    _, order, plan = heapq.heappop(self._parked)
                    heapq.heappush(self._ready, (_WOKEN, order, plan))
                if self._ready:
                    return heapq.heappop(self._ready)[2]
                self._cond.wait(self._parked[0][0] - now if self._parked else None)
            return None

    def stop(self) -> None:
        """Every worker's next :meth:`get` returns ``None``; rows not started are dropped."""
        with self._cond:
            self._stopped = True
            plans = [entry[2] for entry in self._ready] + [entry[2] for entry in self._parked]
            self._ready, self._parked = [], []
            self._cond.notify_all()
        _close_all(plans)
