"""Prices, the token counter and the budget, without a server."""

from __future__ import annotations

import sys
import types

import pytest

from airflow_provider_llmq.core.accounting.cost import (
    HEURISTIC,
    Price,
    TokenCounter,
    estimate_prompts,
    parse_prices,
)
from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.request.options import QueryOptions
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
