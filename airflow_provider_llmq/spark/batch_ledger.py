"""A Batch API run's state in its checkpoint: request files, uploads, batches and what each left.

``batches.json`` beside the results records every step before and after it happens, so a try
killed anywhere finds its way back and never pays twice:

- a *round* is the set of request files planned from the requests pending when a try started;
  its files live under ``batch/`` and are recorded (name, sha256, requests) once complete;
- a file's upload id is recorded when the upload returns (a lost upload costs nothing: it is
  uploaded again);
- before a batch is created its *intent* is recorded (with the time); once created, its id. A try
  killed between the two finds the batch by its metadata (checkpoint key and file digest);
- each batch's last seen status, and once its result files are read, that it is *collected*, the
  result files it wrote, what its usage billed and how many of its requests are still unsettled;
- a file split (its batch was refused for the enqueued-token quota while nothing else of the run
  ran, or only part of it fits the budget) names its parts, which are written and recorded before
  this record is saved, and is never sent again: each request goes out in exactly one part;
- a file the budget refused names the result file of its ``budget_exceeded`` rows.

Each file records the estimate of its requests (prompt tokens counted as live requests are, and
the completion cap), which a budget holds for every batch created and not yet collected.

A retry, a deferral's resume and a re-run with the same checkpoint key all read this record first.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from airflow_provider_llmq.core.batch.batch_api import TERMINAL_STATUSES, TOKEN_LIMIT_EXCEEDED
from airflow_provider_llmq.core.errors import LLMQueryConfigError

if TYPE_CHECKING:
    from airflow_provider_llmq.spark.checkpoint import Checkpoint

LEDGER = "batches.json"
FILES_DIR = "batch"
VERSION = 1
INTENT = "intent"  # a batch whose creation was asked for; its id is not known yet
# statuses past validation: the enqueued-token quota admitted the batch
ACCEPTED_STATUSES = frozenset(
    {"in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"}
)


@dataclass
class BatchRecord:
    """One batch created (or about to be) for a file."""

    intent_at: float
    id: str | None = None
    status: str = INTENT
    error_code: str | None = None
    error_message: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    ended_at: float | None = None  # when llmq first saw it terminal
    collected: bool = False
    answered: int = 0  # requests it settled (answers and errors)
    unsettled: int = 0  # requests it never ran, or that failed transiently: a later try asks them
    results: list[str] = field(default_factory=list)  # result files written from it
    collected_by: str | None = None  # the try that collected it
    billed_tokens: int = 0  # prompt + completion tokens its result lines report
    billed_cost: float = 0.0  # at the run's prices (0 without them)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def live(self) -> bool:
        """Created (or maybe created) and not finished: the API may still be working on it."""
        return not self.terminal

    @property
    def refused(self) -> bool:
        """Failed for the enqueued-token quota: nothing ran, the file goes again later."""
        return self.status == "failed" and self.error_code == TOKEN_LIMIT_EXCEEDED


@dataclass
class FileRecord:
    """One request file of a round and the batches created for it (more than one after a refusal)."""

    name: str
    digest: str
    requests: int
    bytes: int
    file_id: str | None = None
    batches: list[BatchRecord] = field(default_factory=list)
    lone_refusals: int = 0  # refusals while none of this run's batches was running
    prompt_tokens: int = 0  # estimated before sending, as a live request's reservation
    completion_tokens: int = 0  # the completion cap (or expected length) of each request, summed
    split_into: list[str] = field(default_factory=list)  # its parts, once split (never sent again)
    budget_results: list[str] = field(default_factory=list)  # its budget_exceeded rows, if refused
    budget_refused_by: str | None = None  # the try that recorded them
    rows: int = 0  # rows its lines ask (rows_per_request packs several in a line); 0: one a line

    @property
    def row_count(self) -> int:
        return self.rows or self.requests

    @property
    def current(self) -> BatchRecord | None:
        return self.batches[-1] if self.batches else None

    @property
    def superseded(self) -> bool:
        """Split into parts, or refused by the budget: nothing of it is sent any more."""
        return bool(self.split_into) or self.budget_refused_by is not None

    @property
    def done(self) -> bool:
        current = self.current
        return self.superseded or (current is not None and current.collected and not current.refused)

    @property
    def waiting_for_quota(self) -> bool:
        current = self.current
        return not self.superseded and current is not None and current.refused

    @property
    def accepted(self) -> bool:
        """A batch of it passed the enqueued-token quota's check."""
        return any(b.status in ACCEPTED_STATUSES for b in self.batches)


@dataclass
class Round:
    """The request files planned by one try from the requests it found pending."""

    number: int
    owner: str  # the try that planned it (task instance and try number)
    files: list[FileRecord] = field(default_factory=list)
    empty_prompts: int = 0  # recorded when planned (no request is sent for them)
    # the prompt-token estimate of the smallest file refused for the quota with nothing else of the
    # run running: the quota is below it, so files this large are split before they are sent
    quota_ceiling: int | None = None

    @property
    def over(self) -> bool:
        return all(f.done for f in self.files)

    @property
    def unsettled(self) -> int:
        return sum(f.current.unsettled for f in self.files if f.current is not None)


