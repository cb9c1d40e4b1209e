"""Entra ID on a real Spark standalone cluster: each executor's Python worker builds its own credential
from the connection's config and keeps its own token (the driver asks for none), tokens that expire
during the run are replaced before the server refuses them, and every row comes out answered.
Run with ``make test-cluster`` (``pytest -m cluster``)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmq.testing.spark_cluster import Cluster
from airflow_provider_llmq.testing.token_authority import TokenAuthority
from tests.cluster.test_cluster import (
    _check_rows_no_faults,
    _Clients,
    _source,
    _start,
    _summary,
    _under_an_executor,
)
from tests.conftest import TEST_KEY
from tests.integration.test_entra_id import CLIENT, SECRET, entra_connection, service_principal

pytestmark = pytest.mark.cluster
LIFETIME = 3


@pytest.fixture
def authority(tmp_path: Path) -> Iterator[TokenAuthority]:
    with TokenAuthority(TEST_KEY, {CLIENT: SECRET}, lifetime=LIFETIME, cert_dir=str(tmp_path)) as started:
        yield started


@pytest.mark.parametrize(
    ("operator", "kwargs"),
    [
        # about 20 s of asking each: several token lifetimes
        (
            "LLMQueryRateLimitedOperator",
            {"run_on": "executors", "max_concurrency": 8, "requests_per_minute": 6000},
        ),
        ("LLMQueryUDFOperator", {"num_partitions": 4}),  # one request in flight per core, 20 ms each
    ],
)
def test_each_executor_gets_its_own_token_and_keeps_it_fresh(
    cluster: Cluster,
    server: Any,
    authority: TokenAuthority,
    tmp_path: Path,
    operator: str,
    kwargs: dict[str, Any],
) -> None:
    rows = 2000
    server.configure(latency_ms=20)
    env = {
        **os.environ,
        **entra_connection(server, **service_principal(authority)),
        "AIRFLOW_CONN_SPARK_CLUSTER": json.dumps({"conn_type": "spark", "host": cluster.master}),
        "PYSPARK_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
    }
    spec = {
        "source_path": _source(tmp_path, rows),
        "id_col": "id",
        "output_path": f"file://{tmp_path}/out",
        "checkpoint_dir": f"file://{tmp_path}/ckpt",
        "retry_backoff": 0.001,
        **kwargs,
    }
    started = time.monotonic()
    with _Clients(int(authority.authority_url.rsplit(":", 1)[1])) as asking:
        proc = _start(operator, spec, env)
        summary = _summary(proc)
    seconds = time.monotonic() - started
    assert summary["rows"] == rows and summary["ok"] == rows
    _check_rows_no_faults(tmp_path, rows)
    stats, tokens = server.stats(), authority.stats()["token_requests"]
    statuses = stats["requests_by_status"]
    print(f"\n{operator}: {tokens} tokens for {len(asking.pids)} processes, {seconds:.0f} s {statuses}")
    # the tokens came from executors' Python workers, never from the driver
    assert asking.pids and proc.pid not in asking.pids
    assert all(_under_an_executor(pid) for pid in asking.pids), asking.pids
    # every request carried a token; a 401 (a token that expired in flight) only ever for expiry
    assert stats["bearer_tokens"] == summary["requests_sent"] - stats["expired_tokens"]
    assert stats["requests_by_status"].get("401", 0) == stats["expired_tokens"]
    # one token per worker per lifetime (each refreshes at 3/4 of it) while it asks, not one per row
    asking_seconds = len(stats["per_second_counts"]) + 2
    assert tokens <= len(asking.pids) * (asking_seconds / LIFETIME * 2 + 3), (tokens, asking_seconds)
