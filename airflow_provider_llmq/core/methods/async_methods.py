"""Methods 2 and 3 on asyncio + aiohttp, as plain iterators.

The event loop runs in a helper thread, so the methods work whether or not the caller's thread
already runs a loop (notebooks, triggers) without ``nest_asyncio``. The caller's thread pulls rows
and hands them over only while fewer than ``window`` rows are unanswered, so memory is bounded.
The two methods differ only in their ``schedule`` coroutine.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from airflow_provider_llmq.core.client import AsyncClient, configure
from airflow_provider_llmq.core.endpoint import EndpointConfig
from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.result import QueryResult

_END = object()

Item = tuple[Any, Any]
Emit = Callable[[QueryResult], None]
Schedule = Callable[[AsyncClient, "asyncio.Queue[Any]", Emit], Awaitable[None]]


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _run_in_loop_thread(
    endpoint: EndpointConfig,
    rows: Iterable[Item],
    options: dict[str, Any],
    concurrency: int,
    window: int,
    schedule: Schedule,
) -> Iterator[QueryResult]:
    endpoint, query_options = configure(endpoint, **options)
    loop = asyncio.new_event_loop()
    inbox_ready = threading.Event()
    inbox: asyncio.Queue[Any] | None = None
    outbox: queue.Queue[Any] = queue.Queue()  # bounded by `window` through the caller's count
    done = object()
    main_task: asyncio.Task[None] | None = None

    async def main() -> None:
        nonlocal inbox, main_task
        inbox = asyncio.Queue()
        main_task = asyncio.current_task()
        inbox_ready.set()
        try:
            async with AsyncClient(endpoint, query_options, concurrency=concurrency) as client:
                await schedule(client, inbox, outbox.put)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # handed to the caller's thread, which re-raises it
            while isinstance(exc, BaseExceptionGroup):  # TaskGroup wraps the worker's error
                exc = exc.exceptions[0]
            outbox.put(_Failed(exc))
        finally:
            outbox.put(done)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), name="llmq-loop", daemon=True)
    thread.start()
    inbox_ready.wait()
    assert inbox is not None

    def hand_over(item: object) -> None:
        loop.call_soon_threadsafe(inbox.put_nowait, item)

    unanswered = 0
    finished = False
    try:
        source = iter(rows)
        exhausted = False
        while True:
            while not exhausted and unanswered < window:
                item = next(source, _END)
                if item is _END:
                    exhausted = True
                    hand_over(_END)
                    break
                hand_over(item)
                unanswered += 1
            if exhausted and unanswered == 0:
                return
            message = outbox.get()
            if message is done:
                finished = True
                if unanswered:
                    raise RuntimeError(f"query loop stopped with {unanswered} rows unanswered")
                return
            if isinstance(message, _Failed):
                raise message.error
            unanswered -= 1
            yield message
    finally:
        if not finished and main_task is not None:
            loop.call_soon_threadsafe(main_task.cancel)
        thread.join()
        loop.close()


def query_async_batches(
    endpoint: EndpointConfig,
    rows: Iterable[Item],
    *,
    batch_size: int = 128,
    **options: Any,
) -> Iterator[QueryResult]:
    """Method 2: ``batch_size`` requests at a time with ``asyncio.gather``-like batches.

    A failed request no longer kills its batch: it is retried and, at worst, recorded on its row.
    The next batch starts when the whole batch has finished (the article's trade-off).
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
            await _run_all(client, batch, emit)

    return _run_in_loop_thread(endpoint, rows, options, batch_size, 2 * batch_size, schedule)


async def _run_all(client: AsyncClient, batch: list[Item], emit: Emit) -> None:
    """Runs the batch, emitting each result as it completes; an auth error ends it after the rest."""
    if not batch:
        return
    tasks = [asyncio.ensure_future(client.query(row_id, prompt)) for row_id, prompt in batch]
    first_error: BaseException | None = None
    try:
        for next_done in asyncio.as_completed(tasks):
            try:
                emit(await next_done)
            except Exception as exc:
                first_error = first_error or exc
    finally:
        for task in tasks:
            task.cancel()
    if first_error is not None:
        raise first_error


def query_async_limited(
    endpoint: EndpointConfig,
    rows: Iterable[Item],
    *,
    max_concurrency: int = 32,
    **options: Any,
) -> Iterator[QueryResult]:
    """Method 3: ``max_concurrency`` workers pulling from a bounded queue, never more in flight.

    Unlike the article's ``Semaphore`` version, no task is created per row up front, and each
    result carries its own row id instead of being zipped with the ids by position.
    """
    if max_concurrency < 1:
        raise LLMQueryConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")

    async def schedule(client: AsyncClient, inbox: asyncio.Queue[Any], emit: Emit) -> None:
        async def worker() -> None:
            while True:
                item = await inbox.get()
                if item is _END:
                    inbox.put_nowait(_END)  # let the next worker see it too
                    return
                emit(await client.query(*item))

        async with asyncio.TaskGroup() as group:  # an auth error cancels the other workers
            for _ in range(max_concurrency):
                group.create_task(worker())

    return _run_in_loop_thread(endpoint, rows, options, max_concurrency, 2 * max_concurrency, schedule)
