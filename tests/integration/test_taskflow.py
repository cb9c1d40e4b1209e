"""``@task.llmq``: registered through the provider info; its function returns the prompts and the
task queries them like the rate-limited operator, in a dag.test() run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmq.testing.mock_server import expected_answer
from tests.conftest import DEPLOYMENT, llmq_connection_env, run_dag_file

SYSTEM = "You are a helpful assistant."

DAG = """
from datetime import datetime

from airflow.sdk import DAG, task

with DAG("llmq_taskflow", schedule=None, start_date=datetime(2026, 1, 1), tags=["test"],
         default_args={{"owner": "tests"}}) as dag:

    @task.llmq(id_col="id", output_path="{out}", retry_backoff=0.001, max_concurrency=4)
    def reviews(spark, min_id=0):
        frame = spark.read.parquet("{source}")
        return frame.where(frame.id >= min_id).selectExpr("id", "concat('Review: ', text) AS prompt")

    reviews(min_id=5)
"""


def test_task_llmq_queries_what_its_function_returns(
    airflow_db: Path, spark: Any, server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in llmq_connection_env(server).items():
        monkeypatch.setenv(name, value)
    source, out = tmp_path / "src", tmp_path / "out"
    spark.createDataFrame([(i, f"text {i}") for i in range(20)], "id long, text string").write.parquet(
        str(source)
    )
    run = run_dag_file(DAG.format(source=source, out=out), "llmq_taskflow")
    assert run.state == "success"
    rows = {r["id"]: r for r in spark.read.parquet(str(out)).collect()}
    assert sorted(rows) == list(range(5, 20))  # the function's own argument reached it
    for i, row in rows.items():
        assert row["response"] == expected_answer(DEPLOYMENT, SYSTEM, f"Review: text {i}", {})
    assert server.stats()["chat_requests"] == 15


def test_the_decorator_is_registered_in_the_provider_info() -> None:
    from airflow_provider_llmq import get_provider_info

    [decorator] = get_provider_info()["task-decorators"]
    module, name = decorator["class-name"].rsplit(".", 1)
    import importlib

    assert decorator["name"] == "llmq" and callable(getattr(importlib.import_module(module), name))
