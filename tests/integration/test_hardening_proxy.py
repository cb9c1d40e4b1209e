"""Issue 10, item 7, over real sockets: both clients through a local CONNECT proxy, chosen by
HTTPS_PROXY or by the connection's ``proxy`` extra; NO_PROXY; proxy credentials; TLS to the
endpoint verified against the connection's CA through the tunnel."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.methods import query_sync
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.core.transport.async_client import AsyncClient
from airflow_provider_llmq.core.transport.sync_client import SyncClient
from airflow_provider_llmq.hooks.llmq import LLMQueryHook
from airflow_provider_llmq.testing.mock_server import MockServer
from tests.conftest import DEPLOYMENT, TEST_KEY, make_endpoint
from tests.proxy_server import ConnectProxy

pytestmark = pytest.mark.timeout(120)
USER, PASSWORD = "llmq-proxy-user", "pr0xy-s3cret-4d2f"
FAST = {"max_retries": 1, "retry_backoff": 0.001, "max_retry_wait": 0.5}
_PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture
def proxy_env(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Sets proxy variables, both spellings (lower case wins in urllib), after clearing them all."""
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name.upper(), value)
            monkeypatch.setenv(name.lower(), value)

    return set_env


@pytest.fixture
def proxy() -> Iterator[ConnectProxy]:
    with ConnectProxy() as server:
        yield server


@pytest.fixture
def auth_proxy() -> Iterator[ConnectProxy]:
    with ConnectProxy(USER, PASSWORD) as server:
        yield server


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ask(kind: str, endpoint: EndpointConfig, prompts: list[str], **settings: Any) -> list[QueryResult]:
    options = QueryOptions(**{**FAST, **settings})
    if kind == "sync":
        with SyncClient(endpoint, options, pool_size=4) as client, ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda item: client.query(*item), enumerate(prompts)))

    async def main() -> list[QueryResult]:
        async with AsyncClient(endpoint, options, concurrency=4) as client:
            return list(await asyncio.gather(*(client.query(i, p) for i, p in enumerate(prompts))))

    return asyncio.run(main())


def test_https_proxy_from_the_environment_is_used(
    kind: str, server: MockServer, proxy: ConnectProxy, proxy_env: Callable[..., None]
) -> None:
    proxy_env(https_proxy=proxy.url)
    results = ask(kind, make_endpoint(server, "azure"), [f"via proxy {i}" for i in range(6)])
    assert all(r.ok for r in results), results
    assert proxy.connects >= 1 and all(t == server.base_url.split("//")[1] for t in proxy.targets)


def test_no_proxy_bypasses_the_environment_proxy(
    kind: str, server: MockServer, proxy: ConnectProxy, proxy_env: Callable[..., None]
) -> None:
    proxy_env(https_proxy=proxy.url, no_proxy="localhost,127.0.0.1")
    [result] = ask(kind, make_endpoint(server, "openai"), ["direct"])
    assert result.ok and proxy.connects == 0 and proxy.targets == []


def test_the_proxy_setting_wins_over_the_environment(
    kind: str, server: MockServer, auth_proxy: ConnectProxy, proxy_env: Callable[..., None]
) -> None:
    # the environment names a dead proxy and bypasses the host: the connection's proxy still wins
    proxy_env(https_proxy=f"http://127.0.0.1:{_dead_port()}", no_proxy="127.0.0.1")
    endpoint = make_endpoint(server, "azure", proxy=auth_proxy.url_with_credentials())
    results = ask(kind, endpoint, ["one", "two"])
    assert all(r.ok for r in results), results
    assert auth_proxy.connects >= 1 and auth_proxy.refused == 0
    assert PASSWORD not in repr(endpoint)


def test_environment_proxy_credentials_are_sent(
    kind: str, server: MockServer, auth_proxy: ConnectProxy, proxy_env: Callable[..., None]
) -> None:
    proxy_env(https_proxy=auth_proxy.url_with_credentials())
    for api_type in ("openai", "azure"):
        endpoint = make_endpoint(server, api_type, headers={"Ocp-Apim-Subscription-Key": "apim-value-8b8b"})
        [result] = ask(kind, endpoint, ["with credentials"])
        assert result.ok and auth_proxy.connects >= 1
    assert auth_proxy.auth_headers and all(h.startswith("Basic ") for h in auth_proxy.auth_headers)
    # the tunnel request reaches the proxy in clear text: no key, no endpoint header in it
    heads = "\n".join(auth_proxy.connect_heads)
    assert TEST_KEY not in heads and "apim-value-8b8b" not in heads, heads


