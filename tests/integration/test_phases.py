"""The task's own summary says where its time went: every phase of ``execute``, adding up to its
wall time, with the driver's checkpoint flushes apart from asking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmq.operators.llmq import LLMQueryRateLimitedOperator
from tests.conftest import llmq_connection_env

ROWS = 3000


def test_the_phases_are_in_the_summary_and_add_up_to_the_wall_time(
    server: Any, spark: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in llmq_connection_env(server).items():
        monkeypatch.setenv(name, value)
    server.configure(latency_ms=2)
    source = str(tmp_path / "src")
    rows = [(i, f"phase row {i}") for i in range(ROWS)]
    spark.createDataFrame(rows, "id long, prompt string").write.parquet(source)
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
