"""The pack policy: one pack of rows, start to end, each row ending with its own answer or error.

Like the engine's ``_attempts``, it is a generator of the engine's steps (slot, send, sleep), so
both clients run it as they run one row. A pack is one request through ``_attempts`` (the limiter
counts it as one request, tokens/min and the budget by its real tokens, retries and 429s as for a
row). Then:

* an answer is matched by id (:mod:`.unpack`); the rows without exactly one valid answer (missing,
  answered twice, invalid) are asked again together, a smaller pack, or alone when one is left;
* a pack that fails as a whole with what may be one row's doing (a content filter, a context
  length, an unusable answer, any permanent error) is split in halves, down to single rows, so one
  bad row ends as its own explicit error and every other row is answered;
* a transient failure that outlived its retries (5xx, timeouts, a broken answer) is split in
  halves too, since one row may be its cause (a real API fails the request of a row it cannot
  serve): each half gets one attempt, single rows what is left of a second allowance of the pack's
  attempts, so a row is part of at most about twice the attempts its pack made, and only a row
  that fails alone ends with the error. A refusal for the whole client (429 patience, the budget)
  ends every row of the pack with it: halves would meet the same, and a later try asks them again.

The pack's usage, failed packs included, is split over its rows in proportion to their prompt
tokens, so tokens and cost stay per row and add up to what was billed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow_provider_llmq.core.accounting.cost import MESSAGE_OVERHEAD_TOKENS, TokenCounter
from airflow_provider_llmq.core.accounting.result import STATUS_ERROR, STATUS_OK, QueryResult
from airflow_provider_llmq.core.packing.envelope import PACK_INSTRUCTION, PackedChatRequest, envelope_text
from airflow_provider_llmq.core.packing.sizer import PackSizer
from airflow_provider_llmq.core.packing.unpack import unpack
from airflow_provider_llmq.core.request.error_codes import (
    BUDGET_EXCEEDED,
    CONTEXT_LENGTH,
    CUT_BY_BUDGET,
    INVALID_OUTPUT,
    LENGTH,
    RATE_LIMITED,
    TIMEOUT,
    TRANSIENT_ERROR_CODES,
)

if TYPE_CHECKING:
    from airflow_provider_llmq.core.accounting.budget import Budget
    from airflow_provider_llmq.core.pacing.adaptive import AdaptiveRate
    from airflow_provider_llmq.core.request.payload import ChatRequest
    from airflow_provider_llmq.core.transport.engine import Limiter, Received, Step, _RowPolicy

__all__ = [
    "PackContext",
    "group_rows",
    "pack_attempts",
    "pack_policy_of",
    "row_tokens",
    "saved_tokens",
    "shares",
]

Item = tuple[Any, Any]
_ITEM_TOKENS = 16  # an item's id and JSON punctuation in the envelope
# failures that say the pack was too big, not that one row is bad: the sizer shrinks on them
_SIZE_CODES = frozenset({CONTEXT_LENGTH, LENGTH, INVALID_OUTPUT})
# transient failures of the whole client, not of a row: a pack's halves would meet the same
_CLIENT_CODES = frozenset({RATE_LIMITED, BUDGET_EXCEEDED, CUT_BY_BUDGET})


def row_tokens(prompt: Any) -> int:
    """A row's weight in a pack: its prompt's tokens and its item's framing."""
    return TokenCounter.shared().count(prompt if isinstance(prompt, str) else None) + _ITEM_TOKENS


def group_rows(rows: Iterable[Item], sizer: PackSizer) -> Iterator[list[Item]]:
    """The rows in packs, lazily: a pack closes at the sizer's row cap or token cap (a row too big
    for the token cap goes alone). Empty prompts are packs of their own (no request is sent)."""
    pack: list[Item] = []
    tokens = 0
    for row in rows:
        prompt = row[1]
        if not isinstance(prompt, str) or not prompt.strip():
            yield [row]
            continue
        weight = row_tokens(prompt)
        cap = sizer.token_cap()
        if pack and (len(pack) >= sizer.row_cap() or (cap is not None and tokens + weight > cap)):
            yield pack
            pack, tokens = [], 0
        pack.append(row)
        tokens += weight
    if pack:
        yield pack


def pack_policy_of(policy: _RowPolicy) -> _RowPolicy:
    """The policy a pack is asked with: the row policy's, with the pack's body."""
    return dataclasses.replace(policy, request=PackedChatRequest.of(policy.request))


def _prompt_estimate(request: ChatRequest, text: str) -> int:
    """A pack's prompt tokens counted before it is sent: the instruction, its message's framing, and
    each item's id and JSON punctuation, which a word count of the envelope misses."""
    rows = request.rows if isinstance(request, PackedChatRequest) else 1
    counter = TokenCounter.shared()
    counted = counter.prompt_tokens(request.system_prompt, text) + counter.count(PACK_INSTRUCTION)
    return counted + MESSAGE_OVERHEAD_TOKENS + _ITEM_TOKENS * rows


