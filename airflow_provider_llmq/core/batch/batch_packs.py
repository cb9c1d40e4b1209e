"""Packs on the Batch API (``rows_per_request``): several rows in one request line, in the live
envelope (:mod:`..packing.envelope`), and a pack's result line back to its rows. Pure functions over
values: no I/O.

A pack line's ``custom_id`` names the pack, not a row. Which rows it holds (their request keys, in
item order) and what earlier lines of those rows were billed (:class:`Spent`) travel beside the
request file as :class:`PackEntry`, never to the API. A pack's answer is matched by id and each
item checked on its own (:func:`~..packing.unpack.unpack`), its usage split over its rows in
proportion to their prompt tokens, as live. The rows without exactly one valid answer are asked
again together; a line that failed whole (a content filter, a context length, an unusable answer,
a 5xx) is asked again as two halves, down to single rows sent as plain lines, so one bad row ends
as its own explicit error and every other row is answered.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_llmq.core.accounting.cost import Price, RequestEstimate
from airflow_provider_llmq.core.accounting.result import STATUS_OK, QueryResult
from airflow_provider_llmq.core.batch.batch_estimate import LineEstimator
from airflow_provider_llmq.core.batch.batch_files import LineBuilder, is_empty_prompt
from airflow_provider_llmq.core.packing.envelope import PackedChatRequest, envelope_text
from airflow_provider_llmq.core.packing.runner import group_rows, row_tokens, saved_tokens, shares
from airflow_provider_llmq.core.packing.sizer import PackSizer
from airflow_provider_llmq.core.packing.unpack import unpack
from airflow_provider_llmq.core.request.structured import StructuredOutput

__all__ = [
    "PACK_ID_PREFIX",
    "PackEntry",
    "PackLineBuilder",
    "Reask",
    "Spent",
    "estimate_lines",
    "settle_pack",
    "with_spent",
]

PACK_ID_PREFIX = "llmq-pack-"


@dataclass
class Spent:
    """What the earlier lines a row was part of were billed: its share of their usage, the lines
    (``attempts``) and its share of them (``requests``: 1/n for a line of n rows)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    attempts: int = 0
    requests: float = 0.0

    def plus(self, prompt: float | None, completion: float | None, cached: float | None, rows: int) -> Spent:
        return Spent(
            self.prompt_tokens + round(prompt or 0),
            self.completion_tokens + round(completion or 0),
            self.cached_tokens + round(cached or 0),
            self.attempts + 1,
            self.requests + 1 / rows,
        )

    def result_fields(self) -> dict[str, Any]:
        """What a row's ``QueryResult`` carries of it."""
        return {
            "attempts": self.attempts,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_prompt_tokens": self.cached_tokens,
            "requests": round(self.requests, 6),
        }


@dataclass(frozen=True)
class PackEntry:
    """The rows of one line of a request file (a pack, or a row asked again alone) and what their
    earlier lines spent; kept beside the file."""

    keys: list[str]
    spent: list[Spent] = field(default_factory=list)  # per key; empty: nothing spent yet

    def spent_of(self, index: int) -> Spent:
        return self.spent[index] if self.spent else Spent()

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"keys": self.keys}
        if self.spent:
            entry["spent"] = [dataclasses.astuple(s) for s in self.spent]
        return entry

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PackEntry:
        return cls([str(k) for k in data["keys"]], [Spent(*s) for s in data.get("spent") or []])


@dataclass(frozen=True)
class Reask:
    """Rows to ask again in a later line, with what they spent so far."""

    keys: list[str]
    prompts: list[str]
    spent: list[Spent]


@dataclass(frozen=True)
class PackLineBuilder:
    """Request lines for groups of rows: one row a plain line (its key the ``custom_id``), several a
    pack line (the live pack body, its ``max_tokens`` scaled to its rows)."""

    builder: LineBuilder

    def line(self, keys: Sequence[str], prompts: Sequence[str]) -> tuple[str, bytes]:
        if len(keys) == 1:
            return keys[0], self.builder.line(keys[0], prompts[0])
        custom_id = PACK_ID_PREFIX + hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()[:32]
        request = PackedChatRequest.of(self.builder.request).for_rows(len(keys))
        packed = dataclasses.replace(self.builder, request=request)
        return custom_id, packed.line(custom_id, envelope_text(list(prompts)))


