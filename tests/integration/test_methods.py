"""The four query methods against the mock server over HTTPS: every row once, with its own answer.

Faults are predicted from the mock's deterministic plan (``planned_fault``), so each row's expected
fate (answer after how many attempts, or content filter) is known before the run.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.errors import LLMQueryAuthError, LLMQueryConfigError
from airflow_provider_llmq.core.methods import (
    query_async_batches,
    query_async_limited,
    query_sync,
    query_thread_pool,
)
from airflow_provider_llmq.core.request.payload import DEFAULT_SYSTEM_PROMPT
from airflow_provider_llmq.testing.mock_server import MockConfig, MockServer, expected_answer, planned_fault
from tests.conftest import DEPLOYMENT, TEST_KEY, make_endpoint

Method = Callable[..., Iterator[QueryResult]]
# each method with its scheduling argument; "concurrency" is what that argument allows in flight
METHODS: dict[str, tuple[Method, str | None]] = {
    "sync": (query_sync, None),
    "async_batches": (query_async_batches, "batch_size"),
    "async_limited": (query_async_limited, "max_concurrency"),
    "thread_pool": (query_thread_pool, "max_workers"),
}
POOLED = ["async_batches", "async_limited", "thread_pool"]
pytestmark = pytest.mark.timeout(120)  # a method that hangs fails instead of stalling CI
FAST = {"retry_backoff": 0.001, "max_retry_wait": 1.0}
FAULT_KINDS = ("500", "429", "reset", "malformed")
# about 3% faults, 5% slow answers (completion order differs from input order), 1% content filter
MIXED = {
    "fault_rate": 0.03,
    "fault_kinds": list(FAULT_KINDS),
    "slow_rate": 0.05,
    "slow_ms": 20.0,
    "content_filter_rate": 0.01,
    "retry_after_ms": 5,
    "seed": 11,
}
EMPTY_PROMPTS = ["", "   ", None]


def query(
    name: str,
    endpoint: EndpointConfig,
    rows: Iterable[tuple[Any, Any]],
    concurrency: int = 32,
    **options: Any,
) -> Iterator[QueryResult]:
    method, argument = METHODS[name]
    if argument is not None:
        options[argument] = concurrency
    return method(endpoint, rows, **{**FAST, **options})


def llmq_threads() -> list[threading.Thread]:
    """Helper threads the methods start (the event loop's, the pool's), not the mock server's."""
    return [t for t in threading.enumerate() if t.name == "llmq-loop" or t.name.startswith("llmq-query")]


