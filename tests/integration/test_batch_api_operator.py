"""LLMQueryBatchAPIOperator against the mock server over TLS, with local Spark and ``dag.test()``:
the same output as the rate-limited operator (deferred, resumed by dag.test's inline triggerer),
re-attaching after a kill (never a second batch), a batch expiring halfway, files split at the
request limit and a file refused for the enqueued-token quota, and cancel_on_kill."""

from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_provider_llmq.core.batch.batch_api import BatchApiClient
from airflow_provider_llmq.core.batch.batch_files import LineBuilder
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.operators.batch_api import LLMQueryBatchAPIOperator
from airflow_provider_llmq.operators.outcome import LLMQueryFailedRowsError
from airflow_provider_llmq.spark.placements import PlacementStopped
from airflow_provider_llmq.testing.mock_server.batch_lines import tokens
from tests.conftest import (
    DAGS_FOLDER,
    DEPLOYMENT,
    child_airflow_env,
    llmq_connection_env,
    make_endpoint,
    run_dag_file,
)
from tests.integration.test_batch_api_mock import BatchMock

DAG_HEAD = """
from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_provider_llmq.operators.batch_api import LLMQueryBatchAPIOperator
from airflow_provider_llmq.operators.llmq import LLMQueryRateLimitedOperator

with DAG(
    "{dag_id}",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    default_args={{"owner": "tests", "retries": {retries}, "retry_delay": timedelta(0)}},
    tags=["test"],
) as dag:
"""
RUN_MAIN = """
if __name__ == "__main__":
    import sys

    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    run = dag.test()
    with create_session() as session:
        ti = session.query(TaskInstance).filter_by(dag_id=dag.dag_id, run_id=run.run_id, task_id="ask").one()
        print("RUN", run.state, "TRIES", ti.try_number, flush=True)
    sys.exit(0 if run.state == "success" else 3)
"""
COMPARED = (
    "id",
    "prompt",
    "response",
    "llmq_status",
    "llmq_error_code",
    "llmq_error",
    "llmq_http_status",
    "llmq_attempts",
    "llmq_prompt_tokens",
    "llmq_completion_tokens",
    "llmq_finish_reason",
)


@pytest.fixture
def batch_mock(server: Any) -> Any:
    mock = BatchMock(server)
    mock.reset()
    mock.configure(validating_s=0.2, in_progress_s=0.5, finalizing_s=0.1)
    yield mock
    mock.reset()


def _connect(server: Any, monkeypatch: pytest.MonkeyPatch, api_type: str) -> dict[str, str]:
    env = llmq_connection_env(server, api_type=api_type)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def _write(spark: Any, path: Path, rows: list[tuple[int, str | None]]) -> str:
    spark.createDataFrame(rows, "id long, prompt string").write.mode("overwrite").parquet(str(path))
    return str(path)


def _rows(spark: Any, path: Path) -> list[dict[str, Any]]:
    return [row.asDict() for row in spark.read.parquet(str(path)).orderBy("id").collect()]


def _xcom(run: Any, task_id: str) -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = (
            session.query(XComModel)
            .filter_by(dag_id=run.dag_id, run_id=run.run_id, task_id=task_id, key="return_value")
            .one()
        )
        return XComModel.deserialize_value(row)


