"""A run's token and cost budget, shared by every thread or task of a client: a bound that holds.

Every **attempt** (a row's first request, each retry, the repair of an invalid structured answer, a
re-ask of an answer cut short) *reserves* its worst case before it waits for a slot and is sent, and
*settles* it with the usage the server reported when it comes back (nothing, for a refusal or a
reset: not billed). The worst case of an attempt is:

- its prompt: the counted estimate times the largest ratio of billed to estimated prompt tokens seen
  so far in this run (with a margin; 1.5 before any answer), so that a tokenizer the counter does not
  know, or a schema the server bills with the prompt, is learned rather than passed;
- its completion: ``max_tokens`` when the user set it; otherwise the **limit llmq sends**
  (:meth:`Budget.completion_limit`): about 1.5x the longest complete answer seen, never more than
  what is left divided by the requests in flight (nor less than the longest answer seen). An answer
  that limit cut (``finish_reason: length``) is asked again with twice the limit while the budget
  allows, and ends ``cut_by_budget`` (asked again by a later run) when it does not.

An attempt that does not fit beside the reservations in flight **waits** for them to settle
(:data:`WAIT`); the budget *closes* only when what was actually spent plus this attempt's worst case
passes it, and from then on nothing more is sent (rows end ``budget_exceeded``, asked again by a
later run). So with the prompt ratio learned, spent never passes the budget, and a run with enough
work stops within one request's worst case of it.

A run's budget is the **run's**, across task tries: the Spark layer gives a try what is left after
what the checkpoint says earlier tries of the run were billed. On Spark executors many budgets share
one: each draws *grants* from the driver's ledger (a :class:`~.grants.GrantSource`) and reserves
inside them; the ledger, not each budget, decides when the run's budget is closed.

Safe for threads and event loops alike: one ``threading.Lock``, held for a few additions and never
across a wait, so an event loop never blocks on it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Final

from airflow_provider_llmq.core.accounting.cost import Price
from airflow_provider_llmq.core.accounting.grants import (
    GrantAnswer,
    GrantSource,
    GrantsUnreachable,
    Room,
    Standing,
)
from airflow_provider_llmq.core.errors import LLMQueryConfigError

__all__ = ["WAIT", "Budget", "Hold"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Hold:
    """One attempt's reservation; ``prompt_estimate`` is the raw count, for learning its ratio."""

    tokens: int
    cost: float
    prompt_estimate: int


class _Wait:
    def __repr__(self) -> str:
        return "WAIT"


#: :meth:`Budget.reserve`'s answer when the attempt fits once requests in flight settle
WAIT: Final = _Wait()

# before any answer: a count off by half is still inside the reservation
_FIRST_PROMPT_RATIO = 1.5
_PROMPT_MARGIN = 1.1
# the completion limit llmq sends: 1.5x the longest complete answer (+ a few tokens for variance)
_LIMIT_GROWTH = 1.5
_LIMIT_SLACK = 16
_FIRST_LIMIT = 256  # nothing learned and no expected_completion_tokens: a short answer's room
_MIN_LIMIT = 16
# a grant is this many of the attempt's worst case: few draws per task, little held idle at the end
_GRANT_CHUNK = 4
_REDRAW_SECONDS = 0.1  # a ledger that said wait is asked again after this long
_IDLE_SECONDS = 0.25  # nothing in flight this long (a task ended): what is unreserved goes back
_fell_back = threading.Event()


