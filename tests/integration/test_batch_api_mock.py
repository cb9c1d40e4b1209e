"""The mock server's Files and Batches APIs and llmq's client for them, over TLS sockets, both URL
forms: states over time, per-line faults with the live error codes, expiry, cancel, the
enqueued-token quota, the request-count limit, counters; and the trigger polling them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import pytest
import requests

from airflow_provider_llmq.core.batch.batch_api import BatchApiClient, BatchInfo, LLMQueryBatchError
from airflow_provider_llmq.core.batch.batch_files import LineBuilder, parse_result_line
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.errors import LLMQueryAuthError, LLMQueryConfigError
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.core.transport.sync_client import SyncClient
from airflow_provider_llmq.testing.mock_server import expected_answer
from airflow_provider_llmq.testing.mock_server.batch_lines import tokens
from tests.conftest import DEPLOYMENT, llmq_connection_env, make_endpoint

SYSTEM = "You are a helpful assistant."


class BatchMock:
    """The mock server's batch admin routes: stats, reset, config."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = requests.request(
            method, self.server.base_url + path, json=body, verify=self.server.ca_path, timeout=10
        )
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, Any]:
        return dict(self._call("GET", "/_mock/batches/stats"))

    def reset(self) -> None:
        self._call("POST", "/_mock/batches/reset", {})

    def configure(self, **changes: Any) -> dict[str, Any]:
        return dict(self._call("POST", "/_mock/batches/config", changes))


def _client(endpoint: EndpointConfig) -> BatchApiClient:
    return BatchApiClient(endpoint, QueryOptions(retry_backoff=0.01).retry_policy())


def _submit(
    client: BatchApiClient, prompts: dict[str, str], metadata: dict[str, str] | None = None
) -> BatchInfo:
    builder = LineBuilder(QueryOptions().chat_request(client.endpoint), client.line_url, DEPLOYMENT)
    content = b"".join(builder.line(key, prompt) for key, prompt in prompts.items())
    return client.create_batch(client.upload("requests.jsonl", content), metadata or {})


def _wait(client: BatchApiClient, batch_id: str, seen: list[str] | None = None) -> BatchInfo:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = client.get_batch(batch_id)
        if seen is not None and (not seen or seen[-1] != info.status):
            seen.append(info.status)
        if not info.active:
            return info
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} did not finish")


def _results(client: BatchApiClient, info: BatchInfo) -> dict[str, Any]:
    found = {}
    for file_id in (info.output_file_id, info.error_file_id):
        for raw in client.file_lines(file_id) if file_id else ():
            outcome = parse_result_line(raw, client.scrubber)
            found[outcome.custom_id] = outcome.result or outcome.never_ran_code
    return found


@pytest.mark.parametrize(
    ("api_type", "prefix", "line_url", "bare_host"),
    [
        ("azure", "/openai", "/chat/completions", False),
        ("azure_v1", "/openai/v1", "/chat/completions", False),
        ("azure_v1", "/openai/v1", "/chat/completions", True),  # the resource URL alone
        ("openai", "/v1", "/v1/chat/completions", False),
        ("openai", "/v1", "/v1/chat/completions", True),  # a host without /v1 means host/v1
    ],
)
def test_the_client_speaks_each_url_form_from_upload_to_results(
    server: Any, batches: BatchMock, api_type: str, prefix: str, line_url: str, bare_host: bool
) -> None:
    endpoint = make_endpoint(server, api_type, api_version="2024-10-21" if api_type == "azure" else None)
    if bare_host:
        endpoint = dataclasses.replace(endpoint, api_base=server.base_url)
    prompts = {f"key-{i}": f"question {i}?" for i in range(5)}
    seen: list[str] = []
    with _client(endpoint) as client:
        assert client.line_url == line_url
        created = _submit(client, prompts, {"llmq_checkpoint": "dag/task/run", "llmq_file": "abc"})
        done = _wait(client, created.id, seen)
        results = _results(client, done)
        listed = list(client.list_batches())
        client.delete_file(done.output_file_id or "")
    assert seen == ["validating", "in_progress", "finalizing", "completed"]
    assert done.request_counts == {"total": 5, "completed": 5, "failed": 0}
    assert {k: r.response for k, r in results.items()} == {
        k: expected_answer(DEPLOYMENT, SYSTEM, p) for k, p in prompts.items()
    }
    assert [b.id for b in listed] == [created.id] and listed[0].metadata["llmq_checkpoint"] == "dag/task/run"
    stats = batches.stats()
    routes = stats["routes"]
    assert routes[f"POST {prefix}/files"] == 1 and routes[f"POST {prefix}/batches"] == 1
    assert routes[f"GET {prefix}/batches/{{batch_id}}"] >= len(seen)  # one poll per state at least
    assert (
        routes[f"GET {prefix}/files/{{file_id}}/content"] == 1
        and routes[f"DELETE {prefix}/files/{{file_id}}"] == 1
    )
    versions = {k: v for k, v in routes.items() if k.startswith("api-version=")}
    assert versions == ({"api-version=2024-10-21": stats["http_requests"]} if api_type == "azure" else {})
    assert (stats["files_created"], stats["batches_created"], stats["lines_created"]) == (1, 1, 5)
    assert server.stats()["keys_in_url"] == 0 and server.stats()["chat_requests"] == 0


