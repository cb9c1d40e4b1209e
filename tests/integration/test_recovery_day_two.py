"""A few thousand rows: a killed task's next try asks again at most what was in flight plus one
flush, and a day two with the cross-run cache asks only the new rows (counted by the mock server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmq.operators.llmq import LLMQueryRateLimitedOperator
from airflow_provider_llmq.testing.mock_server import expected_answer
from airflow_provider_llmq.testing.mock_server.faults import prompt_hash
from tests.conftest import DEPLOYMENT, llmq_connection_env
from tests.slow.run_operator import kill_midway, start, summary

SYSTEM = "You are a helpful assistant."


def _write(spark: Any, path: Path, rows: int, new: int = 0) -> str:
    prompts = [(i, f"day row {i}" if i < rows else f"new row {i}") for i in range(rows + new)]
    spark.createDataFrame(prompts, "id long, prompt string").repartition(2).write.parquet(str(path))
    return str(path)


def _task(spark: Any, tmp_path: Path, rows: int, **kwargs: Any) -> dict[str, Any]:
    """The rate-limited operator on ``rows`` new rows, as :mod:`tests.slow.run_operator` runs it."""
    paths = {"output_path": str(tmp_path / "out"), "checkpoint_dir": str(tmp_path / "ckpt")}
    source = _write(spark, tmp_path / "src", rows)
    kwargs = {"source_path": source, "id_col": "id", **paths, "checkpoint_key": "dag/task/run", **kwargs}
    return {"operator": "LLMQueryRateLimitedOperator", "kwargs": kwargs}


@pytest.mark.slow  # two operator runs of 3000 rows: 30-90 s on a loaded 2-core machine
def test_day_two_with_the_cache_asks_only_the_new_rows(
    server: Any, spark: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in llmq_connection_env(server).items():
        monkeypatch.setenv(name, value)
    server.configure(latency_ms=1)
    rows, new = 3000, 30
    cache = str(tmp_path / "cache")

    def run(source: str, key: str) -> dict[str, Any]:
        return LLMQueryRateLimitedOperator(
            task_id="ask",
            source_path=source,
            id_col="id",
            output_path=str(tmp_path / f"out-{key}"),
            checkpoint_dir=str(tmp_path / "ckpt"),
            checkpoint_key=key,
            cache_path=cache,
            chunk_size=1000,
            max_concurrency=32,
        ).execute({})

    first = run(_write(spark, tmp_path / "day1", rows), "day1")
    assert first["requests_sent"] == rows and server.stats()["chat_requests"] == rows
    second = run(_write(spark, tmp_path / "day2", rows, new), "day2")
    assert second["rows"] == rows + new and second["ok"] == rows + new
    assert second["cache_hits"] == rows and second["requests_sent"] == new
    assert server.stats()["chat_requests"] == rows + new  # only the new rows reached the server
    assert second["phases"]["cache"] > 0  # the day's time for the copy, reported as its own phase
    out = spark.read.parquet(str(tmp_path / "out-day2")).collect()
    assert sorted(r["id"] for r in out) == list(range(rows + new))
    assert sum(r["llmq_cached"] for r in out) == rows
    assert all(r["response"] == expected_answer(DEPLOYMENT, SYSTEM, r["prompt"], None) for r in out)


@pytest.mark.slow  # two task processes, each starting its own Spark (about 40 s)
def test_resume_after_a_kill_asks_again_at_most_the_rows_in_flight_plus_one_flush(
    server: Any, spark: Any, tmp_path: Path
) -> None:
    rows, chunk_size, concurrency = 4000, 200, 16
    server.configure(latency_ms=20)  # about 800 rows/s: the kill lands in the middle of asking
    spec = _task(spark, tmp_path, rows, chunk_size=chunk_size, max_concurrency=concurrency)
    env = llmq_connection_env(server)
    kill_midway(start(spec, env), lambda: server.stats()["chat_requests"] >= rows * 6 // 10)
    found = summary(start(spec, env), timeout=600)
    assert found["rows"] == rows and found["ok"] == rows
    asked_again = server.stats()["chat_requests"] - rows
    assert 0 <= asked_again <= concurrency + chunk_size, asked_again
    written = spark.read.parquet(str(tmp_path / "out")).collect()
    assert sorted(r["id"] for r in written) == list(range(rows))


@pytest.mark.slow  # two task processes, each starting its own Spark (about 40 s)
def test_a_packed_run_killed_midway_pays_again_at_most_the_rows_in_flight(
    server: Any, spark: Any, tmp_path: Path
) -> None:
    rows, chunk_size, concurrency, per_request = 4000, 200, 16, 8
    server.configure(latency_ms=200)  # 500 packs, about 6 s of asking: the kill lands midway
    options = {"chunk_size": chunk_size, "max_concurrency": concurrency, "rows_per_request": per_request}
    spec = _task(spark, tmp_path, rows, **options)
    packs = rows // per_request
    env = llmq_connection_env(server)
    kill_midway(start(spec, env), lambda: server.stats()["chat_requests"] >= packs // 2)
    assert server.stats()["chat_requests"] < packs  # killed with rows left to ask
    found = summary(start(spec, env), timeout=600)
    assert found["rows"] == rows and found["ok"] == rows
    written = spark.read.parquet(str(tmp_path / "out")).collect()
    assert sorted(r["id"] for r in written) == list(range(rows))
    assert all(r["response"] == expected_answer(DEPLOYMENT, SYSTEM, r["prompt"], None) for r in written)
    # each row's requests as the server counted them, alone or as an item of a pack
    asked = server.stats()["requests_per_prompt"]
    times = [asked.get(prompt_hash(r["prompt"]), 0) for r in written]
    assert min(times) == 1 and max(times) <= 2, (min(times), max(times))
    paid_again = sum(n - 1 for n in times)
    assert paid_again <= chunk_size + concurrency * per_request, paid_again
