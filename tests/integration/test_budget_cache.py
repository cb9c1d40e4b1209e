"""Budget, cost, estimate and the cross-run answer cache over real sockets against the mock server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmq.core.accounting.cost import TokenCounter, estimate_prompts
from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.methods import query_async_limited, query_sync, query_thread_pool
from airflow_provider_llmq.sample_data import generate_reviews
from airflow_provider_llmq.testing.mock_server.tokens import count_messages
from tests.conftest import DEPLOYMENT, llmq_connection_env, make_endpoint, run_dag_file

SYSTEM = "Answer with exactly one word: positive, neutral or negative."
MAX_TOKENS = 12
PRICES = {DEPLOYMENT: {"input": 0.15, "output": 0.6}}


def _prompts(n: int) -> list[tuple[int, str]]:
    return [
        (i, f"Classify the sentiment of review {i}: the kettle is {'great' if i % 2 else 'poor'}.")
        for i in range(n)
    ]


def _used(result: QueryResult) -> int:
    return (result.prompt_tokens or 0) + (result.completion_tokens or 0)


def test_budget_stops_at_the_right_request_one_at_a_time(server: Any) -> None:
    """Concurrency 1: row k is sent iff what rows before it used plus its own reservation fits."""
    endpoint = make_endpoint(server, "azure")
    budget = 600
    results = list(
        query_sync(
            endpoint,
            _prompts(40),
            system_prompt=SYSTEM,
            request_params={"max_tokens": MAX_TOKENS},
            max_total_tokens=budget,
        )
    )
    counter = TokenCounter.shared()
    spent = 0
    sent = 0
    for result in results:
        reservation = counter.prompt_tokens(SYSTEM, _prompts(40)[result.row_id][1]) + MAX_TOKENS
        if result.error_code == "budget_exceeded":
            assert spent + reservation > budget or sent < result.row_id  # closed after the first refusal
            assert result.attempts == 0 and result.http_status is None
            continue
        assert result.ok and spent + reservation <= budget, (result.row_id, spent, reservation)
        spent += _used(result)
        sent += 1
    first_refused = next(r.row_id for r in results if r.error_code == "budget_exceeded")
    assert first_refused == sent and 0 < sent < 40  # a prefix was sent, then nothing more
    assert server.stats()["chat_requests"] == sent
    assert spent <= budget


@pytest.mark.parametrize("method", ["async_limited", "thread_pool"])
def test_budget_bound_with_requests_in_flight(server: Any, method: str) -> None:
    """Concurrency 8: the spend never passes the budget by more than the requests in flight, and it
    stops no earlier than one reservation per request in flight short of it."""
    server.configure(latency_ms=20)
    endpoint = make_endpoint(server, "openai")
    budget, concurrency = 3000, 8
    kwargs: dict[str, Any] = (
        {"max_concurrency": concurrency} if method == "async_limited" else {"max_workers": concurrency}
    )
    run = query_async_limited if method == "async_limited" else query_thread_pool
    results = list(
        run(
            endpoint,
            _prompts(200),
            system_prompt=SYSTEM,
            request_params={"max_tokens": MAX_TOKENS},
            max_total_tokens=budget,
            **kwargs,
        )
    )
    answered = [r for r in results if r.ok]
    refused = [r for r in results if r.error_code == "budget_exceeded"]
    assert len(answered) + len(refused) == 200 and refused and all(r.attempts == 0 for r in refused)
    spent = sum(_used(r) for r in answered)
    largest = max(_used(r) for r in answered)
    reservation = max(TokenCounter.shared().prompt_tokens(SYSTEM, p) for _, p in _prompts(200)) + MAX_TOKENS
    assert spent <= budget + concurrency * largest
    assert spent >= budget - concurrency * reservation
    assert server.stats()["chat_requests"] == len(answered)


def test_cost_per_row_is_prices_times_usage(server: Any) -> None:
    endpoint = make_endpoint(server, "azure")
    results = list(query_sync(endpoint, _prompts(5), system_prompt=SYSTEM, prices=PRICES))
    for result in results:
        expected = (result.prompt_tokens * 0.15 + result.completion_tokens * 0.6) / 1e6
        assert result.cost == pytest.approx(expected) and result.cost > 0


def test_estimate_is_within_10_percent_of_the_mock_servers_count(server: Any) -> None:
    """English prompts (the sample reviews): the estimate before the run against the usage the
    mock server reports (its word/punctuation count, not the estimator's formula)."""
    reviews = generate_reviews(300)
    prompts = [
        f"Classify the sentiment of this review of {r['product']}: {r['review_text']}" for r in reviews
    ]
    estimate = estimate_prompts(prompts, system_prompt=SYSTEM, model=DEPLOYMENT, max_tokens=5, prices=PRICES)
    endpoint = make_endpoint(server, "azure")
    results = list(
        query_async_limited(endpoint, list(enumerate(prompts)), system_prompt=SYSTEM, max_concurrency=32)
    )
    billed = sum(r.prompt_tokens or 0 for r in results)
    assert billed == server.stats()["prompt_tokens_total"]
    assert billed == sum(count_messages([SYSTEM, p]) for p in prompts)  # the mock's own count
    error = (estimate.prompt_tokens - billed) / billed
    print(f"estimate {estimate.prompt_tokens} vs billed {billed}: error {error:+.2%} ({estimate.method})")
    assert abs(error) < 0.10
    assert estimate.requests == 300 and estimate.completion_tokens == 300 * 5
    assert estimate.cost == pytest.approx((estimate.prompt_tokens * 0.15 + 1500 * 0.6) / 1e6)
    assert server.stats()["chat_requests"] == 300  # the estimate itself sent nothing


DAG = """
import json
from datetime import datetime, timedelta

from airflow.sdk import DAG, task

from airflow_provider_llmq.operators.llmq import LLMQueryRateLimitedOperator

with DAG(
    "{dag_id}",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    default_args={{"owner": "tests", "retries": 0, "retry_delay": timedelta(0)}},
) as dag:
    previous = None
    for name, kwargs in {tasks!r}:
        step = LLMQueryRateLimitedOperator(
            task_id=name,
            id_col="review_id",
            system_prompt="{system}",
            request_params={{"max_tokens": {max_tokens}}},
            prices={prices!r},
            checkpoint_dir="{out}/checkpoints",
            output_path="{out}/" + name,
            retry_backoff=0.001,
            progress_interval=1,
            **kwargs,
        )

        @task(task_id="save_" + name)
        def save(summary, name=name):
            with open("{out}/" + name + ".summary.json", "w") as f:
                json.dump(summary, f)

        save(step.output)
        if previous is not None:
            previous >> step
        previous = step
"""


def _write_reviews(spark: Any, path: Path, n: int) -> None:
    rows = [(r["review_id"], r["review_text"]) for r in generate_reviews(n)]
    spark.createDataFrame(rows, "review_id string, prompt string").coalesce(1).write.parquet(str(path))


def _run(tmp_path: Path, dag_id: str, tasks: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out = tmp_path / "out"
    source = DAG.format(
        dag_id=dag_id, tasks=tasks, system=SYSTEM, max_tokens=MAX_TOKENS, prices=PRICES, out=out
    )
    run = run_dag_file(source, dag_id)
    assert run.state == "success"
    return {name: json.loads((out / f"{name}.summary.json").read_text()) for name, _ in tasks}


@pytest.mark.slow  # over 7 s: CI's slow step runs it
def test_budget_exceeded_rows_are_asked_by_a_run_with_a_larger_budget(
    airflow_db: Path, spark: Any, server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in llmq_connection_env(server).items():
        monkeypatch.setenv(name, value)
    _write_reviews(spark, tmp_path / "reviews", 60)
    common = {"source_path": str(tmp_path / "reviews"), "checkpoint_key": "daily", "max_concurrency": 1}
    summaries = _run(
        tmp_path,
        "llmq_budget_resume",
        [
            ("small", {**common, "max_total_tokens": 2500}),
            # the same run again (a retry, a clear): the budget is the run's, already spent
            ("again", {**common, "max_total_tokens": 2500}),
            ("larger", {**common, "max_total_tokens": 100_000}),
        ],
    )
    small, again, larger = summaries["small"], summaries["again"], summaries["larger"]
    unsent = small["errors_by_code"]["budget_exceeded"]
    assert 0 < unsent < 60 and small["requests_sent"] == 60 - unsent
    assert (small["answered"], small["not_sent"], small["failed"], small["skipped"]) == (
        60 - unsent,
        unsent,
        0,
        0,
    )
    assert small["checkpoint"] is not None  # kept for the run that resumes
    # both tries together stay inside the run's budget
    billed = sum(s["prompt_tokens"] + s["completion_tokens"] for s in (small, again))
    assert billed <= 2500 and again["requests_sent"] < unsent
    unsent = again["not_sent"]
    # a larger budget asks exactly the rows not sent yet
    assert larger["requests_sent"] == unsent and larger["errors"] == 0 and larger["ok"] == 60
    assert server.stats()["chat_requests"] == 60
    first = {r["review_id"]: r for r in spark.read.parquet(str(tmp_path / "out" / "small")).collect()}
    second = spark.read.parquet(str(tmp_path / "out" / "larger")).collect()
    first = {r["review_id"]: r for r in spark.read.parquet(str(tmp_path / "out" / "again")).collect()}
    asked_again = {i for i, r in first.items() if r["llmq_error_code"] == "budget_exceeded"}
    for row in second:
        before = first[row["review_id"]]
        assert row["llmq_status"] == "ok"
        if row["review_id"] not in asked_again:  # the first run's own result, not asked again
            assert (row["response"], row["llmq_latency_ms"]) == (
                before["response"],
                before["llmq_latency_ms"],
            )
        else:
            assert before["llmq_attempts"] == 0 and row["llmq_attempts"] == 1
    # cost per row and the total: prices x usage
    for row in second:
        expected = (row["llmq_prompt_tokens"] * 0.15 + row["llmq_completion_tokens"] * 0.6) / 1e6
        assert row["llmq_cost"] == pytest.approx(expected) and not row["llmq_cached"]
    assert larger["cost"] == pytest.approx(sum(r["llmq_cost"] for r in second))
    assert larger["cost_this_try"] == pytest.approx(
        sum(r["llmq_cost"] for r in second if r["review_id"] in asked_again)
    )
    assert larger["schema_version"] == 5


@pytest.mark.slow  # over 7 s: CI's slow step runs it
def test_cache_asks_only_the_rows_a_grown_table_added(
    airflow_db: Path, spark: Any, server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in llmq_connection_env(server).items():
        monkeypatch.setenv(name, value)
    _write_reviews(spark, tmp_path / "day1", 90)
    _write_reviews(spark, tmp_path / "day2", 99)  # the same 90 rows and 9 new ones
    cache = str(tmp_path / "cache")
    summaries = _run(
        tmp_path,
        "llmq_cache_growth",
        [
            ("day1", {"source_path": str(tmp_path / "day1"), "cache_path": cache, "checkpoint_key": "d1"}),
            ("estimate", {"source_path": str(tmp_path / "day2"), "cache_path": cache, "estimate_only": True}),
            ("day2", {"source_path": str(tmp_path / "day2"), "cache_path": cache, "checkpoint_key": "d2"}),
        ],
    )
    day1, estimate, day2 = summaries["day1"], summaries["estimate"], summaries["day2"]
    assert day1["requests_sent"] == 90 and day1["cache_hits"] == 0
    assert estimate["estimate_only"] and estimate["requests"] == 9  # only what the cache lacks
    assert estimate["completion_tokens"] == 9 * MAX_TOKENS and estimate["cost"] > 0
    assert day2["requests_sent"] == 9 and day2["cache_hits"] == 90 and day2["ok"] == 99
    assert server.stats()["chat_requests"] == 99  # the cache saved 90 requests
    rows = spark.read.parquet(str(tmp_path / "out" / "day2")).collect()
    assert sum(r["llmq_cached"] for r in rows) == 90
    first = {r["review_id"]: r for r in spark.read.parquet(str(tmp_path / "out" / "day1")).collect()}
    for row in rows:
        if row["llmq_cached"]:  # the original answer, usage and cost; nothing sent for it
            original = first[row["review_id"]]
            assert row["response"] == original["response"] and row["llmq_attempts"] == 0
            assert row["llmq_prompt_tokens"] == original["llmq_prompt_tokens"]
            assert row["llmq_cost"] == pytest.approx(original["llmq_cost"])
    assert day2["cost_this_try"] == pytest.approx(sum(r["llmq_cost"] for r in rows if not r["llmq_cached"]))
    assert day2["cost"] == pytest.approx(sum(r["llmq_cost"] for r in rows))
