"""The Batch API placement: pending requests go out as JSONL files, come back as result files.

One :meth:`BatchAPIPlacement.advance` is one pass over the run's state (:mod:`..batch_ledger`):
plan a round of request files if none is under way, upload them, create their batches (or find
the ones a killed try created), poll, collect what finished into the checkpoint, and send again a
file the enqueued-token quota refused once a batch of this run has finished. It returns what the
run still waits for; :meth:`run` polls in this process until nothing is left, and a deferrable
operator hands the wait to a trigger and calls ``advance`` again when it fires.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import ClassVar

from airflow_provider_llmq.core.batch.batch_api import (
    TOKEN_LIMIT_EXCEEDED,
    BatchApiClient,
    BatchInfo,
    LLMQueryBatchError,
)
from airflow_provider_llmq.core.batch.batch_files import LineBuilder
from airflow_provider_llmq.core.batch.batch_packs import PackLineBuilder
from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.spark.batch_ledger import BatchRecord, FileRecord, Ledger, Round, open_request_file
from airflow_provider_llmq.spark.placements.base import PlacementStopped, Work
from airflow_provider_llmq.spark.placements.batch_budget import BatchBudget, line_estimator, refuse_file
from airflow_provider_llmq.spark.placements.batch_io import collect, write_request_files
from airflow_provider_llmq.spark.placements.batch_packs import add_reask_files
from airflow_provider_llmq.spark.placements.batch_settings import (
    BatchSettings,
    LLMQueryBatchIncompleteError,
    Waiting,
)
from airflow_provider_llmq.spark.placements.batch_split import (
    halves,
    larger_than_the_quota,
    line_estimates,
    split_file,
)

log = logging.getLogger(__name__)

MAX_LONE_REFUSALS = 6  # a file refused this often with nothing of this run running: give up
ORPHAN_SCAN = 500  # batches listed, newest first, to find one a killed try created
ORPHAN_SLACK = 300.0  # seconds: created_at is whole seconds, and clocks differ


@dataclass(frozen=True)
class BatchAPIPlacement:
    keeps_its_own_ledger: ClassVar[bool] = True  # batches.json: what each batch billed or may bill
    settings: BatchSettings

    def run(self, work: Work) -> None:
        """Polls in this process until every request of the round is settled."""
        while True:
            waiting = self.step(work)
            if waiting is None:
                return
            delay = self.settings.poll_interval
            if not waiting.batch_ids and waiting.wake_after is not None:
                delay = waiting.wake_after
            if work.stop.wait(delay):
                self.step(work)  # sees the stop: cancels when asked, and raises

    def step(self, work: Work) -> Waiting | None:
        """:meth:`advance`, unless the task is being stopped: then the live batches are cancelled
        when ``cancel_on_kill`` asks (else left running for a retry) and :class:`PlacementStopped`
        is raised, what was collected being checkpointed."""
        try:
            if work.stop.is_set():
                raise PlacementStopped("stopped while batches were running")
            return self.advance(work)
        except PlacementStopped as exc:
            cancelled = self.cancel(work) if self.settings.cancel_on_kill else None
            kept = (
                f"{len(cancelled)} live batches cancelled"
                if cancelled is not None
                else "live batches left running (cancel_on_kill=False); a retry re-attaches"
            )
            raise PlacementStopped(f"{exc}: {kept}") from None

    def advance(self, work: Work) -> Waiting | None:
        """One pass; None when the run's requests are settled (or the run is over)."""
        with self._client(work) as client:
            return _Pass(self.settings, work, self._ledger(work), client).run()

    def cancel(self, work: Work) -> list[str]:
        """Cancels this run's live batches (what they answered is kept, their queued work is lost)."""
        ledger = self._ledger(work)
        cancelled = []
        with self._client(work) as client:
            for batch_id in ledger.live_batch_ids():
                try:
                    client.cancel_batch(batch_id)
                except LLMQueryBatchError as exc:  # already finished, say
                    log.warning("llmq: could not cancel batch %s: %s", batch_id, exc)
                    continue
                cancelled.append(batch_id)
        log.info("llmq: cancelled batches %s", cancelled)
        return cancelled

    def _client(self, work: Work) -> BatchApiClient:
        return BatchApiClient(work.endpoint, work.options.retry_policy(), self.settings.api_version)

    def _ledger(self, work: Work) -> Ledger:
        manifest = work.checkpoint.read_manifest()
        if manifest is None:
            raise LLMQueryConfigError(f"the checkpoint {work.checkpoint.uri} has no manifest")
        return Ledger.load(work.checkpoint, manifest.digest(), self.settings.checkpoint_key)


