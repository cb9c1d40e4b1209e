"""Methods 1 and 4: one request at a time per worker (a Spark UDF), and a bounded thread pool."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from airflow_provider_llmq.core.client import SyncClient, configure
from airflow_provider_llmq.core.endpoint import EndpointConfig
from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.result import QueryResult

_clients: dict[tuple[object, ...], SyncClient] = {}
_clients_lock = threading.Lock()


def sync_client_for(endpoint: EndpointConfig, **options: Any) -> SyncClient:
    """The process's pooled client for these settings: a Spark Python worker reuses one session
    (and its TLS connections) across every row of every task it runs, instead of one per row."""
    endpoint, query_options = configure(endpoint, **options)
    key = (endpoint.cache_key(), endpoint.model, repr(query_options))  # params may be unhashable
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = SyncClient(endpoint, query_options, pool_size=4)
        return client


def query_sync(
    endpoint: EndpointConfig, rows: Iterable[tuple[Any, Any]], **options: Any
) -> Iterator[QueryResult]:
    """Method 1: one request at a time, in input order (what the UDF runs on each executor row)."""
    client = sync_client_for(endpoint, **options)
    for row_id, prompt in rows:
        yield client.query(row_id, prompt)


def query_thread_pool(
    endpoint: EndpointConfig,
    rows: Iterable[tuple[Any, Any]],
    *,
    max_workers: int = 32,
    **options: Any,
) -> Iterator[QueryResult]:
    """Method 4: ``max_workers`` threads sharing one pooled ``requests.Session``.

    At most ``2 * max_workers`` rows are submitted ahead of the results yielded, so memory stays
    bounded whatever the row count (the article submits every row up front).
    """
    if max_workers < 1:
        raise LLMQueryConfigError(f"max_workers must be >= 1, got {max_workers}")
    endpoint, query_options = configure(endpoint, **options)
    window = 2 * max_workers
    with SyncClient(endpoint, query_options, pool_size=max_workers) as client:
        pool = ThreadPoolExecutor(max_workers, thread_name_prefix="llmq-query")
        pending: set[Future[QueryResult]] = set()
        try:
            source = iter(rows)
            exhausted = False
            while True:
                while not exhausted and len(pending) < window:
                    item = next(source, None)
                    if item is None:
                        exhausted = True
                        break
                    pending.add(pool.submit(client.query, *item))
                if not pending:
                    return
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()  # an auth / config error ends the run here
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
