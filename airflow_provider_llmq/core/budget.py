"""A run's token and cost budget, shared by every thread or task of a client.

Before a request is sent, its estimated tokens (prompt estimate + ``max_tokens``, or the expected
completion length) are *reserved*; when its row ends, the usage the API reported replaces the
reservation. A request whose reservation would take spent + reserved past ``max_total_tokens`` or
``max_cost`` is not sent, and from then on no request is: the budget is *closed*, and the rows
still to ask end ``budget_exceeded`` (unsent, ``attempts`` 0), which a later run asks again.

Because the requests in flight are reserved, the budget is passed by at most what those in flight
used beyond their reservation: with ``max_tokens`` set (the completion is capped) only a prompt
larger than its estimate can do that.

Safe for threads and event loops alike: one ``threading.Lock``, held for a few additions and never
across a wait, so an event loop never blocks on it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from airflow_provider_llmq.core.cost import Price
from airflow_provider_llmq.core.errors import LLMQueryConfigError

__all__ = ["Budget", "Hold"]


@dataclass(frozen=True, slots=True)
class Hold:
    """One request's reservation."""

    tokens: int
    cost: float


class Budget:
    """What a run may still spend.

    :param max_total_tokens: tokens (prompt + completion) the run may spend; None for no limit.
    :param max_cost: cost the run may spend at ``price``; None for no limit.
    :param price: the model's price; needed for ``max_cost`` and to count cost at all.
    """

    def __init__(
        self, max_total_tokens: int | None = None, max_cost: float | None = None, price: Price | None = None
    ) -> None:
        if max_cost is not None and price is None:
            raise LLMQueryConfigError("max_cost needs prices for the model (or deployment) the run asks")
        self.max_total_tokens = max_total_tokens
        self.max_cost = max_cost
        self.price = price
        self._lock = threading.Lock()
        self.spent_tokens = 0
        self.spent_cost = 0.0
        self.reserved_tokens = 0
        self.reserved_cost = 0.0
        self.closed = False
        self.refused = 0

    def _cost(self, prompt_tokens: int | None, completion_tokens: int | None) -> float:
        return self.price.cost(prompt_tokens, completion_tokens) if self.price is not None else 0.0

    def reserve(self, prompt_tokens: int, completion_tokens: int) -> Hold | None:
        """Reserves one request's estimate; None when it would pass the budget (which then closes:
        the run stops sending, even requests small enough to fit, so it stops at one clear row)."""
        tokens = prompt_tokens + completion_tokens
        cost = self._cost(prompt_tokens, completion_tokens)
        with self._lock:
            if not self.closed:
                over_tokens = (
                    self.max_total_tokens is not None
                    and self.spent_tokens + self.reserved_tokens + tokens > self.max_total_tokens
                )
                over_cost = (
                    self.max_cost is not None and self.spent_cost + self.reserved_cost + cost > self.max_cost
                )
                if not (over_tokens or over_cost):
                    self.reserved_tokens += tokens
                    self.reserved_cost += cost
                    return Hold(tokens, cost)
                self.closed = True
            self.refused += 1
            return None

    def settle(self, hold: Hold, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        """The row ended: its reservation becomes what the API reported it billed (nothing when no
        usage came back: a request refused or lost before an answer is not billed)."""
        with self._lock:
            self.reserved_tokens -= hold.tokens
            self.reserved_cost -= hold.cost
            self.spent_tokens += (prompt_tokens or 0) + (completion_tokens or 0)
            self.spent_cost += self._cost(prompt_tokens, completion_tokens)

    def refusal(self) -> str:
        """The message of a row the budget kept from being sent."""
        with self._lock:
            limits = []
            if self.max_total_tokens is not None:
                limits.append(f"max_total_tokens={self.max_total_tokens}")
            if self.max_cost is not None:
                limits.append(f"max_cost={self.max_cost:g}")
            return (
                f"not sent: the run's budget ({', '.join(limits)}) would be passed; spent "
                f"{self.spent_tokens} tokens / {self.spent_cost:.6g} so far. A later run with a "
                "larger budget asks this row"
            )

    def __repr__(self) -> str:
        return (
            f"Budget(max_total_tokens={self.max_total_tokens}, max_cost={self.max_cost}, "
            f"spent_tokens={self.spent_tokens}, reserved_tokens={self.reserved_tokens}, closed={self.closed})"
        )
