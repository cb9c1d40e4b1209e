"""Methods 1 and 4: one request at a time per worker (a Spark UDF), and a bounded thread pool."""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from airflow_provider_llmq.core.client import SyncClient, configure
from airflow_provider_llmq.core.endpoint import EndpointConfig
from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.methods._failed import Failed
from airflow_provider_llmq.core.result import QueryResult

_clients: dict[tuple[object, ...], SyncClient] = {}
_clients_lock = threading.Lock()
# connections kept open by the process's shared client: one is enough for a Python worker that runs one
# task at a time, more for threads sharing it (arrow UDF concurrency); urllib3 opens them only on demand
_SHARED_POOL_SIZE = 64


def sync_client_for(endpoint: EndpointConfig, **options: Any) -> SyncClient:
    """The process's pooled client for these settings: a Spark Python worker reuses one session
    (and its TLS connections) across every row of every task it runs, instead of one per row."""
    endpoint, query_options = configure(endpoint, **options)
    key = (endpoint.cache_key(), endpoint.model, repr(query_options))  # params may be unhashable
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = SyncClient(endpoint, query_options, pool_size=_SHARED_POOL_SIZE)
        return client


def query_sync(
    endpoint: EndpointConfig, rows: Iterable[tuple[Any, Any]], **options: Any
) -> Iterator[QueryResult]:
    """Method 1: one request at a time, in input order (what the UDF runs on each executor row).

    Settings are checked at the call; rows are pulled one at a time as results are taken.
    """
    client = sync_client_for(endpoint, **options)
    return (client.query(row_id, prompt) for row_id, prompt in rows)


def query_thread_pool(
    endpoint: EndpointConfig,
    rows: Iterable[tuple[Any, Any]],
    *,
    max_workers: int = 32,
    **options: Any,
) -> Iterator[QueryResult]:
    """Method 4: ``max_workers`` threads sharing one pooled ``requests.Session``.

    At most ``2 * max_workers`` rows are submitted ahead of the results yielded, so memory stays
    bounded whatever the row count (the article submits every row up front). Results are yielded
    in completion order, each with its own row id; a failed row is a result, never dropped.
    """
    if max_workers < 1:
        raise LLMQueryConfigError(f"max_workers must be >= 1, got {max_workers}")
    endpoint, query_options = configure(endpoint, **options)
    client = SyncClient(endpoint, query_options, pool_size=max_workers)
    return _pooled(client, rows, max_workers)


def _pooled(client: SyncClient, rows: Iterable[tuple[Any, Any]], max_workers: int) -> Iterator[QueryResult]:
    window = 2 * max_workers
    finished: queue.SimpleQueue[QueryResult | Failed] = queue.SimpleQueue()
    failed = threading.Event()

    def work(row_id: Any, prompt: Any) -> None:
        if failed.is_set():  # the run is ending: send nothing more
            return
        try:
            finished.put(client.query(row_id, prompt))
        except BaseException as exc:  # an auth / config error ends the run in the caller's thread
            failed.set()
            finished.put(Failed(exc))

    with client, ThreadPoolExecutor(max_workers, thread_name_prefix="llmq-query") as pool:
        try:
            source = iter(rows)
            unanswered = 0
            exhausted = False
            while True:
                if not exhausted and unanswered < window:
                    wanted = window - unanswered
                    for row_id, prompt in itertools.islice(source, wanted):
                        pool.submit(work, row_id, prompt)
                        unanswered += 1
                        wanted -= 1
                    exhausted = wanted > 0
                if unanswered == 0:
                    return
                burst = [finished.get()]
                while True:  # take every result that is already there in one wake-up
                    try:
                        burst.append(finished.get_nowait())
                    except queue.Empty:
                        break
                for outcome in burst:
                    if isinstance(outcome, Failed):
                        raise outcome.error
                    unanswered -= 1
                    yield outcome
        finally:
            # rows not yet started are dropped; the ones in flight finish (at most one request each)
            pool.shutdown(wait=True, cancel_futures=True)