@dataclass(frozen=True)
class PackContext:
    """What a pack's attempts use: the row policy (rows asked alone), the pack policy (its body), the
    client's limiter, adaptive rate and budget, and the sizer."""

    policy: _RowPolicy
    pack_policy: _RowPolicy
    limiter: Limiter
    rate: AdaptiveRate
    budget: Budget | None
    sizer: PackSizer


@dataclass
class _Spent:
    """What one row was part of so far: requests, 429s and its share of the billed tokens."""

    attempts: int = 0
    throttled: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    share: float = 0.0  # of the requests sent: 1/n for each request of n rows

    def add(
        self, attempts: int, throttled: int, prompt: float | None, completion: float | None, rows: int = 1
    ) -> None:
        self.attempts += attempts
        self.share += attempts / rows
        self.throttled += throttled
        if prompt is not None:
            self.prompt_tokens = (self.prompt_tokens or 0) + round(prompt)
        if completion is not None:
            self.completion_tokens = (self.completion_tokens or 0) + round(completion)


def shares(total: int | None, weights: list[int]) -> list[float | None]:
    """``total`` split in proportion to ``weights``, as integers adding up to it (largest remainder)."""
    if total is None:
        return [None] * len(weights)
    whole = sum(weights) or len(weights)
    exact = (
        [total * (w or 1) / whole for w in weights] if sum(weights) else [total / len(weights)] * len(weights)
    )
    floors = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: exact[i] - floors[i], reverse=True)
    for i in order[: total - sum(floors)]:
        floors[i] += 1
    return [float(x) for x in floors]


def pack_attempts(rows: list[Item], ctx: PackContext) -> Generator[Step, Received | None, list[QueryResult]]:
    """Every row of ``rows`` to its own result, in the order they end."""
    from airflow_provider_llmq.core.transport.engine import _attempts

    started = time.monotonic()
    spent = [_Spent() for _ in rows]
    weights = [row_tokens(prompt) for _, prompt in rows]
    results: list[QueryResult] = []
    # (rows, attempts left): None is a pack's first asking (its full retries); after a transient
    # failure, the attempts each of its rows may still be part of (see _transient_halves)
    todo: list[tuple[list[int], int | None]] = [(list(range(len(rows))), None)]
    while todo:
        group, left = todo.pop()
        if len(group) == 1:
            index = group[0]
            policy = ctx.policy if left is None else _with_attempts(ctx.policy, left)
            alone = yield from _attempts(*rows[index], policy, ctx.limiter, ctx.rate, ctx.budget)
            results.append(_merged(alone, spent[index], ctx))
            continue
        prompts = [rows[i][1] for i in group]
        text = envelope_text(prompts)
        policy = _policy_for(ctx, len(group), None if left is None else 1)
        if ctx.budget is not None and not _fits(ctx.budget, policy, text):
            # the budget closes at the first request it refuses: a pack too big for what is left
            # is split first, so the budget still ends at one clear row, not at a whole pack
            todo.extend((half, left) for half in _halves(group))
            continue
        pack = yield from _attempts(f"pack of {len(group)}", text, policy, ctx.limiter, ctx.rate, ctx.budget)
        for i, prompt_share, completion_share in zip(
            group,
            shares(pack.prompt_tokens, [weights[i] for i in group]),
            shares(pack.completion_tokens, [weights[i] for i in group]),
            strict=True,
        ):
            spent[i].add(pack.attempts, pack.throttled, prompt_share, completion_share, len(group))
        if not pack.ok:
            code = pack.error_code or ""
            if code in _CLIENT_CODES:
                results.extend(
                    _from_pack(rows[i][0], pack, spent[i], len(group), started, ctx, None) for i in group
                )
                continue
            transient = code in TRANSIENT_ERROR_CODES
            ctx.sizer.failed(
                len(group),
                pack.prompt_tokens,
                size=code in _SIZE_CODES or code == TIMEOUT,
                context=code == CONTEXT_LENGTH,
            )
            if transient:
                todo.extend(
                    _transient_halves(group, ctx.policy.retry.max_retries + 1 if left is None else left - 1)
                )
            else:
                todo.extend((half, None if left is None else max(1, left - 1)) for half in _halves(group))
            continue
        ids = [str(n) for n in range(1, len(group) + 1)]
        found = unpack(pack.response or "", ids, ctx.policy.request.output)
        if found.problem is not None or not found.answers:
            ctx.sizer.failed(len(group), pack.prompt_tokens, size=True)
            todo.extend((half, left) for half in _halves(group))
            continue
        ctx.sizer.answered(len(group), complete=not found.missing, completion_tokens=pack.completion_tokens)
        saved = _saved(ctx, policy, text, prompts)
        for pack_id, i, row_saved in zip(ids, group, saved, strict=True):
            answer = found.answers.get(pack_id)
            if answer is not None:
                row = _from_pack(rows[i][0], pack, spent[i], len(group), started, ctx, answer)
                results.append(dataclasses.replace(row, prompt_tokens_saved=row_saved))
        kept = [n for pack_id, n in zip(ids, saved, strict=True) if pack_id in found.answers]
        ctx.sizer.saved(len(kept), sum(kept))
        if found.missing:  # asked again together: a smaller pack than this one, so this ends
            todo.append(([group[ids.index(pack_id)] for pack_id in found.missing], left))
    return results


