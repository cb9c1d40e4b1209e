"""Methods 2-4 on the driver: pending requests stream in one bucket at a time, results are
flushed to the checkpoint as they arrive."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.spark.placements.base import PlacementStopped, Work
from airflow_provider_llmq.spark.plan import stream_requests

QueryMethod = Callable[..., Iterator[QueryResult]]
# a slow endpoint still checkpoints this often, so a hard kill (no time to flush) loses at most
# about this many seconds of answers
MAX_FLUSH_SECONDS = 10.0
STOP_GRACE_SECONDS = 5.0  # well inside the few seconds Airflow leaves between SIGTERM and SIGKILL


@dataclass(frozen=True)
class DriverPlacement:
    """Runs a core query method in this process.

    :param method: called as ``method(endpoint, rows, options=options)``; bind its scheduling
        argument first, e.g. ``functools.partial(query_async_limited, max_concurrency=64)``.
    """

    keeps_its_own_ledger: ClassVar[bool] = False

    method: QueryMethod

    def run(self, work: Work) -> None:
        # On a stop, no new row is handed to the method, the requests in flight are answered and
        # flushed (for at most STOP_GRACE_SECONDS), and only then is the stream cut: a retry asks
        # again only what was still in flight after that.
        rows = _until_stopped(work.stop, stream_requests(work.pending, work.n_buckets))
        stream = self._ask(work.endpoint, rows, work.options)
        work.progress.watch(getattr(stream, "stats", None))
        batch: list[QueryResult] = []
        flushed_at = time.monotonic()
        cut_at: float | None = None
        try:
            for result in stream:
                batch.append(result)
                work.progress.settled(result)
                now = time.monotonic()
                if work.stop.is_set():
                    cut_at = cut_at or now + STOP_GRACE_SECONDS
                    if now >= cut_at:
                        break
                if len(batch) >= work.flush_rows or now - flushed_at >= MAX_FLUSH_SECONDS:
                    with work.phases("flush", within="ask"):
                        work.checkpoint.flush(batch)
                    batch, flushed_at = [], now
            if work.stop.is_set():
                raise PlacementStopped("stopped: the answers received are flushed to the checkpoint")
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
            if batch:  # what was answered before an error is kept for the retry
                with work.phases("flush", within="ask"):
                    work.checkpoint.flush(batch)

    def _ask(
        self, endpoint: EndpointConfig, rows: Iterable[tuple[Any, Any]], options: QueryOptions
    ) -> Iterator[QueryResult]:
        return self.method(endpoint, rows, options=options)


def _until_stopped(stop: threading.Event, rows: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
    """The rows, ending early once ``stop`` is set: the method then finishes what it holds."""
    for row in rows:
        if stop.is_set():
            return
        yield row
