"""Prices, the token counter and the budget, without a server."""

from __future__ import annotations

import sys
import threading
import types

import pytest

from airflow_provider_llmq.core.budget import Budget
from airflow_provider_llmq.core.cost import HEURISTIC, Price, TokenCounter, estimate_prompts, parse_prices
from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.options import QueryOptions
from airflow_provider_llmq.core.payload import BUDGET_EXCEEDED, TRANSIENT_ERROR_CODES
from airflow_provider_llmq.spark.placements.base import job_share


def test_prices_take_three_forms_and_refuse_nonsense() -> None:
    parsed = parse_prices({"a": {"input": 1, "output": 2}, "b": (0.5, 4), "c": Price(1, 1)})
    assert parsed == {"a": Price(1.0, 2.0), "b": Price(0.5, 4.0), "c": Price(1, 1)}
    assert parsed["b"].cost(1_000_000, 500_000) == pytest.approx(0.5 + 2.0)
    for bad in ({"a": (1,)}, {"a": {"input": 1}}, {"a": (-1, 1)}, {"a": (float("nan"), 1)}):
        with pytest.raises(LLMQueryConfigError):
            parse_prices(bad)
    with pytest.raises(LLMQueryConfigError):
        QueryOptions(prices={"m": "cheap"})


def test_max_cost_needs_a_price() -> None:
    with pytest.raises(LLMQueryConfigError, match="max_cost needs prices"):
        Budget(max_cost=1.0)


def test_budget_closes_at_the_first_request_that_would_pass_it() -> None:
    budget = Budget(max_total_tokens=100)
    first = budget.reserve(30, 20)
    assert first is not None
    assert budget.reserve(30, 20) is not None  # 100: exactly the budget
    assert budget.reserve(1, 0) is None and budget.closed
    budget.settle(first, 10, 5)  # used far less than reserved...
    assert budget.reserve(1, 0) is None  # ...yet the run has stopped sending
    assert budget.spent_tokens == 15 and budget.reserved_tokens == 50 and budget.refused == 2


def test_budget_counts_cost_at_the_price() -> None:
    budget = Budget(max_cost=1.0, price=Price(input=100_000, output=200_000))  # 0.1 / 0.2 per token
    assert budget.reserve(4, 2) is not None  # 0.8
    assert budget.reserve(1, 0) is not None  # 0.9
    assert budget.reserve(1, 1) is None  # 0.9 + 0.3 > 1.0
    assert budget.reserve(0, 0) is None and budget.closed


def test_budget_is_never_passed_by_threads_reserving_at_once() -> None:
    budget = Budget(max_total_tokens=10_000)
    admitted: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(200):
            hold = budget.reserve(7, 3)
            if hold is None:
                return
            with lock:
                admitted.append(hold.tokens)
            budget.settle(hold, 7, 3)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(admitted) == budget.spent_tokens == 10_000 and budget.reserved_tokens == 0


def test_budget_exceeded_is_asked_again_by_a_later_run() -> None:
    assert BUDGET_EXCEEDED in TRANSIENT_ERROR_CODES


def test_counter_falls_back_when_tiktoken_cannot_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, tiktoken fails to download its BPE file at first use: the heuristic is used."""
    fake = types.ModuleType("tiktoken")

    def get_encoding(name: str) -> object:
        raise OSError("offline: could not fetch the encoding")

    fake.get_encoding = get_encoding  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tiktoken", fake)
    counter = TokenCounter()
    assert counter.method == HEURISTIC
    assert counter.count("one two three four five six") == 8  # 6 words * 4/3
    assert counter.prompt_tokens("sys", "one two three") == 2 + 4 + 3 * 3


def test_counter_uses_tiktoken_when_it_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    class Encoding:
        name = "o200k_base"

        def encode(self, text: str, disallowed_special: object = ()) -> list[int]:
            return list(range(len(text)))

    fake = types.ModuleType("tiktoken")
    fake.get_encoding = lambda name: Encoding()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tiktoken", fake)
    counter = TokenCounter()
    assert counter.method == "tiktoken:o200k_base" and counter.count("abcd") == 4
    estimate = estimate_prompts(["abcd", None, "  "], system_prompt=None, max_tokens=10, counter=counter)
    assert estimate.requests == 1 and estimate.prompt_tokens == 4 + 3 * 2
    assert (
        estimate.completion_tokens == 10
        and estimate.cost is None
        and estimate.completion_basis == "max_tokens"
    )


def test_job_share_splits_what_is_left() -> None:
    options = QueryOptions(max_total_tokens=1000, max_cost=2.0, prices={"m": (1, 1)})
    share = job_share(options, (400, 0.5), 3)
    assert share.max_total_tokens == 200 and share.max_cost == pytest.approx(0.5)
    spent = job_share(options, (1200, 3.0), 3)
    assert spent.max_total_tokens == 0 and spent.max_cost == 0.0  # the job sends nothing
    assert job_share(QueryOptions(), (10, 1.0), 4) == QueryOptions()