def _policy_for(ctx: PackContext, rows: int, attempts: int | None = None) -> _RowPolicy:
    """The pack policy for ``rows`` rows: its ``max_tokens`` is each row's, scaled; ``attempts``
    (None: the run's retries) bounds the requests it makes."""
    request = ctx.pack_policy.request
    if isinstance(request, PackedChatRequest):
        request = request.for_rows(rows)
    policy = dataclasses.replace(ctx.pack_policy, request=request)
    return policy if attempts is None else _with_attempts(policy, attempts)


def _with_attempts(policy: _RowPolicy, attempts: int) -> _RowPolicy:
    """``policy`` making at most ``attempts`` requests (429s aside, which spend no retry)."""
    retry = dataclasses.replace(policy.retry, max_retries=max(0, attempts - 1))
    return dataclasses.replace(policy, retry=retry)


def _transient_halves(group: list[int], left: int) -> list[tuple[list[int], int]]:
    """A pack that failed transiently after its retries, split so that each of its rows is part of
    at most ``left`` more attempts: a half of several rows is asked once (and costs one), single
    rows get what is left; with one attempt left, the pack goes straight to single rows."""
    if left <= 1:
        return [([i], max(1, left)) for i in reversed(group)]  # popped last first: in order
    return [(half, left) for half in _halves(group)]


def _saved(ctx: PackContext, policy: _RowPolicy, text: str, prompts: list[str]) -> list[int]:
    return saved_tokens(ctx.policy.request.system_prompt, policy.request, text, prompts)


def saved_tokens(system_prompt: str | None, request: ChatRequest, text: str, prompts: list[str]) -> list[int]:
    """Prompt tokens each row of a pack (its envelope ``text``, sent with ``request``) saved against
    one request of its own, both sides counted the same way before sending (so the counter's own
    error cancels out); the pack's count is shared by the rows' weights, as its usage is."""
    counter = TokenCounter.shared()
    packed = _prompt_estimate(request, text)
    parts = shares(packed, [row_tokens(p) for p in prompts])
    return [
        counter.prompt_tokens(system_prompt, p) - round(s or 0) for p, s in zip(prompts, parts, strict=True)
    ]


def _fits(budget: Budget, policy: _RowPolicy, text: str) -> bool:
    """Whether a pack could be reserved once nothing else is in flight (a closed budget refuses it
    anyway): its prompt and its completion limit, the user's scaled or the one llmq would set."""
    if budget.closed:
        return True
    completion = policy.request.max_completion_tokens() or budget.completion_limit()
    return budget.fits_alone(_prompt_estimate(policy.request, text), completion)


def _halves(group: list[int]) -> list[list[int]]:
    middle = len(group) // 2
    return [group[middle:], group[:middle]]  # popped last first: the first half is asked first


def _cost(ctx: PackContext, spent: _Spent) -> float | None:
    price = ctx.policy.price
    return None if price is None else price.cost(spent.prompt_tokens, spent.completion_tokens)


def _from_pack(
    row_id: Any,
    pack: QueryResult,
    spent: _Spent,
    rows: int,
    started: float,
    ctx: PackContext,
    answer: str | None,
) -> QueryResult:
    """A row's result from the pack of ``rows`` rows that ended it: its ``answer``, else the pack's
    error (which outlived its retries), with what the row's packs spent on it."""
    if answer is not None:
        fate: dict[str, Any] = {"response": answer, "status": STATUS_OK, "http_status": 200}
    else:
        fate = {
            "response": None,
            "status": STATUS_ERROR,
            "error_code": pack.error_code,
            "error_message": f"{pack.error_message} (asked in a pack of {rows} rows)",
            "http_status": pack.http_status,
        }
    return QueryResult(
        row_id,
        **fate,
        attempts=spent.attempts,
        prompt_tokens=spent.prompt_tokens,
        completion_tokens=spent.completion_tokens,
        latency_ms=round((time.monotonic() - started) * 1000, 3),
        finish_reason=pack.finish_reason,
        throttled=spent.throttled,
        cost=_cost(ctx, spent),
        pack_rows=rows,
        requests=round(spent.share, 6),
    )


def _merged(alone: QueryResult, spent: _Spent, ctx: PackContext) -> QueryResult:
    """A row asked alone, with what the packs it was part of before spent on it."""
    if not spent.attempts:
        return alone
    total = _Spent(spent.attempts, spent.throttled, spent.prompt_tokens, spent.completion_tokens)
    total.add(alone.attempts, alone.throttled, alone.prompt_tokens, alone.completion_tokens)
    return dataclasses.replace(
        alone,
        attempts=total.attempts,
        throttled=total.throttled,
        prompt_tokens=total.prompt_tokens,
        completion_tokens=total.completion_tokens,
        cost=_cost(ctx, total) if ctx.policy.price is not None else alone.cost,
        requests=round(spent.share + alone.attempts, 6),
    )
