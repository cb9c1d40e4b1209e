"""Both clients, both API types, over HTTPS against the mock server (real sockets, no patching)."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.errors import LLMQueryAuthError, LLMQueryConfigError
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.core.transport.async_client import AsyncClient
from airflow_provider_llmq.core.transport.sync_client import SyncClient
from airflow_provider_llmq.testing.mock_server import expected_answer
from tests.conftest import DEPLOYMENT, TEST_KEY, make_endpoint

FAST = {"max_retries": 3, "retry_backoff": 0.001, "max_retry_wait": 1.0}


def _options(endpoint: EndpointConfig, **kwargs: Any) -> tuple[EndpointConfig, QueryOptions]:
    return endpoint, QueryOptions(**{**FAST, **kwargs})


def ask(kind: str, endpoint: EndpointConfig, prompts: list[str], **kwargs: Any) -> list[QueryResult]:
    """Ask all prompts concurrently with one client of the given kind."""
    endpoint, options = _options(endpoint, **kwargs)
    if kind == "sync":
        with SyncClient(endpoint, options, pool_size=16) as client, ThreadPoolExecutor(16) as pool:
            return list(pool.map(lambda item: client.query(*item), enumerate(prompts)))

    async def main() -> list[QueryResult]:
        async with AsyncClient(endpoint, options, concurrency=16) as client:
            return list(await asyncio.gather(*(client.query(i, p) for i, p in enumerate(prompts))))

    return asyncio.run(main())


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_plain_answer_matches_the_mock(kind: str, endpoint: EndpointConfig) -> None:
    [result] = ask(
        kind, endpoint, ["What is Spark?"], system_prompt="Answer briefly.", request_params={"temperature": 0}
    )
    assert result.ok and result.attempts == 1 and result.http_status == 200
    assert result.response == expected_answer(
        DEPLOYMENT, "Answer briefly.", "What is Spark?", {"temperature": 0}
    )
    assert result.prompt_tokens and result.completion_tokens and result.finish_reason == "stop"
    assert result.latency_ms is not None and result.latency_ms > 0


def test_500_twice_then_ok_takes_three_attempts(kind: str, endpoint: EndpointConfig, server: Any) -> None:
    [result] = ask(kind, endpoint, ["flaky [[500x2]]"])
    assert result.ok and result.attempts == 3
    assert server.stats()["requests_by_status"].get("500") == 2


@pytest.mark.parametrize("marker", ["[[reset]]", "[[malformed]]", "[[empty]]", "[[503x1]]", "[[408]]"])
def test_transient_faults_are_retried(kind: str, endpoint: EndpointConfig, marker: str) -> None:
    [result] = ask(kind, endpoint, [f"q {marker}"])
    assert result.ok and result.attempts == 2, result


def test_timeout_is_retried_then_recorded(kind: str, server: Any) -> None:
    endpoint = make_endpoint(server, "azure", timeout=0.3)
    [result] = ask(kind, endpoint, ["sleepy [[slow:2000]]"], max_retries=1)
    assert not result.ok and result.error_code == "timeout" and result.attempts == 2


def test_content_filter_and_context_length_are_not_retried(kind: str, endpoint: EndpointConfig) -> None:
    results = ask(kind, endpoint, ["bad [[content_filter]]", "long [[context_length]]"])
    assert [(r.error_code, r.attempts, r.http_status) for r in results] == [
        ("content_filter", 1, 400),
        ("context_length_exceeded", 1, 400),
    ]
    assert all(r.response is None and r.error_message for r in results)


def test_429_retry_after_ms_is_waited_out_and_pauses_the_client(
    kind: str, endpoint: EndpointConfig, server: Any
) -> None:
    prompts = ["throttled [[429:ms=400]]"] + [f"bystander {i} [[slow:50]]" for i in range(6)]
    started = time.monotonic()
    results = ask(kind, endpoint, prompts)
    elapsed = time.monotonic() - started
    assert all(r.ok for r in results)
    assert results[0].attempts == 2 and elapsed >= 0.4
    # the throttled row waited at least what the server asked
    assert results[0].latency_ms is not None and results[0].latency_ms >= 400


def _wait_for_429(server: Any) -> None:
    deadline = time.monotonic() + 5
    while not server.stats()["requests_by_status"].get("429"):
        assert time.monotonic() < deadline, "the mock never answered 429"
        time.sleep(0.005)
    time.sleep(0.02)  # the client has read the answer and set the pause


@pytest.mark.parametrize(
    ("marker", "held"),
    [("[[x-ratelimit-remaining-requests=0]]", True), ("", False)],
    ids=["quota_evidence", "isolated"],
)
def test_a_429_hint_pauses_everyone_only_with_quota_evidence(
    kind: str, endpoint: EndpointConfig, server: Any, marker: str, held: bool
) -> None:
    """A 429 with retry-after-ms and its bucket at zero holds the requests issued after it; an
    isolated one (no evidence of a quota: one refusal is noise until more say otherwise) delays only
    its own row, which still waits its hint."""
    endpoint, options = _options(endpoint)
    prompt = f"first [[429:ms=500]] {marker}"

    def sync_run() -> tuple[float, float]:
        with SyncClient(endpoint, options, pool_size=4) as client, ThreadPoolExecutor(1) as pool:
            began = time.monotonic()
            throttled = pool.submit(client.query, 0, prompt)
            _wait_for_429(server)
            started = time.monotonic()
            client.query(1, "issued during the pause")
            waited = time.monotonic() - started
            throttled.result()
            return waited, time.monotonic() - began

    async def async_run() -> tuple[float, float]:
        async with AsyncClient(endpoint, options, concurrency=4) as client:
            began = time.monotonic()
            throttled = asyncio.create_task(client.query(0, prompt))
            await asyncio.to_thread(_wait_for_429, server)
            started = time.monotonic()
            await client.query(1, "issued during the pause")
            waited = time.monotonic() - started
            await throttled
            return waited, time.monotonic() - began

    waited, refused_row = sync_run() if kind == "sync" else asyncio.run(async_run())
    assert refused_row >= 0.5  # the refused row waits its hint either way
    if held:
        assert waited >= 0.25
    else:
        assert waited < 0.4  # not held for the 500 ms (a loaded machine answers within that)


def test_huge_retry_after_is_capped_and_row_ends_rate_limited(kind: str, endpoint: EndpointConfig) -> None:
    started = time.monotonic()
    [result] = ask(kind, endpoint, ["forever [[429:s=86400x99]]"], max_retries=2, max_retry_wait=0.2)
    assert time.monotonic() - started < 5
    assert not result.ok and result.error_code == "rate_limited" and result.attempts == 3
    assert result.http_status == 429


def test_max_retry_wait_one_second_is_honoured(kind: str, endpoint: EndpointConfig) -> None:
    started = time.monotonic()
    [result] = ask(kind, endpoint, ["again [[429:s=86400x99]]"], max_retries=1, max_retry_wait=1.0)
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 4 and result.error_code == "rate_limited" and result.attempts == 2


def test_wrong_key_raises_at_once(kind: str, server: Any) -> None:
    for api_type in ("azure", "openai"):
        endpoint = make_endpoint(server, api_type, api_key="sk-wrong-key-000")
        server.reset()
        with pytest.raises(LLMQueryAuthError) as info:
            ask(kind, endpoint, ["hello"])
        assert "sk-wrong-key-000" not in str(info.value)
        assert server.stats()["chat_requests"] == 1  # no retry of an auth failure


def test_unknown_deployment_raises_config_error(kind: str, server: Any) -> None:
    server.configure(deployments=[DEPLOYMENT])
    endpoint = make_endpoint(server, "azure", model="no-such-deployment")
    with pytest.raises(LLMQueryConfigError, match="404"):
        ask(kind, endpoint, ["hello"])


def test_wrong_ca_fails_with_a_clear_message(kind: str, server: Any) -> None:
    import trustme

    other_ca = trustme.CA().cert_pem.bytes().decode()
    endpoint = make_endpoint(server, "openai", ca_cert=other_ca)
    with pytest.raises(LLMQueryConfigError, match="certificate could not be verified"):
        ask(kind, endpoint, ["hello"])


def test_ca_given_as_pem_text_works(kind: str, server: Any) -> None:
    endpoint = make_endpoint(server, "azure", ca_cert=server.ca_pem)
    [result] = ask(kind, endpoint, ["pem"])
    assert result.ok


def test_empty_prompts_send_nothing(kind: str, endpoint: EndpointConfig, server: Any) -> None:
    results = ask(kind, endpoint, ["", "   ", None])  # type: ignore[list-item]
    assert [r.error_code for r in results] == ["empty_prompt"] * 3
    assert all(r.attempts == 0 for r in results)
    assert server.stats()["chat_requests"] == 0


def test_key_never_leaks(kind: str, server: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []
    for api_type in ("azure", "openai"):
        endpoint = make_endpoint(server, api_type)
        ask(kind, endpoint, ["a [[500]]", "b [[reset]]", "c [[content_filter]]"])
        assert TEST_KEY not in repr(endpoint) and TEST_KEY not in endpoint.url()
        client = SyncClient(endpoint) if kind == "sync" else AsyncClient(endpoint)
        assert TEST_KEY not in repr(client)
        try:
            ask(kind, make_endpoint(server, api_type, api_key=TEST_KEY + "x"), ["x"])
        except LLMQueryAuthError as exc:
            errors.append(f"{exc!r} {exc}")
    assert errors and all(TEST_KEY not in text for text in errors)
    assert all(TEST_KEY not in record.getMessage() for record in caplog.records)
    assert server.stats()["keys_in_url"] == 0


def test_sync_client_trusts_only_the_configured_ca(server: Any) -> None:
    """requests would load certifi's bundle into the shared SSL context on every new connection."""
    endpoint = make_endpoint(server, "azure")
    context = endpoint.ssl_context()
    [result] = ask("sync", endpoint, ["trust"])
    assert result.ok
    assert len(context.get_ca_certs()) == 1
