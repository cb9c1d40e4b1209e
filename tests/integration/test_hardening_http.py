"""Issue 10 over real sockets, both clients: whitespace keys in every method, redirects, retry hints,
insufficient_quota, 200 answer shapes and the whole-request deadline."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.errors import LLMQueryQuotaError
from airflow_provider_llmq.core.methods import (
    query_async_batches,
    query_async_limited,
    query_sync,
    query_thread_pool,
)
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.core.transport.async_client import AsyncClient
from airflow_provider_llmq.core.transport.sync_client import SyncClient
from airflow_provider_llmq.hooks.llmq import LLMQueryHook
from airflow_provider_llmq.testing.mock_server import MockServer, expected_answer
from tests.conftest import DEPLOYMENT, TEST_KEY, make_endpoint
from tests.proxy_server import RECORDED_ANSWER, RecordingServer

pytestmark = pytest.mark.timeout(120)
FAST = {"max_retries": 3, "retry_backoff": 0.001, "max_retry_wait": 1.0}
METHODS: dict[str, Callable[..., Iterator[QueryResult]]] = {
    "sync": query_sync,
    "async_batches": query_async_batches,
    "async_limited": query_async_limited,
    "thread_pool": query_thread_pool,
}


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def recorder() -> Iterator[RecordingServer]:
    with RecordingServer() as server:
        yield server


def ask(kind: str, endpoint: EndpointConfig, prompts: list[str], **options: Any) -> list[QueryResult]:
    opts = QueryOptions(**{**FAST, **options})
    if kind == "sync":
        with SyncClient(endpoint, opts, pool_size=8) as client, ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda item: client.query(*item), enumerate(prompts)))

    async def main() -> list[QueryResult]:
        async with AsyncClient(endpoint, opts, concurrency=8) as client:
            return list(await asyncio.gather(*(client.query(i, p) for i, p in enumerate(prompts))))

    return asyncio.run(main())


# -- 1. keys with stray whitespace ---------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("api_type", ["azure", "openai"])
def test_whitespace_around_the_key_is_stripped_in_every_method(
    method: str, api_type: str, server: MockServer
) -> None:
    rows = [(i, f"q {i}") for i in range(4)]
    for raw in (f"{TEST_KEY}\n", f"{TEST_KEY}\r\n", f" {TEST_KEY}"):
        endpoint = make_endpoint(server, api_type, api_key=raw)
        results = list(METHODS[method](endpoint, iter(rows), **FAST))
        assert sorted(r.row_id for r in results) == [0, 1, 2, 3]
        assert all(r.ok and r.attempts == 1 for r in results), [r for r in results if not r.ok]
    assert server.stats()["auth_failures"] == 0


def test_header_values_travel_stripped_in_both_clients(kind: str, recorder: RecordingServer) -> None:
    endpoint = EndpointConfig(
        recorder.url,
        f"{TEST_KEY}\r\n",
        "azure",
        "dep",
        "2024-06-01",
        headers={"Ocp-Apim-Subscription-Key": " sub-key-value-123\n"},
    )
    [result] = ask(kind, endpoint, ["hello"])
    assert result.ok and result.response == RECORDED_ANSWER
    [received] = recorder.requests
    headers = {k.lower(): v for k, v in received.headers.items()}
    assert headers["api-key"] == TEST_KEY and headers["ocp-apim-subscription-key"] == "sub-key-value-123"


@pytest.mark.parametrize(
    ("password", "extra", "field"),
    [
        (f"sk-x\n{TEST_KEY}", {}, "API key"),
        (TEST_KEY, {"headers": {"Ocp-Apim-Subscription-Key": "abc\r\nsub-key-value-123"}}, "header"),
    ],
)
def test_a_control_character_inside_fails_before_any_request(
    monkeypatch: pytest.MonkeyPatch, server: MockServer, password: str, extra: dict[str, Any], field: str
) -> None:
    conn = {
        "conn_type": "llmq",
        "host": server.base_url,
        "password": password,
        "extra": {"api_type": "azure", "deployment": DEPLOYMENT, "ca_cert": server.ca_path, **extra},
    }
    monkeypatch.setenv("AIRFLOW_CONN_LLMQ_CTRL", json.dumps(conn))
    ok, message = LLMQueryHook("llmq_ctrl").test_connection()
    assert not ok and field in message
    assert TEST_KEY not in message and "sub-key-value-123" not in message
    for method in METHODS.values():
        with pytest.raises(Exception, match=field) as info:
            list(method(LLMQueryHook("llmq_ctrl").endpoint, iter([(1, "q")]), **FAST))
        assert TEST_KEY not in str(info.value) and "sub-key-value-123" not in str(info.value)
    assert server.stats()["requests_total"] == 0


def test_connection_with_a_trailing_newline_in_the_key_succeeds(
    monkeypatch: pytest.MonkeyPatch, server: MockServer
) -> None:
    conn = {
        "conn_type": "llmq",
        "host": server.base_url,
        "password": f"{TEST_KEY}\n",
        "extra": {"api_type": "azure", "deployment": DEPLOYMENT, "ca_cert": server.ca_path},
    }
    monkeypatch.setenv("AIRFLOW_CONN_LLMQ_NL", json.dumps(conn))
    ok, message = LLMQueryHook("llmq_nl").test_connection()
    assert ok and "successful" in message and TEST_KEY not in message


def test_connection_reports_an_exhausted_quota(monkeypatch: pytest.MonkeyPatch, server: MockServer) -> None:
    conn = {
        "conn_type": "llmq",
        "host": server.base_url,
        "password": TEST_KEY,
        "extra": {"api_type": "azure", "deployment": DEPLOYMENT, "ca_cert": server.ca_path},
    }
    monkeypatch.setenv("AIRFLOW_CONN_LLMQ_QUOTA", json.dumps(conn))
    server.configure(fault_rate=1.0, fault_kinds=["quota"])
    ok, message = LLMQueryHook("llmq_quota").test_connection()
    assert not ok and message.startswith("Quota exhausted") and "insufficient_quota" in message
    assert server.stats()["chat_requests"] == 1


# -- 3. redirects are not followed -----------------------------------------------------------------


def test_a_redirect_to_another_host_sends_it_nothing(
    kind: str, server: MockServer, recorder: RecordingServer
) -> None:
    server.configure(redirect_url=f"{recorder.url}/v1/chat/completions")
    for api_type in ("azure", "openai"):
        results = ask(kind, make_endpoint(server, api_type), ["steal me [[redirect]]"])
        assert [(r.error_code, r.attempts, r.http_status) for r in results] == [
            ("unexpected_redirect", 1, 307)
        ]
        assert "127.0.0.1" in (results[0].error_message or "")
    assert recorder.requests == []  # neither the key nor the prompt reached the other host


# -- 4. retry hints and quota ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "hint",
    [
        "[[429x2]] [[retry-after=0]]",
        "[[429x2]] [[retry-after-ms=0]]",
        "[[429x2]] [[retry-after=-5]]",
        "[[429x2]] [[retry-after-ms=-300]]",
        "[[429x2]] [[retry-after=Wed, 21 Oct 2015 07:28:00 GMT]]",
        "[[429x2]] [[retry-after=soon]]",
        "[[503x2]] [[retry-after=0]]",
    ],
)
def test_unusable_server_waits_fall_back_to_our_backoff(kind: str, server: MockServer, hint: str) -> None:
    """With backoff 0.1 s doubling and 25 % jitter, two retries wait at least 0.075 + 0.15 s; taking
    the server's zero at its word would retry within a few milliseconds."""
    endpoint = make_endpoint(server, "azure")
    [result] = ask(kind, endpoint, [f"hinted {hint}"], retry_backoff=0.1)
    assert result.ok and result.attempts == 3
    assert result.latency_ms is not None and result.latency_ms >= 225, result.latency_ms


