"""An Airflow retry resumes from the checkpoint; the key leaks nowhere on disk or in the logs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _AIRFLOW_HOME, TEST_KEY, llmq_connection_env, run_dag_file

RETRY_DAG = """
from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_provider_llmq.operators.llmq import LLMQueryRateLimitedOperator

with DAG(
    "llmq_retry_resume",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    default_args={{"owner": "tests", "retries": 1, "retry_delay": timedelta(0)}},
    tags=["test"],
) as dag:
    LLMQueryRateLimitedOperator(
        task_id="ask",
        source_path="{source}",
        id_col="id",
        output_path="{out}/answers",
        checkpoint_dir="{out}/checkpoints",
        keep_checkpoint=True,
        chunk_size={chunk_size},
        max_concurrency={concurrency},
        retry_backoff=0.001,
        progress_interval=1,
    )
"""


def _files_under(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]


def test_airflow_retry_resumes_from_the_checkpoint_and_the_key_leaks_nowhere(
    airflow_db: Path,
    spark: Any,
    server: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # an API-management subscription key: a secret header value, as secret as the key
    secret_header = "apim-sub-4d1e8b7c93a2"
    for name, value in llmq_connection_env(
        server, headers={"Ocp-Apim-Subscription-Key": secret_header}
    ).items():
        monkeypatch.setenv(name, value)
    rows, first_try_answers, chunk_size, concurrency = 1000, 300, 100, 8
    server.configure(auth_fail={"after": first_try_answers, "count": 1})
    source, out = tmp_path / "src", tmp_path / "out"
    spark.createDataFrame(
        [(i, f"prompt number {i}") for i in range(rows)], "id int, prompt string"
    ).write.parquet(str(source))
    dag = RETRY_DAG.format(source=source, out=out, chunk_size=chunk_size, concurrency=concurrency)
    run = run_dag_file(dag, "llmq_retry_resume")
    logs = capfd.readouterr()
    text = logs.out + logs.err
    assert run.state == "success"
    assert "LLMQueryAuthError" in text and "a retry of this task resumes" in text
    resumed = [int(k) for k in re.findall(r"resumed (\d+) rows from checkpoint", text)]
    assert resumed and resumed[0] >= first_try_answers - chunk_size - concurrency
    # the kept checkpoint holds every answer of both tries, compacted into one committed result file
    committed = list((out / "checkpoints").rglob("results/spark-*.done"))
    assert len(committed) == 1 and not list((out / "checkpoints").rglob("flush-*.parquet"))
    assert spark.read.parquet(str(committed[0])[: -len(".done")]).count() == rows
    stats = server.stats()
    assert stats["auth_failures"] == 1
    # a row answered and checkpointed by the first try is not asked again: beyond one request per
    # row and the one 401, only the unflushed chunk and the requests in flight are asked twice
    assert stats["chat_requests"] - 1 - rows <= chunk_size + concurrency
    assert spark.read.parquet(str(out / "answers")).count() == rows

    # the key and the secret header: not in the task logs, the Airflow home (SQLite DB with XCom and
    # rendered fields, Spark event log), the checkpoint or the output, nor in any URL the server saw
    for secret in (TEST_KEY, secret_header):
        assert secret not in text
        needle = secret.encode()
        leaked = [str(p) for p in _files_under(_AIRFLOW_HOME, out) if needle in p.read_bytes()]
        assert leaked == [], secret
    assert list((_AIRFLOW_HOME / "spark-events").iterdir()), "the Spark event log was scanned"
    assert stats["keys_in_url"] == 0