def with_spent(result: QueryResult, spent: Spent) -> QueryResult:
    """A row's result with what its earlier lines spent added to its own line's usage."""
    if not spent.attempts:
        return result
    return dataclasses.replace(
        result,
        attempts=result.attempts + spent.attempts,
        prompt_tokens=(result.prompt_tokens or 0) + spent.prompt_tokens,
        completion_tokens=(result.completion_tokens or 0) + spent.completion_tokens,
        cached_prompt_tokens=(result.cached_prompt_tokens or 0) + spent.cached_tokens,
        requests=round(spent.requests + (result.requests or result.attempts), 6),
    )


@dataclass
class PackSettled:
    """What a pack's result line settled: the rows answered, and the rows to ask again."""

    results: list[QueryResult] = field(default_factory=list)
    reasks: list[Reask] = field(default_factory=list)


def settle_pack(
    line: QueryResult,
    entry: PackEntry,
    prompts: list[str],
    request: PackedChatRequest,
    output: StructuredOutput | None,
) -> PackSettled:
    """A pack line's classified result (:func:`~.batch_files.parse_result_line`) as its rows'.

    :param request: the pack's request (its system prompt: the tokens saved are counted against it).
    """
    rows = len(entry.keys)
    weights = [row_tokens(p) for p in prompts]
    spent = [
        entry.spent_of(i).plus(p, c, k, rows)
        for i, (p, c, k) in enumerate(
            zip(
                shares(line.prompt_tokens, weights),
                shares(line.completion_tokens, weights),
                shares(line.cached_prompt_tokens, weights),
                strict=True,
            )
        )
    ]
    settled = PackSettled()
    ids = [str(n) for n in range(1, rows + 1)]
    found = unpack(line.response or "", ids, output) if line.ok else None
    if found is None or found.problem is not None or not found.answers:
        middle = rows // 2  # failed whole: each half again, down to single rows
        for part in (range(middle), range(middle, rows)):
            settled.reasks.append(_reask(entry, prompts, spent, list(part)))
        return settled
    text = envelope_text(prompts)
    saved = saved_tokens(request.system_prompt, request.for_rows(rows), text, prompts)
    for index, pack_id in enumerate(ids):
        answer = found.answers.get(pack_id)
        if answer is None:
            continue
        settled.results.append(
            QueryResult(
                entry.keys[index],
                answer,
                STATUS_OK,
                http_status=line.http_status,
                finish_reason=line.finish_reason,
                pack_rows=rows,
                prompt_tokens_saved=saved[index],
                **spent[index].result_fields(),
            )
        )
    if found.missing:  # a smaller pack than this one (or one row): this ends
        settled.reasks.append(_reask(entry, prompts, spent, [ids.index(i) for i in found.missing]))
    return settled


def _reask(entry: PackEntry, prompts: list[str], spent: list[Spent], indexes: list[int]) -> Reask:
    return Reask([entry.keys[i] for i in indexes], [prompts[i] for i in indexes], [spent[i] for i in indexes])


def estimate_lines(
    rows: Iterable[tuple[str, str | None]],
    lines: PackLineBuilder,
    rows_per_request: int | str,
    estimator: LineEstimator,
    price: Price | None,
    basis: str,
) -> RequestEstimate:
    """What the request lines of ``rows`` would cost (``estimate_only``): packed as a round packs
    them, each line counted as the budget counts it; nothing is written or sent."""
    sizer = PackSizer(rows_per_request, lines.builder.request.max_completion_tokens())
    requests = prompt_tokens = completion_tokens = 0
    for group in group_rows(rows, sizer):
        if len(group) == 1 and is_empty_prompt(group[0][1]):
            continue
        _, line = lines.line([str(k) for k, _ in group], [str(p) for _, p in group])
        prompt, completion = estimator(line)
        requests, prompt_tokens, completion_tokens = (
            requests + 1,
            prompt_tokens + prompt,
            completion_tokens + completion,
        )
    cost = price.cost(prompt_tokens, completion_tokens) if price is not None else None
    return RequestEstimate(requests, prompt_tokens, completion_tokens, cost, estimator.counter.method, basis)