# slow (45 s for both forms, a Spark run each plus the live operator's): CI runs it after the default suite
@pytest.mark.slow
@pytest.mark.parametrize("api_type", ["azure", "openai"])
def test_the_same_table_as_the_rate_limited_operator(
    airflow_db: Path,
    spark: Any,
    server: Any,
    batch_mock: BatchMock,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    api_type: str,
) -> None:
    _connect(server, monkeypatch, api_type)
    rows: list[tuple[int, str | None]] = []
    for i in range(30):
        prompt = f"question {i % 24}?"  # six prompts asked twice: deduped, fanned out
        if i % 10 == 3:
            prompt += " [[content_filter]]"  # a 400 content_filter
        rows.append((i, prompt))
    rows += [(30, "tell me [[filtered]]"), (31, None)]  # a 200 finish_reason content_filter, no prompt
    source = _write(spark, tmp_path / "src", rows)
    dag_id = f"llmq_batch_equal_{api_type}"
    dag = (
        DAG_HEAD.format(dag_id=dag_id, retries=0)
        + f"""
    live = LLMQueryRateLimitedOperator(
        task_id="live", source_path="{source}", id_col="id", output_path="{tmp_path / "live"}",
        retry_backoff=0.001,
    )
    batch = LLMQueryBatchAPIOperator(
        task_id="batch", source_path="{source}", id_col="id", output_path="{tmp_path / "batch"}",
        poll_interval=0.2, max_requests_per_file=10,
    )
    live >> batch
"""
    )
    caplog.set_level(logging.INFO)
    run = run_dag_file(dag, dag_id)
    # dag.test() logs through structlog to stdout or through logging, as earlier tests set it up
    logs = capfd.readouterr().out + caplog.text
    assert run.state == "success"
    assert "llmq: deferring while batches" in logs and "running trigger in line" in logs

    live, batch = spark.read.parquet(str(tmp_path / "live")), spark.read.parquet(str(tmp_path / "batch"))
    assert batch.schema == live.schema
    live_rows, batch_rows = _rows(spark, tmp_path / "live"), _rows(spark, tmp_path / "batch")
    assert [{c: r[c] for c in COMPARED} for r in batch_rows] == [
        {c: r[c] for c in COMPARED} for r in live_rows
    ]
    codes = {r["id"]: r["llmq_error_code"] for r in batch_rows if r["llmq_status"] == "error"}
    assert codes == {
        3: "content_filter",
        13: "content_filter",
        23: "content_filter",
        30: "content_filter",
        31: "empty_prompt",
    }

    summary = _xcom(run, "batch")
    stats = batch_mock.stats()
    chat = server.stats()
    print(f"\n{api_type} equality: chat requests {chat['chat_requests']}, batch {stats}, summary {summary}")
    distinct = len({prompt for _, prompt in rows if prompt})  # deduped: one request per prompt
    assert chat["chat_requests"] == distinct  # the live run only: the batch run sent no chat request
    assert (stats["files_created"], stats["batches_created"], stats["lines_created"]) == (3, 3, distinct)
    assert stats["requests_per_batch"] == [10, 10, distinct - 20] and stats["files_live"] == 0  # deleted
    assert summary["rows"] == 32 and summary["ok"] == 27 and summary["requests_sent"] == distinct
    assert summary["batch_api"]["batch_states"] == {"completed": 3} and summary["batch_api"]["files"] == 3
    assert summary["resumed_requests"] == 0  # the deferral's resume is the same try, not a resume


def _kill_dag(dag_id: str, source: str, out: Path, ckpt: Path, retries: int, **arguments: Any) -> Path:
    args = "".join(f"        {name}={value!r},\n" for name, value in arguments.items())
    body = (
        DAG_HEAD.format(dag_id=dag_id, retries=retries)
        + f"""
    LLMQueryBatchAPIOperator(
        task_id="ask",
        source_path="{source}",
        id_col="id",
        output_path="{out}",
        checkpoint_dir="{ckpt}",
        checkpoint_key="fixed",
        poll_interval=0.2,
        max_requests_per_file=10,
{args}    )
"""
    )
    path = DAGS_FOLDER / f"{dag_id}.py"
    path.write_text(body + RUN_MAIN)
    return path


