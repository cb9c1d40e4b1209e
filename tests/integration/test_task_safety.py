"""The task under Airflow's own life cycle: retries after an error-policy failure in every save
mode, mapped instances, SIGTERM then a re-run, params that must resume, configuration errors that
no retry can fix. Real ``dag.test()`` runs against local Spark and the mock server over TLS."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmq.operators.llmq import LLMQueryConfigFailure, LLMQueryRateLimitedOperator
from airflow_provider_llmq.testing.mock_server import expected_answer
from tests.conftest import DAGS_FOLDER, DEPLOYMENT, child_airflow_env, llmq_connection_env, run_dag_file

DAG_HEAD = """
from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_provider_llmq.operators.llmq import LLMQueryRateLimitedOperator

with DAG(
    "{dag_id}",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    default_args={{"owner": "tests", "retries": {retries}, "retry_delay": timedelta(0)}},
    tags=["test"],
) as dag:
"""


@pytest.fixture
def llm(server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in llmq_connection_env(server).items():
        monkeypatch.setenv(name, value)
    return server


def _source(spark: Any, path: Path, n: int, start: int = 0, marker_every: int = 0) -> str:
    rows = [
        (i, f"question {i}?" + (" [[500]]" if marker_every and i % marker_every == 0 else ""))
        for i in range(start, start + n)
    ]
    spark.createDataFrame(rows, "id long, prompt string").write.mode("overwrite").parquet(str(path))
    return str(path)


def _task_tries(run: Any, task_id: str) -> tuple[str, int]:
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        ti = (
            session.query(TaskInstance).filter_by(dag_id=run.dag_id, run_id=run.run_id, task_id=task_id).one()
        )
        return str(ti.state), int(ti.try_number)


@pytest.mark.parametrize("mode", ["overwrite", "append", "ignore", "errorifexists"])
def test_a_retry_after_an_error_policy_failure_writes_each_row_once(
    airflow_db: Path, spark: Any, llm: Any, tmp_path: Path, mode: str
) -> None:
    # a row with [[500]] fails its first attempt only: with max_retries=0 the first try records it as
    # server_error and on_error="fail" fails that try after writing; the retry asks only those rows
    source = _source(spark, tmp_path / "src", 40, marker_every=8)
    out = tmp_path / "out"
    before = 0
    if mode == "append":  # rows the sink held before the task: they must stay untouched
        LLMQueryRateLimitedOperator(
            task_id="seed",
            source_path=_source(spark, tmp_path / "seed", 3, start=1000),
            id_col="id",
            output_path=str(out),
            checkpoint_key="seed",
            retry_backoff=0.001,
        ).execute({})
        before = 3
    dag_id = f"llmq_retry_{mode}"
    dag = (
        DAG_HEAD.format(dag_id=dag_id, retries=1)
        + f"""
    LLMQueryRateLimitedOperator(
        task_id="ask",
        source_path="{source}",
        id_col="id",
        output_path="{out}",
        mode="{mode}",
        on_error="fail",
        max_retries=0,
        retry_backoff=0.001,
    )
"""
    )
    run = run_dag_file(dag, dag_id)
    assert run.state == "success"
    assert _task_tries(run, "ask") == ("success", 2)
    rows = spark.read.parquet(str(out)).collect()
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)) == 40 + before
    ours = [row for row in rows if row["id"] < 1000]
    assert all(row["llmq_status"] == "ok" for row in ours), {r["llmq_error_code"] for r in ours}
    assert llm.stats()["requests_by_status"].get("500", 0) == 5  # each marked row failed once only


@pytest.mark.slow  # over 7 s: CI's slow step runs it
def test_mapped_instances_keep_separate_checkpoints(
    airflow_db: Path, spark: Any, llm: Any, tmp_path: Path
) -> None:
    sources = [_source(spark, tmp_path / f"src{i}", 30, start=100 * i) for i in range(3)]
    kwargs = [{"source_path": s, "output_path": str(tmp_path / f"out{i}")} for i, s in enumerate(sources)]
    dag_id = "llmq_mapped"
    dag = (
        DAG_HEAD.format(dag_id=dag_id, retries=0)
        + f"""
    LLMQueryRateLimitedOperator.partial(
        task_id="ask",
        id_col="id",
        system_prompt="Be brief for {{{{ dag.dag_id }}}}.",  # templated
        checkpoint_dir="{tmp_path / "ckpt"}",
        keep_checkpoint=True,
        retry_backoff=0.001,
    ).expand_kwargs({json.dumps(kwargs)})
