"""llmq through LiteLLM's proxy over real sockets: the four methods in both API forms, every row its
own answer; upstream 429s and the gateway's own 429s classified as rate limits; a wrong key; one
operator run with ``dag.test()``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.errors import LLMQueryAuthError
from airflow_provider_llmq.core.methods import (
    query_async_batches,
    query_async_limited,
    query_sync,
    query_thread_pool,
)
from airflow_provider_llmq.core.request.payload import DEFAULT_SYSTEM_PROMPT
from airflow_provider_llmq.testing.mock_server import MockConfig, MockServer, expected_answer, planned_fault
from tests.conftest import DEPLOYMENT, TEST_KEY, run_dag_file
from tests.gateway.conftest import MASTER_KEY, MOCK_ANSWER, Gateway
from tests.integration.test_batch_api_operator import DAG_HEAD  # the same DAG file head

pytestmark = [pytest.mark.gateway, pytest.mark.timeout(300)]
FAST = {"retry_backoff": 0.001, "max_retry_wait": 1.0}
METHODS: dict[str, tuple[Any, str | None]] = {
    "sync": (query_sync, None),
    "async_batches": (query_async_batches, "batch_size"),
    "async_limited": (query_async_limited, "max_concurrency"),
    "thread_pool": (query_thread_pool, "max_workers"),
}


def through(gateway: Gateway, api_type: str, **overrides: Any) -> EndpointConfig:
    """The gateway as a connection names it: the bare host for the OpenAI form (llmq adds /v1), the
    same host for the Azure form (LiteLLM serves /openai/deployments/... too)."""
    fields: dict[str, Any] = {
        "api_base": gateway.base_url,
        "api_key": MASTER_KEY,
        "api_type": api_type,
        "model": DEPLOYMENT,
        "api_version": "2024-06-01" if api_type == "azure" else None,
        "timeout": 30.0,
    }
    return EndpointConfig(**{**fields, **overrides})


def run(
    name: str, endpoint: EndpointConfig, rows: list[tuple[Any, str]], **options: Any
) -> list[QueryResult]:
    method, argument = METHODS[name]
    if argument is not None:
        options[argument] = 8
    results: Iterator[QueryResult] = method(endpoint, rows, **{**FAST, **options})
    return list(results)


def rows_of(n: int, tag: str) -> list[tuple[Any, str]]:
    return [(f"{tag}-{i}", f"gateway question {tag} {i}?") for i in range(n)]


@pytest.mark.parametrize("api_type", ["openai", "azure"])
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_answers_every_row_through_the_proxy(
    name: str, api_type: str, gateway: Gateway, upstream: MockServer
) -> None:
    rows = rows_of(120, f"{name}-{api_type}")
    results = run(name, through(gateway, api_type), rows)
    assert sorted(r.row_id for r in results) == sorted(row_id for row_id, _ in rows)
    prompts = dict(rows)
    for result in results:
        assert result.ok, result
        # the upstream's answer for this row's own prompt, through the gateway
        assert result.response == expected_answer(
            DEPLOYMENT, DEFAULT_SYSTEM_PROMPT, prompts[result.row_id], {}
        )
        assert result.attempts == 1 and result.prompt_tokens and result.completion_tokens
    stats = upstream.stats()
    assert stats["chat_requests"] == len(rows)  # the gateway sent each row upstream once
    assert stats["chat_routes"] == {"/v1/chat/completions": len(rows)}


def test_mock_response_models_answer_without_an_upstream(gateway: Gateway, upstream: MockServer) -> None:
    results = run("async_limited", through(gateway, "openai", model="mock-answer"), rows_of(50, "mock"))
    assert len(results) == 50 and all(r.ok and r.response == MOCK_ANSWER for r in results)
    assert upstream.stats()["chat_requests"] == 0


def test_upstream_429s_come_through_the_proxy_and_are_retried(gateway: Gateway, upstream: MockServer) -> None:
    faults = {"fault_rate": 0.1, "fault_kinds": ["429"], "retry_after_ms": 5, "seed": 3}
    upstream.configure(**faults)
    config = MockConfig(api_key=TEST_KEY, **faults)  # type: ignore[arg-type]
    rows = rows_of(200, "throttled")
    results = run("async_limited", through(gateway, "openai"), rows, adaptive=False)
    planned = {row_id: planned_fault(prompt, config) for row_id, prompt in rows}
    assert sum(fate == "429" for fate in planned.values()) > 5  # the run met the trouble it claims to survive
    for result in results:
        assert result.ok, result  # every row answered in the end
        assert result.attempts == (2 if planned[result.row_id] == "429" else 1), result
    assert upstream.stats()["requests_by_status"].get("429", 0) == sum(f == "429" for f in planned.values())


def test_the_gateways_own_429s_end_rows_rate_limited_not_failed(
    gateway: Gateway, upstream: MockServer
) -> None:
    """LiteLLM's own RateLimitError (a 429 with type throttling_error, no Retry-After): congestion,
    so no row is a bad request or an auth error; with nothing ever answered the run's patience ends it."""
    endpoint = through(gateway, "openai", model="always-429")
    results = run("async_limited", endpoint, rows_of(10, "refused"), patience=3.0)
    assert len(results) == 10
    assert all((r.status, r.error_code) == ("error", "rate_limited") for r in results), results
    # the rows sent were refused with the gateway's 429; the rest ended unsent once patience was spent
    assert any(r.http_status == 429 and r.throttled for r in results), results
    assert all(r.http_status in (429, None) for r in results)
    assert upstream.stats()["chat_requests"] == 0


