"""The outcome of one row's query: an answer, or an explicit error kept as data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

STATUS_OK = "ok"
STATUS_ERROR = "error"


@dataclass(frozen=True, slots=True)
class QueryResult:
    """What happened to one row.

    :param row_id: the row's id, as given by the caller (never matched back by position).
    :param response: the answer text; None when the row ended in error.
    :param status: ``"ok"`` or ``"error"``.
    :param error_code: machine-readable reason (``content_filter``, ``rate_limited``, ...); None when ok.
    :param error_message: human-readable reason; None when ok.
    :param http_status: HTTP status of the last request, None if no answer was received.
    :param attempts: every HTTP request made for the row, 429s included (0 when none was sent).
    :param throttled: how many of those were refused with a 429 (congestion: they spend no retry).
    :param prompt_tokens: tokens the API billed for the prompt (from its ``usage``).
    :param completion_tokens: tokens the API billed for the answer.
    :param latency_ms: wall time from the first request to the final outcome, retries included.
    :param finish_reason: the API's ``finish_reason`` (``stop``, ``length``, ...).
    :param cost: what the row's request cost at the run's ``prices`` (its reported usage); None
        without a price for the model.
    :param cached_prompt_tokens: of ``prompt_tokens``, those the API served from its prompt cache
        (``usage.prompt_tokens_details.cached_tokens``), priced at the cached rate when one is given.
    :param cached: the result was copied from the cross-run answer cache, not asked by this run (its
        usage and cost are those of the run that asked it).
    :param pack_rows: rows of the request that gave this result (``rows_per_request``; 1: asked alone).
    :param requests: this row's share of the requests sent: 1/n for each request of n rows that
        carried it (``attempts`` counts each of them once); None: ``attempts``, unpacked.
    :param prompt_tokens_saved: prompt tokens this row saved against being asked alone, both sides
        counted before sending (negative when packing cost more); None when not packed.
    """

    row_id: Any
    response: str | None
    status: str
    error_code: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    attempts: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    finish_reason: str | None = None
    throttled: int = 0
    cost: float | None = None
    cached: bool = False
    cached_prompt_tokens: int | None = None
    pack_rows: int = 1
    requests: float | None = None
    prompt_tokens_saved: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_row_id(self, row_id: Any) -> QueryResult:
        """The same outcome for another row (dedupe fans one answer out to every row asking it)."""
        return QueryResult(**{**asdict(self), "row_id": row_id})
