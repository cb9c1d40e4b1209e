"""Batch request files in, row results out. Pure functions over bytes: no I/O.

A request file holds one JSONL line per request key (``custom_id``), its body built by the same
:class:`ChatRequest` a live request uses; :class:`FileSplitter` cuts the stream of lines at the
API's limits. Each result line (output or error file) is classified by
:func:`classify_response`, so a row gets the error code a live request would have got; a line the
batch never ran (expired, cancelled) is told apart, since a later try can still ask it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from airflow_provider_llmq.core.accounting.result import STATUS_ERROR, STATUS_OK, QueryResult
from airflow_provider_llmq.core.endpoint.secrets import Scrubber
from airflow_provider_llmq.core.request.error_codes import (
    BATCH_CANCELLED,
    BATCH_EXPIRED,
    BATCH_FAILED,
    EMPTY_PROMPT,
)
from airflow_provider_llmq.core.request.payload import Answer, ChatRequest, classify_response
from airflow_provider_llmq.core.request.structured import StructuredOutput

NEVER_RAN_CODES = frozenset({BATCH_EXPIRED, BATCH_CANCELLED, BATCH_FAILED})
# the batch status that left a request unrun -> the code it is recorded under
NEVER_RAN_BY_STATUS = {"expired": BATCH_EXPIRED, "cancelled": BATCH_CANCELLED, "failed": BATCH_FAILED}


def is_empty_prompt(prompt: object) -> bool:
    return not isinstance(prompt, str) or not prompt.strip()


def empty_prompt_result(key: str) -> QueryResult:
    """What a live request records for a null or blank prompt: an error, and no request."""
    return QueryResult(key, None, STATUS_ERROR, EMPTY_PROMPT, "prompt is null or empty: no request sent")


@dataclass(frozen=True)
class LineBuilder:
    """One request line per prompt, as the Batch API takes it.

    :param request: the run's body template (:meth:`QueryOptions.chat_request`).
    :param url: the line's ``url`` (``/v1/chat/completions`` or Azure's ``/chat/completions``).
    :param model: the ``model`` of every body: the OpenAI model, or the Azure deployment.
    """

    request: ChatRequest
    url: str
    model: str

    def line(self, custom_id: str, prompt: str) -> bytes:
        body = {**self.request.body(prompt), "model": self.model}
        record = {"custom_id": custom_id, "method": "POST", "url": self.url, "body": body}
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


@dataclass(frozen=True)
class WrittenFile:
    """A request file, complete: where it is, its sha256, its requests and size."""

    name: str
    digest: str
    requests: int
    bytes: int


class FileSplitter:
    """Writes lines into as many files as the limits ask: at most ``max_requests`` lines and
    ``max_bytes`` bytes each.

    :param open_file: opens the ``index``-th file for writing and returns (its name, the stream).
    """

    def __init__(self, max_requests: int, max_bytes: int, open_file: Callable[[int], tuple[str, IO[bytes]]]):
        self.max_requests, self.max_bytes, self._open_file = max_requests, max_bytes, open_file
        self.files: list[WrittenFile] = []
        self._name = ""
        self._stream: IO[bytes] | None = None
        self._hash = hashlib.sha256()
        self._lines = self._bytes = 0

    def add(self, line: bytes) -> None:
        if len(line) > self.max_bytes:
            raise ValueError(
                f"one request line is {len(line)} bytes, over the {self.max_bytes} bytes a file holds"
            )
        if self._stream is not None and (
            self._lines >= self.max_requests or self._bytes + len(line) > self.max_bytes
        ):
            self._close()
        if self._stream is None:
            self._name, self._stream = self._open_file(len(self.files))
            self._hash, self._lines, self._bytes = hashlib.sha256(), 0, 0
        self._stream.write(line)
        self._hash.update(line)
        self._lines += 1
        self._bytes += len(line)

    def finish(self) -> list[WrittenFile]:
        if self._stream is not None:
            self._close()
        return self.files

    def _close(self) -> None:
        assert self._stream is not None
        self._stream.close()
        self.files.append(WrittenFile(self._name, self._hash.hexdigest(), self._lines, self._bytes))
        self._stream = None


def custom_ids(lines: Iterable[bytes]) -> Iterator[str]:
    """The ``custom_id`` of each line of a request file."""
    for line in lines:
        if line.strip():
            yield str(json.loads(line)["custom_id"])


@dataclass(frozen=True)
class LineOutcome:
    """One result line: the row's result, or (``result`` None) a request the batch never ran."""

    custom_id: str
    result: QueryResult | None
    never_ran_code: str | None = None
    message: str | None = None


def parse_result_line(
    raw: bytes,
    scrubber: Scrubber,
    output: StructuredOutput | None = None,
    packs: Container[str] = frozenset(),
) -> LineOutcome:
    """An output- or error-file line as the row's result. A line with a ``response`` is classified
    like a live answer of that status and body (and raises what a live answer raises: 401/403,
    404, ``insufficient_quota``); one with only an ``error`` is that error, or a never-ran request.
    A line whose ``custom_id`` is in ``packs`` is not checked against ``output``: each of its items
    is, on its own (:mod:`.batch_packs`)."""
    data = json.loads(raw)
    custom_id = str(data["custom_id"])
    response = data.get("response")
    if isinstance(response, dict) and response.get("status_code") is not None:
        checked = None if custom_id in packs else output
        return LineOutcome(custom_id, _classified(custom_id, response, scrubber, checked))
    error = data.get("error") if isinstance(data.get("error"), dict) else {}
    code = str(error.get("code") or "bad_response")[:100]
    message = scrubber.text(str(error.get("message") or "the batch returned no response for this request"))
    if code in NEVER_RAN_CODES:
        return LineOutcome(custom_id, None, code, message)
    return LineOutcome(custom_id, QueryResult(custom_id, None, STATUS_ERROR, code, message[:500], attempts=1))


def _classified(
    custom_id: str, response: dict[str, Any], scrubber: Scrubber, output: StructuredOutput | None
) -> QueryResult:
    status = int(response["status_code"])
    body = response.get("body")
    raw = body.encode("utf-8") if isinstance(body, str) else json.dumps(body).encode("utf-8")
    outcome = classify_response(status, {}, raw, output)  # structured answers are checked as live ones
    if isinstance(outcome, Answer):
        return QueryResult(
            custom_id,
            outcome.content,
            STATUS_OK,
            http_status=status,
            attempts=1,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            finish_reason=outcome.finish_reason,
            cached_prompt_tokens=outcome.cached_tokens,
        )
    result = QueryResult(
        custom_id,
        outcome.content,  # the raw text of an invalid_output answer; None for the other errors
        STATUS_ERROR,
        outcome.code,
        outcome.message,
        http_status=outcome.http_status or status,
        attempts=1,
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        finish_reason=outcome.finish_reason,
        cached_prompt_tokens=outcome.cached_tokens,
    )
    return scrubber.result(result)


def never_ran_result(custom_id: str, code: str, message: str) -> QueryResult:
    """A request the batch never ran, recorded once the run is over (no try is left to ask it)."""
    return QueryResult(custom_id, None, STATUS_ERROR, code, message, attempts=0)


__all__ = [
    "BATCH_CANCELLED",
    "BATCH_EXPIRED",
    "BATCH_FAILED",
    "NEVER_RAN_BY_STATUS",
    "NEVER_RAN_CODES",
    "FileSplitter",
    "LineBuilder",
    "LineOutcome",
    "WrittenFile",
    "custom_ids",
    "empty_prompt_result",
    "is_empty_prompt",
    "never_ran_result",
    "parse_result_line",
]
