"""A row that waits to retry does not hold its worker (issue 21): over real sockets, one worker.

With a single worker the order of the results shows who waited where: a row refused with a long
retry hint comes out after the rows behind it, which the worker answered while it waited. The
ratios this buys under noise live in benchmarks/NOISE.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from airflow_provider_llmq.testing.mock_server import MockServer
from tests.conftest import make_endpoint
from tests.integration.test_methods import FAST, answer_for, query, wait_until_no_llmq_threads

pytestmark = pytest.mark.timeout(60)
POOLED = ["async_limited", "thread_pool"]
# long enough that the four rows behind it are answered first on a loaded machine (20 ms each)
HINT_MS = 1500
WAITS = {**FAST, "max_retry_wait": 10.0}  # the hint is kept whole, not cut to FAST's 1 s
WAITER = f"the refused row [[429:ms={HINT_MS}]]"


class Counted:
    """The rows, pulled lazily, counting how many the method took."""

    def __init__(self, rows: list[tuple[Any, str]]) -> None:
        self.rows = rows
        self.pulled = 0

    def __iter__(self) -> Iterator[tuple[Any, str]]:
        for row in self.rows:
            self.pulled += 1
            yield row


@pytest.mark.parametrize("name", POOLED)
def test_the_worker_answers_other_rows_while_a_refused_row_waits(name: str, server: MockServer) -> None:
    """An isolated 429's hint delays its own row only (adaptive=False pauses the whole client for
    it instead, as it always did)."""
    server.configure(latency_ms=20)
    rows = [("waiter", WAITER)] + [(i, f"behind the refused row {i}") for i in range(4)]
    source = Counted(rows)
    results = []
    for result in query(name, make_endpoint(server, "azure"), source, concurrency=1, **WAITS):
        results.append(result)
        # the waiting row still counts against the read-ahead window (2 x the one worker)
        assert source.pulled - len(results) <= 2
    assert [r.row_id for r in results] == [0, 1, 2, 3, "waiter"]
    assert all(r.ok and r.response == answer_for(rows_prompt) for r, rows_prompt in _paired(results, rows))
    waiter = results[-1]
    assert (waiter.attempts, waiter.throttled) == (2, 1)
    assert server.stats()["chat_requests"] == 6


def _paired(results: list[Any], rows: list[tuple[Any, str]]) -> list[tuple[Any, str]]:
    prompts = dict(rows)
    return [(r, prompts[r.row_id]) for r in results]


@pytest.mark.parametrize("name", POOLED)
def test_a_run_stopped_while_a_row_waits_never_sends_that_row_again(name: str, server: MockServer) -> None:
    """on_kill / an early stop: the waiting row is dropped, not slept out and sent once more."""
    server.configure(latency_ms=20)
    rows = [("waiter", f"stopped while waiting [[429:ms={HINT_MS * 3}]]"), (0, "answered meanwhile")]
    stream = query(name, make_endpoint(server, "azure"), rows, concurrency=1, **WAITS)
    first = next(stream)
    assert first.row_id == 0 and first.ok
    stream.close()  # type: ignore[attr-defined]
    wait_until_no_llmq_threads()
    assert server.stats()["chat_requests"] == 2  # the refused request and the answer, no retry


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
@pytest.mark.parametrize("name", POOLED)
def test_a_retried_failure_frees_its_worker_too(name: str, adaptive: bool, server: MockServer) -> None:
    """A 500's wait is a wait like a 429's: the rows behind it go first, with or without the
    adaptive rate."""
    server.configure(latency_ms=20)
    rows = [("failed", f"fails once [[500]][[retry-after-ms={HINT_MS}]]")]
    rows += [(i, f"behind the failure {i}") for i in range(3)]
    endpoint = make_endpoint(server, "azure")
    results = list(query(name, endpoint, rows, concurrency=1, adaptive=adaptive, **WAITS))
    assert [r.row_id for r in results] == [0, 1, 2, "failed"]
    assert all(r.ok for r in results) and results[-1].attempts == 2
