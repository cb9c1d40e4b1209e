"""LLMQueryHook over real sockets: connection parsing, query / aquery, test_connection messages."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.hooks.llmq import LLMQueryHook
from airflow_provider_llmq.testing.mock_server import expected_answer
from tests.conftest import DEPLOYMENT, TEST_KEY


@pytest.fixture
def conn_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Registers connections as AIRFLOW_CONN_* variables, as a deployment's secrets would."""

    def define(conn_id: str, host: str, password: str = TEST_KEY, **extra: Any) -> str:
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{conn_id.upper()}",
            json.dumps({"conn_type": "llmq", "host": host, "password": password, "extra": extra}),
        )
        return conn_id

    yield define


def _azure(conn_env: Any, server: Any, conn_id: str = "llmq_azure", **extra: Any) -> LLMQueryHook:
    fields = {
        "api_type": "azure",
        "deployment": DEPLOYMENT,
        "api_version": "2024-06-01",
        "ca_cert": server.ca_path,
    }
    fields.update(extra)
    return LLMQueryHook(
        conn_env(conn_id, server.base_url, **{k: v for k, v in fields.items() if k != "password"})
    )


def test_host_without_scheme_means_https(conn_env: Any, server: Any) -> None:
    host = server.base_url.removeprefix("https://")
    hook = LLMQueryHook(
        conn_env("noscheme", host, api_type="azure", deployment=DEPLOYMENT, ca_cert=server.ca_path)
    )
    assert hook.endpoint.api_base == server.base_url
    assert hook.query("hi").ok


def test_query_and_aquery_answer_with_system_prompt(conn_env: Any, server: Any) -> None:
    hook = _azure(conn_env, server)
    result = hook.query("Name a colour", system_prompt="One word.", temperature=0)
    assert result.response == expected_answer(DEPLOYMENT, "One word.", "Name a colour", {"temperature": 0})
    aresult = asyncio.run(hook.aquery("Name a colour", system_prompt="One word.", temperature=0))
    assert aresult.response == result.response


def test_openai_connection_with_pem_text(conn_env: Any, server: Any) -> None:
    conn_id = conn_env(
        "llmq_openai", server.openai_base_url, api_type="openai", model="gpt-x", ca_cert=server.ca_pem
    )
    result = LLMQueryHook(conn_id).query("hello")
    assert result.ok and result.response == expected_answer(
        "gpt-x", "You are a helpful assistant.", "hello", None
    )


def test_model_argument_overrides_the_deployment(conn_env: Any, server: Any) -> None:
    result = _azure(conn_env, server).query("q", model="other-deployment")
    assert result.response == expected_answer("other-deployment", "You are a helpful assistant.", "q", None)


def test_repr_and_endpoint_repr_hide_the_key(conn_env: Any, server: Any) -> None:
    hook = _azure(conn_env, server)
    assert TEST_KEY not in repr(hook) and TEST_KEY not in repr(hook.endpoint)


def test_unknown_api_type_is_a_clear_error(conn_env: Any, server: Any) -> None:
    hook = LLMQueryHook(conn_env("badtype", server.base_url, api_type="bedrock"))
    with pytest.raises(LLMQueryConfigError, match="api_type"):
        _ = hook.endpoint


def test_verify_false_warns(conn_env: Any, server: Any, capfd: pytest.CaptureFixture[str]) -> None:
    hook = LLMQueryHook(
        conn_env("noverify", server.base_url, api_type="azure", deployment=DEPLOYMENT, verify="false")
    )
    assert hook.endpoint.verify is False
    assert hook.query("insecure but explicit").ok
    out, err = capfd.readouterr()  # Airflow logs through structlog to the process output
    assert "NOT checked" in out + err


def test_connection_success(conn_env: Any, server: Any) -> None:
    ok, message = _azure(conn_env, server).test_connection()
    assert ok and "successful" in message
    assert server.stats()["chat_requests"] == 1  # exactly one cheap request


def test_connection_wrong_key(conn_env: Any, server: Any) -> None:
    conn_id = conn_env(
        "wrongkey",
        server.base_url,
        password="sk-not-the-key",
        api_type="azure",
        deployment=DEPLOYMENT,
        ca_cert=server.ca_path,
    )
    ok, message = LLMQueryHook(conn_id).test_connection()
    assert not ok and "Authentication failed" in message and "401" in message
    assert "sk-not-the-key" not in message


def test_connection_unknown_deployment(conn_env: Any, server: Any) -> None:
    server.configure(deployments=[DEPLOYMENT])
    ok, message = _azure(conn_env, server, deployment="missing").test_connection()
    assert not ok and "404" in message and "deployment" in message


def test_connection_tls_failure(conn_env: Any, server: Any) -> None:
    conn_id = conn_env(
        "nocacert", server.base_url, api_type="azure", deployment=DEPLOYMENT
    )  # system CAs only
    ok, message = LLMQueryHook(conn_id).test_connection()
    assert not ok and "certificate could not be verified" in message


def test_connection_unreachable_host(conn_env: Any) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conn_id = conn_env("unreachable", f"https://127.0.0.1:{port}", api_type="openai", model="m")
    ok, message = LLMQueryHook(conn_id).test_connection()
    assert not ok and "Could not reach" in message and str(port) in message
    # the cause leads, so Airflow's cut of a long message keeps it
    assert "Connection refused" in message[:120], message


def test_api_type_is_inferred_when_absent(conn_env: Any, server: Any) -> None:
    azure = LLMQueryHook(conn_env("inferred_azure", "myres.openai.azure.com", deployment="gpt4o"))
    assert azure.endpoint.api_type == "azure" and azure.endpoint.url().startswith(
        "https://myres.openai.azure.com/"
    )
    openai = LLMQueryHook(conn_env("inferred_openai", "https://api.openai.com/v1", model="gpt-4o-mini"))
    assert openai.endpoint.api_type == "openai"


def test_provider_info_declares_the_connection_form() -> None:
    from airflow_provider_llmq import get_provider_info

    [conn_type] = get_provider_info()["connection-types"]
    assert conn_type["connection-type"] == "llmq"
    assert conn_type["hook-class-name"] == "airflow_provider_llmq.hooks.llmq.LLMQueryHook"
    fields = conn_type["conn-fields"]
    assert {
        "api_type",
        "api_version",
        "deployment",
        "model",
        "ca_cert",
        "verify",
        "timeout",
        "proxy",
        "headers",
    } <= set(fields)
    assert None not in fields["api_type"]["schema"]["enum"]  # the UI would show a literal "null"
    assert fields["verify"]["schema"]["type"][0] == "boolean"  # a switch
    assert fields["timeout"]["schema"]["type"][0] == "number"  # a number box
    assert all("label" in f and "type" in f["schema"] for f in fields.values())
    assert conn_type["ui-field-behaviour"]["relabeling"]["password"] == "API key"
    hook_class = conn_type["hook-class-name"].rsplit(".", 1)[1]
    assert hook_class == LLMQueryHook.__name__ and LLMQueryHook.conn_type == conn_type["connection-type"]
