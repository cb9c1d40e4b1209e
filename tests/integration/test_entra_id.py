"""Entra ID authentication over real sockets, offline: a local token authority over TLS
(:mod:`airflow_provider_llmq.testing.token_authority`) that azure-identity is pointed at, its
managed-identity endpoint in App Service form, and the mock server checking each Bearer token and
its expiry. Nothing may leave loopback (``loopback_only`` refuses, and records, any other address).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import pickle
import socket
import time
import traceback
from collections.abc import Iterator
from typing import Any

import pytest

from airflow_provider_llmq.core.batch.batch_api import BatchApiClient
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.endpoint.entra_id import DEFAULT_SCOPE, EntraIdConfig, LLMQueryCredentialError
from airflow_provider_llmq.core.endpoint.entra_token import forget_tokens, refresh_margin
from airflow_provider_llmq.core.errors import LLMQueryAuthError, LLMQueryConfigError
from airflow_provider_llmq.core.methods import query_async_limited, query_thread_pool
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.core.transport.async_client import AsyncClient
from airflow_provider_llmq.core.transport.sync_client import SyncClient
from airflow_provider_llmq.hooks.llmq import LLMQueryHook
from airflow_provider_llmq.testing.mock_server import MockServer
from airflow_provider_llmq.testing.token_authority import TokenAuthority
from tests.conftest import DEPLOYMENT, TEST_KEY, make_endpoint

pytestmark = pytest.mark.timeout(180)
TENANT, CLIENT, SECRET = "llmq-tenant-01", "llmq-client-01", "sp-secret-e2f7c4a91b"
CERT_CLIENT = "llmq-cert-client-01"
AZURE_ENV = (
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_AUTHORITY_HOST",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_USERNAME",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "IMDS_ENDPOINT",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
)


@pytest.fixture(scope="module")
def token_authority(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenAuthority]:
    # it signs with the mock server's key: the server accepts exactly its tokens
    cert_dir = str(tmp_path_factory.mktemp("authority-ca"))
    with TokenAuthority(TEST_KEY, {CLIENT: SECRET, CERT_CLIENT: None}, cert_dir=cert_dir) as authority:
        yield authority


@pytest.fixture
def authority(token_authority: TokenAuthority, monkeypatch: pytest.MonkeyPatch) -> Iterator[TokenAuthority]:
    """Counters zeroed, hour-long honest tokens, no Azure variable from outside, fresh sources."""
    token_authority.configure(lifetime=3600, reported_lifetime=0, signing_key=TEST_KEY)
    token_authority.reset()
    for name in AZURE_ENV:
        monkeypatch.delenv(name, raising=False)
    forget_tokens()
    yield token_authority
    forget_tokens()


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Refuses every name lookup and connection that is not loopback; returns what was refused."""
    refused: list[str] = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def loopback(host: object) -> bool:
        if host in (None, "localhost"):
            return True
        try:
            return ipaddress.ip_address(str(host)).is_loopback
        except ValueError:
            return False

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not loopback(host):
            refused.append(str(host))
            raise socket.gaierror(socket.EAI_NONAME, f"test: {host} is not loopback")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not loopback(address[0]):
            refused.append(str(address[0]))
            raise OSError(101, f"test: {address[0]} is not loopback")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return refused


def service_principal(authority: TokenAuthority, secret: str = SECRET) -> dict[str, str]:
    return {"tenant_id": TENANT, "client_id": CLIENT, "client_secret": secret, **trust(authority)}


def trust(authority: TokenAuthority) -> dict[str, str]:
    return {"authority_host": authority.authority_url, "authority_ca_cert": authority.ca_path}


def entra_endpoint(server: MockServer, api_type: str, **entra: str) -> EndpointConfig:
    return make_endpoint(server, api_type, api_key="", entra_id=EntraIdConfig(**entra))