class _Pass:
    """One pass over a run's state with one client; every step is recorded before the next."""

    def __init__(self, settings: BatchSettings, work: Work, ledger: Ledger, client: BatchApiClient) -> None:
        self.settings, self.work, self.ledger, self.client = settings, work, ledger, client
        self.checkpoint = work.checkpoint
        self.estimate = line_estimator(work.options, work.options.chat_request(work.endpoint))

    def save(self) -> None:
        self.ledger.save(self.checkpoint)

    def run(self) -> Waiting | None:
        current = self.round = self._round()
        freed = False
        for file in current.files:  # poll
            batch = file.current
            if batch is not None and batch.id is not None and batch.live:
                freed |= self._refresh(batch)
        self.save()
        for file in current.files:  # collect (first: what a batch billed frees the budget)
            batch = file.current
            if batch is not None and batch.terminal and not batch.collected:
                self._collect(file, batch)
        index = 0
        while index < len(current.files):  # submit or re-attach; parts of a split come next
            file = current.files[index]
            index += 1
            if file.superseded:
                continue
            if file.current is None:
                self._submit(file)
            elif file.current.id is None and file.current.live:
                self._reattach_or_create(file, file.current)
        live = any(f.current is not None and f.current.live for f in current.files)
        for file in list(current.files):  # a refused file goes again once capacity is freed
            if not file.waiting_for_quota:
                continue
            if not freed and not live and file.requests > 1 and larger_than_the_quota(current, file):
                live |= self._split(file, halves(file), "it alone is over the enqueued-token quota")
            elif self._may_resend(file, freed, live):
                live |= self._submit(file)
        self.save()
        if current.over:
            if current.unsettled and not self.settings.last_try:
                raise LLMQueryBatchIncompleteError(
                    f"the batches of round {current.number} are over with {current.unsettled} requests "
                    "not answered (expired, cancelled or failed transiently): their answers are "
                    "checkpointed, and the next try asks only the rest"
                )
            return None
        return self._waiting(current)

    # --- rounds and files ----------------------------------------------------------------

    def _round(self) -> Round:
        current = self.ledger.current
        if current is not None and (not current.over or current.owner == self.settings.owner):
            return current
        return self._plan(len(self.ledger.rounds) + 1)

    def _plan(self, number: int) -> Round:
        """Writes the pending requests as request files under the checkpoint, one line per key."""
        endpoint = self.work.endpoint
        if not endpoint.model:
            raise LLMQueryConfigError(
                "the Batch API needs a model (OpenAI) or deployment (Azure) on each line"
            )
        with self.work.phases("request_files", within="ask"):
            records, empty_prompts = write_request_files(
                self.work, self._lines(), f"round-{number:03d}", *self._limits(), self.estimate
            )
        planned = Round(number, self.settings.owner, records, empty_prompts=empty_prompts)
        self.ledger.rounds.append(planned)
        self.save()
        log.info(
            "llmq: round %d: %d request lines in %d request files (%d empty prompts recorded)",
            number, sum(f.requests for f in records), len(records), empty_prompts,
        )  # fmt: skip
        return planned

    def _lines(self) -> PackLineBuilder:
        endpoint = self.work.endpoint
        assert endpoint.model is not None
        request = self.work.options.chat_request(endpoint)
        return PackLineBuilder(LineBuilder(request, self.client.line_url, endpoint.model))

    def _limits(self) -> tuple[int, int]:
        """Lines and bytes a request file holds at most."""
        limit = min(self.client.max_requests, self.settings.max_requests_per_file or self.client.max_requests)
        return limit, self.settings.max_file_bytes

    def _upload(self, file: FileRecord) -> None:
        with self.work.phases("upload", within="ask"):
            with open_request_file(self.checkpoint, file.name) as stream:
                content = stream.read()  # one file at a time: at most the API's 200 MB
            if hashlib.sha256(content).hexdigest() != file.digest:
                raise LLMQueryBatchError(f"the request file {file.name} changed since it was written")
            file.file_id = self.client.upload(f"llmq-{file.digest[:16]}.jsonl", content)
        self.save()

    # --- batches ---------------------------------------------------------------------------

    def _submit(self, file: FileRecord) -> bool:
        """Creates the file's batch, unless the quota's known size or the budget asks to split it
        first (its parts are then submitted) or the budget refuses it; True when a batch went out."""
        ceiling = self.round.quota_ceiling
        if ceiling is not None and file.requests > 1 and file.prompt_tokens >= ceiling:
            return self._split(
                file, halves(file), f"over the {ceiling} prompt tokens the quota refused alone"
            )
        budget = BatchBudget.of(self.ledger, self.work.options, self.work.endpoint.model)
        if budget is not None and not budget.fits(file.prompt_tokens, file.completion_tokens):
            fitting = budget.fitting_lines(line_estimates(self.checkpoint, file, self.estimate))
            if fitting:
                return self._split(file, [fitting, file.requests - fitting], "only a part fits the budget")
            if not budget.holds:  # nothing running can free any: what is left is not enough
                refuse_file(self.work, file, budget, self.settings.owner)
                self.save()
            else:  # each pass says so: debug
                log.debug("llmq: %s waits for the running batches' bill (%s)", file.name, budget.describe())
            return False
        if file.file_id is None:
            self._upload(file)
        self._create(file)
        return True

    def _split(self, file: FileRecord, sizes: list[int], why: str) -> bool:
        """Splits the file into parts of ``sizes`` lines (recorded before anything is sent) and
        submits them; True when a batch went out."""
        parts = split_file(self.checkpoint, self.round, file, sizes, self.estimate)
        self.save()
        log.info(
            "llmq: split %s (%d requests) into parts of %s requests: %s", file.name, file.requests, sizes, why
        )
        if file.file_id is not None:
            self._delete(file.file_id)
        return any([self._submit(part) for part in parts])

    def _create(self, file: FileRecord, record: BatchRecord | None = None) -> None:
        """Records the intent, creates the batch, records its id: a try killed in between finds the
        batch by its metadata (:meth:`_reattach_or_create`)."""
        assert file.file_id is not None
        if record is None:
            record = BatchRecord(intent_at=time.time())
            file.batches.append(record)
        record.intent_at = time.time()
        self.save()
        metadata = {"llmq_checkpoint": self.ledger.checkpoint_key[:512], "llmq_file": file.digest}
        try:
            info = self.client.create_batch(file.file_id, metadata)
        except LLMQueryBatchError as exc:
            if exc.code != TOKEN_LIMIT_EXCEEDED:
                raise
            record.status, record.error_code, record.error_message = "failed", TOKEN_LIMIT_EXCEEDED, str(exc)
            record.ended_at, record.collected = time.time(), True
            self.save()
            return
        self._update(record, info)
        self.save()
        log.info("llmq: created batch %s for %s (%d requests)", info.id, file.name, file.requests)

    def _reattach_or_create(self, file: FileRecord, record: BatchRecord) -> None:
        known = {b.id for b in file.batches if b.id is not None}
        for info in self.client.list_batches(ORPHAN_SCAN):
            if (
                info.id not in known
                and info.metadata.get("llmq_checkpoint") == self.ledger.checkpoint_key[:512]
                and info.metadata.get("llmq_file") == file.digest
                and info.created_at >= record.intent_at - ORPHAN_SLACK
            ):
                log.info(
                    "llmq: re-attached to batch %s, created by a try stopped before recording it", info.id
                )
                self._update(record, info)
                self.save()
                return
        self._create(file, record)

    def _refresh(self, batch: BatchRecord) -> bool:
        """Polls a live batch; True when it finished with work done (which frees enqueued tokens)."""
        assert batch.id is not None
        self._update(batch, self.client.get_batch(batch.id))
        return batch.terminal and not batch.refused

    def _update(self, record: BatchRecord, info: BatchInfo) -> None:
        record.id, record.status = info.id, info.status
        record.output_file_id, record.error_file_id = info.output_file_id, info.error_file_id
        if info.errors:
            record.error_code = TOKEN_LIMIT_EXCEEDED if info.refused_for_quota else info.errors[0][0]
            record.error_message = info.error_text()
        if not info.active and record.ended_at is None:
            record.ended_at = time.time()

    def _may_resend(self, file: FileRecord, freed: bool, live: bool) -> bool:
        if freed:
            return True  # a batch of this run finished: its enqueued tokens are free again
        if live:
            return False  # wait for this run's batches
        # nothing of this run is running: other jobs hold the quota, or this file alone exceeds it
        refused = file.current
        assert refused is not None and refused.ended_at is not None
        if time.time() - refused.ended_at < self._lone_wait(file):
            return False
        file.lone_refusals += 1
        if file.lone_refusals > MAX_LONE_REFUSALS:
            raise LLMQueryBatchError(
                f"the request file {file.name} ({file.requests} requests, about {file.prompt_tokens} "
                f"prompt tokens) was refused for the enqueued-token quota {file.lone_refusals} times "
                "while no other batch of this run was running: raise the deployment's batch quota"
            )
        return True

    def _lone_wait(self, file: FileRecord) -> float:
        return self.settings.poll_interval * 2 ** min(file.lone_refusals, MAX_LONE_REFUSALS)

    def _waiting(self, current: Round) -> Waiting:
        waiting = [f for f in current.files if f.waiting_for_quota]
        for_budget = [f for f in current.files if f.current is None and not f.superseded]
        running = [f.current for f in current.files if f.current and f.current.id and f.current.live]
        wake_after = None
        if waiting and not running:
            due = min((f.current.ended_at or 0) + self._lone_wait(f) for f in waiting if f.current)
            wake_after = max(0.0, due - time.time())
        return Waiting(
            tuple(b.id for b in running if b.id),
            wake_on_any=bool(waiting or for_budget),
            wake_after=wake_after,
            states=tuple(b.status for b in running),
            files_waiting=len(waiting) + len(for_budget),
        )

    # --- results ---------------------------------------------------------------------------

    def _collect(self, file: FileRecord, batch: BatchRecord) -> None:
        """A finished batch's output and error files into the checkpoint; what it never ran is left
        to the next try, or recorded when this is the last one."""
        if not batch.refused:
            with self.work.phases("collect", within="ask"):
                reasks = collect(self.work, self.client, file, batch, last_try=self.settings.last_try)
            if reasks:  # rows a pack's answer did not settle: asked again in this round
                add_reask_files(
                    self.checkpoint, self.round, file, reasks, self._lines(), self._limits(), self.estimate
                )
        batch.collected, batch.collected_by = True, self.settings.owner
        self.save()
        for file_id in (batch.output_file_id, batch.error_file_id, None if batch.refused else file.file_id):
            if file_id:  # the API keeps files until deleted (Azure: 500 a resource)
                self._delete(file_id)

    def _delete(self, file_id: str) -> None:
        try:
            self.client.delete_file(file_id)
        except LLMQueryBatchError as exc:
            log.warning("llmq: could not delete file %s: %s", file_id, exc)


__all__ = ["BatchAPIPlacement", "BatchSettings", "LLMQueryBatchIncompleteError", "Waiting"]
