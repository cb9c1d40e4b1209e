"""Issue 10, item 2, over real sockets: no key, secret header value or proxy credential in any row,
exception (with its chain), log line or test_connection message, whatever the server echoes."""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
from collections.abc import Iterator
from typing import Any

import pytest

from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.errors import LLMQueryError
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
from airflow_provider_llmq.testing.mock_server import MockServer
from tests.conftest import DEPLOYMENT, TEST_KEY, make_endpoint

pytestmark = pytest.mark.timeout(120)
HEADER = "Ocp-Apim-Subscription-Key"
HEADER_SECRET = "apim-subscription-7c1e9a2b"
PROXY_USER, PROXY_PASSWORD = "proxyuser", "proxy-pass-31f5d0"
SECRETS = (TEST_KEY, HEADER_SECRET, PROXY_PASSWORD)
FAST = {"max_retries": 1, "retry_backoff": 0.001, "max_retry_wait": 0.5}
# a gateway echoing every request header in its error body, plus every other kind of failure
FAULTS = [
    "echo [[echo]]",
    "e500 [[500x9]]",
    "reset [[resetx9]]",
    "redirect [[redirect]]",
    "cf [[content_filter]]",
]


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def _scan(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


def _exception_text(exc: BaseException) -> str:
    parts = ["".join(traceback.format_exception(exc))]
    link: BaseException | None = exc
    while link is not None:  # also the links a traceback print would suppress
        parts.append(f"{link!s} {link!r} {link.args!r}")
        link = link.__cause__ or link.__context__
    return "\n".join(parts)


def _ask_one(kind: str, endpoint: EndpointConfig, prompt: str) -> QueryResult:
    options = QueryOptions(**FAST)
    if kind == "sync":
        with SyncClient(endpoint, options) as client:
            return client.query(1, prompt)

    async def run() -> QueryResult:
        async with AsyncClient(endpoint, options) as client:
            return await client.query(1, prompt)

    return asyncio.run(run())


def _endpoint(server: MockServer, api_type: str, **overrides: Any) -> EndpointConfig:
    return make_endpoint(server, api_type, headers={HEADER: f"{HEADER_SECRET}\n"}, **overrides)


@pytest.mark.parametrize("api_type", ["azure", "openai"])
def test_rows_hold_no_secret_whatever_the_server_says(
    api_type: str, server: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rows = [(i, prompt) for i, prompt in enumerate(FAULTS)]
    recorded: list[QueryResult] = []
    for method in (query_sync, query_async_batches, query_async_limited, query_thread_pool):
        recorded += list(method(_endpoint(server, api_type), iter(rows), **FAST))
    echoed = [r for r in recorded if r.error_code and r.error_code.startswith("rejected")]
    assert len(echoed) == 4 and all("***" in (r.error_message or "") for r in echoed)  # it did echo
    for result in recorded:
        assert not _scan(json.dumps(result.to_dict(), default=str)), result
    assert not _scan("\n".join(record.getMessage() for record in caplog.records))


@pytest.mark.parametrize("status", [401, 404])
def test_raised_errors_hold_no_secret_even_when_the_server_echoes_it(server: MockServer, status: int) -> None:
    """The auth and 404 errors quote the API's error code; here the gateway puts the headers in it."""
    for kind in ("sync", "async"):
        with pytest.raises(LLMQueryError) as info:
            _ask_one(kind, _endpoint(server, "azure"), f"fail [[echo:{status}]]")
        text = _exception_text(info.value)
        assert str(status) in text and "***" in text
        assert not _scan(text), text


def test_a_timeout_and_a_dead_proxy_leave_no_credential_in_messages(server: MockServer) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    proxy = f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{dead}"
    for kind in ("sync", "async"):
        endpoint = _endpoint(server, "openai", proxy=proxy)
        assert PROXY_PASSWORD not in repr(endpoint)
        result = _ask_one(kind, endpoint, "through a dead proxy")
        assert result.error_code == "connection_error", result
        assert not _scan(json.dumps(result.to_dict())), result
    [timed_out] = list(
        query_sync(
            _endpoint(server, "azure"), iter([(1, "slow [[drip:200]]")]), max_retries=0, request_timeout=0.5
        )
    )
    assert timed_out.error_code == "timeout" and not _scan(json.dumps(timed_out.to_dict()))


@pytest.fixture
def secret_connection(monkeypatch: pytest.MonkeyPatch, server: MockServer) -> Iterator[str]:
    conn = {
        "conn_type": "llmq",
        "host": server.base_url,
        "password": f"{TEST_KEY}\r\n",
        "extra": {
            "api_type": "azure",
            "deployment": DEPLOYMENT,
            "ca_cert": server.ca_path,
            "headers": {HEADER: HEADER_SECRET},
        },
    }
    monkeypatch.setenv("AIRFLOW_CONN_LLMQ_SECRETS", json.dumps(conn))
    yield "llmq_secrets"


def test_the_hook_registers_every_secret_with_airflows_masker(
    monkeypatch: pytest.MonkeyPatch, secret_connection: str
) -> None:
    from airflow.sdk._shared.secrets_masker import redact

    monkeypatch.setenv("HTTPS_PROXY", f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # the proxy is registered though the mock bypasses it
    hook = LLMQueryHook(secret_connection)
    assert hook.endpoint.api_key == TEST_KEY
    line = f"key={TEST_KEY} header={HEADER_SECRET} proxy=http://{PROXY_USER}:{PROXY_PASSWORD}@host"
    assert not _scan(str(redact(line)))


def test_connection_messages_hold_no_secret(server: MockServer, secret_connection: str) -> None:
    hook = LLMQueryHook(secret_connection)
    messages = [hook.test_connection()[1]]
    for kinds in (["echo"], ["500"], ["reset"]):
        server.configure(fault_rate=1.0, fault_kinds=kinds, fault_attempts=99)
        messages.append(LLMQueryHook(secret_connection).test_connection()[1])
    server.configure(fault_rate=0.0)
    assert messages[0].startswith("Connection successful")
    assert not _scan("\n".join(messages)), messages


def test_a_bad_host_with_credentials_is_not_echoed_by_the_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    conn = {"conn_type": "llmq", "host": f"htps://user:{PROXY_PASSWORD}@host", "password": TEST_KEY}
    monkeypatch.setenv("AIRFLOW_CONN_LLMQ_BADHOST", json.dumps(conn))
    ok, message = LLMQueryHook("llmq_badhost").test_connection()
    assert not ok and "credentials" in message and not _scan(message)
