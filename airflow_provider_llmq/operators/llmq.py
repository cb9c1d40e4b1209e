"""The four operators, the article's four ways to query, each one placement on one shared base."""

from __future__ import annotations

from functools import partial
from typing import Any

from airflow_provider_llmq.core.methods import query_async_batches, query_async_limited, query_thread_pool
from airflow_provider_llmq.operators.base import LLMQueryBaseOperator
from airflow_provider_llmq.operators.outcome import LLMQueryConfigFailure, LLMQueryFailedRowsError
from airflow_provider_llmq.spark.placements import DriverPlacement, Placement, UDFPlacement


class LLMQueryAsyncBatchOperator(LLMQueryBaseOperator):
    """Method 2: asyncio + aiohttp, ``batch_size`` requests at a time (the article's
    ``api_call_batch_size``), on the driver, streamed in buckets.

    :param batch_size: requests gathered together; the next batch starts when one finishes.
    """

    def __init__(self, *, batch_size: int = 128, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batch_size = batch_size

    def _placement(self) -> Placement:
        return DriverPlacement(partial(query_async_batches, batch_size=self.batch_size))


class LLMQueryRateLimitedOperator(LLMQueryBaseOperator):
    """Method 3: asyncio + aiohttp with at most ``max_concurrency`` requests in flight (the
    article's ``max_concurrent_requests``) and optional requests/min and tokens/min caps, spread
    evenly. The one to pick for a deployment with a quota.

    :param max_concurrency: requests in flight at most.
    :param requests_per_minute: requests/min cap; None for none.
    :param tokens_per_minute: tokens/min cap (estimated prompt tokens + max_tokens); None for none.
    """

    def __init__(
        self,
        *,
        max_concurrency: int = 32,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.max_concurrency = max_concurrency
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute

    def _placement(self) -> Placement:
        return DriverPlacement(
            partial(
                query_async_limited,
                max_concurrency=self.max_concurrency,
                requests_per_minute=self.requests_per_minute,
                tokens_per_minute=self.tokens_per_minute,
            )
        )


class LLMQueryThreadPoolOperator(LLMQueryBaseOperator):
    """Method 4: ``max_workers`` threads (the article's ``num_workers``) sharing one pooled
    ``requests`` session, on the driver, streamed in buckets.

    :param max_workers: threads, each with one request in flight.
    """

    def __init__(self, *, max_workers: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_workers = max_workers

    def _placement(self) -> Placement:
        return DriverPlacement(partial(query_thread_pool, max_workers=self.max_workers))


class LLMQueryUDFOperator(LLMQueryBaseOperator):
    """Method 1: a Spark UDF asks each row's prompt on the executors, one request at a time per
    Python worker (the article's ``repartition(30)`` + ``requests`` UDF), reusing one pooled
    session per worker. Results are checkpointed per bucket: one Spark job per bucket of rows.

    :param num_partitions: partitions per bucket job (the article's ``repartition(30)``);
        None keeps Spark's default parallelism.
    """

    def __init__(self, *, num_partitions: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_partitions = num_partitions

    def _placement(self) -> Placement:
        return UDFPlacement(self.num_partitions)


__all__ = [
    "LLMQueryAsyncBatchOperator",
    "LLMQueryBaseOperator",
    "LLMQueryConfigFailure",
    "LLMQueryFailedRowsError",
    "LLMQueryRateLimitedOperator",
    "LLMQueryThreadPoolOperator",
    "LLMQueryUDFOperator",
]
