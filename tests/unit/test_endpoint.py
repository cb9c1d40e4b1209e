from __future__ import annotations

import pytest

from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.errors import LLMQueryConfigError

KEY = "sk-secret-value-123"


def test_azure_url_and_header() -> None:
    endpoint = EndpointConfig("myres.openai.azure.com/", KEY, "azure", "gpt4o", "2023-05-15")
    assert endpoint.url() == (
        "https://myres.openai.azure.com/openai/deployments/gpt4o/chat/completions?api-version=2023-05-15"
    )
    assert endpoint.request_headers()["api-key"] == KEY
    assert "Authorization" not in endpoint.request_headers()


def test_openai_url_and_bearer() -> None:
    endpoint = EndpointConfig("https://api.openai.com/v1", KEY, "openai", "gpt-4o-mini")
    assert endpoint.url() == "https://api.openai.com/v1/chat/completions"
    assert endpoint.request_headers()["Authorization"] == f"Bearer {KEY}"


def test_model_override_is_the_azure_deployment() -> None:
    endpoint = EndpointConfig("https://x", KEY, "azure", "a", "v1")
    assert "/deployments/b/" in endpoint.url("b")
    assert endpoint.with_options(model="c").url().count("/deployments/c/") == 1


def test_azure_without_deployment_is_a_config_error() -> None:
    with pytest.raises(LLMQueryConfigError, match="deployment"):
        EndpointConfig("https://x", KEY, "azure").url()


def test_key_is_never_in_repr_or_url() -> None:
    endpoint = EndpointConfig("https://x", KEY, "azure", "d", "v")
    assert KEY not in repr(endpoint) and KEY not in endpoint.url() and KEY not in str(endpoint)


@pytest.mark.parametrize("bad", ["", "ftp://x", "https://x?api-key=1", "https://user:pw@x"])
def test_bad_base_urls_are_refused(bad: str) -> None:
    with pytest.raises(LLMQueryConfigError):
        EndpointConfig(bad, KEY)


def test_unknown_api_type_is_refused() -> None:
    with pytest.raises(LLMQueryConfigError, match="api_type"):
        EndpointConfig("https://x", KEY, "bedrock")  # type: ignore[arg-type]


def test_credential_headers_are_refused_in_extras() -> None:
    with pytest.raises(LLMQueryConfigError, match="credential"):
        EndpointConfig("https://x", KEY, headers={"api-key": "other"})


def test_missing_key_is_a_config_error() -> None:
    with pytest.raises(LLMQueryConfigError, match="no API key"):
        EndpointConfig("https://x").request_headers()


def test_missing_ca_file_is_a_config_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    endpoint = EndpointConfig("https://x", KEY, ca_cert=str(tmp_path / "missing.pem"))
    with pytest.raises(LLMQueryConfigError, match="not found"):
        endpoint.ssl_context()


def test_garbage_pem_is_a_config_error() -> None:
    endpoint = EndpointConfig(
        "https://x", KEY, ca_cert="-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----"
    )
    with pytest.raises(LLMQueryConfigError, match="could not be loaded"):
        endpoint.ssl_context()
