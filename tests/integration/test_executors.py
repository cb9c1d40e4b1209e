"""``run_on="executors"`` on local Spark: each partition asks from a Python worker process, every
row comes out once with its own answer, and the global caps hold across the partitions. The same
on a real standalone cluster is in tests/cluster."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.operators.llmq import (
    LLMQueryAsyncBatchOperator,
    LLMQueryConfigFailure,
    LLMQueryRateLimitedOperator,
    LLMQueryThreadPoolOperator,
    LLMQueryUDFOperator,
)
from airflow_provider_llmq.spark.placements.base import portable
from airflow_provider_llmq.spark.placements.executors import share_caps
from airflow_provider_llmq.testing.mock_server import expected_answer, planned_fault
from tests.conftest import DEPLOYMENT, llmq_connection_env

SYSTEM = "You are a helpful assistant."
FAULTS = {"fault_rate": 0.03, "slow_rate": 0.05, "slow_ms": 40, "seed": 11, "retry_after_ms": 5}


@pytest.fixture
def llm(server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in llmq_connection_env(server).items():
        monkeypatch.setenv(name, value)
    server.configure(latency_ms=10, **FAULTS)
    return server


def _connections_to(port: int) -> set[tuple[int, int]]:
    """(pid, local port) of every client connection to the mock server's port."""
    return {
        (conn.pid, conn.laddr.port)
        for conn in psutil.net_connections(kind="tcp")
        if conn.raddr and conn.raddr.port == port and conn.pid
    }


def _client_processes(port: int, stop: threading.Event, seen: set[int]) -> None:
    """Every process that opens a connection to the mock server while the run lasts (connections
    kept alive by earlier tests' clients in this process are not the run's)."""
    before = _connections_to(port)
    while not stop.is_set():
        seen.update(pid for pid, local in _connections_to(port) - before)
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("cls", "concurrency"),
    [
        (LLMQueryRateLimitedOperator, {"max_concurrency": 6}),
        # the other two methods take the same placement path (13 s each): with the slow suite in CI
        pytest.param(LLMQueryAsyncBatchOperator, {"batch_size": 6}, marks=pytest.mark.slow),
        pytest.param(LLMQueryThreadPoolOperator, {"max_workers": 6}, marks=pytest.mark.slow),
    ],
)
def test_executor_placement_answers_every_row_once_from_worker_processes(
    cls: type, concurrency: dict[str, int], llm: Any, spark: Any, tmp_path: Path
) -> None:
    rows = 600
    source = str(tmp_path / "src")
    spark.createDataFrame(
        [(i, f"question {i}?") for i in range(rows)], "id long, prompt string"
    ).write.parquet(source)
    seen: set[int] = set()
    stop = threading.Event()
    watcher = threading.Thread(target=_client_processes, args=(llm.port, stop, seen), daemon=True)
    watcher.start()
    try:
        summary = cls(
            task_id="ask",
            source_path=source,
            id_col="id",
            output_path=str(tmp_path / "out"),
            checkpoint_key="exec",
            run_on="executors",
            chunk_size=200,
            retry_backoff=0.001,
            **concurrency,
        ).execute({})
    finally:
        stop.set()
        watcher.join()
    assert summary["rows"] == rows and summary["schema_version"] == 5
    out = {r["id"]: r for r in spark.read.parquet(str(tmp_path / "out")).collect()}
    assert sorted(out) == list(range(rows))
    config = llm.config
    for i, row in out.items():
        prompt = f"question {i}?"
        if planned_fault(prompt, config) in ("content_filter",):
            assert row["llmq_error_code"] == "content_filter"
        else:
            assert row["llmq_status"] == "ok", (i, row["llmq_error_code"], row["llmq_error"])
            assert row["response"] == expected_answer(DEPLOYMENT, SYSTEM, prompt, {})
    stats = llm.stats()
    assert stats["max_in_flight"] <= 6  # the global cap, shared by the partitions
    assert stats["chat_requests"] == summary["requests_sent"]
    # the requests came from Spark's Python workers, never from this (driver) process
    assert seen and os.getpid() not in seen
    names = {psutil.Process(pid).cmdline()[-1] for pid in seen if psutil.pid_exists(pid)}
    assert names <= {"pyspark.worker"}, names


