"""Shared fixtures: an isolated Airflow home, the mock server over TLS, endpoints for both API types."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Airflow reads its home and dags folder on import: isolate both before any test imports airflow.
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="llmq-airflow-home-"))
DAGS_FOLDER = _AIRFLOW_HOME / "dags"
DAGS_FOLDER.mkdir()
SPARK_EVENTS = _AIRFLOW_HOME / "spark-events"
SPARK_EVENTS.mkdir()
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS_FOLDER)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.pop("AIRFLOW_CONN_LLMQ_DEFAULT", None)

from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig  # noqa: E402
from airflow_provider_llmq.testing.mock_server import MockConfig, MockServer  # noqa: E402

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


def mock_base(server: MockServer, api_type: str) -> str:
    """The mock's base URL for a form: the resource, ``/openai/v1`` (Azure's v1 API) or ``/v1``."""
    return {"azure": server.base_url, "azure_v1": f"{server.base_url}/openai/v1"}.get(
        api_type, server.openai_base_url
    )


def make_endpoint(server: MockServer, api_type: str, **overrides: object) -> EndpointConfig:
    base = mock_base(server, api_type)
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


@pytest.fixture(params=["azure", "azure_v1", "openai"])
def endpoint(request: pytest.FixtureRequest, server: MockServer) -> EndpointConfig:
    return make_endpoint(server, request.param)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated SQLite metadata DB (what ``dag.test()`` needs); about 5 s, once per session."""
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, env=os.environ
    )
    return _AIRFLOW_HOME


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    """One local Spark session per test process (starting one costs 7-20 s)."""
    from airflow_provider_llmq.hooks.spark_session import get_spark_session

    session = get_spark_session(
        None,
        {
            "spark.master": "local[2]",
            "spark.ui.enabled": "false",
            "spark.sql.shuffle.partitions": "4",
            "spark.default.parallelism": "4",
            "spark.driver.host": "127.0.0.1",
            "spark.sql.warehouse.dir": str(_AIRFLOW_HOME / "spark-warehouse"),
            # the leak test scans the event log for the key
            "spark.eventLog.enabled": "true",
            "spark.eventLog.dir": str(SPARK_EVENTS),
        },
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    logging.getLogger("py4j").setLevel(logging.WARNING)  # its shutdown lines land on closed streams
    session.stop()


def child_airflow_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a child process that runs ``dag.test()``: its own copy of the migrated
    metadata DB. A child killed by a test (SIGTERM, SIGKILL) in the middle of a write would
    otherwise leave the SQLite file this test process keeps using damaged."""
    import shutil

    copy = tmp_path / "airflow-child.db"
    shutil.copyfile(_AIRFLOW_HOME / "airflow.db", copy)
    return {**os.environ, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{copy}"}


def run_dag_file(source: str, dag_id: str, filename: str | None = None) -> Any:
    """Writes a DAG file into the dags folder and runs it with ``dag.test()`` (Airflow refuses to
    test a DAG its dags folder cannot parse). Returns the finished DagRun."""
    from airflow.dag_processing.dagbag import DagBag

    path = DAGS_FOLDER / (filename or f"{dag_id}.py")
    path.write_text(source)
    bag = DagBag(str(path))
    assert not bag.import_errors, bag.import_errors
    dag = bag.get_dag(dag_id)
    assert dag is not None, f"{dag_id} not found in {path}"
    return dag.test()


def llmq_connection_env(
    server: MockServer,
    conn_id: str = "llmq_default",
    api_type: str = "azure",
    headers: dict[str, str] | None = None,
) -> dict[str, str]:
    """An ``llmq`` connection to the mock server as an AIRFLOW_CONN_* variable (key in the password)."""
    base = mock_base(server, api_type)
    extra: dict[str, Any] = {"api_type": api_type, "deployment": DEPLOYMENT, "ca_cert": server.ca_path}
    if headers:
        extra["headers"] = headers
    if api_type == "azure":
        extra["api_version"] = "2024-06-01"
    value = {"conn_type": "llmq", "host": base, "password": TEST_KEY, "extra": extra}
    return {f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(value)}