@pytest.mark.parametrize("api_type", ["azure", "azure_v1", "openai"])
def test_each_line_gets_the_error_code_a_live_request_gets(
    server: Any, batches: BatchMock, api_type: str
) -> None:
    endpoint = make_endpoint(server, api_type)
    prompts = {
        "plain": "hello?",
        "filter": "bad words [[content_filter]]",
        "filtered": "answer filtered [[filtered]]",
        "context": "far too long [[context_length]]",
        "refusal": "refuse me [[refusal]]",
        "server": "unlucky [[500]]",
        "tools": "call a tool [[tool_calls]]",
    }
    with _client(endpoint) as client:
        batch = _results(client, _wait(client, _submit(client, prompts).id))
    with SyncClient(endpoint, QueryOptions(max_retries=0)) as live:
        expected = {key: live.query(key, prompt) for key, prompt in prompts.items()}
    assert {k: (r.status, r.error_code, r.response) for k, r in batch.items()} == {
        k: (r.status, r.error_code, r.response) for k, r in expected.items()
    }
    assert batch["filter"].error_code == batch["filtered"].error_code == "content_filter"


def test_an_expired_batch_keeps_the_lines_done_before_the_window_closed(
    server: Any, batches: BatchMock
) -> None:
    # 20 lines at 0.05 s each after 0.1 s of validation; the window closes 0.6 s after creation
    batches.configure(validating_s=0.1, in_progress_s=0.0, line_s=0.05, completion_window_s=0.6)
    prompts = {f"k{i:02d}": f"question {i}?" for i in range(20)}
    with _client(make_endpoint(server, "openai")) as client:
        done = _wait(client, _submit(client, prompts).id)
        results = _results(client, done)
    assert done.status == "expired"
    answered = sorted(k for k, r in results.items() if r != "batch_expired")
    assert answered == [f"k{i:02d}" for i in range(10)]  # (0.6 - 0.1) / 0.05 lines, in file order
    assert sorted(k for k, r in results.items() if r == "batch_expired") == [
        f"k{i:02d}" for i in range(10, 20)
    ]
    assert batches.stats()["lines_answered"] == 10


def test_a_cancelled_batch_keeps_what_it_answered(server: Any, batches: BatchMock) -> None:
    batches.configure(validating_s=0.1, in_progress_s=0.0, line_s=0.1)
    prompts = {f"k{i}": f"question {i}?" for i in range(10)}
    with _client(make_endpoint(server, "azure")) as client:
        created = _submit(client, prompts)
        time.sleep(0.45)
        client.cancel_batch(created.id)
        done = _wait(client, created.id)
        results = _results(client, done)
        with pytest.raises(LLMQueryBatchError, match="cannot be cancelled"):
            client.cancel_batch(created.id)
    answered = [k for k, r in results.items() if r != "batch_cancelled"]
    assert done.status == "cancelled" and 1 <= len(answered) <= 5
    assert len(results) == 10 and batches.stats()["cancel_requests"] == 1


def test_the_enqueued_token_quota_refuses_a_batch_until_earlier_ones_finish(
    server: Any, batches: BatchMock
) -> None:
    files = [{f"f{n}-k{i}": f"question {n}{i}?" for i in range(4)} for n in range(3)]
    endpoint = make_endpoint(server, "azure")
    builder = LineBuilder(QueryOptions().chat_request(endpoint), "/chat/completions", DEPLOYMENT)
    per_file = sum(tokens(json.loads(builder.line(k, p))["body"]) for k, p in files[0].items())
    batches.configure(enqueued_token_limit=2 * per_file + 1, validating_s=0.1, in_progress_s=0.5)
    with _client(endpoint) as client:
        created = [_submit(client, prompts) for prompts in files]
        ended = [_wait(client, b.id) for b in created]
        again = _wait(client, _submit(client, files[2]).id)
    assert [b.status for b in ended] == ["completed", "completed", "failed"]
    assert ended[2].refused_for_quota and "enqueued tokens" in (ended[2].error_text() or "")
    assert again.status == "completed"
    stats = batches.stats()
    assert (stats["token_limit_refusals"], stats["batches_created"], stats["files_created"]) == (1, 4, 4)