"""
    )
    run = run_dag_file(dag, dag_id)
    assert run.state == "success"
    manifests = sorted((tmp_path / "ckpt").rglob("manifest.json"))
    assert [m.parent.name for m in manifests] == ["map-0", "map-1", "map-2"]
    for i in range(3):
        rows = spark.read.parquet(str(tmp_path / f"out{i}")).collect()
        assert sorted(r["id"] for r in rows) == list(range(100 * i, 100 * i + 30))
        for row in rows:
            want = expected_answer(DEPLOYMENT, "Be brief for llmq_mapped.", f"question {row['id']}?", {})
            assert row["response"] == want
        # a kept checkpoint is compacted into one result file
        results = [p for p in (manifests[i].parent / "results").iterdir() if not p.name.startswith(".")]
        assert len([p for p in results if not p.name.endswith(".done")]) == 1


def test_request_params_with_a_tuple_and_int_keys_resume(llm: Any, spark: Any, tmp_path: Path) -> None:
    args: dict[str, Any] = {
        "task_id": "ask",
        "source_path": _source(spark, tmp_path / "src", 20),
        "id_col": "id",
        "output_path": str(tmp_path / "out"),
        "checkpoint_key": "params",
        "keep_checkpoint": True,
        "retry_backoff": 0.001,
        "request_params": {"stop": ("\n\n", "END"), "logit_bias": {50256: -100}, "temperature": 0},
    }
    first = LLMQueryRateLimitedOperator(**args).execute({})
    assert first["ok"] == 20 and llm.stats()["chat_requests"] == 20
    second = LLMQueryRateLimitedOperator(**args).execute({})
    assert second["ok"] == 20 and second["resumed_requests"] == 20
    assert llm.stats()["chat_requests"] == 20  # nothing asked again


def test_a_changed_endpoint_is_refused_on_resume(
    llm: Any, spark: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    args: dict[str, Any] = {
        "task_id": "ask",
        "source_path": _source(spark, tmp_path / "src", 5),
        "id_col": "id",
        "output_path": str(tmp_path / "out"),
        "checkpoint_key": "endpoint",
        "keep_checkpoint": True,
        "retry_backoff": 0.001,
    }
    LLMQueryRateLimitedOperator(**args).execute({})
    for name, value in llmq_connection_env(llm, api_type="openai").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LLMQueryConfigFailure, match="api_base, api_type, api_version"):
        LLMQueryRateLimitedOperator(**args).execute({})


def test_a_missing_column_fails_in_one_try(airflow_db: Path, spark: Any, llm: Any, tmp_path: Path) -> None:
    source = _source(spark, tmp_path / "src", 5)
    dag_id = "llmq_config_error"
    dag = (
        DAG_HEAD.format(dag_id=dag_id, retries=3)
        + f"""
    LLMQueryRateLimitedOperator(
        task_id="ask", source_path="{source}", prompt_col="no_such_column", output_path="{tmp_path / "out"}"
    )
"""
    )
    run = run_dag_file(dag, dag_id)
    assert run.state == "failed"
    assert _task_tries(run, "ask") == ("failed", 1)
    assert llm.stats()["chat_requests"] == 0


KILL_DAG = """
import sys
from datetime import datetime

from airflow.sdk import DAG

from airflow_provider_llmq.operators.llmq import {operator}

with DAG("{dag_id}", schedule=None, start_date=datetime(2026, 1, 1), tags=["test"],
         default_args={{"owner": "tests"}}) as dag:
    {operator}(
        task_id="ask",
        source_path="{source}",
        id_col="id",
        output_path="{out}",
        checkpoint_dir="{ckpt}",
        checkpoint_key="fixed",
        chunk_size={chunk_size},
        retry_backoff=0.001,
        progress_interval=1,
        {scheduling},
    )

if __name__ == "__main__":
    run = dag.test()
    print("RUN_STATE", run.state, flush=True)
    sys.exit(0 if run.state == "success" else 3)
"""

# (operator, rows, scheduling argument, chunk_size, requests re-asked at most by the re-run)
KILL_CASES = {
    # the driver flushes on stop: only the requests cut in flight are asked again
    "rate_limited": ("LLMQueryRateLimitedOperator", 3000, "max_concurrency=8", 100_000, 8 + 4),
    # a UDF bucket job is cancelled whole: its answers are asked again (at most one bucket)
    "udf": ("LLMQueryUDFOperator", 600, "num_partitions=2", 100, 100 + 2),
}


@pytest.mark.slow  # about 50 s each: CI runs them with make test-slow
@pytest.mark.parametrize("case", sorted(KILL_CASES))
def test_sigterm_stops_within_seconds_and_a_rerun_asks_only_the_rest(
    airflow_db: Path, spark: Any, llm: Any, tmp_path: Path, case: str
) -> None:
    operator, rows, scheduling, chunk_size, reasked_at_most = KILL_CASES[case]
    llm.configure(latency_ms=20)
    source = _source(spark, tmp_path / "src", rows)
    dag_id = f"llmq_sigterm_{case}"
    path = DAGS_FOLDER / f"{dag_id}.py"
    path.write_text(
        KILL_DAG.format(
            operator=operator,
            dag_id=dag_id,
            source=source,
            out=tmp_path / "out",
            ckpt=tmp_path / "ckpt",
            chunk_size=chunk_size,
            scheduling=scheduling,
        )
    )
    env = {**child_airflow_env(tmp_path), **llmq_connection_env(llm)}
    proc = subprocess.Popen(
        [sys.executable, str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 180
    while llm.stats()["chat_requests"] < rows // 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    killed_at = time.monotonic()
    output, _ = proc.communicate(timeout=120)
    stopped_after = time.monotonic() - killed_at
    text = output.decode(errors="replace")
    assert proc.returncode == 3, text[-3000:]
    asked_first = llm.stats()["chat_requests"]
    assert asked_first < rows, "the first run was stopped before it finished"
    assert "llmq stopped" in text and "resumes" in text
    assert stopped_after < 30, f"the task ended {stopped_after:.1f} s after SIGTERM"

    proc2 = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, timeout=300)
    assert proc2.returncode == 0, proc2.stdout.decode(errors="replace")[-3000:]
    reasked = llm.stats()["chat_requests"] - rows
    print(
        f"{case}: first run asked {asked_first}, stopped {stopped_after:.1f} s after SIGTERM, "
        f"re-asked {reasked}"
    )
    assert reasked <= reasked_at_most, (asked_first, reasked)
    ids = [r["id"] for r in spark.read.parquet(str(tmp_path / "out")).collect()]
    assert sorted(ids) == list(range(rows))
