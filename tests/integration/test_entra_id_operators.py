"""Entra ID through the operators, with ``dag.test()`` and local Spark: a wrong secret fails the task
in one try naming the credential; the rate-limited and the Batch API operators (its deferral and
trigger included) run on tokens that expire during the run, and no token reaches a log, a row, the
checkpoint or XCom."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from airflow_provider_llmq.testing.mock_server import MockServer
from airflow_provider_llmq.testing.token_authority import TokenAuthority
from tests.conftest import run_dag_file
from tests.integration import test_entra_id as entra
from tests.integration.test_batch_api_mock import BatchMock, _submit
from tests.integration.test_batch_api_operator import DAG_HEAD  # the same DAG file head
from tests.integration.test_entra_id import SECRET, TENANT, entra_connection, service_principal

# the authority fixtures of test_entra_id, shared
token_authority, authority = entra.token_authority, entra.authority

pytestmark = pytest.mark.timeout(600)


def _connect(monkeypatch: pytest.MonkeyPatch, server: MockServer, **entra: str) -> None:
    for name, value in entra_connection(server, **entra).items():
        monkeypatch.setenv(name, value)


def _source(spark: Any, path: Path, rows: int) -> str:
    data = [(i, f"entra question {i}?") for i in range(rows)]
    spark.createDataFrame(data, "id long, prompt string").write.parquet(str(path))
    return str(path)


def _tries(run: Any, task_id: str) -> int:
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        query = session.query(TaskInstance).filter_by(dag_id=run.dag_id, run_id=run.run_id, task_id=task_id)
        return int(query.one().try_number)


def _files_text(folder: Path) -> str:
    """Every byte under ``folder`` as text, parquet files as their values (they are compressed)."""
    parts = []
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        if path.suffix == ".parquet" or path.name.startswith("part-"):
            try:
                parts.append(str(pq.read_table(path).to_pylist()))
                continue
            except Exception:
                pass
        parts.append(path.read_bytes().decode(errors="replace"))
    return "\n".join(parts)


def test_a_wrong_secret_fails_the_task_in_one_try_naming_the_credential(
    airflow_db: Path,
    spark: Any,
    server: MockServer,
    authority: TokenAuthority,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = "wrong-secret-dag-5e1f"
    _connect(monkeypatch, server, **service_principal(authority, secret=wrong))
    source = _source(spark, tmp_path / "src", 20)
    dag = DAG_HEAD.format(dag_id="llmq_entra_wrong_secret", retries=2) + (
        f'    LLMQueryRateLimitedOperator(task_id="ask", source_path="{source}", id_col="id", '
        f'output_path="{tmp_path / "out"}")\n'
    )
    caplog.set_level(logging.INFO)
    run = run_dag_file(dag, "llmq_entra_wrong_secret")
    logs = capfd.readouterr().out + caplog.text
    assert run.state == "failed"
    assert _tries(run, "ask") == 1, "a wrong secret is not retried"
    assert f"ClientSecretCredential for tenant {TENANT}" in logs and "AADSTS7000215" in logs
    assert wrong not in logs
    assert authority.stats()["refused"] == 1  # the authority was asked once, not per row or per try
    assert server.stats()["chat_requests"] == 0


def test_the_batch_trigger_polls_with_a_refreshed_token(
    server: MockServer, authority: TokenAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_provider_llmq.core.batch.batch_api import BatchApiClient
    from airflow_provider_llmq.hooks.llmq import LLMQueryHook
    from airflow_provider_llmq.triggers.batch_api import LLMQueryBatchTrigger

    authority.configure(lifetime=2)
    batch = BatchMock(server)
    batch.reset()
    batch.configure(validating_s=0.2, in_progress_s=3.0, finalizing_s=0.1)  # longer than a token lives
    _connect(monkeypatch, server, **service_principal(authority))
    with BatchApiClient(LLMQueryHook().endpoint) as client:
        info = _submit(client, {"a": "entra batch question?"})
    trigger = LLMQueryBatchTrigger(llm_conn_id="llmq_default", batch_ids=[info.id], poll_interval=0.2)

    async def first_event() -> Any:
        async for event in trigger.run():
            return event

    event = asyncio.run(first_event())
    batch.reset()
    assert event.payload == {"status": "ready", "batches": {info.id: "completed"}}
    assert authority.stats()["token_requests"] >= 2  # the trigger's polls outlived the first token
    assert server.stats()["expired_tokens"] == 0  # replaced before it expired


@pytest.mark.slow
def test_the_live_and_batch_api_operators_run_on_expiring_tokens(
    airflow_db: Path,
    spark: Any,
    server: MockServer,
    authority: TokenAuthority,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    authority.configure(lifetime=3)
    batch = BatchMock(server)
    batch.reset()
    # the batch runs longer than a token lives: the trigger's polls need a fresh one
    batch.configure(validating_s=0.2, in_progress_s=4.0, finalizing_s=0.1)
    _connect(monkeypatch, server, **service_principal(authority))
    source = _source(spark, tmp_path / "src", 40)
    out = tmp_path / "out"
    dag = DAG_HEAD.format(dag_id="llmq_entra_operators", retries=0) + (
        f'    live = LLMQueryRateLimitedOperator(task_id="live", source_path="{source}", id_col="id", '
        f'output_path="{out}/live", checkpoint_dir="{out}/ckpt", keep_checkpoint=True)\n'
        f'    batch = LLMQueryBatchAPIOperator(task_id="batch", source_path="{source}", id_col="id", '
        f'output_path="{out}/batch", checkpoint_dir="{out}/ckpt", keep_checkpoint=True, poll_interval=0.2)\n'
        "    live >> batch\n"
    )
    caplog.set_level(logging.DEBUG)
    run = run_dag_file(dag, "llmq_entra_operators")
    logs = capfd.readouterr().out + caplog.text
    batch.reset()
    assert run.state == "success", logs[-3000:]
    assert "running trigger in line" in logs  # the Batch API task deferred and its trigger polled
    for task in ("live", "batch"):
        rows = pq.read_table(out / task).to_pylist()
        assert sorted(r["id"] for r in rows) == list(range(40)) and {r["llmq_status"] for r in rows} == {"ok"}
    stats = server.stats()
    assert (
        stats["bearer_tokens"] >= 40 and stats["requests_by_status"].get("401", 0) == stats["expired_tokens"]
    )
    assert authority.stats()["token_requests"] >= 2, "the tokens expired during the run"
    issued = list(authority.issued)
    text = logs + _files_text(tmp_path) + _xcoms(run)
    assert not [value for value in (SECRET, *issued) if value in text]


def _xcoms(run: Any) -> str:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(XComModel).filter_by(dag_id=run.dag_id, run_id=run.run_id).all()
        return " ".join(str(XComModel.deserialize_value(row)) for row in rows)
