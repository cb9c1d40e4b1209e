"""Runs one operator in its own process, as an Airflow task process would (used by the kill, memory
and cluster tests). Arguments: a JSON object {"operator": class name, "kwargs": {...}, "tracemalloc":
bool}; without a ``spark_conn_id`` in kwargs the session is local[2]. Prints one JSON line: the
summary, plus the Python heap's tracemalloc peak when asked. :func:`start` and :func:`summary` are
the tests' side: start it, and read the summary of a run that ended."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any


def start(spec: dict[str, Any], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, json.dumps(spec)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # so a kill of its process group takes the Spark JVM with it
    )


def kill_midway(proc: subprocess.Popen[str], far_enough: Callable[[], bool], within: float = 600) -> None:
    """SIGKILL the task process (no on_kill, no last flush) once ``far_enough()`` holds."""
    deadline = time.monotonic() + within
    while not far_enough():
        assert proc.poll() is None, "the first run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def summary(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-2000:]
    line = next(line for line in out.splitlines() if line.startswith("SUMMARY "))
    found: dict[str, Any] = json.loads(line.removeprefix("SUMMARY "))
    return found


def main() -> None:
    spec = json.loads(sys.argv[1])
    from airflow_provider_llmq.hooks.spark_session import get_spark_session
    from airflow_provider_llmq.operators import llmq

    conf = {
        "spark.ui.enabled": "false",
        "spark.sql.shuffle.partitions": "4",
        "spark.driver.host": "127.0.0.1",
    }
    if "spark_conn_id" not in spec["kwargs"]:
        get_spark_session(None, {"spark.master": "local[2]", **conf}).sparkContext.setLogLevel("ERROR")
    if spec.get("tracemalloc"):
        tracemalloc.start()
    operator = getattr(llmq, spec["operator"])(task_id="ask", **spec["kwargs"])
    result = operator.execute({})
    if spec.get("tracemalloc"):
        result["tracemalloc_peak_bytes"] = tracemalloc.get_traced_memory()[1]
    print("SUMMARY " + json.dumps(result), flush=True)
    os._exit(0)  # skip the JVM's slow shutdown


if __name__ == "__main__":
    main()
