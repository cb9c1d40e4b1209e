"""The Batch API inside the promises the live operators keep, against the mock server over TLS:
rows carry the tokens and cost the batch output billed (cached prompt tokens at the cached rate,
live rows too), a budget that no batch passes (also across a kill and the retry that re-attaches),
``estimate_only`` sending nothing, and a request file larger than the whole enqueued-token quota
split until every row is answered once."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_provider_llmq.core.batch.batch_files import LineBuilder
from airflow_provider_llmq.core.methods import query_thread_pool
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.operators.batch_api import LLMQueryBatchAPIOperator
from airflow_provider_llmq.testing.mock_server.batch_lines import tokens
from tests.conftest import DEPLOYMENT, child_airflow_env, make_endpoint
from tests.integration.test_batch_api_mock import BatchMock
from tests.integration.test_batch_api_operator import _connect, _kill_dag, _rows, _wait_for, _write

PRICE = {"input": 2.0, "output": 8.0, "cached_input": 0.5}  # per million tokens
LONG_SYSTEM = "You answer questions about the product catalogue. " * 200  # over 1,024 cached tokens


@pytest.fixture
def batch_mock(server: Any) -> Any:
    mock = BatchMock(server)
    mock.reset()
    mock.configure(validating_s=0.1, in_progress_s=0.3, finalizing_s=0.05)
    yield mock
    mock.reset()


def _batch_operator(tmp_path: Path, source: str, **arguments: Any) -> LLMQueryBatchAPIOperator:
    return LLMQueryBatchAPIOperator(
        task_id="ask",
        source_path=source,
        id_col="id",
        output_path=str(tmp_path / "out"),
        checkpoint_dir=str(tmp_path / "ckpt"),
        poll_interval=0.1,
        deferrable=False,
        **arguments,
    )


def _cost(prompt: int, completion: int, cached: int) -> float:
    return (
        (prompt - cached) * PRICE["input"] + cached * PRICE["cached_input"] + completion * PRICE["output"]
    ) / 1e6


@pytest.mark.slow  # over 7 s: CI's slow step runs it
def test_batch_rows_carry_what_the_batch_billed_and_cached_tokens_are_priced(
    spark: Any, server: Any, batch_mock: BatchMock, monkeypatch: Any, tmp_path: Path
) -> None:
    _connect(server, monkeypatch, "openai")
    source = _write(spark, tmp_path / "src", [(i, f"question {i}?") for i in range(12)])
    summary = _batch_operator(
        tmp_path, source, system_prompt=LONG_SYSTEM, prices={DEPLOYMENT: PRICE}, max_requests_per_file=5
    ).execute({})
    stats = batch_mock.stats()
    rows = _rows(spark, tmp_path / "out")
    print(f"\nbatch usage: stats {stats}, summary {summary}")
    billed_prompt, billed_completion = stats["prompt_tokens_billed"], stats["completion_tokens_billed"]
    cached = stats["cached_tokens_billed"]
    assert cached >= 1024 * 12 and cached % 12 == 0  # every line reported its cached prefix
    assert {r["llmq_status"] for r in rows} == {"ok"} and all(r["llmq_prompt_tokens"] > 1024 for r in rows)
    assert sum(r["llmq_prompt_tokens"] for r in rows) == billed_prompt == summary["prompt_tokens"]
    assert sum(r["llmq_completion_tokens"] for r in rows) == billed_completion == summary["completion_tokens"]
    for row in rows:  # each row at its own usage, its cached share at the cached rate
        expected = _cost(row["llmq_prompt_tokens"], row["llmq_completion_tokens"], cached // 12)
        assert math.isclose(row["llmq_cost"], expected, rel_tol=1e-9)
    assert math.isclose(summary["cost"], _cost(billed_prompt, billed_completion, cached), rel_tol=1e-6)
    assert summary["cost"] < _cost(billed_prompt, billed_completion, 0)  # cheaper than uncached
    assert summary["batch_api"]["billed_tokens"] == billed_prompt + billed_completion


def test_live_rows_price_cached_prompt_tokens_at_the_cached_rate(server: Any) -> None:
    before = server.stats()
    results = list(
        query_thread_pool(
            make_endpoint(server, "openai"),
            [(i, f"question {i}?") for i in range(6)],
            system_prompt=LONG_SYSTEM,
            prices={DEPLOYMENT: PRICE},
            max_workers=3,
        )
    )
    after = server.stats()
    cached = after["cached_tokens_total"] - before["cached_tokens_total"]
    assert cached >= 6 * 1024 and all(r.ok for r in results)
    assert sum(r.cached_prompt_tokens or 0 for r in results) == cached
    for r in results:
        assert r.prompt_tokens and r.completion_tokens and r.cost is not None
        assert math.isclose(r.cost, _cost(r.prompt_tokens, r.completion_tokens, cached // 6), rel_tol=1e-9)


def test_estimate_only_counts_the_batch_and_sends_nothing(
    spark: Any, server: Any, batch_mock: BatchMock, monkeypatch: Any, tmp_path: Path
) -> None:
    _connect(server, monkeypatch, "azure")
    source = _write(spark, tmp_path / "src", [(i, f"question {i}?") for i in range(8)] + [(8, None)])
    summary = _batch_operator(
        tmp_path, source, estimate_only=True, request_params={"max_tokens": 20}, prices={DEPLOYMENT: PRICE}
    ).execute({})
    stats = batch_mock.stats()
    assert summary["estimate_only"] and summary["requests"] == 8
    assert summary["completion_tokens"] == 8 * 20 and summary["prompt_tokens"] > 8 * 10
    assert summary["cost"] > 0
    assert (stats["files_created"], stats["batches_created"]) == (0, 0) and server.stats()[
        "chat_requests"
    ] == 0


def _ti(run_id: str) -> SimpleNamespace:
    return SimpleNamespace(dag_id="d", task_id="ask", run_id=run_id, map_index=-1, try_number=1, max_tries=0)


def _line_tokens(server: Any, prompt: str, max_tokens: int | None = None) -> int:
    params = {"max_tokens": max_tokens} if max_tokens else None
    request = QueryOptions(request_params=params).chat_request(make_endpoint(server, "azure"))
    line = LineBuilder(request, "/chat/completions", DEPLOYMENT).line("k", prompt)
    return tokens(json.loads(line)["body"])


def test_a_budget_is_never_passed_and_what_does_not_fit_is_budget_exceeded(
    spark: Any, server: Any, batch_mock: BatchMock, monkeypatch: Any, tmp_path: Path
) -> None:
    _connect(server, monkeypatch, "azure")
    prompts = [(i, f"question {i:02d}: which colour is the sky at noon?") for i in range(40)]
    per_request = _line_tokens(server, prompts[0][1]) + 6  # prompt + the completion cap
    budget = 23 * per_request  # room for two 10-line files and three more lines
    source = _write(spark, tmp_path / "src", prompts)
    arguments: dict[str, Any] = {
        "request_params": {"max_tokens": 6},
        "max_total_tokens": budget,
        "max_requests_per_file": 10,
        "checkpoint_key": "budget",
    }
    summary = _batch_operator(tmp_path, source, **arguments).execute({"ti": _ti("first")})
    stats = batch_mock.stats()
    billed = stats["prompt_tokens_billed"] + stats["completion_tokens_billed"]
    rows = _rows(spark, tmp_path / "out")
    print(f"\nbatch budget {budget}: billed {billed}, stats {stats}, summary {summary}")
    assert billed <= budget
    assert summary["prompt_tokens"] + summary["completion_tokens"] == billed
    ok = [r for r in rows if r["llmq_status"] == "ok"]
    unsent = [r for r in rows if r["llmq_error_code"] == "budget_exceeded"]
    assert len(ok) + len(unsent) == 40 and len(ok) >= 20 and unsent
    assert all(r["llmq_attempts"] == 0 and "max_total_tokens" in r["llmq_error"] for r in unsent)
    assert stats["lines_answered"] == len(ok)  # each answered row asked once, no unsent row asked
    # the same run with a larger budget asks only what the first did not send, counting what it billed
    larger = {**arguments, "max_total_tokens": 60 * per_request}
    summary = _batch_operator(tmp_path, source, **larger).execute({"ti": _ti("second")})
    stats = batch_mock.stats()
    assert stats["lines_answered"] == 40 and summary["ok"] == 40
    assert stats["prompt_tokens_billed"] + stats["completion_tokens_billed"] <= 60 * per_request


@pytest.mark.slow  # about 35 s: a task process started, killed and started again
def test_a_retry_after_a_kill_counts_the_batches_it_re_attaches_against_the_budget(
    airflow_db: Path, spark: Any, server: Any, batch_mock: BatchMock, monkeypatch: Any, tmp_path: Path
) -> None:
    env = {**child_airflow_env(tmp_path), **_connect(server, monkeypatch, "azure")}
    batch_mock.configure(in_progress_s=4.0)
    prompts = [(i, f"question {i}?") for i in range(40)]
    per_request = _line_tokens(server, "question 10?", 6) + 6
    budget = 25 * per_request  # two 10-line files and part of a third fit; the rest waits for the bill
    source = _write(spark, tmp_path / "src", prompts)
    path = _kill_dag(
        "llmq_batch_budget_sigterm", source, tmp_path / "out", tmp_path / "ckpt", retries=1,
        deferrable=False, max_total_tokens=budget, request_params={"max_tokens": 6},
    )  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        _wait_for(
            lambda: batch_mock.stats()["batches_created"] >= 2 or proc.poll() is not None, "2 batches", 240
        )
    finally:
        if proc.poll() is not None:
            print(proc.communicate()[0].decode(errors="replace")[-5000:])
    time.sleep(0.5)
    assert batch_mock.stats()["batches_created"] < 4  # the budget holds the last files back
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=240)[0].decode(errors="replace")
    stats = batch_mock.stats()
    billed = stats["prompt_tokens_billed"] + stats["completion_tokens_billed"]
    print(f"\nSIGTERM + retry under budget {budget}: billed {billed}, stats {stats}")
    assert proc.returncode == 0, output[-3000:]
    assert "RUN success TRIES 2" in output
    assert billed <= budget and stats["cancel_requests"] == 0
    out = _rows(spark, tmp_path / "out")
    ok = [r for r in out if r["llmq_status"] == "ok"]
    # had the retry not counted the batches it re-attached to, it would have sent every file (40 rows)
    assert len(out) == 40 and 20 <= stats["lines_answered"] == len(ok) < 40
    assert {r["llmq_error_code"] for r in out if r["llmq_status"] != "ok"} <= {"budget_exceeded"}


def test_a_file_larger_than_the_whole_quota_is_split_until_every_row_is_answered(
    spark: Any, server: Any, batch_mock: BatchMock, monkeypatch: Any, tmp_path: Path
) -> None:
    # the case: 350 rows, 100-line files, a 2,500-token enqueued quota (it failed after 7 refusals)
    _connect(server, monkeypatch, "azure")
    prompts = [(i, f"Summarize review {i}: the product arrived on time and works well.") for i in range(350)]
    assert 100 * _line_tokens(server, prompts[0][1]) > 2500  # a whole file is over the quota
    batch_mock.configure(enqueued_token_limit=2500, validating_s=0.05, in_progress_s=0.2, finalizing_s=0.05)
    source = _write(spark, tmp_path / "src", prompts)
    summary = _batch_operator(tmp_path, source, max_requests_per_file=100).execute({})
    stats = batch_mock.stats()
    print(f"\n350 rows / 100-line files / 2,500-token quota: stats {stats}, summary {summary['batch_api']}")
    rows = _rows(spark, tmp_path / "out")
    assert [r["id"] for r in rows] == list(range(350)) and {r["llmq_status"] for r in rows} == {"ok"}
    assert stats["lines_answered"] == 350  # every row asked exactly once, however often a file was split
    assert (
        stats["token_limit_refusals"] >= 3 and summary["batch_api"]["file_splits"] >= 3
    )  # each 100-line file
    assert summary["ok"] == 350 and summary["requests_sent"] == 350