def test_a_file_over_the_request_limit_fails_validation(server: Any, batches: BatchMock) -> None:
    batches.configure(max_requests_per_file=5, validating_s=0.05)
    with _client(make_endpoint(server, "openai")) as client:
        done = _wait(client, _submit(client, {f"k{i}": f"q{i}" for i in range(6)}).id)
    assert done.status == "failed" and done.errors[0][0] == "too_many_requests"


def test_refusals_raise_what_a_chat_request_raises(server: Any, batches: BatchMock) -> None:
    wrong_key = make_endpoint(server, "openai", api_key="sk-wrong-key-000")
    with _client(wrong_key) as client, pytest.raises(LLMQueryAuthError):
        next(client.list_batches())
    with _client(make_endpoint(server, "azure")) as client, pytest.raises(LLMQueryConfigError, match="404"):
        client.get_batch("batch_missing")
    no_version = requests.get(
        server.base_url + "/openai/batches",
        headers={"api-key": make_endpoint(server, "azure").api_key},
        verify=server.ca_path,
        timeout=10,
    )
    assert no_version.status_code == 400
    assert batches.stats()["batches_created"] == 0


def test_counters_count_and_reset(server: Any, batches: BatchMock) -> None:
    with _client(make_endpoint(server, "openai")) as client:
        _wait(client, _submit(client, {"a": "one?", "b": "two?"}).id)
    stats = batches.stats()
    assert (stats["files_created"], stats["batches_created"], stats["requests_per_batch"]) == (1, 1, [2])
    assert stats["files_live"] == 2  # the input and the output file: no line failed, so no error file
    batches.reset()
    cleared = batches.stats()
    assert (cleared["files_created"], cleared["batches_created"], cleared["files_live"]) == (0, 0, 0)


# --- the trigger, run the way dag.test runs it: its first event -----------------------------


@pytest.fixture
def conn(server: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    for name, value in llmq_connection_env(server, "llmq_batch", api_type="openai").items():
        monkeypatch.setenv(name, value)
    return "llmq_batch"


def _first_event(trigger: Any) -> tuple[dict[str, Any], float]:
    async def first() -> Any:
        return await anext(trigger.run())

    started = time.monotonic()
    event = asyncio.run(first())
    return event.payload, time.monotonic() - started


def test_the_trigger_fires_once_every_batch_has_finished(server: Any, batches: BatchMock, conn: str) -> None:
    from airflow_provider_llmq.triggers.batch_api import LLMQueryBatchTrigger

    batches.configure(validating_s=0.1, in_progress_s=0.0, line_s=0.1)
    with _client(make_endpoint(server, "openai")) as client:
        short = _submit(client, {"a": "one?"})
        long = _submit(client, {f"k{i}": f"q{i}?" for i in range(8)})
    ids = [short.id, long.id]
    payload, waited = _first_event(LLMQueryBatchTrigger(llm_conn_id=conn, batch_ids=ids, poll_interval=0.1))
    assert payload == {"status": "ready", "batches": {short.id: "completed", long.id: "completed"}}
    assert waited >= 0.8
    # with a file waiting for quota, the first batch to finish wakes the task
    with _client(make_endpoint(server, "openai")) as client:
        short = _submit(client, {"a": "one?"})
        long = _submit(client, {f"k{i}": f"q{i}?" for i in range(8)})
    trigger = LLMQueryBatchTrigger(
        llm_conn_id=conn, batch_ids=[short.id, long.id], poll_interval=0.1, wake_on_any=True
    )
    payload, _ = _first_event(trigger)
    assert payload["batches"][short.id] == "completed" and payload["batches"][long.id] != "completed"


@pytest.mark.parametrize("cancel_on_kill", [True, False])
def test_the_trigger_cancels_on_kill_only_when_asked(
    server: Any, batches: BatchMock, conn: str, cancel_on_kill: bool
) -> None:
    from airflow_provider_llmq.triggers.batch_api import LLMQueryBatchTrigger

    batches.configure(in_progress_s=5.0)
    with _client(make_endpoint(server, "openai")) as client:
        created = _submit(client, {"a": "one?", "b": "two?"})
        trigger = LLMQueryBatchTrigger(
            llm_conn_id=conn, batch_ids=[created.id], poll_interval=0.1, cancel_on_kill=cancel_on_kill
        )
        asyncio.run(trigger.on_kill())
        status = _wait(client, created.id).status if cancel_on_kill else client.get_batch(created.id).status
    assert batches.stats()["cancel_requests"] == (1 if cancel_on_kill else 0)
    assert status == ("cancelled" if cancel_on_kill else "validating")
