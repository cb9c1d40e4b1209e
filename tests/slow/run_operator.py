"""Runs one operator in its own process, as an Airflow task process would (used by the kill, memory
and cluster tests). Arguments: a JSON object {"operator": class name, "kwargs": {...}, "tracemalloc":
bool}; without a ``spark_conn_id`` in kwargs the session is local[2]. Prints one JSON line: the
summary, plus the Python heap's tracemalloc peak when asked."""

from __future__ import annotations

import json
import os
import sys
import tracemalloc


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
    summary = operator.execute({})
    if spec.get("tracemalloc"):
        summary["tracemalloc_peak_bytes"] = tracemalloc.get_traced_memory()[1]
    print("SUMMARY " + json.dumps(summary), flush=True)
    os._exit(0)  # skip the JVM's slow shutdown


if __name__ == "__main__":
    main()