def test_x_should_retry_false_stops_retries_of_5xx_and_429(kind: str, server: MockServer) -> None:
    endpoint = make_endpoint(server, "openai")
    results = ask(
        kind, endpoint, ["a [[500x3]] [[x-should-retry=false]]", "b [[429x3]] [[x-should-retry=false]]"]
    )
    assert [(r.error_code, r.attempts) for r in results] == [("server_error", 1), ("rate_limited", 1)]
    assert server.stats()["chat_requests"] == 2


def test_x_should_retry_true_retries_a_code_otherwise_final(kind: str, server: MockServer) -> None:
    endpoint = make_endpoint(server, "openai")
    [hinted, plain] = ask(kind, endpoint, ["a [[400x1]] [[x-should-retry=true]]", "b [[400x1]]"])
    assert hinted.ok and hinted.attempts == 2
    assert plain.error_code == "invalid_request_error" and plain.attempts == 1


@pytest.mark.parametrize("method", sorted(METHODS))
def test_insufficient_quota_ends_the_run_fast(method: str, server: MockServer) -> None:
    rows = [(i, f"fine {i}") for i in range(10)] + [(10, "billing [[quota]]")]
    rows += [(i, f"never asked {i}") for i in range(11, 500)]
    seen: list[QueryResult] = []
    started = time.monotonic()
    with pytest.raises(LLMQueryQuotaError, match="insufficient_quota") as info:
        for result in METHODS[method](make_endpoint(server, "azure"), iter(rows), **FAST):
            seen.append(result)
    assert time.monotonic() - started < 10
    assert "quota" in str(info.value) and TEST_KEY not in str(info.value)
    stats = server.stats()
    assert stats["requests_per_prompt"].get(_hash("billing [[quota]]")) == 1  # never retried
    assert stats["chat_requests"] < 11 + 2 * 128  # the run stopped: most rows were never sent
    assert all(r.ok for r in seen)
    if method == "sync":
        assert [r.row_id for r in seen] == list(range(10))  # rows answered before it are handed over