@dataclass
class Ledger:
    """Every round of a checkpoint's Batch API run.

    :param manifest: the digest of the manifest the rounds answer; a record for another one is stale.
    :param checkpoint_key: what each batch's metadata names.
    """

    manifest: str
    checkpoint_key: str
    rounds: list[Round] = field(default_factory=list)

    @classmethod
    def load(cls, checkpoint: Checkpoint, manifest: str, checkpoint_key: str) -> Ledger:
        try:
            data = checkpoint.read_json(LEDGER)
            if not data or data.get("manifest") != manifest:
                return cls(manifest, checkpoint_key)
            return cls._from(data, checkpoint_key)
        except (ValueError, KeyError, TypeError) as exc:
            # "unreadable" is not "no batches": some may be running, and would be paid twice
            raise LLMQueryConfigError(
                f"{checkpoint.uri}/{LEDGER} cannot be read ({type(exc).__name__}: {exc}); batches it "
                "records may still be running. Restore it, or delete it to start new batches"
            ) from None

    @classmethod
    def _from(cls, data: dict[str, Any], checkpoint_key: str) -> Ledger:
        rounds = [
            Round(
                r["number"],
                r["owner"],
                [
                    FileRecord(**{**f, "batches": [BatchRecord(**b) for b in f["batches"]]})
                    for f in r["files"]
                ],
                r.get("empty_prompts", 0),
                r.get("quota_ceiling"),
            )
            for r in data["rounds"]
        ]
        return cls(data["manifest"], data.get("checkpoint_key", checkpoint_key), rounds)

    def save(self, checkpoint: Checkpoint) -> None:
        data = {"version": VERSION, **dataclasses.asdict(self)}
        checkpoint.write_json(LEDGER, data)

    @property
    def current(self) -> Round | None:
        return self.rounds[-1] if self.rounds else None

    def live_batch_ids(self) -> list[str]:
        return [b.id for r in self.rounds for f in r.files for b in f.batches if b.id is not None and b.live]

    def results_of(self, owner: str) -> list[str]:
        """The result files written from batches this try collected, and its budget refusals."""
        files = [f for r in self.rounds for f in r.files]
        collected = [name for f in files for b in f.batches if b.collected_by == owner for name in b.results]
        return collected + [name for f in files if f.budget_refused_by == owner for name in f.budget_results]

    def settled_by(self, owner: str) -> int:
        """Requests this try has settled so far (a deferred try is resumed more than once)."""
        planned = sum(r.empty_prompts for r in self.rounds if r.owner == owner)
        files = [f for r in self.rounds for f in r.files]
        refused = sum(f.row_count for f in files if f.budget_refused_by == owner)
        return (
            planned + refused + sum(b.answered for f in files for b in f.batches if b.collected_by == owner)
        )

    def summary(self) -> dict[str, Any]:
        """For the task's summary: rounds, files, batches and their states, quota refusals."""
        batches = [b for r in self.rounds for f in r.files for b in f.batches]
        states: dict[str, int] = {}
        for batch in batches:
            states[batch.status] = states.get(batch.status, 0) + 1
        files = [f for r in self.rounds for f in r.files]
        ended = [b.ended_at for b in batches if b.ended_at is not None]
        return {
            "rounds": len(self.rounds),
            "files": len(files),
            "file_requests": sum(f.requests for f in files if not f.split_into),
            "batches": len([b for b in batches if b.id is not None]),
            "batch_states": dict(sorted(states.items())),
            "quota_refusals": len([b for b in batches if b.refused]),
            "file_splits": len([f for f in files if f.split_into]),
            "budget_refused_requests": sum(f.row_count for f in files if f.budget_refused_by is not None),
            "billed_tokens": sum(b.billed_tokens for b in batches),
            "batch_ids": [b.id for b in batches if b.id is not None],
            # from the first batch asked for to the last seen finished
            "batch_seconds": round(max(ended) - min(b.intent_at for b in batches), 3) if ended else None,
        }


def file_path(checkpoint: Checkpoint, name: str) -> str:
    """A request file's path in the checkpoint's filesystem."""
    return f"{checkpoint.root}/{FILES_DIR}/{name}"


def open_request_file(checkpoint: Checkpoint, name: str) -> io.BufferedReader:
    """A request file, to read line by line."""
    return io.BufferedReader(checkpoint.fs.open_input_stream(file_path(checkpoint, name)))


__all__ = [
    "FILES_DIR",
    "LEDGER",
    "BatchRecord",
    "FileRecord",
    "Ledger",
    "Round",
    "file_path",
    "open_request_file",
]
