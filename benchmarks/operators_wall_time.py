"""Wall time of the four operators against the mock server (child process, TLS, fixed latency),
beside the query phase alone, to show what Spark's reading and writing adds.

    .venv/bin/python benchmarks/operators_wall_time.py --rows 10000 --latency-ms 50 --concurrency 64
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from airflow_provider_llmq.testing.mock_server import MockConfig, MockServerProcess


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--udf-rows", type=int, default=1_000, help="the UDF runs 1 request per task slot")
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="llmq-bench-ops-")
    os.environ.setdefault("AIRFLOW_HOME", os.path.join(work, "airflow"))
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from airflow_provider_llmq.hooks.spark_session import get_spark_session
    from airflow_provider_llmq.operators import llmq

    spark = get_spark_session(None, {"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "8"})
    spark.sparkContext.setLogLevel("ERROR")
    key = "bench-" + os.urandom(8).hex()
    with MockServerProcess(MockConfig(api_key=key, latency_ms=args.latency_ms), cert_dir=work) as server:
        os.environ["AIRFLOW_CONN_LLMQ_DEFAULT"] = json.dumps(
            {
                "conn_type": "llmq",
                "host": server.base_url,
                "password": key,
                "extra": {"api_type": "azure", "deployment": "bench", "ca_cert": server.ca_path},
            }
        )
        c = args.concurrency
        plans = [
            ("LLMQueryUDFOperator", args.udf_rows, {"num_partitions": c}),
            ("LLMQueryAsyncBatchOperator", args.rows, {"batch_size": c}),
            ("LLMQueryRateLimitedOperator", args.rows, {"max_concurrency": c}),
            ("LLMQueryThreadPoolOperator", args.rows, {"max_workers": c}),
        ]
        print("| operator | rows | wall s | query s | rows/s (wall) | requests/s (query) | limit rows/s |")
        print("|---|---|---|---|---|---|---|")
        for name, rows, kwargs in plans:
            source = os.path.join(work, f"src-{rows}")
            if not os.path.exists(source):
                spark.range(rows).selectExpr("id", "concat('benchmark prompt ', id) as prompt").write.parquet(
                    source
                )
            server.reset()
            started = time.monotonic()
            summary = getattr(llmq, name)(
                task_id="bench",
                source_path=source,
                id_col="id",
                output_path=os.path.join(work, f"out-{name}"),
                checkpoint_key=name,
                **kwargs,
            ).execute({})
            wall = time.monotonic() - started
            slots = spark.sparkContext.defaultParallelism if name == "LLMQueryUDFOperator" else c
            limit = slots / (args.latency_ms / 1000)
            assert summary["ok"] == rows, summary
            print(
                f"| {name} | {rows} | {wall:.1f} | {summary['query_seconds']:.1f} | {rows / wall:.0f} | "
                f"{summary['query_requests_per_second']:.0f} | {limit:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