def _hash(prompt: str) -> str:
    from airflow_provider_llmq.testing.mock_server import prompt_hash

    return prompt_hash(prompt)


# -- 5. 200 answer shapes ------------------------------------------------------------------------


def test_unusable_200_answers_are_recorded_not_retried(kind: str, server: MockServer) -> None:
    endpoint = make_endpoint(server, "azure")
    prompts = ["a [[filtered]]", "b [[tool_calls]]", "c [[refusal]]", "d [[length]]"]
    results = ask(kind, endpoint, prompts)
    assert [(r.error_code, r.attempts, r.http_status, r.response) for r in results] == [
        ("content_filter", 1, 200, None),
        ("tool_calls", 1, 200, None),
        ("refusal", 1, 200, None),
        ("length", 1, 200, None),
    ]
    assert results[1].error_message and "get_weather" in results[1].error_message
    assert results[2].error_message == "I'm sorry, but I can't help with that request."
    assert [r.finish_reason for r in results] == ["content_filter", "tool_calls", "stop", "length"]
    assert all(r.prompt_tokens for r in results)  # billed, so counted
    assert server.stats()["chat_requests"] == 4


def test_text_cut_by_length_is_ok_and_text_parts_are_joined(kind: str, server: MockServer) -> None:
    endpoint = make_endpoint(server, "openai")
    cut, parts = ask(kind, endpoint, ["e [[length_text]]", "f [[parts]]"])
    system = QueryOptions().system_prompt
    assert cut.ok and cut.finish_reason == "length"
    assert cut.response == expected_answer(DEPLOYMENT, system, "e [[length_text]]", {})
    assert parts.ok and parts.response == expected_answer(DEPLOYMENT, system, "f [[parts]]", {})


# -- 6. request_timeout is a deadline for the whole request -----------------------------------


def test_a_trickled_body_is_cut_at_the_request_deadline(kind: str, server: MockServer) -> None:
    """The mock sends headers at once, then one byte every 400 ms: each socket read is quick, so
    only a whole-request deadline ends it. The same client then answers the next row."""
    endpoint = make_endpoint(server, "azure")
    options = QueryOptions(**{**FAST, "max_retries": 0, "request_timeout": 2})

    def run_sync() -> tuple[QueryResult, float, QueryResult]:
        with SyncClient(endpoint, options, pool_size=1) as client:  # one connection: the cut one
            started = time.monotonic()
            cut = client.query(1, "trickle [[drip:400]]")
            return cut, time.monotonic() - started, client.query(2, "after the trickle")

    async def run_async() -> tuple[QueryResult, float, QueryResult]:
        async with AsyncClient(endpoint, options, concurrency=1) as client:
            started = time.monotonic()
            cut = await client.query(1, "trickle [[drip:400]]")
            return cut, time.monotonic() - started, await client.query(2, "after the trickle")

    result, elapsed, after = run_sync() if kind == "sync" else asyncio.run(run_async())
    assert result.error_code == "timeout" and result.attempts == 1, result
    assert 1.5 <= elapsed < 4, elapsed
    assert after.ok, after


def test_every_attempt_has_its_own_deadline(server: MockServer) -> None:
    endpoint = make_endpoint(server, "openai")
    started = time.monotonic()
    results = list(
        query_thread_pool(
            endpoint,
            iter([(i, f"drip {i} [[drip:300]]") for i in range(4)] + [(9, "quick")]),
            max_workers=8,
            max_retries=1,
            retry_backoff=0.001,
            request_timeout=1,
        )
    )
    elapsed = time.monotonic() - started
    by_id = {r.row_id: r for r in results}
    assert by_id[9].ok
    assert all(by_id[i].error_code == "timeout" and by_id[i].attempts == 2 for i in range(4))
    assert elapsed < 4, elapsed  # two attempts of about 1 s each, the rows in parallel
