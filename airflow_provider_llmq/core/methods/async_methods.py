"""Methods 2 and 3 on asyncio + aiohttp, as plain iterators.

The event loop runs in a helper thread, so the methods work whether or not the caller's thread
already runs a loop (notebooks, triggers) without ``nest_asyncio``. The caller's thread pulls rows
and hands them over only while fewer than ``window`` rows are unanswered, so memory is bounded
whatever the row count; rows cross to the loop in lists and results come back through one queue
that the caller drains, so the two threads meet once per burst of results, not once per row.
The two methods differ only in their inbox and their ``schedule`` coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Protocol

from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.methods._read_ahead import Failed, Item, QueryStream, ReadAhead, drain
from airflow_provider_llmq.core.methods._run_queue import AsyncRunQueue
from airflow_provider_llmq.core.packing import group_rows
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.core.transport.async_client import AsyncClient
from airflow_provider_llmq.core.transport.engine import Sleep

Emit = Callable[[QueryResult | list[QueryResult]], None]


class Inbox(Protocol):
    """Where the caller's rows arrive on the loop (and ``_END`` after the last one)."""

    def put_nowait(self, item: Any) -> None: ...


Schedule = Callable[[AsyncClient, Any, Emit], Awaitable[None]]


class _End:
    """Marks the end of the rows in the loop's inbox."""


_END = _End()


class _Done:
    """The loop has stopped (last message of the outbox)."""


_DONE = _Done()


def _first_error(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):  # TaskGroup wraps the worker's error
        exc = exc.exceptions[0]
    return exc


def _run_in_loop_thread(
    endpoint: EndpointConfig,
    rows: Iterable[Item],
    options: QueryOptions,
    concurrency: int,
    schedule: Schedule,
    inbox: Callable[[AsyncClient], Inbox],
    bursts: bool = False,
) -> Iterator[QueryResult]:
    """Checks the settings now (a bad option raises at the call), then streams lazily.

    :param inbox: makes the loop's inbox, on the loop; ``schedule`` gets it."""
    client = AsyncClient(endpoint, options, concurrency=concurrency, bursts=bursts)  # no loop needed yet
    # rows_per_request: the items are packs, each emitted as a list
    items: Iterable[Any] = rows if client.sizer is None else group_rows(rows, client.sizer)
    ahead = ReadAhead(items, window=2 * concurrency)
    stream = QueryStream(_stream(client, ahead, schedule, inbox), client.stats)
    stream.packing = client.sizer.stats if client.sizer is not None else None
    return stream


async def _ask(client: AsyncClient, item: Any) -> QueryResult | list[QueryResult]:
    """One row, or one pack's rows."""
    if client.sizer is not None:
        return await client.query_pack(item)
    return await client.query(*item)


def _stream(
    client: AsyncClient, ahead: ReadAhead, schedule: Schedule, make_inbox: Callable[[AsyncClient], Inbox]
) -> Iterator[QueryResult]:
    loop = asyncio.new_event_loop()
    outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()  # bounded by `window` through the caller's count
    started = threading.Event()
    inbox: Inbox | None = None
    main_task: asyncio.Task[None] | None = None

    async def main() -> None:
        nonlocal inbox, main_task
        inbox = make_inbox(client)
        main_task = asyncio.current_task()
        started.set()
        try:
            async with client:
                await schedule(client, inbox, outbox.put)
        except asyncio.CancelledError:
            pass  # the caller stopped early: it no longer reads the outbox
        except BaseException as exc:  # handed to the caller's thread, which re-raises it
            outbox.put(Failed(_first_error(exc)))
        finally:
            outbox.put(_DONE)

    def run() -> None:
        try:
            loop.run_until_complete(main())
            loop.run_until_complete(loop.shutdown_asyncgens())
        except BaseException as exc:  # the loop itself failed: never leave the caller waiting
            outbox.put(Failed(exc))
            outbox.put(_DONE)
        finally:
            started.set()  # in case main() never ran
            loop.close()

    def feed(items: list[Any]) -> None:
        assert inbox is not None
        for item in items:
            inbox.put_nowait(item)

    thread = threading.Thread(target=run, name="llmq-loop", daemon=True)
    thread.start()
    started.wait()
    stopped = False
    try:
        while True:
            if not ahead.exhausted:
                items: list[Any] = list(ahead.take())
                if ahead.exhausted:
                    items.append(_END)
                if items:
                    with contextlib.suppress(RuntimeError):  # the loop already ended: its outbox says why
                        loop.call_soon_threadsafe(feed, items)
            message = yield from ahead.results(drain(outbox))
            if message is _DONE:
                stopped = True
                if ahead.unanswered:
                    raise RuntimeError(f"query loop stopped with {ahead.unanswered} rows unanswered")
                return
            if isinstance(message, Failed):
                stopped = True  # the loop is ending by itself
                raise message.error
    finally:
        if not stopped and main_task is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing left to cancel
                loop.call_soon_threadsafe(main_task.cancel)
        thread.join()


