"""Where a :class:`~.budget.Budget` draws its room from when it is one of many sharing a run's
budget (the Spark executors' tasks): a *grant source*, such as the Spark driver's ledger.

A budget with a grant source reserves inside what it was granted (its *ceiling*); when the next
attempt does not fit, it gives back what it holds unreserved and asks for a grant of a few attempts'
worst case. The source answers with a grant, *wait* (the room exists once reservations elsewhere
settle or come back) or *closed* (what was billed plus this attempt passes the budget). The answers
are computed by the source; this module is only their shape, so core needs no network or Spark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from airflow_provider_llmq.core.errors import LLMQueryError

__all__ = ["GrantAnswer", "GrantSource", "GrantTicket", "GrantsUnreachable", "Room", "Standing"]


@dataclass(frozen=True, slots=True)
class Room:
    """Tokens and cost together, the two units a budget bounds: a holder's ceiling, what it was
    billed, or what the other holders hold."""

    tokens: int = 0
    cost: float = 0.0

    def plus(self, tokens: int, cost: float) -> Room:
        return Room(self.tokens + tokens, self.cost + cost)

    def at_most(self, tokens: int, cost: float) -> Room:
        return Room(min(self.tokens, tokens), min(self.cost, cost))


@dataclass(frozen=True, slots=True)
class Standing:
    """A holder's account as it tells the source: what it was billed, and the ceiling it keeps
    (billed plus its reservations in flight; the rest of its grants goes back)."""

    spent_tokens: int
    spent_cost: float
    kept_tokens: int
    kept_cost: float


@dataclass(frozen=True, slots=True)
class GrantAnswer:
    """A source's answer to a draw.

    :param tokens: tokens granted on top of the kept ceiling (0 with ``wait`` or ``closed``).
    :param cost: cost granted likewise.
    :param wait: ask again shortly: the room exists once reservations elsewhere settle.
    :param closed: what was billed plus the attempt passes the budget: send nothing more.
    :param elsewhere_tokens: what the other holders hold or were billed, for the completion limit.
    :param elsewhere_cost: likewise for cost.
    """

    tokens: int = 0
    cost: float = 0.0
    wait: bool = False
    closed: bool = False
    elsewhere_tokens: int = 0
    elsewhere_cost: float = 0.0


class GrantsUnreachable(LLMQueryError):
    """The first contact with the source failed: the budget falls back to a fixed share."""


class GrantSource(Protocol):
    """One holder's line to the ledger; calls block (a budget makes them off its callers' threads)."""

    def draw(self, standing: Standing, need: tuple[int, float], chunk: tuple[int, float]) -> GrantAnswer:
        """A grant of at least ``need`` (tokens, cost), ``chunk`` when there is room; raises
        :class:`GrantsUnreachable` when the source was never reached."""
        ...

    def give_back(self, standing: Standing) -> None:
        """Returns what the holder holds beyond ``standing``'s kept ceiling."""
        ...

    def fallback(self) -> tuple[int | None, float | None]:
        """The fixed share (tokens, cost) the holder keeps to where the source cannot be reached."""
        ...

    def secrets(self) -> tuple[str, ...]:
        """Values a message must never show (the source's shared secret)."""
        ...


class GrantTicket(Protocol):
    """What travels to an executor with the options: each budget opens its own line."""

    def open(self) -> GrantSource: ...
