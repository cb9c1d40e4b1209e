"""Methods 2-4 on the driver: pending requests stream in one bucket at a time, results are
flushed to the checkpoint as they arrive."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from airflow_provider_llmq.core.endpoint import EndpointConfig
from airflow_provider_llmq.core.options import QueryOptions
from airflow_provider_llmq.core.result import QueryResult
from airflow_provider_llmq.spark.placements.base import PlacementStopped, Work
from airflow_provider_llmq.spark.plan import stream_requests

QueryMethod = Callable[..., Iterator[QueryResult]]
# a slow endpoint still checkpoints this often, so a hard kill (no time to flush) loses at most
# about this many seconds of answers
MAX_FLUSH_SECONDS = 10.0


@dataclass(frozen=True)
class DriverPlacement:
    """Runs a core query method in this process.

    :param method: called as ``method(endpoint, rows, options=options)``; bind its scheduling
        argument first, e.g. ``functools.partial(query_async_limited, max_concurrency=64)``.
    """

    method: QueryMethod

    def run(self, work: Work) -> None:
        rows = stream_requests(work.pending, work.n_buckets)
        stream = self._ask(work.endpoint, rows, work.options)
        batch: list[QueryResult] = []
        flushed_at = time.monotonic()
        try:
            for result in stream:
                batch.append(result)
                work.progress.add(1)
                if work.stop.is_set():
                    raise PlacementStopped(f"stopped with {len(batch)} unflushed answers, now flushed")
                if len(batch) >= work.flush_rows or time.monotonic() - flushed_at >= MAX_FLUSH_SECONDS:
                    work.checkpoint.flush(batch)
                    batch, flushed_at = [], time.monotonic()
        finally:
            # close first: a stop must cut the requests in flight before the flush writes
            close = getattr(stream, "close", None)
            if close is not None:
                close()
            if batch:  # what was answered before an error is kept for the retry
                work.checkpoint.flush(batch)

    def _ask(
        self, endpoint: EndpointConfig, rows: Iterable[tuple[Any, Any]], options: QueryOptions
    ) -> Iterator[QueryResult]:
        return self.method(endpoint, rows, options=options)