def entra_connection(
    server: MockServer, conn_id: str = "llmq_default", api_type: str = "azure", **entra: str
) -> dict[str, str]:
    """An ``llmq`` connection with ``auth_type: entra_id`` as an AIRFLOW_CONN_* variable (no key)."""
    base = server.base_url if api_type == "azure" else server.openai_base_url
    extra = {
        "api_type": api_type,
        "deployment": DEPLOYMENT,
        "ca_cert": server.ca_path,
        "auth_type": "entra_id",
    }
    if api_type == "azure":
        extra["api_version"] = "2024-06-01"
    value = {"conn_type": "llmq", "host": base, "extra": {**extra, **entra}}
    return {f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(value)}


def _leaks(text: str, authority: TokenAuthority) -> list[str]:
    return [value for value in (SECRET, *authority.issued) if value in text]


def _run(method: Any, endpoint: EndpointConfig, rows: int, **settings: Any) -> tuple[list[Any], float]:
    started = time.monotonic()
    results = list(method(endpoint, ((i, f"question {i}?") for i in range(rows)), **settings))
    return results, time.monotonic() - started


@pytest.mark.slow  # over 7 s: CI's slow step runs it
def test_a_2000_row_run_refreshes_its_token_about_once_per_lifetime(
    server: MockServer, authority: TokenAuthority
) -> None:
    lifetime = 3
    authority.configure(lifetime=lifetime)
    server.configure(latency_ms=5)
    endpoint = entra_endpoint(server, "azure", **service_principal(authority))
    assert "api-key" not in endpoint.request_headers() and "Authorization" not in endpoint.request_headers()
    # paced to ~10 s, so the token expires at least three times whatever the machine's speed
    results, seconds = _run(
        query_thread_pool, endpoint, 2000, max_workers=16, requests_per_minute=12_000, retry_backoff=0.001
    )
    tokens = authority.stats()["token_requests"]
    stats = server.stats()
    print(f"\n2000 rows in {seconds:.1f} s: {tokens} token requests, server {stats['requests_by_status']}")
    assert len(results) == 2000 and all(r.ok for r in results), [r for r in results if not r.ok][:3]
    assert not [r for r in results if r.http_status == 401]
    assert seconds >= 3 * lifetime and tokens >= 4  # it expired at least three times
    assert tokens <= seconds / lifetime * 2 + 3  # about one per lifetime, not one per row
    # every request carried a token of the authority: the Azure form sent no api-key
    assert stats["bearer_tokens"] == stats["chat_requests"] == 2000


def test_the_async_client_shares_the_token_and_refreshes_it_off_the_loop(
    server: MockServer, authority: TokenAuthority
) -> None:
    lifetime = 2
    authority.configure(lifetime=lifetime)
    server.configure(latency_ms=5)
    endpoint = entra_endpoint(server, "openai", **service_principal(authority))
    results, seconds = _run(
        query_async_limited, endpoint, 400, max_concurrency=16, requests_per_minute=9000, retry_backoff=0.001
    )
    tokens = authority.stats()["token_requests"]
    assert all(r.ok for r in results) and len(results) == 400
    assert 2 <= tokens <= seconds / lifetime * 3 + 3  # a short life: refreshed at 3/4 of it


@pytest.mark.parametrize("claimed", [200, 3600])
def test_a_token_refused_before_it_expires_is_refreshed_once_and_the_row_asked_again(
    server: MockServer, authority: TokenAuthority, claimed: int
) -> None:
    # the answers claim `claimed` s, the tokens live 2 s: every 2 s the server refuses the current
    # one, as it would a token that expired in flight or was revoked. 200 s: MSAL caches no token
    # under 300 s, so asking again gets a new one. 3600 s: MSAL caches it and hands the refused
    # token back, so the refresh after the 401 must get past its cache
    authority.configure(lifetime=2, reported_lifetime=claimed)
    endpoint = entra_endpoint(server, "azure", **service_principal(authority))
    # max_retries=0: the fresh token's request spends no retry
    results, seconds = _run(
        query_thread_pool, endpoint, 500, max_workers=8, requests_per_minute=12_000, max_retries=0
    )
    stats, tokens = server.stats(), authority.stats()["token_requests"]
    assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
    assert stats["expired_tokens"] >= 1 and any(r.attempts == 2 for r in results) and tokens >= 2
    # concurrent 401s to one token cause one refresh
    assert tokens <= seconds / 2 + 3, (tokens, seconds, stats["expired_tokens"])