def query_async_batches(
    endpoint: EndpointConfig,
    rows: Iterable[Item],
    *,
    batch_size: int = 128,
    options: QueryOptions | None = None,
    **settings: Any,
) -> Iterator[QueryResult]:
    """Method 2: ``batch_size`` requests at a time, like the article's ``asyncio.gather`` batches.

    A failed request no longer kills its batch: it is retried and, at worst, recorded on its row;
    results are yielded as they complete, each with its own row id. The next batch starts when the
    whole batch has finished (the article's trade-off: one slow row holds up its batch).
    """
    if batch_size < 1:
        raise LLMQueryConfigError(f"batch_size must be >= 1, got {batch_size}")

    async def schedule(client: AsyncClient, inbox: asyncio.Queue[Any], emit: Emit) -> None:
        ended = False
        while not ended:
            batch: list[Item] = []
            while len(batch) < batch_size:
                item = await inbox.get()
                if item is _END:
                    ended = True
                    break
                batch.append(item)
            await _run_batch(client, batch, emit)

    return _run_in_loop_thread(
        endpoint,
        rows,
        QueryOptions.of(options, **settings),
        batch_size,
        schedule,
        lambda client: asyncio.Queue(),
        bursts=True,
    )


async def _run_batch(client: AsyncClient, batch: list[Item], emit: Emit) -> None:
    """Runs the batch, emitting each result as it completes; an auth error cancels the rest at once."""
    if not batch:
        return
    tasks = [asyncio.ensure_future(_ask(client, item)) for item in batch]
    try:
        for next_done in asyncio.as_completed(tasks):
            emit(await next_done)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # none left pending when the loop closes


def query_async_limited(
    endpoint: EndpointConfig,
    rows: Iterable[Item],
    *,
    max_concurrency: int = 32,
    options: QueryOptions | None = None,
    **settings: Any,
) -> Iterator[QueryResult]:
    """Method 3: ``max_concurrency`` workers pulling from a bounded queue, never more in flight.

    Unlike the article's ``Semaphore`` version, no task is created per row up front, and each
    result carries its own row id instead of being zipped with the ids by position. The rate
    adapts to what the server allows; ``requests_per_minute`` / ``tokens_per_minute`` are ceilings
    on top of it. A row that waits to retry gives its worker to the next row meanwhile, and comes
    back ahead of new rows when its wait is over (:mod:`._run_queue`).
    """
    if max_concurrency < 1:
        raise LLMQueryConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")

    async def schedule(client: AsyncClient, work: _PlanInbox, emit: Emit) -> None:
        async def worker() -> None:
            while (plan := await work.get()) is not None:
                outcome = await client.advance(plan)
                if isinstance(outcome, Sleep):
                    work.park(plan, outcome.seconds)
                else:
                    emit(outcome)
                    work.answered()

        try:
            async with asyncio.TaskGroup() as group:  # an auth error cancels the other workers
                for _ in range(max_concurrency):
                    group.create_task(worker())
        finally:
            work.close()  # a run that stopped early drops its parked rows

    return _run_in_loop_thread(
        endpoint,
        rows,
        QueryOptions.of(options, **settings),
        max_concurrency,
        schedule,
        lambda client: _PlanInbox(client, max_concurrency),
    )


class _PlanInbox(AsyncRunQueue):
    """The rate-limited method's inbox: each row arrives as its plan."""

    def __init__(self, client: AsyncClient, workers: int) -> None:
        super().__init__(workers)
        self._client = client

    def put_nowait(self, item: Any) -> None:
        if item is _END:
            self.end()
        else:
            self.put(self._client.plan(item))