def wait_until_no_llmq_threads(timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while llmq_threads():
        assert time.monotonic() < deadline, f"threads still alive: {llmq_threads()}"
        time.sleep(0.01)


def mixed_rows(n: int) -> list[tuple[str, Any]]:
    """``n`` distinct prompts with ids that are not positions, plus three empty prompts among them."""
    rows: list[tuple[str, Any]] = [
        (f"id-{i * 7919 % 100_003:06d}", f"Question {i}: what is in row {i}?")
        for i in range(n - len(EMPTY_PROMPTS))
    ]
    for j, empty in enumerate(EMPTY_PROMPTS):
        rows.insert((j + 1) * len(rows) // 4, (f"empty-{j}", empty))
    return rows


def answer_for(prompt: str) -> str:
    return expected_answer(DEPLOYMENT, DEFAULT_SYSTEM_PROMPT, prompt, {})


def check_every_row(
    rows: list[tuple[str, Any]], results: list[QueryResult], config: MockConfig, stats: dict[str, Any]
) -> None:
    """Each input row exactly once, with the fate the mock planned for its own prompt."""
    ids = [r.row_id for r in results]
    assert len(ids) == len(rows) and len(set(ids)) == len(ids)
    assert set(ids) == {row_id for row_id, _ in rows}
    by_id = {r.row_id: r for r in results}
    fates: Counter[str | None] = Counter()
    for row_id, prompt in rows:
        result = by_id[row_id]
        if prompt is None or not prompt.strip():
            assert (result.status, result.error_code, result.attempts) == ("error", "empty_prompt", 0)
            continue
        fate = planned_fault(prompt, config)
        fates[fate] += 1
        if fate == "content_filter":
            assert (result.status, result.error_code, result.attempts) == ("error", "content_filter", 1)
            assert result.response is None and result.http_status == 400
        else:
            assert result.ok, result
            assert result.response == answer_for(prompt), f"row {row_id} got another row's answer"
            assert result.attempts == (2 if fate in FAULT_KINDS else 1), result
    # the run exercised every kind of trouble it claims to survive
    assert all(fates[kind] > 0 for kind in (*FAULT_KINDS, "slow", "content_filter")), fates
    non_empty = len(rows) - len(EMPTY_PROMPTS)
    assert stats["chat_requests"] == non_empty + sum(r.attempts - 1 for r in results if r.attempts)
    by_status = stats["requests_by_status"]
    assert by_status.get("500", 0) == fates["500"] and by_status.get("429", 0) == fates["429"]
    assert by_status.get("reset", 0) == fates["reset"]
    assert by_status.get("400", 0) == fates["content_filter"]


# the 5,000 rows where that is quick; the sequential method and the GIL-bound thread pool run
# fewer rows in the default suite and the full 5,000 under -m slow
SIZES = [
    pytest.param("sync", 500, id="sync-500"),
    pytest.param("sync", 5000, id="sync-5000", marks=pytest.mark.slow),
    pytest.param("async_batches", 1000, id="async_batches-1000"),
    pytest.param("async_batches", 5000, id="async_batches-5000", marks=pytest.mark.slow),
    pytest.param("async_limited", 1000, id="async_limited-1000"),
    pytest.param("async_limited", 5000, id="async_limited-5000", marks=pytest.mark.slow),
    pytest.param("thread_pool", 1000, id="thread_pool-1000"),
    pytest.param("thread_pool", 5000, id="thread_pool-5000", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "n"), SIZES)
def test_every_row_once_with_its_own_answer_under_faults(name: str, n: int, server: MockServer) -> None:
    server.configure(**MIXED)
    config = MockConfig(api_key=TEST_KEY, **MIXED)  # type: ignore[arg-type]
    rows = mixed_rows(n)
    results = list(query(name, make_endpoint(server, "azure"), rows, concurrency=64))
    check_every_row(rows, results, config, server.stats())
    in_input_order = [r.row_id for r in results] == [row_id for row_id, _ in rows]
    # results come in completion order: slow answers overtake in every concurrent method
    assert in_input_order if name == "sync" else not in_input_order


@pytest.mark.parametrize("name", list(METHODS))
def test_both_api_forms_and_request_options_reach_the_server(
    name: str, endpoint: EndpointConfig, server: MockServer
) -> None:
    rows = [(i, f"options {i}") for i in range(40)]
    params = {"temperature": 0, "max_tokens": 20}
    results = list(
        query(name, endpoint, rows, concurrency=8, system_prompt="Be short.", request_params=params)
    )
    assert sorted(r.row_id for r in results) == list(range(40))
    for result in results:
        prompt = rows[result.row_id][1]
        assert result.ok and result.response == expected_answer(DEPLOYMENT, "Be short.", prompt, params)
        assert result.prompt_tokens and result.completion_tokens and result.finish_reason == "stop"
    assert server.stats()["chat_requests"] == 40


@pytest.mark.parametrize("name", POOLED)
def test_concurrency_bound_is_reached_and_never_exceeded(name: str, server: MockServer) -> None:
    server.configure(latency_ms=30)
    rows = [(i, f"in flight {i}") for i in range(200)]
    results = list(query(name, make_endpoint(server, "azure"), rows, concurrency=8))
    assert len(results) == 200 and all(r.ok for r in results)
    assert server.stats()["max_in_flight"] == 8


def test_rate_limited_method_holds_requests_per_minute_in_every_second(server: MockServer) -> None:
    rpm, n = 1200, 90  # 20 per second: about 4.5 s
    started = time.monotonic()
    results = list(
        query(
            "async_limited",
            make_endpoint(server, "azure"),
            [(i, f"paced {i}") for i in range(n)],
            concurrency=32,
            requests_per_minute=rpm,
        )
    )
    elapsed = time.monotonic() - started
    assert len(results) == n and all(r.ok for r in results)
    stats = server.stats()
    assert len(stats["per_second_counts"]) >= 4  # several full seconds were observed
    assert stats["max_per_second_after_first"] <= math.ceil(rpm / 60) + 1, stats["per_second_counts"]
    # spread evenly, not a burst then a wait: the whole run took about n / (rpm / 60) seconds
    assert (n - 1) * 60 / rpm * 0.95 <= elapsed < (n - 1) * 60 / rpm + 1.5


@pytest.mark.parametrize("name", ["async_batches", "async_limited"])
def test_async_methods_work_inside_a_running_event_loop(
    name: str, endpoint: EndpointConfig, server: MockServer
) -> None:
    rows = [(f"loop-{i}", f"from a coroutine {i} [[slow:{i % 3 * 10}]]") for i in range(60)]

    async def caller() -> list[QueryResult]:
        asyncio.get_running_loop()  # raises unless a loop runs in this thread
        await asyncio.sleep(0)
        return list(query(name, endpoint, rows, concurrency=16))  # a plain, synchronous call

    results = asyncio.run(caller())
    prompts = dict(rows)
    assert sorted(r.row_id for r in results) == sorted(prompts)
    assert all(r.ok and r.response == answer_for(prompts[r.row_id]) for r in results)
    wait_until_no_llmq_threads()


def _million_rows() -> Iterator[tuple[int, str]]:
    for i in range(1_000_000):
        yield i, f"row {i}"


@pytest.mark.parametrize("name", list(METHODS))
def test_wrong_key_raises_auth_error_promptly_and_stops_threads(name: str, server: MockServer) -> None:
    endpoint = make_endpoint(server, "azure", api_key="sk-wrong-key-4242")
    started = time.monotonic()
    with pytest.raises(LLMQueryAuthError) as info:
        for _ in query(name, endpoint, _million_rows(), concurrency=16):
            pass
    assert time.monotonic() - started < 3
    assert "sk-wrong-key-4242" not in str(info.value)
    wait_until_no_llmq_threads()
    sent = server.stats()["chat_requests"]
    assert 1 <= sent <= 2 * 16  # the run stopped at the first refusal, not after a million rows
    time.sleep(0.1)
    assert server.stats()["chat_requests"] == sent


@pytest.mark.parametrize("name", list(METHODS))
def test_auth_failure_mid_run_raises_after_the_rows_answered_so_far(name: str, server: MockServer) -> None:
    after = 150
    server.configure(auth_fail={"after": after, "count": 1_000_000})
    yielded = 0
    with pytest.raises(LLMQueryAuthError):
        for result in query(name, make_endpoint(server, "azure"), _million_rows(), concurrency=16):
            assert result.ok
            yielded += 1
    assert after - 2 * 16 <= yielded <= after
    wait_until_no_llmq_threads()


@pytest.mark.parametrize("name", list(METHODS))
def test_bad_settings_raise_at_the_call_before_any_request(name: str, server: MockServer) -> None:
    endpoint = make_endpoint(server, "azure")
    method, argument = METHODS[name]
    with pytest.raises(LLMQueryConfigError):
        method(endpoint, _million_rows(), request_params={"stream": True})
    if argument is not None:
        with pytest.raises(LLMQueryConfigError):
            method(endpoint, _million_rows(), **{argument: 0})
    with pytest.raises(LLMQueryConfigError):
        method(make_endpoint(server, "azure", api_key=""), _million_rows())
    assert server.stats()["chat_requests"] == 0 and not llmq_threads()


@pytest.mark.parametrize("name", list(METHODS))
def test_empty_input_yields_nothing_and_sends_nothing(name: str, server: MockServer) -> None:
    assert list(query(name, make_endpoint(server, "azure"), iter([]))) == []
    assert server.stats()["chat_requests"] == 0
    wait_until_no_llmq_threads()


def test_sync_method_reuses_one_pooled_client_per_process(server: MockServer) -> None:
    from airflow_provider_llmq.core.methods import sync_client_for

    endpoint = make_endpoint(server, "azure")
    first = sync_client_for(endpoint, **FAST)
    assert sync_client_for(endpoint, **FAST) is first
    assert sync_client_for(endpoint, **FAST, system_prompt="other") is not first
    # two runs (two Spark tasks in one Python worker) go through that same client
    calls: list[Any] = []
    original = first.query
    first.query = lambda *item: calls.append(item) or original(*item)  # type: ignore[method-assign]
    try:
        for run in range(2):
            assert all(r.ok for r in query_sync(endpoint, [(run, "reuse")], **FAST))
    finally:
        del first.query
    assert calls == [(0, "reuse"), (1, "reuse")]
