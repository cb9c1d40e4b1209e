"""The budget's ledger without a server: worst cases, waiting, closing, the limit llmq sets."""

from __future__ import annotations

import threading

import pytest

from airflow_provider_llmq.core.accounting.budget import WAIT, Budget, Hold
from airflow_provider_llmq.core.accounting.cost import Price, TokenCounter
from airflow_provider_llmq.core.accounting.row_budget import RowBudget
from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.request.error_codes import (
    BUDGET_EXCEEDED,
    CUT_BY_BUDGET,
    TRANSIENT_ERROR_CODES,
)
from airflow_provider_llmq.core.request.payload import ChatRequest


def _learned(budget: Budget, ratio: float = 1.0, answer: int = 10) -> None:
    """One attempt settled, so the prompt ratio (``ratio``) and an answer's length are known."""
    hold = budget.reserve(100, 0)
    assert isinstance(hold, Hold)
    budget.settle(hold, round(100 * ratio), answer)


def test_max_cost_needs_a_price() -> None:
    with pytest.raises(LLMQueryConfigError, match="max_cost needs prices"):
        Budget(max_cost=1.0)


def test_before_any_answer_a_prompt_reserves_half_again_its_count() -> None:
    budget = Budget(max_total_tokens=1000)
    hold = budget.reserve(20, 10)
    assert isinstance(hold, Hold) and hold.tokens == 30 + 10


def test_the_prompt_ratio_is_learned_from_what_was_billed() -> None:
    """A counter that counts 2x too few tokens (another tokenizer, a schema billed with the prompt)
    is corrected by the first answer: the next reservation is the billed ratio with a margin."""
    budget = Budget(max_total_tokens=100_000)
    _learned(budget, ratio=2.0)
    hold = budget.reserve(100, 0)
    assert isinstance(hold, Hold) and hold.tokens == 220
    budget.settle(hold, 150, 0)  # a smaller ratio never lowers the largest seen
    assert budget.prompt_worst_case(100) == 220


def test_an_attempt_that_fits_only_later_waits_and_closes_only_on_what_was_spent() -> None:
    budget = Budget(max_total_tokens=300)
    _learned(budget, answer=0)  # 100 spent; ratio 1 (so 50 counted reserves 55)
    first = budget.reserve(50, 60)  # 115 reserved
    assert isinstance(first, Hold)
    assert budget.reserve(50, 60) is WAIT  # 100 + 115 + 115 > 300, but 100 + 115 fits once it settles
    budget.settle(first, 50, 20)  # billed 70: spent 170
    second = budget.reserve(50, 60)  # 170 + 115 = 285
    assert isinstance(second, Hold) and not budget.closed
    assert budget.reserve(50, 60) is WAIT
    budget.settle(second, 50, 20)  # spent 240
    assert budget.reserve(50, 60) is None and budget.closed  # 240 + 115 > 300, nothing in flight
    assert budget.reserve(1, 0) is None  # closed: the run has stopped sending
    assert budget.spent_tokens == 240 and budget.reserved_tokens == 0 and budget.refused == 2


def test_budget_counts_cost_at_the_price() -> None:
    budget = Budget(max_cost=1.0, price=Price(input=100_000, output=200_000))  # 0.1 / 0.2 per token
    assert isinstance(budget.reserve(4, 2), Hold)  # 6 prompt (x1.5) + 2: 0.6 + 0.4
    assert budget.reserve(4, 0) is WAIT  # 1.0 + 0.6 > 1.0; alone it fits
    assert budget.reserve(10, 0) is None and budget.closed  # 1.5 alone passes 1.0


def test_budget_is_never_passed_by_threads_reserving_at_once() -> None:
    budget = Budget(max_total_tokens=10_000)
    admitted: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            hold = budget.reserve(10, 5)
            if hold is None:
                return
            if hold is WAIT:
                continue
            assert isinstance(hold, Hold)
            with lock:
                admitted.append(10 + 5)
            budget.settle(hold, 10, 5)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert budget.spent_tokens == sum(admitted) <= 10_000 and budget.reserved_tokens == 0
    assert budget.spent_tokens > 10_000 - 2 * 15  # stopped within one worst case (11 + 5) of it


def test_the_limit_llmq_sets_follows_the_answers_and_what_is_left() -> None:
    budget = Budget(max_total_tokens=100_000)
    assert budget.completion_limit() == 256  # nothing learned, no expectation
    assert Budget(max_total_tokens=100_000, expected_completion_tokens=40).completion_limit() == 80
    _learned(budget, answer=40)
    assert budget.completion_limit() == 40 * 3 // 2 + 16
    small = Budget(max_total_tokens=1000)
    _learned(small, answer=20)  # 120 spent
    holds = [small.reserve(10, 30) for _ in range(8)]  # 8 in flight, 8 x 41 reserved
    assert all(isinstance(h, Hold) for h in holds)
    # what is left (1000 - 120 - 328) over 9 requests is 61 > 46: the learned target stands
    assert small.completion_limit() == 46
    for _ in range(4):
        assert isinstance(small.reserve(10, 30), Hold)
    # left 388 over 13 is 29: shrunk, never below the longest answer seen (20)
    assert small.completion_limit() == 29


def test_a_row_budget_sets_the_limit_and_doubles_it_after_a_cut() -> None:
    budget = Budget(max_total_tokens=100_000)
    request = ChatRequest("sys", "m", limit_param="max_completion_tokens")
    row = RowBudget(budget, request)
    body = row.body(request.body("hello there"))
    assert row.owns_limit and body["max_completion_tokens"] == 256 and "max_tokens" not in body
    hold = row.reserve(body)
    # the conversation as sent, counted with its framing
    assert isinstance(hold, Hold) and hold.prompt_estimate == TokenCounter.shared().prompt_tokens(
        "sys", "hello there"
    )
    budget.settle(hold, 20, 256, cut=True)
    row.cut()
    assert row.body(request.body("hello there"))["max_completion_tokens"] == 512 * 3 // 2 + 16
    user = RowBudget(budget, ChatRequest("sys", "m", {"max_tokens": 7}))
    assert not user.owns_limit and "max_completion_tokens" not in user.body(request.body("x"))


def test_rows_the_budget_held_back_are_asked_again_by_a_later_run() -> None:
    assert {BUDGET_EXCEEDED, CUT_BY_BUDGET} <= TRANSIENT_ERROR_CODES