def test_a_token_refused_mid_run_keeps_the_budget(server: MockServer, authority: TokenAuthority) -> None:
    """The budget's promise on the Entra ID path: an attempt refused with a 401 is not billed, its
    reservation comes back, and the fresh token's attempt reserves again, so the server's bill stays
    inside the budget and the budget still gets used."""
    authority.configure(lifetime=2, reported_lifetime=3600)
    endpoint = entra_endpoint(server, "azure", **service_principal(authority))
    budget = 3000
    # about 30 requests/s: the budget (about 90 requests) lasts 3 s, past the 2 s a token lives
    results, _ = _run(
        query_thread_pool, endpoint, 400, max_workers=8, requests_per_minute=1800, max_total_tokens=budget
    )
    stats = server.stats()
    billed = int(stats["prompt_tokens_total"] + stats["completion_tokens_total"])
    assert stats["expired_tokens"] >= 1 and any(r.attempts >= 2 for r in results)
    assert 0.8 * budget <= billed <= budget, billed
    assert {r.error_code for r in results} <= {None, "budget_exceeded", "cut_by_budget"}


def test_a_second_401_is_an_auth_error_that_quotes_no_token(
    server: MockServer, authority: TokenAuthority
) -> None:
    authority.configure(signing_key="not-the-servers-key")  # the server refuses every token
    endpoint = entra_endpoint(server, "openai", **service_principal(authority))
    with pytest.raises(LLMQueryAuthError) as info:
        _run(query_thread_pool, endpoint, 50, max_workers=4)
    assert not isinstance(info.value, LLMQueryConfigError)  # refused by the API: Airflow may retry
    assert authority.stats()["token_requests"] <= 4
    assert not _leaks("".join(traceback.format_exception(info.value)), authority)


