"""The request engine: one row's attempts, limits and retries, shared by the sync and async clients.

``_attempts`` is the whole policy for one row as a generator that yields the blocking steps it
needs (take a slot from the limiter, send, sleep) and receives what the network answered. The
clients (:mod:`.sync_client` with ``requests``, :mod:`.async_client` with ``aiohttp``) only perform
those steps: they share every rule about payloads, errors, retries, pauses, limits and secrets, and
differ only in I/O.

Every answer is reported to the client's :class:`~..pacing.adaptive.AdaptiveRate`, which sets the rate of
the limiter's pacer. A 429 is congestion, not a row failure: it does not spend the row's
``max_retries``; the row asks again when the pacer lets it, until the client has been refused for
``patience`` seconds without a single answer. Two exceptions keep a 429 final or counted: a server
that says not to retry (``x-should-retry: false``), and a wait longer than ``max_retry_wait`` (the
server wants more patience for one wait than the run grants, e.g. a daily quota: those spend a
retry, as every other failure does). ``max_retries=0`` means one request, whatever comes back.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_llmq.core.accounting.budget import WAIT, Budget, Hold
from airflow_provider_llmq.core.accounting.cost import Price
from airflow_provider_llmq.core.accounting.result import STATUS_ERROR, STATUS_OK, QueryResult
from airflow_provider_llmq.core.accounting.row_budget import RowBudget
from airflow_provider_llmq.core.endpoint.entra_token import TokenSource
from airflow_provider_llmq.core.endpoint.secrets import Scrubber
from airflow_provider_llmq.core.pacing.adaptive import AdaptiveRate
from airflow_provider_llmq.core.pacing.limits import AsyncLimiter, ThreadLimiter, estimate_request_tokens
from airflow_provider_llmq.core.pacing.reachability import Reachability
from airflow_provider_llmq.core.pacing.retry import RetryPolicy
from airflow_provider_llmq.core.request.error_codes import (
    BUDGET_EXCEEDED,
    CONNECTION_ERROR,
    CUT_BY_BUDGET,
    EMPTY_PROMPT,
    INVALID_OUTPUT,
    LENGTH,
    RATE_LIMITED,
)
from airflow_provider_llmq.core.request.payload import (
    Answer,
    ChatRequest,
    Failure,
    classify_response,
)
from airflow_provider_llmq.core.transport.retry_log import RetryLog
from airflow_provider_llmq.core.transport.transport_errors import classify_exception

__all__ = ["Acquire", "Plan", "Received", "Send", "Sleep", "Step", "resume"]


@dataclass(frozen=True)
class Acquire:
    tokens: int


@dataclass(frozen=True)
class Send:
    body: bytes


@dataclass(frozen=True)
class Sleep:
    seconds: float


Step = Acquire | Send | Sleep
# what a Send gets back: (status, headers, body) or the transport exception
Received = tuple[int, Mapping[str, str], bytes] | BaseException
Limiter = ThreadLimiter | AsyncLimiter
# one row's (or one pack's) attempts; a client advances it until it answers or asks to wait (Sleep),
# and a pooled method hands a waiting plan's worker to the next row meanwhile (methods/_run_queue.py)
Plan = Generator[Step, Received | None, Any]


def resume(plan: Plan, received: Received | None = None) -> Any:
    """The plan's next step, given what its last one received; once it has ended, its value (a row's
    result or a pack's results, never a step): what both clients' ``advance`` loops drive."""
    try:
        return plan.send(received)
    except StopIteration as done:
        return done.value


@dataclass(frozen=True)
class _RowPolicy:
    """What one row's attempts follow, derived once per client from :class:`QueryOptions`."""

    request: ChatRequest
    retry: RetryPolicy
    count_tokens: bool
    scrubber: Scrubber
    price: Price | None = None  # the model's price: results then carry their cost
    tokens: TokenSource | None = None  # Entra ID: a 401 refreshes its token once
    reach: Reachability | None = None  # a server that never answers ends the run in seconds
    retries: RetryLog = field(init=False)  # each retry's line, traceable to its row

    def __post_init__(self) -> None:
        object.__setattr__(self, "retries", RetryLog(self.scrubber))

    def estimated_tokens(self, prompt: str) -> int:
        """What a request reserves against tokens/min before it is sent: prompt + max_tokens."""
        text = (self.request.system_prompt or "") + prompt
        return estimate_request_tokens(text, self.request.max_completion_tokens())