@pytest.mark.parametrize("api_type", ["openai", "azure"])
@pytest.mark.parametrize("name", ["sync", "async_limited"])
def test_a_wrong_key_is_one_clear_auth_error(
    name: str, api_type: str, gateway: Gateway, upstream: MockServer
) -> None:
    """Without a database LiteLLM answers an unknown key with a 400 ``no_db_connection`` (with one,
    a 401): either way the run stops with an auth error at once, not one error per row."""
    wrong = "sk-wrong-gateway-key-31f0"
    with pytest.raises(LLMQueryAuthError, match="could not check the key") as raised:
        run(name, through(gateway, api_type, api_key=wrong), rows_of(200, "wrong"))
    assert wrong not in str(raised.value)
    assert upstream.stats()["chat_requests"] == 0


OPERATOR = (
    '    LLMQueryRateLimitedOperator(task_id="ask", source_path="{source}", id_col="id", '
    'output_path="{output}", max_concurrency=8)\n'
)


@pytest.mark.slow
def test_an_operator_runs_through_the_proxy(
    airflow_db: Path,
    spark: Any,
    gateway: Gateway,
    upstream: MockServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The connection a user writes for LiteLLM: its bare host, the master key, the model group."""
    import pyarrow.parquet as pq

    connection = {
        "conn_type": "llmq",
        "host": gateway.base_url,
        "password": MASTER_KEY,
        "extra": {"api_type": "openai", "model": DEPLOYMENT},
    }
    monkeypatch.setenv("AIRFLOW_CONN_LLMQ_DEFAULT", json.dumps(connection))
    prompts = {i: f"operator question {i}?" for i in range(60)}
    source, output = tmp_path / "src", tmp_path / "out"
    spark.createDataFrame(list(prompts.items()), "id long, prompt string").write.parquet(str(source))
    dag = DAG_HEAD.format(dag_id="llmq_through_litellm", retries=0) + OPERATOR.format(
        source=source, output=output
    )
    run = run_dag_file(dag, "llmq_through_litellm")
    assert run.state == "success"
    rows = pq.read_table(output).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(prompts)
    for row in rows:
        assert row["llmq_status"] == "ok", row
        assert row["response"] == expected_answer(DEPLOYMENT, DEFAULT_SYSTEM_PROMPT, prompts[row["id"]], {})
    assert upstream.stats()["chat_routes"] == {"/v1/chat/completions": len(prompts)}
