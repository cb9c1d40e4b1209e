"""Each API form's rule for the base URL: where chat, files and batches go, and what is refused."""

from __future__ import annotations

import pytest

from airflow_provider_llmq.core.endpoint.api_forms import guess_api_type
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.request.options import QueryOptions

KEY = "sk-form-test-4c1d9e"
RESOURCE = "https://myres.openai.azure.com"


@pytest.mark.parametrize(
    "host", [RESOURCE, f"{RESOURCE}/openai/v1", f"{RESOURCE}/openai/v1/", "myres.openai.azure.com"]
)
def test_azure_v1_takes_the_resource_with_or_without_its_path(host: str) -> None:
    endpoint = EndpointConfig(host, KEY, "azure_v1", "my-deployment")
    assert endpoint.url() == f"{RESOURCE}/openai/v1/chat/completions"  # no api-version
    assert endpoint.api_root == f"{RESOURCE}/openai/v1"
    headers = endpoint.request_headers()
    assert headers["api-key"] == KEY and "Authorization" not in headers


def test_azure_v1_sends_the_deployment_as_the_body_model() -> None:
    endpoint = EndpointConfig(RESOURCE, KEY, "azure_v1", "my-deployment")
    assert QueryOptions().chat_request(endpoint).body("hi")["model"] == "my-deployment"
    dated = EndpointConfig(RESOURCE, KEY, "azure", "my-deployment", "2024-06-01")
    assert "model" not in QueryOptions().chat_request(dated).body("hi")  # in the URL there


def test_azure_v1_sends_preview_but_refuses_a_dated_version() -> None:
    preview = EndpointConfig(RESOURCE, KEY, "azure_v1", "d", api_version="preview")
    assert preview.url().endswith("/openai/v1/chat/completions?api-version=preview")
    with pytest.raises(LLMQueryConfigError, match="no dated api_version"):
        EndpointConfig(RESOURCE, KEY, "azure_v1", "d", api_version="2024-06-01")


def test_azure_v1_without_a_deployment_is_refused_before_sending() -> None:
    with pytest.raises(LLMQueryConfigError, match="deployment"):
        EndpointConfig(RESOURCE, KEY, "azure_v1").url()


@pytest.mark.parametrize(
    ("host", "hint"), [(f"{RESOURCE}/openai/v1", "azure_v1"), (f"{RESOURCE}/openai/", "resource URL")]
)
def test_the_dated_azure_form_refuses_a_path_it_would_double(host: str, hint: str) -> None:
    with pytest.raises(LLMQueryConfigError, match=hint):
        EndpointConfig(host, KEY, "azure", "d", "2024-06-01")


def test_the_dated_azure_form_keeps_a_gateway_path() -> None:
    endpoint = EndpointConfig("https://apim.example.com/llm", KEY, "azure", "d", "2024-06-01")
    assert endpoint.url() == (
        "https://apim.example.com/llm/openai/deployments/d/chat/completions?api-version=2024-06-01"
    )


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("https://api.openai.com", "https://api.openai.com/v1/chat/completions"),  # bare host: /v1
        ("http://127.0.0.1:4000/", "http://127.0.0.1:4000/v1/chat/completions"),
        ("https://api.openai.com/v1", "https://api.openai.com/v1/chat/completions"),
        ("https://gw.example.com/llm", "https://gw.example.com/llm/chat/completions"),  # a path: as given
        ("https://openrouter.ai/api/v1", "https://openrouter.ai/api/v1/chat/completions"),
    ],
)
def test_openai_form_appends_v1_only_to_a_bare_host(host: str, url: str) -> None:
    endpoint = EndpointConfig(host, KEY, "openai", "gpt-4o-mini")
    assert endpoint.url() == url
    assert endpoint.api_root == url.removesuffix("/chat/completions")
    assert endpoint.request_headers()["Authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize(
    ("host", "deployment", "api_type"),
    [
        (f"{RESOURCE}/openai/v1", False, "azure_v1"),
        (f"{RESOURCE}/openai/v1/", True, "azure_v1"),
        ("https://gw.example.com/openai/v1", False, "azure_v1"),
        (RESOURCE, False, "azure"),
        ("https://x.cognitiveservices.azure.com", False, "azure"),
        ("https://gw.example.com", True, "azure"),
        ("https://api.openai.com/v1", False, "openai"),
        ("http://127.0.0.1:4000", False, "openai"),
    ],
)
def test_the_api_type_is_guessed_from_the_host(host: str, deployment: bool, api_type: str) -> None:
    assert guess_api_type(host, deployment) == api_type