def test_wrong_proxy_credentials_are_a_row_error_without_them(
    kind: str, server: MockServer, auth_proxy: ConnectProxy, proxy_env: Callable[..., None]
) -> None:
    proxy_env()
    endpoint = make_endpoint(
        server, "azure", proxy=auth_proxy.url_with_credentials(password="wr0ng-pa55-9e9e")
    )
    [result] = ask(kind, endpoint, ["refused by the proxy"])
    assert not result.ok and result.error_code == "connection_error" and auth_proxy.refused >= 1
    text = json.dumps(result.to_dict())
    assert "wr0ng-pa55-9e9e" not in text and USER not in text.replace("***", ""), text
    assert server.stats()["chat_requests"] == 0


def test_tls_through_the_proxy_verifies_the_connections_ca(
    kind: str, server: MockServer, proxy: ConnectProxy, proxy_env: Callable[..., None]
) -> None:
    import trustme

    proxy_env()
    # the CA as PEM text goes through an SSL context: requests must hand it to its proxy manager too
    [ok] = ask(
        kind, make_endpoint(server, "openai", proxy=proxy.url, ca_cert=server.ca_pem), ["pem via proxy"]
    )
    assert ok.ok and proxy.connects >= 1
    other_ca = trustme.CA().cert_pem.bytes().decode()
    with pytest.raises(LLMQueryConfigError, match="certificate could not be verified"):
        ask(kind, make_endpoint(server, "openai", proxy=proxy.url, ca_cert=other_ca), ["wrong ca via proxy"])


def test_the_request_deadline_holds_through_the_proxy(
    kind: str, server: MockServer, proxy: ConnectProxy, proxy_env: Callable[..., None]
) -> None:
    proxy_env()
    endpoint = make_endpoint(server, "azure", proxy=proxy.url, timeout=1.0)
    started = time.monotonic()
    [result] = ask(kind, endpoint, ["tunnelled trickle [[drip:300]]"], max_retries=0)
    assert result.error_code == "timeout" and time.monotonic() - started < 3 and proxy.connects >= 1


def test_a_shared_sync_client_follows_a_changed_environment(
    server: MockServer, proxy: ConnectProxy, proxy_env: Callable[..., None]
) -> None:
    """query_sync keeps one client per process and endpoint: a new HTTPS_PROXY must not reuse it."""
    proxy_env()
    endpoint = make_endpoint(server, "azure")
    assert all(r.ok for r in query_sync(endpoint, iter([(1, "direct first")]), **FAST))
    proxy_env(https_proxy=proxy.url)
    assert all(r.ok for r in query_sync(endpoint, iter([(2, "proxied second")]), **FAST))
    assert proxy.connects >= 1


def _conn(monkeypatch: pytest.MonkeyPatch, server: MockServer, conn_id: str, **extra: Any) -> LLMQueryHook:
    value = {
        "conn_type": "llmq",
        "host": server.base_url,
        "password": TEST_KEY,
        "extra": {"api_type": "azure", "deployment": DEPLOYMENT, "ca_cert": server.ca_path, **extra},
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(value))
    return LLMQueryHook(conn_id)


def test_the_connection_extra_proxy_in_the_hook(
    monkeypatch: pytest.MonkeyPatch,
    server: MockServer,
    auth_proxy: ConnectProxy,
    proxy_env: Callable[..., None],
) -> None:
    from airflow.sdk._shared.secrets_masker import redact

    proxy_env()
    hook = _conn(monkeypatch, server, "llmq_proxied", proxy=auth_proxy.url_with_credentials())
    ok, message = hook.test_connection()
    assert ok and auth_proxy.connects == 1 and PASSWORD not in message
    assert PASSWORD not in repr(hook.endpoint) and PASSWORD not in str(redact(f"proxy {PASSWORD}"))
    assert asyncio.run(hook.aquery("async via proxy")).ok and auth_proxy.connects == 2

    dead = _conn(
        monkeypatch, server, "llmq_deadproxy", proxy=f"http://{USER}:{PASSWORD}@127.0.0.1:{_dead_port()}"
    )
    ok, message = dead.test_connection()
    assert not ok and "Could not reach" in message and PASSWORD not in message


def test_a_bad_proxy_extra_is_a_clear_error_without_its_credentials(
    monkeypatch: pytest.MonkeyPatch, server: MockServer, proxy_env: Callable[..., None]
) -> None:
    proxy_env()
    hook = _conn(monkeypatch, server, "llmq_socks", proxy=f"socks5://{USER}:{PASSWORD}@127.0.0.1:1080")
    ok, message = hook.test_connection()
    assert not ok and "proxy" in message and PASSWORD not in message
