"""The budget (``max_total_tokens``, ``max_cost``) of a Batch API run, kept from its ledger.

A batch cannot be stopped once created, so a request file is only sent when its whole estimate
(prompt tokens counted before sending, plus each request's completion cap) fits what is left: the
usage billed by every batch collected so far, plus the estimate of every batch created (or about to
be) and not yet collected. The ledger is the run's record across tries, so a retry, a resume after a
kill or a re-run with the same ``checkpoint_key`` counts what earlier tries sent.

:class:`~airflow_provider_llmq.core.accounting.budget.Budget` is a live client's (reserve one
request, settle it with its usage); this one is recomputed from the ledger at each decision
instead, since what a batch holds changes between tries, not between requests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from airflow_provider_llmq.core.accounting.cost import Price, parse_prices
from airflow_provider_llmq.core.accounting.progress import Tally
from airflow_provider_llmq.core.accounting.result import STATUS_ERROR, QueryResult
from airflow_provider_llmq.core.batch.batch_estimate import LineEstimator
from airflow_provider_llmq.core.batch.batch_packs import with_spent
from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.pacing.limits import DEFAULT_MAX_TOKENS
from airflow_provider_llmq.core.request.error_codes import BUDGET_EXCEEDED
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.core.request.payload import ChatRequest
from airflow_provider_llmq.spark.batch_ledger import FileRecord, Ledger
from airflow_provider_llmq.spark.placements.base import Work
from airflow_provider_llmq.spark.placements.batch_packs import file_rows

__all__ = ["BatchBudget", "completion_basis", "completion_cap", "line_estimator", "refuse_file"]

log = logging.getLogger(__name__)


def completion_cap(options: QueryOptions, max_tokens: int | None) -> int | None:
    """The completion tokens a budget counts per request: the ``max_tokens`` sent, else the
    ``expected_completion_tokens`` given; None when a budget has neither to count."""
    if max_tokens is not None:
        return max_tokens
    return options.expected_completion_tokens


def line_estimator(options: QueryOptions, request: ChatRequest) -> LineEstimator:
    """What a run's request lines are counted at: a line without ``max_tokens`` at the expected
    completion, else the default (a budget needs one of the two, the operator checks)."""
    cap = completion_cap(options, request.max_completion_tokens())
    return LineEstimator(cap if cap is not None else DEFAULT_MAX_TOKENS)


def completion_basis(options: QueryOptions, request: ChatRequest) -> str:
    """Where an estimate's completion count comes from."""
    if request.max_completion_tokens() is not None:
        return "max_tokens"
    return "expected_completion_tokens" if options.expected_completion_tokens is not None else "default"


@dataclass(frozen=True)
class BatchBudget:
    """What a run's batches have spent and hold, against its limits."""

    max_total_tokens: int | None
    max_cost: float | None
    price: Price | None
    spent_tokens: int
    spent_cost: float
    held_tokens: int
    held_cost: float

    @classmethod
    def of(cls, ledger: Ledger, options: QueryOptions, model: str | None) -> BatchBudget | None:
        """The run's budget now; None without ``max_total_tokens`` or ``max_cost``."""
        if options.max_total_tokens is None and options.max_cost is None:
            return None
        price = parse_prices(options.prices).get(model or "")
        if options.max_cost is not None and price is None:
            raise LLMQueryConfigError("max_cost needs prices for the model (or deployment) the run asks")
        spent_tokens, spent_cost, held_tokens, held_cost = 0, 0.0, 0, 0.0
        for round_ in ledger.rounds:
            for file in round_.files:
                for batch in file.batches:
                    if batch.refused:
                        continue  # refused at validation: nothing ran, nothing billed
                    if batch.collected:
                        spent_tokens += batch.billed_tokens
                        spent_cost += batch.billed_cost
                    else:  # created (or maybe created) and not collected: its whole estimate
                        held_tokens += file.prompt_tokens + file.completion_tokens
                        held_cost += _cost(price, file.prompt_tokens, file.completion_tokens)
        return cls(
            options.max_total_tokens,
            options.max_cost,
            price,
            spent_tokens,
            spent_cost,
            held_tokens,
            held_cost,
        )

    @property
    def holds(self) -> bool:
        """Some batch of the run is created and not collected: what it holds may be freed."""
        return self.held_tokens > 0 or self.held_cost > 0

    def fits(self, prompt_tokens: int, completion_tokens: int) -> bool:
        tokens = self.spent_tokens + self.held_tokens + prompt_tokens + completion_tokens
        cost = self.spent_cost + self.held_cost + _cost(self.price, prompt_tokens, completion_tokens)
        return (self.max_total_tokens is None or tokens <= self.max_total_tokens) and (
            self.max_cost is None or cost <= self.max_cost
        )

    def fitting_lines(self, estimates: list[tuple[int, int]]) -> int:
        """How many of a file's first lines fit what is left."""
        prompt = completion = 0
        for count, (p, c) in enumerate(estimates):
            prompt, completion = prompt + p, completion + c
            if not self.fits(prompt, completion):
                return count
        return len(estimates)

    def refusal(self, file: FileRecord) -> str:
        """Why a file is not sent: the budget, what is spent and held, and the file's estimate."""
        limits = []
        if self.max_total_tokens is not None:
            limits.append(f"max_total_tokens={self.max_total_tokens}")
        if self.max_cost is not None:
            limits.append(f"max_cost={self.max_cost:g}")
        estimate = file.prompt_tokens + file.completion_tokens
        cost = _cost(self.price, file.prompt_tokens, file.completion_tokens)
        return (
            f"not sent: the Batch API request file {file.name} ({file.requests} requests, estimated "
            f"{estimate} tokens / {cost:.6g}) would pass the run's budget ({', '.join(limits)}): "
            f"{self.spent_tokens} tokens / {self.spent_cost:.6g} billed so far by this run's batches. "
            "A later run with the same checkpoint_key and a larger budget asks this row"
        )

    def describe(self) -> str:
        return (
            f"billed {self.spent_tokens} tokens / {self.spent_cost:.6g}, held by running batches "
            f"{self.held_tokens} tokens / {self.held_cost:.6g}"
        )


def _cost(price: Price | None, prompt_tokens: int, completion_tokens: int) -> float:
    return price.cost(prompt_tokens, completion_tokens) if price is not None else 0.0


def refuse_file(work: Work, file: FileRecord, budget: BatchBudget, owner: str) -> None:
    """Records every request of a file the budget cannot take as ``budget_exceeded`` (not sent; a
    later run with a larger budget asks it), flushed every ``work.flush_rows``; the caller saves the
    ledger. A try killed before that records them again: the newest result of a key wins."""
    message = budget.refusal(file)
    rows = list(file_rows(work.checkpoint, file))  # each row of its pack lines, with what it spent
    for start in range(0, len(rows), work.flush_rows):
        results = [
            with_spent(QueryResult(key, None, STATUS_ERROR, BUDGET_EXCEEDED, message, attempts=0), spent)
            for key, spent in rows[start : start + work.flush_rows]
        ]
        file.budget_results.append(work.checkpoint.flush(results))
        work.progress.add(len(results), Tally.of(results))
    file.budget_refused_by = owner
    log.warning("llmq: %s", message)
