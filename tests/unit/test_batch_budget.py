"""The Batch API's budget, split and prices, without a server: cached prompt tokens priced at the
cached rate, a request line's estimate, a file split into parts that hold each line once, and the
budget recomputed from the ledger (what collected batches billed + what live ones hold)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from airflow_provider_llmq.core.accounting.cost import Price, TokenCounter, parse_prices
from airflow_provider_llmq.core.batch.batch_estimate import LineEstimator
from airflow_provider_llmq.core.batch.batch_files import LineBuilder, custom_ids
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.core.request.payload import Answer, Failure, classify_response
from airflow_provider_llmq.spark.batch_ledger import FILES_DIR, BatchRecord, FileRecord, Ledger, Round
from airflow_provider_llmq.spark.checkpoint import Checkpoint
from airflow_provider_llmq.spark.placements.batch_budget import BatchBudget
from airflow_provider_llmq.spark.placements.batch_settings import Waiting
from airflow_provider_llmq.spark.placements.batch_split import (
    halves,
    larger_than_the_quota,
    line_estimates,
    split_file,
)


def test_cached_prompt_tokens_cost_the_cached_rate_only_when_one_is_given() -> None:
    cached = Price(2.0, 8.0, cached_input=0.5)
    assert math.isclose(cached.cost(2000, 100, 1024), (976 * 2.0 + 1024 * 0.5 + 100 * 8.0) / 1e6)
    assert math.isclose(Price(2.0, 8.0).cost(2000, 100, 1024), (2000 * 2.0 + 100 * 8.0) / 1e6)
    assert math.isclose(cached.cost(100, 0, 5000), 100 * 0.5 / 1e6)  # never more cached than prompt
    assert parse_prices({"m": (2, 8, 0.5)})["m"] == cached
    assert parse_prices({"m": {"input": 2, "output": 8, "cached_input": 0.5}})["m"] == cached
    assert parse_prices({"m": {"input": 2, "output": 8}})["m"].cached_input is None
    with pytest.raises(LLMQueryConfigError, match="cached_input"):
        parse_prices({"m": (2, 8, 0.5, 1)})
    with pytest.raises(LLMQueryConfigError, match=">= 0"):
        parse_prices({"m": (2, 8, -1)})


def _body(usage: dict[str, object], finish: str = "stop", content: str | None = "hi") -> bytes:
    message = {"role": "assistant", "content": content}
    return json.dumps({"choices": [{"message": message, "finish_reason": finish}], "usage": usage}).encode()


def test_an_answer_carries_its_cached_prompt_tokens() -> None:
    usage = {"prompt_tokens": 1500, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 1280}}
    answer = classify_response(200, {}, _body(usage))
    assert isinstance(answer, Answer) and answer.cached_tokens == 1280
    filtered = classify_response(200, {}, _body(usage, "content_filter", ""))
    assert isinstance(filtered, Failure) and filtered.cached_tokens == 1280  # billed all the same
    plain = classify_response(200, {}, _body({"prompt_tokens": 5, "completion_tokens": 1}))
    assert isinstance(plain, Answer) and plain.cached_tokens is None


def _builder(**params: object) -> LineBuilder:
    endpoint = EndpointConfig(
        api_base="https://example.test", api_key="k", api_type="azure", model="gpt-test"
    )
    request = QueryOptions(request_params=params or None).chat_request(endpoint)
    return LineBuilder(request, "/chat/completions", "gpt-test")


def test_a_line_is_estimated_as_a_live_request_is_reserved() -> None:
    counter = TokenCounter(use_tiktoken=False)
    estimate = LineEstimator(completion=40, counter=counter)
    prompt = "Which colour is the sky at noon?"
    expected_prompt = counter.prompt_tokens(QueryOptions().system_prompt, prompt)
    assert estimate(_builder().line("a", prompt)) == (expected_prompt, 40)  # no cap: the expectation
    assert estimate(_builder(max_tokens=7).line("a", prompt)) == (expected_prompt, 7)  # the cap


def _file(checkpoint: Checkpoint, name: str, n: int) -> FileRecord:
    checkpoint.fs.create_dir(f"{checkpoint.root}/{FILES_DIR}", recursive=True)
    data = b"".join(_builder(max_tokens=5).line(f"k{i}", f"question {i}?") for i in range(n))
    with checkpoint.fs.open_output_stream(f"{checkpoint.root}/{FILES_DIR}/{name}") as stream:
        stream.write(data)
    return FileRecord(name, "d", n, len(data))


def test_a_split_file_is_replaced_by_parts_that_hold_each_line_once(tmp_path: Path) -> None:
    checkpoint = Checkpoint(str(tmp_path / "ckpt"))
    estimate = LineEstimator(5, TokenCounter(use_tiktoken=False))
    first, other = _file(checkpoint, "f1.jsonl", 7), _file(checkpoint, "f2.jsonl", 2)
    current = Round(1, "try-1", [first, other])
    parts = split_file(checkpoint, current, first, halves(first), estimate)
    assert [p.requests for p in parts] == [4, 3] and first.split_into == [p.name for p in parts]
    assert current.files == [first, *parts, other] and first.done and not first.waiting_for_quota
    keys = []
    for part in parts:
        with checkpoint.fs.open_input_stream(f"{checkpoint.root}/{FILES_DIR}/{part.name}") as stream:
            keys += list(custom_ids(stream.read().splitlines()))
    assert keys == [f"k{i}" for i in range(7)]
    assert sum(p.prompt_tokens for p in parts) == sum(
        p for p, _ in line_estimates(checkpoint, first, estimate)
    )
    assert sum(p.completion_tokens for p in parts) == 7 * 5
    with pytest.raises(ValueError, match="cannot split"):
        split_file(checkpoint, current, other, [1, 2], estimate)


def test_a_refused_file_is_over_the_quota_unless_one_as_large_was_accepted() -> None:
    small = FileRecord("a", "d", 10, 1, prompt_tokens=100, batches=[BatchRecord(1.0, "b", "completed")])
    large = FileRecord("b", "d", 20, 1, prompt_tokens=300)
    current = Round(1, "t", [small, large])
    assert larger_than_the_quota(current, large) and current.quota_ceiling == 300
    assert not larger_than_the_quota(current, FileRecord("c", "d", 5, 1, prompt_tokens=90))


def test_the_budget_counts_what_collected_batches_billed_and_what_live_ones_hold() -> None:
    billed = BatchRecord(1.0, "b1", "completed", collected=True, billed_tokens=70, billed_cost=0.001)
    refused = BatchRecord(2.0, "b2", "failed", error_code="token_limit_exceeded", collected=True)
    live = BatchRecord(3.0, None)  # an intent: maybe created by a killed try
    files = [
        FileRecord("a", "d", 2, 1, prompt_tokens=40, completion_tokens=60, batches=[billed]),
        FileRecord("b", "d", 2, 1, prompt_tokens=30, completion_tokens=20, batches=[refused, live]),
        FileRecord("c", "d", 2, 1, prompt_tokens=30, completion_tokens=20),
    ]
    ledger = Ledger("m", "k", [Round(1, "t", files)])
    options = QueryOptions(max_total_tokens=200, prices={"gpt-test": (10.0, 10.0)})
    budget = BatchBudget.of(ledger, options, "gpt-test")
    assert budget is not None and (budget.spent_tokens, budget.held_tokens) == (70, 50) and budget.holds
    assert budget.fits(50, 30) and not budget.fits(50, 31)
    assert budget.fitting_lines([(20, 10), (20, 10), (20, 10)]) == 2
    assert "max_total_tokens=200" in budget.refusal(files[2]) and "50 tokens" in budget.refusal(files[2])
    assert BatchBudget.of(ledger, QueryOptions(), "gpt-test") is None
    with pytest.raises(LLMQueryConfigError, match="max_cost needs prices"):
        BatchBudget.of(ledger, QueryOptions(max_cost=1.0), "gpt-test")


def test_the_wait_names_the_batches_that_run() -> None:
    ids = tuple(f"batch_{i}" for i in range(7))
    text = Waiting(ids, states=("in_progress",) * 7).describe()
    assert "batch_0 (in_progress)" in text and "batch_4" in text and "and 2 more" in text
    assert "batch_5" not in text
    assert Waiting((), wake_on_any=True, wake_after=12.0, files_waiting=2).describe() == (
        "no batch runs; 2 request files wait for the enqueued-token quota or the budget; next attempt in 12 s"
    )
