"""The four operators, the article's four ways to query, each one placement on one shared base."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar

from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.methods import query_async_batches, query_async_limited, query_thread_pool
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.operators.base import LLMQueryBaseOperator
from airflow_provider_llmq.operators.outcome import LLMQueryConfigFailure, LLMQueryFailedRowsError
from airflow_provider_llmq.spark.placements import DriverPlacement, ExecutorPlacement, Placement, UDFPlacement
from airflow_provider_llmq.spark.placements.driver import QueryMethod

RUN_ON = ("driver", "executors")


class _MethodOperator(LLMQueryBaseOperator):
    """Methods 2-4: a core method with one concurrency argument, on the driver or the executors.

    :param run_on: ``"driver"`` streams the requests to this process (the article's placement);
        ``"executors"`` runs one event loop or thread pool per Spark partition, the global caps
        shared between the partitions that run at once.
    :param parallelism: task slots, for ``run_on="executors"`` where Spark cannot tell them
        (Spark Connect); None reads them from the session.
    """

    method: ClassVar[Sequence[QueryMethod]]  # a one-item tuple: a bare function would bind as a method
    concurrency_arg: ClassVar[str]

    def __init__(self, *, run_on: str = "driver", parallelism: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run_on = run_on
        self.parallelism = parallelism

    @property
    def concurrency(self) -> int:
        return int(getattr(self, self.concurrency_arg))

    def _placement(self) -> Placement:
        if self.run_on not in RUN_ON:
            raise LLMQueryConfigError(f"run_on must be one of {RUN_ON}, got {self.run_on!r}")
        if self.parallelism is not None and self.parallelism < 1:
            raise LLMQueryConfigError(f"parallelism must be >= 1, got {self.parallelism}")
        [method] = self.method
        if self.run_on == "executors":
            return ExecutorPlacement(method, self.concurrency_arg, self.concurrency, self.parallelism)
        return DriverPlacement(partial(method, **{self.concurrency_arg: self.concurrency}))


class LLMQueryAsyncBatchOperator(_MethodOperator):
    """Method 2: asyncio + aiohttp, ``batch_size`` requests at a time (the article's
    ``api_call_batch_size``), streamed in buckets.

    :param batch_size: requests gathered together; the next batch starts when one finishes.
    """

    method = (query_async_batches,)
    concurrency_arg = "batch_size"

    def __init__(self, *, batch_size: int = 128, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batch_size = batch_size


class LLMQueryRateLimitedOperator(_MethodOperator):
    """Method 3: asyncio + aiohttp with at most ``max_concurrency`` requests in flight (the
    article's ``max_concurrent_requests``), at a rate learned from the server's answers, under
    optional requests/min and tokens/min ceilings spread evenly. The one to pick for a deployment
    with a quota.

    :param max_concurrency: requests in flight at most.
    :param requests_per_minute: requests/min ceiling, never exceeded, and the starting rate; None
        for none (the rate is learned).
    :param tokens_per_minute: tokens/min ceiling (estimated prompt tokens + max_tokens, corrected by
        the usage); None for none.
    """

    method = (query_async_limited,)
    concurrency_arg = "max_concurrency"

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

    def _query_options(self) -> QueryOptions:
        return dataclasses.replace(
            super()._query_options(),
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
        )


class LLMQueryThreadPoolOperator(_MethodOperator):
    """Method 4: ``max_workers`` threads (the article's ``num_workers``) sharing one pooled
    ``requests`` session, streamed in buckets.

    :param max_workers: threads, each with one request in flight.
    """

    method = (query_thread_pool,)
    concurrency_arg = "max_workers"

    def __init__(self, *, max_workers: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_workers = max_workers


class LLMQueryUDFOperator(LLMQueryBaseOperator):
    """Method 1: a Spark UDF asks each row's prompt on the executors, one request at a time per
    Python worker (the article's ``repartition(30)`` + ``requests`` UDF), reusing one pooled
    session per worker. Results are checkpointed per bucket: one Spark job per bucket of rows.

    :param num_partitions: partitions per bucket job (the article's ``repartition(30)``);
        None keeps Spark's default parallelism.
    :param requests_per_worker: requests in flight per Python worker; 1 (the article's method)
        asks one row at a time, more runs that many threads per worker.
    """

    def __init__(
        self, *, num_partitions: int | None = None, requests_per_worker: int = 1, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.num_partitions = num_partitions
        self.requests_per_worker = requests_per_worker

    def _placement(self) -> Placement:
        return UDFPlacement(self.num_partitions, self.requests_per_worker)


__all__ = [
    "LLMQueryAsyncBatchOperator",
    "LLMQueryBaseOperator",
    "LLMQueryConfigFailure",
    "LLMQueryFailedRowsError",
    "LLMQueryRateLimitedOperator",
    "LLMQueryThreadPoolOperator",
    "LLMQueryUDFOperator",
]
