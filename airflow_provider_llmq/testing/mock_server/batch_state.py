"""The state behind the mock Files and Batches APIs: files, batches and their timeline, counters.

A batch moves ``validating`` -> ``in_progress`` -> ``finalizing`` -> ``completed`` over the times in
:class:`BatchConfig`, computed from its creation time whenever it is looked at (no background
task), so what a batch does never depends on when a client polls. Lines are processed in file
order at an even pace while ``in_progress``: an expiry or a cancel keeps the lines done by then,
and the rest get ``batch_expired`` / ``batch_cancelled`` lines in the error file. Validation
refuses a file over the request-count limit and, when ``enqueued_token_limit`` is set, a batch
that would push the tokens enqueued for its model over it (``token_limit_exceeded``, as Azure
does). Each line is answered as the chat route answers a first attempt (:mod:`batch_lines`).
"""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from . import batch_lines
from . import state as chat_state
from .faults import set_fields

# flavour -> (path prefix, the line url / batch endpoint, requests per file)
FLAVOURS = {
    "openai": ("/v1", "/v1/chat/completions", 50_000),
    "azure": ("/openai", "/chat/completions", 100_000),
    "azure_v1": (chat_state.AZURE_V1_PREFIX, "/chat/completions", 100_000),
}
COUNTERS = (
    "files_created",
    "files_deleted",
    "batches_created",
    "cancel_requests",
    "token_limit_refusals",
    "lines_created",
    "lines_answered",
    "http_requests",
    # what the answered lines' usage billed (a batch bills only the lines it ran)
    "prompt_tokens_billed",
    "completion_tokens_billed",
    "cached_tokens_billed",
)


@dataclass
class BatchConfig:
    """How batches behave; every field can be changed at runtime."""

    validating_s: float = 0.3
    #: in_progress lasts ``in_progress_s + line_s * lines``, lines done at an even pace
    in_progress_s: float = 0.6
    line_s: float = 0.0
    finalizing_s: float = 0.2
    cancelling_s: float = 0.1
    #: a batch not completed this long after its creation expires (the real window is 24 h)
    completion_window_s: float = 86_400.0
    #: tokens enqueued per model (batches in progress or finalizing) at most; None: no limit
    enqueued_token_limit: int | None = None
    #: requests per input file at most; None: 50,000 (OpenAI) / 100,000 (Azure)
    max_requests_per_file: int | None = None
    max_file_bytes: int = 200_000_000
    #: Azure: an uploaded file is "pending" this long before it is "processed"
    file_processing_s: float = 0.0

    def update(self, changes: dict[str, Any]) -> None:
        set_fields(self, changes, "batch config")


@dataclass
class MockFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: float
    ready_at: float

    def json(self, now: float) -> dict[str, Any]:
        status = "processed" if now >= self.ready_at else "pending"
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": int(self.created_at),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": status,
        }


@dataclass
class MockBatch:
    id: str
    endpoint: str
    input_file_id: str
    metadata: dict[str, str]
    created_at: float
    timing: BatchConfig
    lines: list[dict[str, Any]]
    model: str
    tokens: int
    invalid: tuple[str, str] | None = None
    status: str = "validating"
    times: dict[str, float] = field(default_factory=dict)  # in_progress_at, completed_at, ...
    cancel_at: float | None = None
    processed: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def leaves_queue_at(self) -> float:
        """When it stops holding enqueued tokens (projected while it runs)."""
        t = self.timing
        ended = [self.times[k] for k in ("completed_at", "expired_at", "cancelled_at") if k in self.times]
        if ended:
            return ended[0]
        start = self.times["in_progress_at"]
        return min(start + self.processing_s() + t.finalizing_s, self.created_at + t.completion_window_s)

    def processing_s(self) -> float:
        return self.timing.in_progress_s + self.timing.line_s * len(self.lines)

    def done_by(self, at: float) -> int:
        """Lines processed by ``at``: an even pace over ``in_progress_s``."""
        start, span = self.times["in_progress_at"], self.processing_s()
        if span <= 0:
            return len(self.lines)
        return max(0, min(len(self.lines), math.floor(len(self.lines) * (at - start) / span)))

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": int(self.created_at),
            "expires_at": int(self.created_at + self.timing.completion_window_s),
            **{name: int(at) for name, at in self.times.items()},
            "request_counts": {"total": len(self.lines), "completed": 0, "failed": 0, **self.counts},
            "metadata": self.metadata,
        }