class Budget:
    """What a run may still spend.

    :param max_total_tokens: tokens (prompt + completion) the run may spend; None for no limit.
    :param max_cost: cost the run may spend at ``price``; None for no limit.
    :param price: the model's price; needed for ``max_cost`` and to count cost at all.
    :param expected_completion_tokens: the user's guess of an answer's length: the first limit
        llmq sends is twice it (before any answer was seen).
    :param grants: where this budget draws its room from when it shares the run's with others
        (a Spark executor's task: the driver's ledger); None: the limits are this budget's own.
    """

    def __init__(
        self,
        max_total_tokens: int | None = None,
        max_cost: float | None = None,
        price: Price | None = None,
        expected_completion_tokens: int | None = None,
        grants: GrantSource | None = None,
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
        self.in_flight = 0
        self.closed = False
        self.refused = 0
        self._prompt_ratio: float | None = None  # billed / estimated prompt tokens, the largest seen
        self._longest_answer = 0  # completion tokens of the longest complete answer seen
        self._first_limit = 2 * expected_completion_tokens if expected_completion_tokens else _FIRST_LIMIT
        # with grants: the room granted (billed + reserved stay inside it), what the other holders
        # hold, and the one call to the source at a time (the wire lock orders them, taken before
        # ``_lock`` and never inside it)
        self._grants = grants
        self._ceiling = self._elsewhere = Room()
        self._drawing = False
        self._next_draw = 0.0
        self._idle_timer: threading.Timer | None = None
        self._wire = threading.Lock()

    def _cost(self, prompt_tokens: int | None, completion_tokens: int | None) -> float:
        return self.price.cost(prompt_tokens, completion_tokens) if self.price is not None else 0.0

    def prompt_worst_case(self, prompt_estimate: int) -> int:
        """The prompt tokens an attempt reserves for a counted estimate."""
        ratio = self._prompt_ratio * _PROMPT_MARGIN if self._prompt_ratio else _FIRST_PROMPT_RATIO
        return math.ceil(prompt_estimate * max(1.0, ratio) - 1e-9)  # 2.0 x 1.1 x 100 is 220, not 221

    def completion_limit(self) -> int:
        """The ``max_tokens`` llmq sends when the user set none: room for the longest answer seen
        and then some, shrunk (never below that answer) so that the requests in flight fit in what
        is left."""
        with self._lock:
            if self._longest_answer:
                target = math.ceil(self._longest_answer * _LIMIT_GROWTH) + _LIMIT_SLACK
            else:
                target = self._first_limit
            floor = max(_MIN_LIMIT, self._longest_answer)
            if self.max_total_tokens is None:
                return target
            left = self.max_total_tokens - self._elsewhere.tokens - self.spent_tokens - self.reserved_tokens
            share = left // (self.in_flight + 1)
            return max(floor, min(target, share))

    def reserve(self, prompt_estimate: int, completion_tokens: int) -> Hold | _Wait | None:
        """Reserves one attempt's worst case. :data:`WAIT` when it fits only once requests in flight
        settle; None when even then it would pass the budget, which then closes: the run stops
        sending, even requests small enough to fit, so it stops at one clear row."""
        prompt = self.prompt_worst_case(prompt_estimate)
        tokens = prompt + completion_tokens
        cost = self._cost(prompt, completion_tokens)
        with self._lock:
            if not self.closed:
                if not self._passes(tokens, cost, self.reserved_tokens, self.reserved_cost, granted=True):
                    self.reserved_tokens += tokens
                    self.reserved_cost += cost
                    self.in_flight += 1
                    return Hold(tokens, cost, prompt_estimate)
                if self._grants is not None:  # the ledger decides: draw, and look again shortly
                    if not self._drawing and time.monotonic() >= self._next_draw:
                        self._drawing = True
                        threading.Thread(
                            target=self._draw, args=(tokens, cost), name="llmq-grant", daemon=True
                        ).start()
                    return WAIT
                if self.in_flight and not self._passes(tokens, cost, 0, 0.0):
                    return WAIT
                self.closed = True
            self.refused += 1
            return None

    def fits_alone(self, prompt_estimate: int, completion_tokens: int) -> bool:
        """Whether an attempt of this estimate fits beside what was billed, once nothing else is in
        flight (a pack too large for that is split before it is asked)."""
        prompt = self.prompt_worst_case(prompt_estimate)
        with self._lock:
            return not self._passes(prompt + completion_tokens, self._cost(prompt, completion_tokens), 0, 0.0)

    def release(self) -> None:
        """The holder is done (its task ended): what is granted and unreserved goes back now."""
        with self._lock:
            timer, self._idle_timer = self._idle_timer, None
        if timer is not None:
            timer.cancel()
        if self._grants is not None:
            self._when_idle()

    def _passes(
        self, tokens: int, cost: float, reserved_tokens: int, reserved_cost: float, granted: bool = False
    ) -> bool:
        """Whether spent + reserved + the attempt pass the budget; with grants, ``granted`` compares
        with the room granted, else with the budget less what the other holders hold."""
        max_tokens, max_cost = self.max_total_tokens, self.max_cost
        if self._grants is not None:
            if granted:
                max_tokens = None if max_tokens is None else self._ceiling.tokens
                max_cost = None if max_cost is None else self._ceiling.cost
            else:
                max_tokens = None if max_tokens is None else max_tokens - self._elsewhere.tokens
                max_cost = None if max_cost is None else max_cost - self._elsewhere.cost
        over_tokens = max_tokens is not None and self.spent_tokens + reserved_tokens + tokens > max_tokens
        over_cost = max_cost is not None and self.spent_cost + reserved_cost + cost > max_cost
        return over_tokens or over_cost

    def _standing(self) -> Standing:
        """Gives back what is granted and not reserved (under ``_lock``): the ceiling becomes what
        was billed plus what is in flight, as the source is about to be told."""
        kept_tokens = self.spent_tokens + self.reserved_tokens
        kept_cost = self.spent_cost + self.reserved_cost
        self._ceiling = self._ceiling.at_most(kept_tokens, kept_cost)
        return Standing(self.spent_tokens, self.spent_cost, kept_tokens, kept_cost)

    def _draw(self, tokens: int, cost: float) -> None:
        """One draw from the grant source, off the callers' threads (an event loop never waits on
        the network); the callers look again after :data:`WAIT`."""
        assert self._grants is not None
        answer: GrantAnswer | None = None
        with self._wire:
            with self._lock:
                standing = self._standing()
            try:
                chunk = (_GRANT_CHUNK * tokens, _GRANT_CHUNK * cost)
                answer = self._grants.draw(standing, (tokens, cost), chunk)
            except GrantsUnreachable as exc:
                self._fall_back(str(exc))
            except Exception as exc:  # the ledger was reached before and is gone: nothing more is safe
                log.warning("the budget ledger was lost (%s): this task sends nothing more", exc)
        with self._lock:
            self._drawing = False
            if self._grants is None:  # fell back
                return
            if answer is None or answer.closed:
                self.closed = True
                return
            self._elsewhere = Room(answer.elsewhere_tokens, answer.elsewhere_cost)
            self._ceiling = self._ceiling.plus(answer.tokens, answer.cost)
            if answer.wait:
                self._next_draw = time.monotonic() + _REDRAW_SECONDS

    def _fall_back(self, reason: str) -> None:
        """The ledger cannot be reached from here: this budget keeps the fixed share."""
        assert self._grants is not None
        tokens, cost = self._grants.fallback()
        if not _fell_back.is_set():  # once per process; the driver's log says it once for the job
            _fell_back.set()
            log.info("the budget ledger cannot be reached (%s): tasks keep a fixed share of it", reason)
        with self._lock:
            self._grants = None
            self.max_total_tokens = tokens if self.max_total_tokens is not None else None
            self.max_cost = cost if self.max_cost is not None else None

    def _when_idle(self) -> None:
        """Nothing in flight for a while (the task ended, or waits for rows): give back what is
        granted and unreserved, so that another task may use it (closed too: what its last
        requests in flight held, and did not spend, is another task's to wait for)."""
        with self._wire:
            with self._lock:
                self._idle_timer = None
                grants = self._grants
                unreserved = (
                    self._ceiling.tokens > self.spent_tokens + self.reserved_tokens
                    or self._ceiling.cost > self.spent_cost + self.reserved_cost
                )
                if grants is None or self.in_flight or self._drawing or not unreserved:
                    return
                standing = self._standing()
            try:
                grants.give_back(standing)
            except Exception as exc:  # kept by the ledger until the job ends: never passed, only idle
                log.debug("the budget ledger did not take back an unused grant: %s", exc)

    def settle(
        self,
        hold: Hold,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        cut: bool = False,
    ) -> None:
        """The attempt came back: its reservation becomes what the API reported it billed (nothing
        when no usage came back: a request refused or lost before an answer is not billed).

        :param cut: the answer stopped at its limit (``finish_reason: length``): the answer wanted at
            least that many tokens.

        Cached prompt tokens count at the full input price here: the budget errs on the safe side.
        """
        with self._lock:
            self.reserved_tokens -= hold.tokens
            self.reserved_cost -= hold.cost
            self.in_flight -= 1
            self.spent_tokens += (prompt_tokens or 0) + (completion_tokens or 0)
            self.spent_cost += self._cost(prompt_tokens, completion_tokens)
            if prompt_tokens and hold.prompt_estimate:
                ratio = prompt_tokens / hold.prompt_estimate
                self._prompt_ratio = max(self._prompt_ratio or 0.0, ratio)
            if completion_tokens:
                longest = completion_tokens * 2 if cut else completion_tokens
                self._longest_answer = max(self._longest_answer, longest)
            if self._grants is not None and not self.in_flight and self._idle_timer is None:
                self._idle_timer = threading.Timer(_IDLE_SECONDS, self._when_idle)
                self._idle_timer.daemon = True
                self._idle_timer.start()

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
                f"{self.spent_tokens} tokens / {self.spent_cost:.6g} so far. A later run with "
                "a larger budget asks this row"
            )

    def __repr__(self) -> str:
        return (
            f"Budget(max_total_tokens={self.max_total_tokens}, max_cost={self.max_cost}, "
            f"spent_tokens={self.spent_tokens}, reserved_tokens={self.reserved_tokens}, closed={self.closed})"
        )
