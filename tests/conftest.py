"""Shared fixtures: an isolated Airflow home, the mock server over TLS, endpoints for both API types."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Airflow reads its home on import: isolate it before any test module imports airflow.
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="llmq-airflow-home-"))
os.environ.setdefault("AIRFLOW_HOME", str(_AIRFLOW_HOME))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "True")

from airflow_provider_llmq.core.endpoint import EndpointConfig  # noqa: E402
from airflow_provider_llmq.mock_server import MockConfig, MockServer  # noqa: E402

TEST_KEY = "sk-llmq-test-9f3c2a7e5b1d"  # a value no other string in the suite contains
DEPLOYMENT = "gpt-test"


@pytest.fixture(scope="session")
def mock_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockServer]:
    cert_dir = tmp_path_factory.mktemp("mock-ca")
    with MockServer(MockConfig(api_key=TEST_KEY), tls=True, cert_dir=str(cert_dir)) as server:
        yield server


@pytest.fixture
def server(mock_server: MockServer) -> Iterator[MockServer]:
    """The session's server with counters zeroed and default behaviour."""
    mock_server.configure(**dataclasses.asdict(MockConfig(api_key=TEST_KEY)))
    mock_server.reset()
    yield mock_server


def make_endpoint(server: MockServer, api_type: str, **overrides: object) -> EndpointConfig:
    base = server.base_url if api_type == "azure" else server.openai_base_url
    fields: dict[str, object] = {
        "api_base": base,
        "api_key": TEST_KEY,
        "api_type": api_type,
        "model": DEPLOYMENT,
        "api_version": "2024-06-01" if api_type == "azure" else None,
        "ca_cert": server.ca_path,
        "timeout": 10.0,
    }
    fields.update(overrides)
    return EndpointConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture(params=["azure", "openai"])
def endpoint(request: pytest.FixtureRequest, server: MockServer) -> EndpointConfig:
    return make_endpoint(server, request.param)
