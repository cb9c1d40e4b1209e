"""The methods pull their rows lazily: a bounded number ahead of the results, bounded memory, prompt stop.

Fed a generator of a million prompts, each method must pull only a bounded number of rows ahead of
the results it has yielded, and closing its iterator must stop its helper thread or pool at once.
The memory test (slow: 60,000 requests per method) runs the mock server in a child process, so
that tracemalloc sees only the client's allocations.
"""

from __future__ import annotations

import itertools
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator

import pytest

from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.methods import (
    query_async_batches,
    query_async_limited,
    query_sync,
    query_thread_pool,
)
from airflow_provider_llmq.testing.mock_server import MockConfig, MockServer, MockServerProcess
from tests.conftest import DEPLOYMENT, TEST_KEY, make_endpoint

pytestmark = pytest.mark.timeout(120)  # a method that hangs fails instead of stalling CI
FAST = {"retry_backoff": 0.001, "max_retry_wait": 1.0}
CONCURRENCY = 16
# method, its scheduling argument, and the most rows it may hold unanswered (pulled, not yet yielded)
CASES: dict[str, tuple[Callable[..., Iterator[QueryResult]], dict[str, int], int]] = {
    "sync": (query_sync, {}, 1),
    "async_batches": (query_async_batches, {"batch_size": CONCURRENCY}, 2 * CONCURRENCY),
    "async_limited": (query_async_limited, {"max_concurrency": CONCURRENCY}, 2 * CONCURRENCY),
    "thread_pool": (query_thread_pool, {"max_workers": CONCURRENCY}, 2 * CONCURRENCY),
}


class CountingSource:
    """A lazy source of ``n`` prompts that records how many were pulled and whether it was closed."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.pulled = 0
        self.closed = False

    def rows(self) -> Iterator[tuple[int, str]]:
        try:
            for i in range(self.n):
                self.pulled += 1
                yield i, f"lazy prompt {i}"
        finally:
            self.closed = True


def llmq_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "llmq-loop" or t.name.startswith("llmq-query")]


@pytest.mark.parametrize("name", list(CASES))
def test_pulls_a_bounded_number_ahead_and_stops_when_closed(name: str, server: MockServer) -> None:
    method, scheduling, bound = CASES[name]
    take = {"sync": 300, "thread_pool": 1000}.get(name, 2000)
    source = CountingSource(1_000_000)
    rows = source.rows()
    results = method(make_endpoint(server, "azure"), rows, **scheduling, **FAST)
    assert source.pulled == 0  # nothing happens before the first result is asked for

    most_ahead = 0
    for taken, result in enumerate(results, start=1):
        assert result.ok
        most_ahead = max(most_ahead, source.pulled - taken)
        if taken == take:
            break
    started = time.monotonic()
    results.close()  # type: ignore[attr-defined]
    closing = time.monotonic() - started

    assert most_ahead <= bound, most_ahead
    if name != "sync":
        assert most_ahead >= CONCURRENCY  # it does work ahead: the window is used, not one row at a time
    assert closing < 1.0 and not llmq_threads()
    sent = server.stats()["chat_requests"]
    assert take <= sent <= source.pulled <= take + bound  # no request for a row it did not pull
    time.sleep(0.1)
    assert server.stats()["chat_requests"] == sent and server.stats()["in_flight"] == 0
    assert not source.closed  # the caller owns its source: the method leaves it open
    rows.close()
    assert source.closed and source.pulled < 1_000_000


@pytest.mark.parametrize("name", list(CASES))
def test_a_consumer_that_stops_early_by_dropping_the_iterator_stops_the_helpers(
    name: str, server: MockServer
) -> None:
    method, scheduling, _ = CASES[name]
    source = CountingSource(1_000_000)
    taken = list(
        itertools.islice(method(make_endpoint(server, "azure"), source.rows(), **scheduling, **FAST), 50)
    )
    assert len(taken) == 50 and all(r.ok for r in taken)
    deadline = time.monotonic() + 2  # the dropped iterator is closed by garbage collection
    while llmq_threads():
        assert time.monotonic() < deadline, llmq_threads()
        time.sleep(0.01)


@pytest.fixture(scope="module")
def server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockServerProcess]:
    cert_dir = tmp_path_factory.mktemp("mock-ca-process")
    with MockServerProcess(MockConfig(api_key=TEST_KEY), tls=True, cert_dir=str(cert_dir)) as process:
        yield process


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", list(CASES))
def test_memory_stays_bounded_over_60k_prompts(name: str, server_process: MockServerProcess) -> None:
    """Memory does not grow with the rows: the peak over the last 50,000 results is the peak over the
    first 10,000, within 8 MiB, where keeping each result (a QueryResult and its strings, some
    hundreds of bytes) would add tens of MiB. It was 200,000 rows for one bound: 25 of CI's minutes
    under tracemalloc, for what the comparison of two phases shows with fewer."""
    method, scheduling, _ = CASES[name]
    warm, n = 10_000, 60_000
    scheduling = {key: 64 for key in scheduling}
    endpoint = EndpointConfig(
        api_base=server_process.base_url,
        api_key=TEST_KEY,
        api_type="azure",
        model=DEPLOYMENT,
        ca_cert=server_process.ca_path,
        timeout=30.0,
    )
    server_process.reset()
    count = ok = 0
    tracemalloc.start()
    try:
        started = time.monotonic()
        for result in method(endpoint, CountingSource(n).rows(), **scheduling, **FAST):
            count += 1
            ok += result.ok
            if count == warm:
                _, first_peak = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
        elapsed = time.monotonic() - started
        _, later_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(
        f"{name}: {n} prompts in {elapsed:.0f} s under tracemalloc, peak {first_peak / 2**20:.1f} MiB"
        f" over the first {warm}, {later_peak / 2**20:.1f} MiB over the rest"
    )
    assert count == ok == n
    assert first_peak < 50 * 2**20
    assert later_peak < first_peak + 8 * 2**20
    assert server_process.stats()["chat_requests"] == n