def _is_empty(prompt: object) -> bool:
    return not isinstance(prompt, str) or not prompt.strip()


def _attempts(
    row_id: Any,
    prompt: Any,
    policy: _RowPolicy,
    limiter: Limiter,
    rate: AdaptiveRate,
    budget: Budget | None = None,
) -> Generator[Step, Received | None, QueryResult]:
    """One row, start to end, and its cost at the run's price. Every result it returns and every
    exception it raises passes the endpoint's scrubber here, the one place messages leave the engine."""
    try:
        result = yield from _row_attempts(row_id, prompt, policy, limiter, rate, budget)
        if policy.price is not None:
            result = dataclasses.replace(
                result,
                cost=policy.price.cost(
                    result.prompt_tokens, result.completion_tokens, result.cached_prompt_tokens
                ),
            )
    except Exception as exc:
        clean = policy.scrubber.exception(exc)
    else:
        return policy.scrubber.result(result)
    # raised outside the handler, so a stand-in does not carry the original as its context
    raise clean


_BUDGET_WAIT = 0.05  # seconds between two looks at a budget whose requests in flight hold it


def _cut(outcome: Answer | Failure) -> bool:
    """The answer stopped at its completion limit (``finish_reason: length``)."""
    if outcome.finish_reason != LENGTH:
        return False
    return isinstance(outcome, Answer) or outcome.code in (LENGTH, INVALID_OUTPUT)


