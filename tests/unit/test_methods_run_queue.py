"""The pooled methods' run queues: a woken row goes before new rows, the end of a run, an early stop.

The plans here are plain generators standing for rows (the queues never look inside them)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Generator
from typing import Any

from airflow_provider_llmq.core.methods._run_queue import AsyncRunQueue, ThreadRunQueue


class Plans:
    """Named stand-in plans, each started and suspended as a waiting row's is, recording closes."""

    def __init__(self) -> None:
        self.closed: list[str] = []

    def make(self, name: str, started: bool = False) -> Generator[Any, Any, str]:
        def plan() -> Generator[Any, Any, str]:
            try:
                yield "sleep"
            except GeneratorExit:
                self.closed.append(name)
                raise
            return name

        gen = plan()
        if started:
            next(gen)
        gen.__name__ = name  # type: ignore[attr-defined]
        return gen


def name_of(plan: Any) -> str:
    return str(plan.__name__)


def test_thread_queue_hands_a_woken_row_before_new_rows_and_a_due_one_only_when_due() -> None:
    plans = Plans()
    work = ThreadRunQueue()
    work.put([plans.make("new-1"), plans.make("new-2")])
    work.park(plans.make("woken", started=True), 0.0)
    work.park(plans.make("later", started=True), 30.0)
    taken = [work.get() for _ in range(3)]  # kept: a dropped generator closes when collected
    assert [name_of(plan) for plan in taken] == ["woken", "new-1", "new-2"]
    # nothing ready, one row parked for 30 s: a worker waits; stopping releases it with None
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(work.get()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got
    work.stop()
    waiter.join(5)
    assert got == [None] and work.get() is None
    assert plans.closed == ["later"]  # the parked row is dropped, its plan ended


def test_thread_queue_wakes_a_sleeping_worker_when_a_row_is_parked() -> None:
    plans = Plans()
    work = ThreadRunQueue()
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(work.get()))
    waiter.start()  # waits with no due time at all
    work.park(plans.make("soon", started=True), 0.05)
    waiter.join(5)
    assert [name_of(plan) for plan in got] == ["soon"]
    work.stop()
    work.park(plans.make("too late", started=True), 0.0)  # after the stop: dropped at once
    assert plans.closed == ["too late"] and work.get() is None


def test_async_queue_puts_woken_rows_first_and_ends_once_every_row_answered() -> None:
    plans = Plans()

    async def scenario() -> list[Any]:
        work = AsyncRunQueue(workers=2)
        work.put(plans.make("new-1"))
        work.put(plans.make("new-2"))
        first = await work.get()
        work.park(first, 0.0)  # new-1 waits to retry
        await asyncio.sleep(0.01)  # its timer fires
        order = [await work.get(), await work.get()]  # woken new-1 before new-2
        work.end()  # no more rows: but two are still unanswered
        work.answered()
        work.answered()
        order += [await work.get(), await work.get()]  # one end for each worker
        return order

    order = asyncio.run(scenario())
    assert [name_of(p) if p is not None else None for p in order] == ["new-1", "new-2", None, None]


def test_async_queue_close_drops_parked_rows_before_their_timer() -> None:
    plans = Plans()

    async def scenario() -> bool:
        work = AsyncRunQueue(workers=1)
        work.put(plans.make("parked"))
        plan = await work.get()
        assert plan is not None
        next(plan)  # suspended at its wait, as a parked row is
        work.park(plan, 0.05)
        work.close()
        try:
            await asyncio.wait_for(work.get(), 0.2)  # the timer was cancelled: nothing comes back
        except TimeoutError:
            return True
        return False

    assert asyncio.run(scenario())
    assert plans.closed == ["parked"]
