"""The operators on a real Spark standalone cluster (a master and two workers on 127.0.0.1) and
through Spark Connect: requests come from executor processes, every row comes out once with its
own answer, the global caps hold across executors, and a run resumes after its driver is killed.
Run with ``make test-cluster`` (``pytest -m cluster``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_provider_llmq.testing.mock_server import expected_answer, planned_fault
from airflow_provider_llmq.testing.spark_cluster import Cluster
from tests.conftest import DEPLOYMENT, llmq_connection_env

pytestmark = pytest.mark.cluster

RUNNER = Path(__file__).parents[1] / "slow" / "run_operator.py"
SYSTEM = "You are a helpful assistant."
SPARK_CONF = {
    "spark.ui.enabled": "false",
    "spark.driver.host": "127.0.0.1",
    "spark.executor.memory": "768m",
    "spark.sql.shuffle.partitions": "4",
}


@pytest.fixture
def llm(server: Any) -> Any:
    server.configure(latency_ms=20, fault_rate=0.03, slow_rate=0.05, slow_ms=60, seed=3, retry_after_ms=5)
    return server


def _source(tmp_path: Path, rows: int) -> str:
    folder = tmp_path / "src"
    folder.mkdir()
    table = pa.table({"id": list(range(rows)), "prompt": [f"cluster question {i}?" for i in range(rows)]})
    pq.write_table(table, folder / "part-0.parquet")
    return "file://" + str(folder)


def _env(server: Any, spark_conn: dict[str, Any]) -> dict[str, str]:
    return {
        **os.environ,
        **llmq_connection_env(server),
        "AIRFLOW_CONN_SPARK_CLUSTER": json.dumps(spark_conn),
        "PYSPARK_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
    }


def _start(operator: str, kwargs: dict[str, Any], env: dict[str, str]) -> subprocess.Popen[bytes]:
    spec = {
        "operator": operator,
        "kwargs": {"spark_conn_id": "spark_cluster", "spark_conf": SPARK_CONF, **kwargs},
    }
    return subprocess.Popen(
        [sys.executable, str(RUNNER), json.dumps(spec)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _summary(proc: subprocess.Popen[bytes], timeout: float = 600) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    text = out.decode(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("SUMMARY ")]
    assert proc.returncode == 0 and lines, text[-4000:]
    return dict(json.loads(lines[-1][len("SUMMARY ") :]))


class _Clients:
    """Which processes hold connections to the mock server while a run lasts."""

    def __init__(self, port: int) -> None:
        self.port, self.pids = port, set[int]()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> _Clients:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        before = self._connections()  # kept alive by earlier clients of this process: not the run's
        while not self._stop.is_set():
            self.pids.update(pid for pid, _ in self._connections() - before)
            time.sleep(0.05)

    def _connections(self) -> set[tuple[int, int]]:
        return {
            (conn.pid, conn.laddr.port)
            for conn in psutil.net_connections(kind="tcp")
            if conn.raddr and conn.raddr.port == self.port and conn.pid
        }


def _under_an_executor(pid: int) -> bool:
    """The process is a Python worker forked under an executor JVM, not the driver."""
    try:
        for parent in psutil.Process(pid).parents():
            if "CoarseGrainedExecutorBackend" in " ".join(parent.cmdline()):
                return True
    except psutil.NoSuchProcess:
        return True  # a worker that already exited was started by an executor (checked while alive)
    return False


def _check_rows(tmp_path: Path, rows: int, server: Any) -> None:
    table = pq.read_table(str(tmp_path / "out"))
    ids = table.column("id").to_pylist()
    assert sorted(ids) == list(range(rows)), "every row once"
    config = server.config
    for row in table.to_pylist():
        prompt = f"cluster question {row['id']}?"
        if planned_fault(prompt, config) == "content_filter":
            assert row["llmq_error_code"] == "content_filter"
        else:
            assert row["llmq_status"] == "ok", row
            assert row["response"] == expected_answer(DEPLOYMENT, SYSTEM, prompt, {})


@pytest.mark.parametrize(
    ("operator", "concurrency"),
    [
        ("LLMQueryRateLimitedOperator", {"max_concurrency": 8}),
        ("LLMQueryAsyncBatchOperator", {"batch_size": 8}),
        ("LLMQueryThreadPoolOperator", {"max_workers": 8}),
    ],
)
def test_executor_operators_on_a_standalone_cluster(
    cluster: Cluster, llm: Any, tmp_path: Path, operator: str, concurrency: dict[str, int]
) -> None:
    rows = 5000
    kwargs = {
        "source_path": _source(tmp_path, rows),
        "id_col": "id",
        "output_path": f"file://{tmp_path}/out",
        "checkpoint_dir": f"file://{tmp_path}/ckpt",
        "checkpoint_key": "cluster",
        "run_on": "executors",
        "chunk_size": 1000,
        "retry_backoff": 0.001,
        **concurrency,
    }
    env = _env(llm, {"conn_type": "spark", "host": cluster.master})
    with _Clients(llm.port) as clients:
        proc = _start(operator, kwargs, env)
        summary = _summary(proc)
    assert summary["rows"] == rows
    _check_rows(tmp_path, rows, llm)
    stats = llm.stats()
    assert stats["max_in_flight"] <= 8, stats["max_in_flight"]
    assert stats["chat_requests"] == summary["requests_sent"]
    assert clients.pids and proc.pid not in clients.pids
    assert all(_under_an_executor(pid) for pid in clients.pids), clients.pids


def test_caps_below_the_slot_count_hold_across_executors(cluster: Cluster, llm: Any, tmp_path: Path) -> None:
    rows = 400
    llm.configure(latency_ms=20, fault_rate=0.0, slow_rate=0.0)
    kwargs = {
        "source_path": _source(tmp_path, rows),
        "id_col": "id",
        "output_path": f"file://{tmp_path}/out",
        "checkpoint_dir": f"file://{tmp_path}/ckpt",
        "run_on": "executors",
        "max_concurrency": 1,  # below the cluster's 2 task slots
        "requests_per_minute": 1800,  # 30/s
        "retry_backoff": 0.001,
    }
    summary = _summary(
        _start(
            "LLMQueryRateLimitedOperator", kwargs, _env(llm, {"conn_type": "spark", "host": cluster.master})
        )
    )
    assert summary["ok"] == rows
    stats = llm.stats()
    assert stats["max_in_flight"] == 1
    assert stats["max_per_second_after_first"] <= 31, stats["per_second_counts"]


def test_through_spark_connect(spark_connect: str, llm: Any, tmp_path: Path) -> None:
    rows = 2000
    host, port = spark_connect.removeprefix("sc://").split(":")
    kwargs = {
        "source_path": _source(tmp_path, rows),
        "id_col": "id",
        "output_path": f"file://{tmp_path}/out",
        "checkpoint_dir": f"file://{tmp_path}/ckpt",
        "run_on": "executors",
        "parallelism": 2,  # Spark Connect has no SparkContext to read the slots from
        "max_concurrency": 6,
        "retry_backoff": 0.001,
    }
    env = _env(llm, {"conn_type": "spark_connect", "host": host, "port": int(port)})
    with _Clients(llm.port) as clients:
        summary = _summary(_start("LLMQueryRateLimitedOperator", {**kwargs, "spark_conf": {}}, env))
    assert summary["rows"] == rows
    _check_rows(tmp_path, rows, llm)
    assert llm.stats()["max_in_flight"] <= 6
    assert clients.pids and all(_under_an_executor(pid) for pid in clients.pids)


def _wait_for(server: Any, requests: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while server.stats()["chat_requests"] < requests and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_run_resumes_after_its_driver_is_killed(cluster: Cluster, llm: Any, tmp_path: Path) -> None:
    rows, chunk, concurrency = 4000, 500, 8
    llm.configure(latency_ms=20, fault_rate=0.0, slow_rate=0.0)
    kwargs = {
        "source_path": _source(tmp_path, rows),
        "id_col": "id",
        "output_path": f"file://{tmp_path}/out",
        "checkpoint_dir": f"file://{tmp_path}/ckpt",
        "checkpoint_key": "killed",
        "run_on": "executors",
        "chunk_size": chunk,
        "max_concurrency": concurrency,
        "retry_backoff": 0.001,
    }
    env = _env(llm, {"conn_type": "spark", "host": cluster.master})
    first = _start("LLMQueryRateLimitedOperator", kwargs, env)
    _wait_for(llm, rows // 2)
    assert llm.stats()["chat_requests"] >= rows // 2, "the first run got going before it was killed"
    for child in psutil.Process(first.pid).children(recursive=True):  # the driver JVM too
        child.send_signal(signal.SIGKILL)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    asked_first = llm.stats()["chat_requests"]
    assert asked_first < rows
    time.sleep(3)  # let the cluster notice the dead application and free its executors
    summary = _summary(_start("LLMQueryRateLimitedOperator", kwargs, env))
    assert summary["rows"] == rows and summary["ok"] == rows
    # the first job (one bucket) was committed long before the kill: the re-run resumes it, and
    # asks again only what the job running at the kill had not committed
    assert summary["resumed_requests"] > 0
    total = llm.stats()["chat_requests"]
    assert total - rows < asked_first, (asked_first, total, summary)  # not everything again
    _check_rows_no_faults(tmp_path, rows)


def _check_rows_no_faults(tmp_path: Path, rows: int) -> None:
    table = pq.read_table(str(tmp_path / "out"))
    assert sorted(table.column("id").to_pylist()) == list(range(rows))
    assert set(table.column("llmq_status").to_pylist()) == {"ok"}