def _row_attempts(
    row_id: Any, prompt: Any, policy: _RowPolicy, limiter: Limiter, rate: AdaptiveRate, budget: Budget | None
) -> Generator[Step, Received | None, QueryResult]:
    if _is_empty(prompt):
        return QueryResult(
            row_id, None, STATUS_ERROR, EMPTY_PROMPT, "prompt is null or empty: no request sent"
        )
    # with a budget, every attempt reserves its worst case before it waits for a slot (so rows
    # waiting on the pacer count as in flight) and settles it with the usage it was billed
    guard = RowBudget(budget, policy.request) if budget is not None else None
    conversation = policy.request.body(prompt)
    body = b"" if guard is not None else json.dumps(conversation, ensure_ascii=False).encode("utf-8")
    estimate = policy.estimated_tokens(prompt) if policy.count_tokens else 0
    retry = policy.retry
    clock = rate.clock
    started = time.monotonic()
    attempts = 0  # every request sent, 429s included
    failures = 0  # the attempts that spend max_retries
    throttled = 0  # this row's 429s, for the backoff of those without a usable hint
    repaired = False  # the one repair request of an invalid structured answer was sent
    reauthorized = False  # the one fresh Entra ID token a 401 may ask for
    reasks = 0  # answers cut by the limit llmq set for the budget, asked again with a larger one
    last: Failure | None = None  # what the previous attempt ended in, when it did not answer
    # usage over every attempt that reported one (a retried 200, an answer before its repair): each
    # was billed, so the row's tokens, cost and budget count them all
    billed_prompt: int | None = None
    billed_completion: int | None = None
    billed_cached: int | None = None  # of billed_prompt, served from the prompt cache

    def result(
        content: str | None,
        status: str,
        code: str | None = None,
        message: str | None = None,
        http_status: int | None = None,
        finish_reason: str | None = None,
    ) -> QueryResult:
        """The row's end, with what every attempt so far sent, was billed and took."""
        return QueryResult(
            row_id,
            content,
            status,
            code,
            message,
            http_status=http_status,
            attempts=attempts,
            prompt_tokens=billed_prompt,
            completion_tokens=billed_completion,
            cached_prompt_tokens=billed_cached,
            latency_ms=round((time.monotonic() - started) * 1000, 3),
            finish_reason=finish_reason,
            throttled=throttled,
        )

    def ended(outcome: Failure, message: str | None = None, code: str | None = None) -> QueryResult:
        # an invalid structured answer keeps its text (content); None for every other error
        return result(
            outcome.content,
            STATUS_ERROR,
            code or outcome.code,
            message or outcome.message,
            outcome.http_status,
            outcome.finish_reason,
        )

    def not_sent(code: str, message: str) -> QueryResult:
        return result(None, STATUS_ERROR, code, message, 429 if code == RATE_LIMITED and throttled else None)

    while True:
        hold = None
        if guard is not None:
            while True:
                sending = guard.body(conversation)
                hold = guard.reserve(sending)
                if hold is not WAIT:
                    break
                yield Sleep(_BUDGET_WAIT)
            if hold is None:
                assert budget is not None
                if last is None:
                    return not_sent(BUDGET_EXCEEDED, budget.refusal())
                if last.code == INVALID_OUTPUT and not _cut(last):
                    return ended(last)  # its repair does not fit: the invalid answer stands
                if _cut(last):
                    return ended(
                        last,
                        f"the answer stopped at max_tokens={guard.cut_at}, which llmq set to keep the "
                        f"budget; a longer one does not fit in it. {budget.refusal()}",
                        code=CUT_BY_BUDGET,
                    )
                return not_sent(BUDGET_EXCEEDED, f"{budget.refusal()} (after {last.code}: {last.message})")
            body = json.dumps(sending, ensure_ascii=False).encode("utf-8")
        assert hold is None or isinstance(hold, Hold)
        outcome: Answer | Failure | None = None
        try:
            yield Acquire(estimate)  # returns early once the run's patience is spent
            if rate.patience_exhausted():
                # every request refused for ``patience`` s: the rows still waiting end now, unsent,
                # instead of each spending one more 429 at the slowest rate (rate_limited is asked
                # again by the next try)
                return not_sent(
                    RATE_LIMITED,
                    f"not sent: the server refused every request for {rate.patience:g} s without a "
                    "single answer, and the run's patience is spent",
                )
            attempts += 1
            sent = clock()
            token = policy.tokens.generation if policy.tokens is not None else 0
            received = yield Send(body)
            headers: Mapping[str, str] | None = None
            if isinstance(received, BaseException):
                outcome = classify_exception(received)
                if outcome.code == CONNECTION_ERROR and policy.reach is not None:
                    policy.reach.on_connection_failure(clock(), outcome.message)
            else:
                assert received is not None
                status, headers, raw = received
                if policy.reach is not None and not policy.reach.reached:
                    policy.reach.on_response()
                if status == 401 and policy.tokens is not None and not reauthorized:
                    # the token expired in flight or was revoked: one fresh token, asked again
                    # without spending a retry; a second 401 is refused credentials, raised as for a key
                    reauthorized = True
                    policy.tokens.expire(token)
                    continue
                outcome = classify_response(status, headers, raw, policy.request.output)
        finally:
            if hold is not None and guard is not None:
                used = (outcome.prompt_tokens, outcome.completion_tokens) if outcome else (None, None)
                guard.budget.settle(hold, *used, cut=outcome is not None and _cut(outcome))
        now = clock()
        used_tokens = None
        if outcome.prompt_tokens is not None:
            used_tokens = outcome.prompt_tokens + (outcome.completion_tokens or 0)
            billed_prompt = (billed_prompt or 0) + outcome.prompt_tokens
            billed_completion = (billed_completion or 0) + (outcome.completion_tokens or 0)
            if outcome.cached_tokens is not None:
                billed_cached = (billed_cached or 0) + outcome.cached_tokens
            if estimate:
                # a 200 that is no usable answer (filtered, cut, a tool call) was billed all the same
                limiter.adjust_tokens(estimate, used_tokens)
        if isinstance(outcome, Answer) or outcome.http_status == 200:
            # any 200 was admitted by the quota: it is what the rate learns from
            rate.on_success(sent, now, headers, tokens=used_tokens)
        if guard is not None and guard.owns_limit and _cut(outcome):
            # cut by the limit llmq chose, not the user's: ask again with room (the budget decides)
            reasks += 1
            guard.cut()
            last = outcome if isinstance(outcome, Failure) else _cut_answer(outcome)
            if reasks <= _MAX_REASKS:
                continue
            return ended(
                last,
                f"the answer stopped at max_tokens={guard.limit} {reasks} times; llmq set that limit "
                "to keep the budget (set max_tokens in request_params to choose it)",
                code=CUT_BY_BUDGET,
            )
        if isinstance(outcome, Answer):
            return result(outcome.content, STATUS_OK, http_status=200, finish_reason=outcome.finish_reason)
        last = outcome
        if outcome.code == RATE_LIMITED and outcome.http_status == 429:
            throttled += 1
            hint = outcome.retry_after
            # the controller decides what the refusal says: a quota (it pauses the whole client for
            # the hint and cuts its rate once per episode) or noise (only this row waits); it
            # answers how long this row itself waits before it asks for a slot again
            wait = None if hint is None else min(hint, retry.max_retry_wait)
            row_wait = rate.on_throttled(sent, now, wait, headers)
            if not outcome.retryable or retry.max_retries == 0:
                return ended(outcome)
            if hint is not None and hint > retry.max_retry_wait:
                failures += 1
                if not retry.should_retry(outcome, failures):
                    return ended(outcome)
            elif rate.patience_exhausted(now):
                return ended(
                    outcome,
                    f"{outcome.message} (the server refused every request for {rate.patience:g} s "
                    "without a single answer, and the run's patience is spent)",
                )
            if row_wait is None:
                # no usable hint: this row backs off (jittered), so it does not ask again within
                # milliseconds while the client's rate is high
                row_wait = retry.delay(outcome, throttled)
            policy.retries.note(
                row_id, attempts, outcome.code, outcome.http_status, outcome.message, row_wait
            )
            if row_wait > 0:
                yield Sleep(row_wait)
            continue
        repair = None if repaired else policy.request.repair_body(prompt, outcome)
        if repair is not None:  # repair_invalid_output: ask once more, its answer validated again
            repaired = True
            conversation = repair
            body = json.dumps(repair, ensure_ascii=False).encode("utf-8")
            continue
        quick = None
        if outcome.http_status != 200:
            # 5xx, resets and timeouts: the controller tells an overloaded server from noise, and
            # an isolated failure from an outage (its row retries soon, see AdaptiveRate.on_failure)
            quick = rate.on_failure(sent, now, status=outcome.http_status)
        failures += 1
        if not retry.should_retry(outcome, failures):
            return ended(outcome)
        delay = retry.delay(outcome, failures)
        if quick is not None and outcome.retry_after is None:
            # isolated failures are independent: a row failed twice by noise is no outage, and its
            # second backoff of 1 s ended short runs late (2 % of 500s: the async 0.65 against the
            # threads' 0.78 of the limit, the row that met two). A server's own hint is kept.
            delay = min(delay, quick * 2 ** (failures - 1))
        policy.retries.note(row_id, attempts, outcome.code, outcome.http_status, outcome.message, delay)
        yield Sleep(delay)


_MAX_REASKS = 3  # an answer cut by llmq's own limit is asked again with 2x, 4x, 8x the room


def _cut_answer(answer: Answer) -> Failure:
    """A text answer cut by llmq's limit, kept as the row's failure should no longer answer fit."""
    return Failure(
        LENGTH,
        "the answer stopped at its max_tokens",
        False,
        200,
        None,
        answer.prompt_tokens,
        answer.completion_tokens,
        answer.finish_reason,
        content=answer.content,
    )
