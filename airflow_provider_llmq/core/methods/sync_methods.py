"""Methods 1 and 4: one request at a time per worker (a Spark UDF), and a bounded thread pool."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.methods._read_ahead import Failed, Item, QueryStream, ReadAhead, drain
from airflow_provider_llmq.core.methods._run_queue import ThreadRunQueue
from airflow_provider_llmq.core.packing import group_rows
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.core.transport.engine import Sleep
from airflow_provider_llmq.core.transport.sync_client import SyncClient

_clients: dict[tuple[object, ...], SyncClient] = {}
_clients_lock = threading.Lock()
# connections kept open by the process's shared client: one is enough for a Python worker that runs one
# task at a time, more for threads sharing it (arrow UDF concurrency); urllib3 opens them only on demand
_SHARED_POOL_SIZE = 64


def sync_client_for(
    endpoint: EndpointConfig,
    options: QueryOptions | None = None,
    *,
    scope: str | None = None,
    **settings: Any,
) -> SyncClient:
    """The process's pooled client for these settings: a Spark Python worker reuses one session
    (and its TLS connections) across every row of every task it runs, instead of one per row, and
    one adaptive rate: what it learned about the quota carries over to the worker's next task.

    :param scope: what a budget is counted for (a UDF job): clients of another scope are dropped,
        so a budget never carries over to the next job (a job's budget is its own share).
    """
    options = QueryOptions.of(options, **settings)
    key = (endpoint.cache_key(), endpoint.model, repr(options), scope)  # params may be unhashable
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            if scope is not None:  # one budgeted job at a time per worker: drop the earlier ones' clients
                for old in [k for k in _clients if k[3] is not None]:
                    _clients.pop(old).close()
            client = _clients[key] = SyncClient(endpoint, options, pool_size=_SHARED_POOL_SIZE)
        return client


def query_sync(
    endpoint: EndpointConfig,
    rows: Iterable[Item],
    *,
    options: QueryOptions | None = None,
    **settings: Any,
) -> Iterator[QueryResult]:
    """Method 1: one request at a time, in input order (what the UDF runs on each executor row).

    Settings (``options``, or its fields as keywords) are checked at the call; rows are pulled one
    at a time as results are taken.
    """
    options = QueryOptions.of(options, **settings)
    if options.max_total_tokens is not None or options.max_cost is not None:
        # a budget is this call's own: a client of its own, not the process's shared one
        own = SyncClient(endpoint, options, pool_size=1)
        return _packing(QueryStream(_one_by_one(own, rows), own.stats), own)
    client = sync_client_for(endpoint, options)
    return _packing(QueryStream(_each(client, rows), client.stats), client)


def _packing(stream: QueryStream, client: SyncClient) -> QueryStream:
    stream.packing = client.sizer.stats if client.sizer is not None else None
    return stream


def _each(client: SyncClient, rows: Iterable[Item]) -> Iterator[QueryResult]:
    """Row after row, or pack after pack (``rows_per_request``), in input order."""
    if client.sizer is None:
        return (client.query(row_id, prompt) for row_id, prompt in rows)
    sizer = client.sizer
    return (result for pack in group_rows(rows, sizer) for result in client.query_pack(pack))


def _one_by_one(client: SyncClient, rows: Iterable[Item]) -> Iterator[QueryResult]:
    with client:
        yield from _each(client, rows)


def query_thread_pool(
    endpoint: EndpointConfig,
    rows: Iterable[Item],
    *,
    max_workers: int = 32,
    options: QueryOptions | None = None,
    **settings: Any,
) -> Iterator[QueryResult]:
    """Method 4: ``max_workers`` threads sharing one pooled ``requests.Session``.

    At most ``2 * max_workers`` rows are submitted ahead of the results yielded, so memory stays
    bounded whatever the row count (the article submits every row up front). Results are yielded
    in completion order, each with its own row id; a failed row is a result, never dropped. A row
    that waits to retry gives its thread to the next row meanwhile, and comes back ahead of new
    rows when its wait is over.
    """
    if max_workers < 1:
        raise LLMQueryConfigError(f"max_workers must be >= 1, got {max_workers}")
    client = SyncClient(endpoint, QueryOptions.of(options, **settings), pool_size=max_workers)
    # rows_per_request: each worker asks one pack at a time
    items: Iterable[Any] = rows if client.sizer is None else group_rows(rows, client.sizer)
    return _packing(QueryStream(_pooled(client, items, max_workers), client.stats), client)


def _pooled(client: SyncClient, rows: Iterable[Any], max_workers: int) -> Iterator[QueryResult]:
    """``max_workers`` threads advance the rows' plans; a row that waits to retry is parked in the
    run queue and its thread takes the next row (:mod:`._run_queue`)."""
    ahead = ReadAhead(rows, window=2 * max_workers)
    finished: queue.SimpleQueue[QueryResult | list[QueryResult] | Failed] = queue.SimpleQueue()
    work = ThreadRunQueue()
    threads: list[threading.Thread] = []

    def worker() -> None:
        while (plan := work.get()) is not None:
            try:
                outcome = client.advance(plan)
            except BaseException as exc:  # an auth / config error ends the run in the caller's thread
                work.stop()  # the other threads send nothing more
                finished.put(Failed(exc))
                return
            if isinstance(outcome, Sleep):
                work.park(plan, outcome.seconds)
            else:
                finished.put(outcome)

    with client:
        try:
            while True:
                items = ahead.take()
                if items:
                    work.put([client.plan(item) for item in items])
                    # threads start as rows need them, as a ThreadPoolExecutor's do
                    while len(threads) < min(max_workers, ahead.unanswered):
                        name = f"llmq-query_{len(threads)}"
                        threads.append(threading.Thread(target=worker, name=name, daemon=True))
                        threads[-1].start()
                if ahead.finished:
                    return
                failed = yield from ahead.results(drain(finished))
                if failed is not None:
                    raise failed.error
        finally:
            # rows not yet started, and rows waiting to retry, are dropped; the ones in flight
            # finish (at most one request each)
            work.stop()
            for thread in threads:
                thread.join()
