"""The article's four ways to query many prompts, made correct: every row comes out exactly once,
tagged with its own id, in completion order, with bounded memory.

Each is ``method(endpoint, rows, **options)`` where ``rows`` is an iterable of ``(row_id, prompt)``
pulled lazily and options are the fields of :class:`~airflow_provider_llmq.core.request.options.QueryOptions`
plus the method's own scheduling argument. They share the request engine and differ only in
scheduling. Each returns a :class:`QueryStream`: the results, and ``stats()`` of its adaptive rate.
"""

from airflow_provider_llmq.core.methods._read_ahead import QueryStream
from airflow_provider_llmq.core.methods.async_methods import query_async_batches, query_async_limited
from airflow_provider_llmq.core.methods.sync_methods import query_sync, query_thread_pool, sync_client_for

METHODS = {
    "sync": query_sync,
    "async_batches": query_async_batches,
    "async_limited": query_async_limited,
    "thread_pool": query_thread_pool,
}

__all__ = [
    "METHODS",
    "QueryStream",
    "query_async_batches",
    "query_async_limited",
    "query_sync",
    "query_thread_pool",
    "sync_client_for",
]