def _wait_for(condition: Any, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow  # 32 s: a task process started, killed and started again; CI runs it with the slow suite
def test_a_retry_after_a_kill_re_attaches_and_creates_no_batch(
    airflow_db: Path, spark: Any, server: Any, batch_mock: BatchMock, monkeypatch: Any, tmp_path: Path
) -> None:
    # polled in the task: SIGTERM stops the first try while its two batches run; the retry re-attaches
    env = {**child_airflow_env(tmp_path), **_connect(server, monkeypatch, "azure")}
    batch_mock.configure(in_progress_s=4.0)
    source = _write(spark, tmp_path / "src", [(i, f"question {i}?") for i in range(20)])
    path = _kill_dag(
        "llmq_batch_sigterm", source, tmp_path / "out", tmp_path / "ckpt", retries=1, deferrable=False
    )
    proc = subprocess.Popen(
        [sys.executable, str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    _wait_for(lambda: batch_mock.stats()["batches_created"] == 2, "the batches to be created")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=240)[0].decode(errors="replace")
    stats = batch_mock.stats()
    print(f"\nSIGTERM + retry: batch stats {stats}")
    assert proc.returncode == 0, output[-3000:]
    assert "RUN success TRIES 2" in output and "left running (cancel_on_kill=False)" in output
    assert (stats["batches_created"], stats["files_created"], stats["cancel_requests"]) == (2, 2, 0)
    assert server.stats()["chat_requests"] == 0
    out = _rows(spark, tmp_path / "out")
    assert [r["id"] for r in out] == list(range(20)) and {r["llmq_status"] for r in out} == {"ok"}


def test_a_rerun_with_the_same_key_re_attaches_to_the_batches_a_deferred_task_left(
    spark: Any, server: Any, batch_mock: BatchMock, monkeypatch: Any, tmp_path: Path
) -> None:
    # the task defers (its worker slot is freed), then its run is lost with the triggerer; a new run
    # given the same checkpoint_key finds the batches in the checkpoint and creates none
    from airflow.sdk.exceptions import TaskDeferred

    from airflow_provider_llmq.triggers.batch_api import LLMQueryBatchTrigger

    _connect(server, monkeypatch, "openai")
    batch_mock.configure(in_progress_s=1.5)
    args: dict[str, Any] = {
        "task_id": "ask",
        "source_path": _write(spark, tmp_path / "src", [(i, f"question {i}?") for i in range(20)]),
        "id_col": "id",
        "output_path": str(tmp_path / "out"),
        "checkpoint_key": "fixed",
        "poll_interval": 0.1,
        "max_requests_per_file": 10,
    }
    ti = SimpleNamespace(dag_id="d", task_id="ask", run_id="first", map_index=-1, try_number=1, max_tries=0)
    with pytest.raises(TaskDeferred) as deferred:
        LLMQueryBatchAPIOperator(**args).execute({"ti": ti})
    trigger = deferred.value.trigger
    assert isinstance(trigger, LLMQueryBatchTrigger) and deferred.value.method_name == "execute_complete"
    assert len(trigger.batch_ids) == 2 and batch_mock.stats()["batches_created"] == 2
    assert not (tmp_path / ".llmq_checkpoints" / "fixed" / "lease.json").exists()  # released to defer

    summary = LLMQueryBatchAPIOperator(**args).execute({})  # a new run: polls in the task
    stats = batch_mock.stats()
    print(f"\ndeferred, then a re-run with the same key: batch stats {stats}")
    assert (stats["batches_created"], stats["files_created"], stats["lines_created"]) == (2, 2, 20)
    assert sorted(summary["batch_api"]["batch_ids"]) == sorted(trigger.batch_ids)
    assert summary["ok"] == 20 and [r["id"] for r in _rows(spark, tmp_path / "out")] == list(range(20))


class _Killed(BaseException):
    """A try dying between the API's answer and the checkpoint's record of it."""


def test_a_try_killed_between_create_and_record_finds_its_batch_by_metadata(
    spark: Any, server: Any, batch_mock: BatchMock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _connect(server, monkeypatch, "openai")
    args: dict[str, Any] = {
        "task_id": "ask",
        "source_path": _write(spark, tmp_path / "src", [(i, f"question {i}?") for i in range(12)]),
        "id_col": "id",
        "output_path": str(tmp_path / "out"),
        "checkpoint_key": "orphan",
        "poll_interval": 0.1,
        "max_requests_per_file": 6,
    }
    real_create = BatchApiClient.create_batch
    created: list[str] = []

    def create_then_die(self: BatchApiClient, input_file_id: str, metadata: Any) -> Any:
        info = real_create(self, input_file_id, metadata)
        created.append(info.id)
        raise _Killed

    monkeypatch.setattr(BatchApiClient, "create_batch", create_then_die)
    with pytest.raises(_Killed):
        LLMQueryBatchAPIOperator(**args).execute({})
    monkeypatch.setattr(BatchApiClient, "create_batch", real_create)
    summary = LLMQueryBatchAPIOperator(**args).execute({})
    stats = batch_mock.stats()
    print(f"\nkilled between create and record: batch stats {stats}")
    assert stats["batches_created"] == 2  # the orphan, adopted, and the second file's batch
    assert created[0] in summary["batch_api"]["batch_ids"] and summary["ok"] == 12
    assert stats["routes"]["GET /v1/batches"] == 1  # the one listing that found the orphan


EXPIRING = {"validating_s": 0.1, "in_progress_s": 0.0, "line_s": 0.05, "completion_window_s": 0.725}


@pytest.mark.slow  # over 7 s: CI's slow step runs it
def test_a_batch_that_expires_halfway_keeps_its_answers_and_the_next_try_asks_the_rest(
    airflow_db: Path, spark: Any, server: Any, batch_mock: BatchMock, monkeypatch: Any, tmp_path: Path
) -> None:
    # 20 lines at 0.05 s after 0.1 s of validation: the window closes after 12.5 lines; the
    # retry's 8 lines take 0.4 s and fit
    _connect(server, monkeypatch, "openai")
    batch_mock.configure(**EXPIRING)
    source = _write(spark, tmp_path / "src", [(i, f"question {i}?") for i in range(20)])
    dag_id = "llmq_batch_expiry"
    dag = (
        DAG_HEAD.format(dag_id=dag_id, retries=1)
        + f"""
    LLMQueryBatchAPIOperator(
        task_id="ask", source_path="{source}", id_col="id", output_path="{tmp_path / "out"}",
        poll_interval=0.1,
    )
"""
    )
    run = run_dag_file(dag, dag_id)
    stats = batch_mock.stats()
    print(f"\nexpiry halfway: batch stats {stats}, summary {_xcom(run, 'ask')}")
    assert run.state == "success"
    assert stats["requests_per_batch"] == [20, 8]  # the retry asked only the 8 the first batch never ran
    assert stats["batches_by_status"] == {"expired": 1, "completed": 1} and stats["lines_answered"] == 20
    out = _rows(spark, tmp_path / "out")
    assert len(out) == 20 and {r["llmq_status"] for r in out} == {"ok"}


def test_the_last_try_records_what_never_ran_as_batch_expired(
    spark: Any, server: Any, batch_mock: BatchMock, monkeypatch: Any, tmp_path: Path
) -> None:
    _connect(server, monkeypatch, "azure")
    batch_mock.configure(**EXPIRING)
    summary = LLMQueryBatchAPIOperator(
        task_id="ask",
        source_path=_write(spark, tmp_path / "src", [(i, f"question {i}?") for i in range(20)]),
        id_col="id",
        output_path=str(tmp_path / "out"),
        poll_interval=0.1,
    ).execute({})  # outside Airflow the call is the whole run: its only try is the last
    out = _rows(spark, tmp_path / "out")
    assert [r["id"] for r in out] == list(range(20))
    assert sorted(r["llmq_status"] for r in out) == ["error"] * 8 + ["ok"] * 12  # 12.5 lines in the window
    expired = [r for r in out if r["llmq_status"] == "error"]
    assert {r["llmq_error_code"] for r in expired} == {"batch_expired"} and expired[0]["llmq_attempts"] == 0
    assert summary["errors_by_code"] == {"batch_expired": 8} and summary["requests_sent"] == 12
    assert batch_mock.stats()["requests_per_batch"] == [20]


def test_files_split_at_the_request_limit_and_a_quota_refused_file_waits(
    airflow_db: Path, spark: Any, server: Any, batch_mock: BatchMock, monkeypatch: Any, tmp_path: Path
) -> None:
    _connect(server, monkeypatch, "azure")
    prompts = [f"question {i:02d}?" for i in range(30)]  # all the same length: files of equal tokens
    line = LineBuilder(
        QueryOptions().chat_request(make_endpoint(server, "azure")), "/chat/completions", DEPLOYMENT
    )
    per_file = 10 * tokens(json.loads(line.line("k", prompts[0]))["body"])
    batch_mock.configure(enqueued_token_limit=2 * per_file + 1, validating_s=0.1, in_progress_s=0.5)
    source = _write(spark, tmp_path / "src", list(enumerate(prompts)))
    dag_id = "llmq_batch_quota"
    dag = (
        DAG_HEAD.format(dag_id=dag_id, retries=0)
        + f"""
    LLMQueryBatchAPIOperator(
        task_id="ask", source_path="{source}", id_col="id", output_path="{tmp_path / "out"}",
        poll_interval=0.1, max_requests_per_file=10,
    )
"""
    )
    run = run_dag_file(dag, dag_id)
    stats, summary = batch_mock.stats(), _xcom(run, "ask")
    print(f"\nsplit + quota: batch stats {stats}, summary {summary}")
    assert run.state == "success"
    assert stats["files_created"] == 3 and stats["requests_per_batch"] == [10, 10, 10, 10]
    assert (stats["batches_created"], stats["token_limit_refusals"]) == (4, 1)
    assert summary["batch_api"]["quota_refusals"] == 1
    assert summary["batch_api"]["batch_states"] == {"completed": 3, "failed": 1}
    assert summary["ok"] == 30 and math.isclose(summary["requests_sent"], 30)


@pytest.mark.parametrize("cancel_on_kill", [True, False])
def test_on_kill_cancels_the_live_batches_only_when_asked(
    spark: Any, server: Any, batch_mock: BatchMock, monkeypatch: Any, tmp_path: Path, cancel_on_kill: bool
) -> None:
    _connect(server, monkeypatch, "openai")
    batch_mock.configure(in_progress_s=5.0)
    args: dict[str, Any] = {
        "task_id": "ask",
        "source_path": _write(spark, tmp_path / "src", [(i, f"question {i}?") for i in range(10)]),
        "id_col": "id",
        "output_path": str(tmp_path / "out"),
        "checkpoint_key": "kill",
        "poll_interval": 0.1,
        "max_requests_per_file": 5,
        "deferrable": False,
        "cancel_on_kill": cancel_on_kill,
    }
    operator = LLMQueryBatchAPIOperator(**args)
    raised: list[BaseException] = []

    def run() -> None:
        try:
            operator.execute({})
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    _wait_for(lambda: batch_mock.stats()["batches_created"] == 2, "the batches to be created")
    operator.on_kill()
    thread.join(timeout=60)
    assert len(raised) == 1 and isinstance(raised[0], PlacementStopped)
    stats = batch_mock.stats()
    assert stats["cancel_requests"] == (2 if cancel_on_kill else 0)
    if cancel_on_kill:  # what a cancelled batch never ran is recorded by the last try...
        with pytest.raises(LLMQueryFailedRowsError, match=r"none of the 10 rows asked.*batch_cancelled"):
            LLMQueryBatchAPIOperator(**args).execute({})  # ...which answered nothing: not green
        assert batch_mock.stats()["batches_by_status"] == {"cancelled": 2}
    else:
        assert stats["batches_by_status"] == {"in_progress": 2} or "validating" in stats["batches_by_status"]
    assert batch_mock.stats()["batches_created"] == 2


@pytest.mark.parametrize(
    "setting", [{"max_cost": 1.0}, {"max_total_tokens": 1000}, {"repair_invalid_output": True}]
)
def test_a_repair_or_a_budget_without_a_completion_count_is_refused_for_a_batch(
    setting: dict[str, Any],
) -> None:
    # a batch cannot be stopped once created: a budget needs max_tokens or expected_completion_tokens
    from airflow_provider_llmq.core.errors import LLMQueryConfigError
    from airflow_provider_llmq.operators.batch_api import LLMQueryBatchAPIOperator

    op = LLMQueryBatchAPIOperator(task_id="batch", source_path="/x", output_path="/y", **setting)
    with pytest.raises(LLMQueryConfigError, match=next(iter(setting))):
        op._placement()