@pytest.mark.slow  # over 7 s: CI's slow step runs it
def test_a_cap_below_the_slot_count_still_holds(llm: Any, spark: Any, tmp_path: Path) -> None:
    source = str(tmp_path / "src")
    spark.createDataFrame([(i, f"q {i}") for i in range(200)], "id long, prompt string").write.parquet(source)
    llm.configure(latency_ms=30, fault_rate=0.0, slow_rate=0.0)
    summary = LLMQueryRateLimitedOperator(
        task_id="ask",
        source_path=source,
        id_col="id",
        output_path=str(tmp_path / "out"),
        checkpoint_key="exec-cap",
        run_on="executors",
        max_concurrency=1,
        requests_per_minute=1200,
        retry_backoff=0.001,
    ).execute({})
    assert summary["ok"] == 200
    stats = llm.stats()
    assert stats["max_in_flight"] == 1
    assert stats["max_per_second_after_first"] <= 21  # 1200/min = 20/s, spread evenly


def test_caps_are_shared_never_exceeded() -> None:
    options = QueryOptions(requests_per_minute=600, tokens_per_minute=60_000)
    share = share_caps(64, options, slots=4)
    assert (share.partitions, share.concurrency) == (4, 16)
    assert share.requests_per_minute == 150 and share.tokens_per_minute == 15_000
    fewer = share_caps(3, options, slots=8)  # max_concurrency below the task slots
    assert (fewer.partitions, fewer.concurrency) == (3, 1)
    assert fewer.partitions * fewer.concurrency <= 3
    odd = share_caps(10, QueryOptions(), slots=4)
    assert odd.partitions * odd.concurrency <= 10 and odd.requests_per_minute is None


def test_the_ca_travels_as_pem_text(server: Any) -> None:
    endpoint = EndpointConfig(api_base=server.base_url, api_key="k", ca_cert=server.ca_path)
    shipped = portable(endpoint)
    assert shipped.ca_cert is not None and shipped.ca_cert.startswith("-----BEGIN CERTIFICATE-----")
    assert portable(shipped) is shipped


def test_udf_with_several_requests_per_worker(llm: Any, spark: Any, tmp_path: Path) -> None:
    source = str(tmp_path / "src")
    spark.createDataFrame([(i, f"q {i}") for i in range(120)], "id long, prompt string").write.parquet(source)
    llm.configure(latency_ms=50, fault_rate=0.0, slow_rate=0.0)
    summary = LLMQueryUDFOperator(
        task_id="ask",
        source_path=source,
        id_col="id",
        output_path=str(tmp_path / "out"),
        checkpoint_key="udf-threads",
        num_partitions=2,
        requests_per_worker=4,
        retry_backoff=0.001,
    ).execute({})
    assert summary["ok"] == 120
    assert 2 < llm.stats()["max_in_flight"] <= 8  # 2 workers x 4 threads: more than one each
    assert spark.conf.get("spark.sql.execution.pythonUDF.arrow.concurrency.level", None) is None


def test_a_local_path_with_a_cluster_master_is_a_clear_error(
    llm: Any, spark: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the existing local session is reused, with the connection's master in its conf: the check
    # reads that, and nothing is started on the (non-existent) cluster
    conn = {"conn_type": "spark", "host": "spark://cluster.example", "port": 7077}
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_CLUSTER", json.dumps(conn))
    with pytest.raises(LLMQueryConfigFailure, match=r"source_path .* is a local path.*file:///shared"):
        LLMQueryRateLimitedOperator(
            task_id="ask",
            spark_conn_id="spark_cluster",
            source_path=str(tmp_path / "src"),
            output_path="file:///shared/out",
        ).execute({})
    assert llm.stats()["chat_requests"] == 0


def test_job_groups_amortize_the_job_cost_but_keep_whole_buckets() -> None:
    from airflow_provider_llmq.spark.plan import job_groups

    sizes = {0: 100, 1: 120, 2: 90, 3: 110, 4: 100}
    assert job_groups(sizes, 0) == [[0], [1], [2], [3], [4]]  # no rate known yet: one bucket a job
    assert job_groups(sizes, 250) == [[0, 1], [2, 3], [4]]
    assert job_groups(sizes, 10_000) == [[0, 1, 2, 3, 4]]
    assert sorted(b for group in job_groups(sizes, 333) for b in group) == list(sizes)
