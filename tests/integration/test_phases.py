"""The task's own summary says where its time went: every phase of ``execute``, adding up to its
wall time, with the driver's checkpoint flushes apart from asking, and on the Batch API its request
files, uploads and collection apart from the wait for its batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmq.operators.batch_api import LLMQueryBatchAPIOperator
from airflow_provider_llmq.operators.llmq import LLMQueryRateLimitedOperator
from tests.conftest import llmq_connection_env
from tests.integration.test_batch_api_mock import BatchMock

ROWS = 3000


def _source(spark: Any, tmp_path: Path, rows: int, server: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """``rows`` prompts as a Parquet source, with the connection to the mock in the environment."""
    for name, value in llmq_connection_env(server).items():
        monkeypatch.setenv(name, value)
    source = str(tmp_path / "src")
    prompts = [(i, f"phase row {i}") for i in range(rows)]
    spark.createDataFrame(prompts, "id long, prompt string").write.parquet(source)
    return source


def test_the_phases_are_in_the_summary_and_add_up_to_the_wall_time(
    server: Any, spark: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.configure(latency_ms=2)
    source = _source(spark, tmp_path, ROWS, server, monkeypatch)
    summary = LLMQueryRateLimitedOperator(
        task_id="phases",
        source_path=source,
        id_col="id",
        output_path=str(tmp_path / "out"),
        checkpoint_dir=str(tmp_path / "ckpt"),
        chunk_size=500,
        max_concurrency=32,
    ).execute({})

    assert summary["rows"] == ROWS and summary["ok"] == ROWS
    phases = summary["phases"]
    expected = {"spark_start", "materialize", "plan", "ask", "flush", "write", "summary", "other"}
    assert set(phases) == expected, phases
    assert all(seconds >= 0 for seconds in phases.values()), phases
    assert phases["ask"] > 0 and phases["flush"] > 0 and phases["write"] > 0, phases
    named = sum(seconds for name, seconds in phases.items() if name != "other")
    assert abs(named - summary["seconds"]) <= 0.05 * summary["seconds"], (named, summary["seconds"])
    # the flushes are taken out of asking, never counted twice
    assert phases["ask"] + phases["flush"] <= summary["query_seconds"] + 0.01, (phases, summary)


def test_the_batch_api_times_its_files_uploads_and_collection_apart_from_waiting(
    server: Any,
    spark: Any,
    batches: BatchMock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = _source(spark, tmp_path, 300, server, monkeypatch)
    summary = LLMQueryBatchAPIOperator(
        task_id="batch_phases",
        source_path=source,
        id_col="id",
        output_path=str(tmp_path / "out"),
        checkpoint_dir=str(tmp_path / "ckpt"),
        max_requests_per_file=100,
        poll_interval=0.1,
        deferrable=False,
    ).execute({})

    assert summary["rows"] == 300 and summary["ok"] == 300
    phases = summary["phases"]
    for name in ("request_files", "upload", "collect", "ask", "write"):
        assert phases.get(name, 0) > 0, (name, phases)
    # the batches take at least 0.7 s each: that wait is asking; writing files and reading answers is not
    assert phases["ask"] >= 0.7, phases
    named = sum(seconds for name, seconds in phases.items() if name != "other")
    assert abs(named - summary["seconds"]) <= 0.05 * summary["seconds"], (named, summary["seconds"])
    assert batches.stats()["batches_created"] == 3
