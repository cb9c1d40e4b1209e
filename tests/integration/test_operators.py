"""The four operators in a real DAG run (``dag.test()``), local Spark, the mock server over TLS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmq.testing.mock_server import expected_answer, planned_fault
from tests.conftest import DEPLOYMENT, TEST_KEY, llmq_connection_env, run_dag_file

OPERATORS = {
    "udf": ("LLMQueryUDFOperator", {"num_partitions": 4}),
    "async_batch": ("LLMQueryAsyncBatchOperator", {"batch_size": 64}),
    "rate_limited": ("LLMQueryRateLimitedOperator", {"max_concurrency": 32}),
    "thread_pool": ("LLMQueryThreadPoolOperator", {"max_workers": 32}),
}
SYSTEM_PROMPT = "Classify the review as positive, negative or mixed."
N_ROWS = 1000

DAG_TEMPLATE = """
import json
from datetime import datetime, timedelta

from airflow.sdk import DAG, task

from airflow_provider_llmq.operators.llmq import (
    LLMQueryAsyncBatchOperator,
    LLMQueryRateLimitedOperator,
    LLMQueryThreadPoolOperator,
    LLMQueryUDFOperator,
)

with DAG(
    "{dag_id}",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    default_args={{"owner": "tests", "retries": 0, "retry_delay": timedelta(0)}},
    tags=["test"],
) as dag:
    previous = None
{tasks}
"""

TASK_TEMPLATE = """
    {name} = {cls}(
        task_id="{name}",
        source_path="{source}",
        id_col="review_id",
        prompt_template="[{name}] {{review}}",
        system_prompt="{system_prompt}",
        output_path="{out}/{name}",
        checkpoint_dir="{out}/checkpoints",
        chunk_size=500,
        retry_backoff=0.001,
        max_retry_wait=0.05,
        progress_interval=1,
        **{kwargs!r},
    )

    @task(task_id="save_{name}")
    def save_{name}(summary):
        with open("{out}/{name}.summary.json", "w") as f:
            json.dump(summary, f)

    save_{name}({name}.output)
    if previous is not None:
        previous >> {name}
    previous = {name}
"""


def _reviews(n: int) -> list[tuple[int, str, int, str | None]]:
    products = ["kettle", "headphones", "desk lamp", "running shoes", "blender"]
    rows: list[tuple[int, str, int, str | None]] = []
    for i in range(n):
        text: str | None = f"Review {i}: the {products[i % 5]} is {'great' if i % 3 else 'disappointing'}."
        if i in (7, 734):
            text = None if i == 7 else "   "
        rows.append((1_000_000 + i, products[i % 5], 1 + i % 5, text))
    return rows


@pytest.fixture
def faulty_server(server: Any) -> Any:
    """~3 % of prompts fail once (500, 429, reset, malformed), 5 % answer slowly, 0.5 % are filtered."""
    server.configure(
        fault_rate=0.03, slow_rate=0.05, slow_ms=40, content_filter_rate=0.005, retry_after_ms=5, seed=7
    )
    return server


@pytest.mark.slow  # over 7 s: CI's slow step runs it
def test_each_operator_writes_every_row_once_with_its_own_answer(
    airflow_db: Path, spark: Any, faulty_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in llmq_connection_env(faulty_server).items():
        monkeypatch.setenv(name, value)
    source = tmp_path / "reviews"
    spark.createDataFrame(
        _reviews(N_ROWS), "review_id long, product string, rating int, review string"
    ).repartition(3).write.parquet(str(source))
    out = tmp_path / "out"
    tasks = "".join(
        TASK_TEMPLATE.format(
            name=name, cls=cls, kwargs=kwargs, source=source, out=out, system_prompt=SYSTEM_PROMPT
        )
        for name, (cls, kwargs) in OPERATORS.items()
    )
    run = run_dag_file(DAG_TEMPLATE.format(dag_id="llmq_four_operators", tasks=tasks), "llmq_four_operators")
    assert run.state == "success"

    source_rows = {r["review_id"]: r.asDict() for r in spark.read.parquet(str(source)).collect()}
    config = faulty_server.config
    total_attempts = 0
    for name in OPERATORS:
        rows = spark.read.parquet(str(out / name)).collect()
        ids = [r["review_id"] for r in rows]
        assert len(rows) == N_ROWS and len(set(ids)) == N_ROWS and set(ids) == set(source_rows), name
        for row in rows:
            original = source_rows[row["review_id"]]
            assert {k: row[k] for k in original} == original, f"{name}: source columns changed"
            prompt = f"[{name}] {original['review'] or ''}"
            if planned_fault(prompt, config) == "content_filter":
                assert row["llmq_error_code"] == "content_filter", (name, row)
                continue
            assert row["llmq_status"] == "ok", (name, row)
            assert row["response"] == expected_answer(DEPLOYMENT, SYSTEM_PROMPT, prompt, None), name
            assert row["llmq_attempts"] >= 1 and row["llmq_latency_ms"] > 0
        attempts = sum(r["llmq_attempts"] for r in rows)
        asked = sum(1 for r in rows if r["llmq_attempts"] > 0)
        summary = json.loads((out / f"{name}.summary.json").read_text())
        assert summary["rows"] == N_ROWS and summary["ok"] + summary["errors"] == N_ROWS
        assert summary["requests_sent"] == attempts, name
        throttled = sum(r["llmq_throttled"] for r in rows)
        assert summary["throttled"] == throttled > 0, name  # the faults include 429s
        assert summary["retries"] == attempts - asked - throttled, name  # a 429 is no retry
        if name == "udf":  # its clients live in the Python workers
            assert summary["admitted_requests_per_second"] is None
        else:
            assert summary["admitted_requests_per_second"] > 0, name
        assert TEST_KEY not in json.dumps(summary)
        total_attempts += attempts
    assert faulty_server.stats()["chat_requests"] == total_attempts
    assert faulty_server.stats()["keys_in_url"] == 0
