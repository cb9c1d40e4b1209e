"""Scale tests (minutes each): a SIGKILLed task resumes, a fault soak, driver memory.

Run with ``make test-slow`` (``pytest -m slow``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmq.operators.llmq import (
    LLMQueryAsyncBatchOperator,
    LLMQueryRateLimitedOperator,
    LLMQueryThreadPoolOperator,
    LLMQueryUDFOperator,
)
from airflow_provider_llmq.testing.mock_server import expected_answer, planned_fault
from tests.conftest import DEPLOYMENT, llmq_connection_env
from tests.slow.run_operator import kill_midway, start, summary

pytestmark = pytest.mark.slow
SYSTEM = "You are a helpful assistant."


@pytest.mark.parametrize(
    ("operator", "extra"),
    [
        ("LLMQueryRateLimitedOperator", {"max_concurrency": 16}),
        ("LLMQueryUDFOperator", {"num_partitions": 2}),
    ],
)
def test_sigkill_midway_then_resume_asks_each_row_once(
    operator: str, extra: dict[str, Any], spark: Any, server: Any, tmp_path: Path
) -> None:
    rows, chunk_size, concurrency = 20_000, 500, 16
    server.configure(latency_ms=2)
    source = tmp_path / "src"
    spark.createDataFrame(
        [(i, f"kill test prompt {i}") for i in range(rows)], "id int, prompt string"
    ).write.parquet(str(source))
    spec = {
        "operator": operator,
        "kwargs": {
            "source_path": str(source),
            "id_col": "id",
            "output_path": str(tmp_path / "out"),
            "checkpoint_dir": str(tmp_path / "ckpt"),
            "checkpoint_key": "dag/task/run_1",
            "chunk_size": chunk_size,
            **extra,
        },
    }
    env = llmq_connection_env(server)
    kill_midway(start(spec, env), lambda: server.stats()["requests_by_status"].get("200", 0) >= rows // 2)
    answered_before_kill = server.stats()["requests_by_status"]["200"]
    second = summary(start(spec, env), timeout=900)
    assert second["rows"] == rows and second["ok"] == rows
    out = spark.read.parquet(str(tmp_path / "out")).collect()
    assert len(out) == rows and len({r["id"] for r in out}) == rows
    assert all(r["response"] == expected_answer(DEPLOYMENT, SYSTEM, r["prompt"], None) for r in out)
    asked_again = server.stats()["chat_requests"] - rows
    assert 0 <= asked_again <= chunk_size + concurrency, (asked_again, answered_before_kill)
    assert second["resumed_requests"] >= answered_before_kill - chunk_size - concurrency


@pytest.mark.parametrize(
    "cls",
    [
        LLMQueryUDFOperator,
        LLMQueryAsyncBatchOperator,
        LLMQueryRateLimitedOperator,
        LLMQueryThreadPoolOperator,
    ],
)
def test_fault_soak_every_row_once_and_correct(
    cls: type, spark: Any, server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in llmq_connection_env(server).items():
        monkeypatch.setenv(name, value)
    rows = 20_000
    server.configure(
        fault_rate=0.10,
        fault_kinds=["500", "429", "reset", "malformed", "503"],
        content_filter_rate=0.002,
        slow_rate=0.02,
        slow_ms=30,
        rps=1500,
        retry_after_ms=20,
        seed=11,
    )
    source = tmp_path / "src"
    spark.createDataFrame(
        [(i, f"soak prompt {i}") for i in range(rows)], "id int, prompt string"
    ).write.parquet(str(source))
    summary = cls(
        task_id="soak",
        source_path=str(source),
        id_col="id",
        output_path=str(tmp_path / "out"),
        checkpoint_key="soak",
        retry_backoff=0.01,
        max_retries=8,
        # correctness under faults, not the rate: random (non-quota) 429s and 503s at a few % of
        # requests drive the adaptive rate down to ~20/s (README: when to set adaptive=False)
        adaptive=False,
    ).execute({})
    out = spark.read.parquet(str(tmp_path / "out")).collect()
    assert len(out) == rows and len({r["id"] for r in out}) == rows
    config = server.config
    for row in out:
        if planned_fault(row["prompt"], config) == "content_filter":
            assert row["llmq_error_code"] == "content_filter"
        else:
            assert row["llmq_status"] == "ok", row
            assert row["response"] == expected_answer(DEPLOYMENT, SYSTEM, row["prompt"], None)
    assert summary["requests_sent"] == server.stats()["chat_requests"]


def test_dedupe_ten_thousand_rows_send_one_thousand_requests(
    spark: Any, server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in llmq_connection_env(server).items():
        monkeypatch.setenv(name, value)
    source = tmp_path / "src"
    spark.createDataFrame(
        [(i, f"distinct prompt {i % 1000}") for i in range(10_000)], "id int, prompt string"
    ).write.parquet(str(source))
    summary = LLMQueryRateLimitedOperator(
        task_id="dedupe",
        source_path=str(source),
        id_col="id",
        output_path=str(tmp_path / "out"),
        checkpoint_key="d",
    ).execute({})
    assert server.stats()["chat_requests"] == 1000 and summary["requests_sent"] == 1000
    out = spark.read.parquet(str(tmp_path / "out")).collect()
    assert len(out) == 10_000
    by_prompt: dict[str, set[str]] = {}
    for row in out:
        by_prompt.setdefault(row["prompt"], set()).add(row["response"])
    assert len(by_prompt) == 1000 and all(len(answers) == 1 for answers in by_prompt.values())
    assert summary["prompt_tokens"] == server.stats()["prompt_tokens_total"]


def test_driver_memory_stays_bounded_over_100k_prompts(spark: Any, server: Any, tmp_path: Path) -> None:
    # 100,000 prompts of about 1 KB: holding them, or their results, would be 100 MB and more, twice
    # the bound (200,000 took 5 of CI's minutes under tracemalloc)
    rows = 100_000
    source = tmp_path / "src"
    filler = "lorem " * 165  # about 1 KB per prompt
    frame = spark.range(rows).selectExpr("id", f"concat('prompt ', id, ' {filler}') as prompt")
    frame.write.parquet(str(source))
    spec = {
        "operator": "LLMQueryRateLimitedOperator",
        "tracemalloc": True,
        "kwargs": {
            "source_path": str(source),
            "id_col": "id",
            "output_path": str(tmp_path / "out"),
            "checkpoint_key": "memory",
            "chunk_size": 1000,
            "max_concurrency": 64,
            "progress_interval": 10,
        },
    }
    found = summary(start(spec, llmq_connection_env(server)), timeout=1800)
    assert found["rows"] == rows and found["ok"] == rows
    assert found["tracemalloc_peak_bytes"] < 50 * 1024 * 1024, found["tracemalloc_peak_bytes"]