class BatchState:
    """Files, batches and counters of one server; only touched on its event loop.

    :param chat: the chat routes' state, whose config (faults, seed, deployments) answers the lines.
    """

    def __init__(self, chat: chat_state.MockState) -> None:
        self.chat = chat
        self.reset()

    def reset(self) -> None:
        self.config = BatchConfig()
        self.files: dict[str, MockFile] = {}
        self.batches: dict[str, MockBatch] = {}  # creation order
        self.counters: Counter[str] = Counter()
        self.routes: Counter[str] = Counter()
        self.requests_per_batch: list[int] = []

    def snapshot(self) -> dict[str, Any]:
        self.advance(time.time())
        return {
            **{name: self.counters[name] for name in COUNTERS},
            "files_live": len(self.files),
            "batches_by_status": dict(Counter(b.status for b in self.batches.values())),
            "requests_per_batch": list(self.requests_per_batch),
            "routes": dict(self.routes),
            "config": asdict(self.config),
        }

    def advance(self, now: float) -> None:
        """Every batch's state at ``now``, in creation order (a token check sees earlier batches)."""
        for batch in self.batches.values():
            self._advance(batch, now)

    def _advance(self, b: MockBatch, now: float) -> None:
        t = b.timing
        while True:
            if b.status == "validating":
                validated = b.created_at + t.validating_s
                if b.cancel_at is not None and b.cancel_at < validated:
                    b.status, b.times["cancelling_at"] = "cancelling", b.cancel_at
                    continue
                if now < validated:
                    return
                if b.invalid is None and self._over_quota(b, validated):
                    self.counters["token_limit_refusals"] += 1
                    limit = t.enqueued_token_limit
                    b.invalid = (
                        "token_limit_exceeded",
                        f"The number of enqueued tokens has surpassed the configured limit of {limit} for "
                        f"the deployment '{b.model}'. Please either increase the limit or try again once "
                        "the current jobs have finished.",
                    )
                if b.invalid is not None:
                    code, message = b.invalid
                    b.errors = [{"code": code, "message": message, "param": None, "line": None}]
                    b.status, b.times["failed_at"] = "failed", validated
                    return
                b.status, b.times["in_progress_at"] = "in_progress", validated
            elif b.status == "in_progress":
                ends = {
                    "finalizing": b.times["in_progress_at"] + b.processing_s(),
                    "expired": b.created_at + t.completion_window_s,
                }
                if b.cancel_at is not None:
                    ends["cancelling"] = b.cancel_at
                nxt, at = min(ends.items(), key=lambda item: item[1])
                if now < at:
                    return
                b.processed = b.done_by(at)
                if nxt == "expired":
                    self._finish(b, "expired", at)
                    return
                b.status, b.times[f"{nxt}_at"] = nxt, at
            elif b.status in ("finalizing", "cancelling"):
                step = t.finalizing_s if b.status == "finalizing" else t.cancelling_s
                at = b.times[f"{b.status}_at"] + step
                if now < at:
                    return
                self._finish(b, "completed" if b.status == "finalizing" else "cancelled", at)
                return
            else:
                return

    def _over_quota(self, b: MockBatch, at: float) -> bool:
        limit = b.timing.enqueued_token_limit
        if limit is None:
            return False
        enqueued = sum(
            other.tokens
            for other in self.batches.values()
            if other is not b
            and other.model == b.model
            and "in_progress_at" in other.times
            and other.times["in_progress_at"] <= at < other.leaves_queue_at()
        )
        return enqueued + b.tokens > limit

    def _finish(self, b: MockBatch, status: str, at: float) -> None:
        """The batch's result files: answered lines, then (expired, cancelled) those never run."""
        b.status, b.times[f"{status}_at"] = status, at
        if status == "completed":
            b.processed = len(b.lines)
        output: list[bytes] = []
        errors: list[bytes] = []
        for index, line in enumerate(b.lines):
            if index < b.processed:
                code, body = batch_lines.answer(line["body"], self.chat.config)
                self._bill(body)
                (output if code == 200 else errors).append(
                    batch_lines.result_line(line["custom_id"], code, body)
                )
            else:
                errors.append(batch_lines.never_ran_line(line["custom_id"], f"batch_{status}"))
        self.counters["lines_answered"] += b.processed
        b.counts = {"completed": len(output), "failed": len(errors)}
        if output:
            b.output_file_id = self.add_file("batch_output.jsonl", "batch_output", b"".join(output), at).id
        if errors:
            b.error_file_id = self.add_file("batch_errors.jsonl", "batch_output", b"".join(errors), at).id

    def _bill(self, body: Any) -> None:
        billed = body.get("usage") if isinstance(body, dict) else None
        if isinstance(billed, dict):
            self.counters["prompt_tokens_billed"] += billed["prompt_tokens"]
            self.counters["completion_tokens_billed"] += billed["completion_tokens"]
            self.counters["cached_tokens_billed"] += billed["prompt_tokens_details"]["cached_tokens"]

    def add_file(
        self, filename: str, purpose: str, data: bytes, now: float, pending_s: float = 0.0
    ) -> MockFile:
        created = MockFile(f"file-{uuid.uuid4().hex[:24]}", filename, purpose, data, now, now + pending_s)
        self.files[created.id] = created
        return created