def test_a_wrong_secret_names_the_credential_and_never_the_secret(
    server: MockServer, authority: TokenAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    endpoint = entra_endpoint(server, "azure", **service_principal(authority, secret="wrong-secret-77aa01"))
    with pytest.raises(LLMQueryCredentialError) as info:
        _run(query_thread_pool, endpoint, 100, max_workers=8)
    message = str(info.value)
    assert isinstance(info.value, LLMQueryConfigError)  # the operators fail the task without a retry
    assert f"ClientSecretCredential for tenant {TENANT}, client {CLIENT}" in message
    assert "AADSTS7000215" in message
    text = "".join(traceback.format_exception(info.value)) + caplog.text
    assert "wrong-secret-77aa01" not in text
    assert authority.stats().get("refused", 0) <= 2  # the queued threads share the refusal
    assert server.stats()["chat_requests"] == 0


def test_default_credential_from_environment_variables(
    server: MockServer, authority: TokenAuthority, monkeypatch: pytest.MonkeyPatch, loopback_only: list[str]
) -> None:
    env = {"AZURE_TENANT_ID": TENANT, "AZURE_CLIENT_ID": CLIENT, "AZURE_CLIENT_SECRET": SECRET}
    for name, value in {**env, "AZURE_AUTHORITY_HOST": authority.authority_url}.items():
        monkeypatch.setenv(name, value)
    for name, value in entra_connection(server, authority_ca_cert=authority.ca_path).items():
        monkeypatch.setenv(name, value)
    hook = LLMQueryHook()
    ok, message = hook.test_connection()
    assert ok, message
    assert "DefaultAzureCredential via EnvironmentCredential" in message
    assert hook.query("hello").ok
    assert not _leaks(message, authority) and loopback_only == []
    assert authority.stats()["token_requests"] == 1 and authority.stats().get("identity_requests", 0) == 0


def test_default_credential_with_a_managed_identity_in_app_service_form(
    server: MockServer, authority: TokenAuthority, monkeypatch: pytest.MonkeyPatch, loopback_only: list[str]
) -> None:
    monkeypatch.setenv("IDENTITY_ENDPOINT", authority.identity_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", authority.identity_header)
    for name, value in entra_connection(server, api_type="openai").items():
        monkeypatch.setenv(name, value)
    hook = LLMQueryHook()
    ok, message = hook.test_connection()
    assert ok and "DefaultAzureCredential via ManagedIdentityCredential" in message, message
    assert asyncio.run(hook.aquery("hello")).ok
    assert authority.stats()["identity_requests"] >= 1 and loopback_only == []


def test_connection_says_which_credential_worked_or_why_it_failed(
    server: MockServer, authority: TokenAuthority, monkeypatch: pytest.MonkeyPatch, loopback_only: list[str]
) -> None:
    for name, value in entra_connection(server, "llmq_sp", **service_principal(authority)).items():
        monkeypatch.setenv(name, value)
    ok, message = LLMQueryHook("llmq_sp").test_connection()
    assert (
        ok and f"Entra ID token from ClientSecretCredential for tenant {TENANT}, client {CLIENT}" in message
    )
    assert not _leaks(message, authority)

    wrong = service_principal(authority, secret="wrong-secret-0c9d")
    for name, value in entra_connection(server, "llmq_wrong", **wrong).items():
        monkeypatch.setenv(name, value)
    ok, message = LLMQueryHook("llmq_wrong").test_connection()
    assert not ok and message.startswith("Entra ID authentication failed: ClientSecretCredential")
    assert "AADSTS7000215" in message and "wrong-secret-0c9d" not in message
    assert loopback_only == []


def test_a_certificate_credential_gets_tokens(
    server: MockServer, authority: TokenAuthority, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    import trustme

    cert = trustme.CA(key_type=trustme.KeyType.RSA).issue_cert("llmq-client", key_type=trustme.KeyType.RSA)
    path = tmp_path / "client.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(path))
    entra = {"tenant_id": TENANT, "client_id": CERT_CLIENT, "certificate_path": str(path), **trust(authority)}
    for name, value in entra_connection(server, **entra).items():
        monkeypatch.setenv(name, value)
    hook = LLMQueryHook()
    entra_id = hook.endpoint.entra_id
    assert entra_id is not None and "-----BEGIN" in (entra_id.certificate or "")  # executors need no file
    ok, message = hook.test_connection()
    assert ok and "CertificateCredential" in message, message


def test_an_encrypted_certificate_is_opened_with_its_password(
    server: MockServer, authority: TokenAuthority, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    import trustme
    from cryptography.hazmat.primitives import serialization

    password = "cert-password-9b2e71"
    cert = trustme.CA(key_type=trustme.KeyType.RSA).issue_cert("llmq-client", key_type=trustme.KeyType.RSA)
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password.encode()),
    )
    path = tmp_path / "client-encrypted.pem"
    path.write_bytes(encrypted + b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    entra = {"tenant_id": TENANT, "client_id": CERT_CLIENT, "certificate_path": str(path), **trust(authority)}
    wrong = {"certificate_password": "not-the-password-55e0"}
    connections = (
        ("llmq_cert", {"certificate_password": password}),
        ("llmq_nopw", {}),
        ("llmq_badpw", wrong),
    )
    for conn_id, extra in connections:
        for name, value in entra_connection(server, conn_id, **entra, **extra).items():
            monkeypatch.setenv(name, value)
    with pytest.raises(LLMQueryConfigError, match="without a certificate"):
        EntraIdConfig(TENANT, CERT_CLIENT, certificate_password=password)
    hook = LLMQueryHook("llmq_cert")
    assert hook.endpoint.entra_id is not None and password not in repr(hook.endpoint.entra_id)
    assert password in hook.endpoint.secrets()  # scrubbed from every message like the secret
    ok, message = hook.test_connection()
    assert ok and "CertificateCredential" in message, message
    # without it the key cannot be read: the credential is named, the task fails before any row
    for conn_id in ("llmq_nopw", "llmq_badpw"):
        ok, message = LLMQueryHook(conn_id).test_connection()
        assert not ok and "CertificateCredential" in message and "private key" in message, message
        assert password not in message and "not-the-password-55e0" not in message


def test_no_token_in_rows_logs_errors_or_airflow_logs(
    server: MockServer, authority: TokenAuthority, caplog: pytest.LogCaptureFixture
) -> None:

    caplog.set_level(logging.DEBUG)
    endpoint = entra_endpoint(server, "openai", **service_principal(authority))
    prompts = ["echo [[echo]]", "plain question", "e500 [[500x9]]"]
    options = QueryOptions(max_retries=1, retry_backoff=0.001)
    with SyncClient(endpoint, options) as client:
        rows = [client.query(i, p) for i, p in enumerate(prompts)]

    async def ask_async() -> list[Any]:
        async with AsyncClient(endpoint, options) as client:
            return [await client.query(i, p) for i, p in enumerate(prompts)]

    rows += asyncio.run(ask_async())
    assert [r.ok for r in rows] == [False, True, False] * 2
    assert "***" in (rows[0].error_code or "") + (rows[0].error_message or "")  # the echo was masked
    text = " ".join(f"{r.error_code} {r.error_message} {r!r}" for r in rows) + caplog.text
    assert authority.issued and not _leaks(text, authority)


def test_the_hook_hands_every_token_to_airflows_masker(
    server: MockServer, authority: TokenAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk.log import redact

    authority.configure(lifetime=1)
    for name, value in entra_connection(server, **service_principal(authority)).items():
        monkeypatch.setenv(name, value)
    hook = LLMQueryHook()
    assert hook.query("first").ok
    time.sleep(1.1)
    assert hook.query("second, with a refreshed token").ok
    assert len(authority.issued) >= 2
    for token in authority.issued[-2:]:
        assert redact(f"token {token}") == "token ***"
    assert redact(f"secret {SECRET}") == "secret ***"


def test_the_batch_api_client_uses_the_token_and_refreshes_it_after_a_401(
    server: MockServer, authority: TokenAuthority
) -> None:
    authority.configure(lifetime=1, reported_lifetime=200)
    endpoint = entra_endpoint(server, "azure", **service_principal(authority))
    with BatchApiClient(endpoint) as client:
        list(client.list_batches(at_most=5))
        time.sleep(1.2)  # the server now refuses that token; the client does not know
        list(client.list_batches(at_most=5))
    assert server.stats()["expired_tokens"] == 1 and authority.stats()["token_requests"] == 2


def test_entra_id_config_is_checked_travels_and_hides_its_secret(tmp_path: Any) -> None:
    config = EntraIdConfig(TENANT, CLIENT, f" {SECRET}\n", authority_host="login.example.test/")
    assert config.client_secret == SECRET and config.authority_host == "https://login.example.test"
    assert config.scope == DEFAULT_SCOPE and SECRET not in repr(config)
    assert pickle.loads(pickle.dumps(config)) == config  # what executors get
    endpoint = EndpointConfig("https://x.openai.azure.com", api_type="azure", model="m", entra_id=config)
    assert SECRET in endpoint.secrets() and SECRET not in repr(endpoint)
    with pytest.raises(LLMQueryConfigError, match="both an API key and Entra ID"):
        EndpointConfig("https://x.openai.azure.com", api_key="k" * 8, entra_id=config)
    with pytest.raises(LLMQueryConfigError, match="tenant_id and client_id"):
        EntraIdConfig(client_secret=SECRET)
    with pytest.raises(LLMQueryConfigError, match="https"):
        EntraIdConfig(authority_host="http://127.0.0.1:1")
    # a fifth of the life, at most 300 s, at least 1 s unless the life is under 4 s
    assert [refresh_margin(s) for s in (3600, 600, 10, 3, 2)] == [300, 120, 2, 0.75, 0.5]


def test_without_azure_identity_the_error_says_what_to_install(
    server: MockServer, authority: TokenAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "azure.identity", None)  # what an install without the extra sees
    endpoint = entra_endpoint(server, "openai", **service_principal(authority))
    with pytest.raises(LLMQueryConfigError, match=r"airflow-provider-llmq\[azure\]"):
        _run(query_thread_pool, endpoint, 3, max_workers=1)
    # the hook says so when it reads the connection, before a task starts Spark
    for name, value in entra_connection(server, **service_principal(authority)).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LLMQueryConfigError, match=r"needs azure-identity"):
        _ = LLMQueryHook().endpoint
