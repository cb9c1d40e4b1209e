"""The Batch API mode's two ends in the checkpoint: pending requests out as request files, one line
per request key; a finished batch's result files back in, each line mapped by ``custom_id`` into a
row result, and what the batch never ran told apart from what it answered."""

from __future__ import annotations

import dataclasses
from typing import IO

from airflow_provider_llmq.core.batch_api import BatchApiClient, LLMQueryBatchError
from airflow_provider_llmq.core.batch_estimate import LineEstimator
from airflow_provider_llmq.core.batch_files import (
    NEVER_RAN_BY_STATUS,
    FileSplitter,
    LineBuilder,
    WrittenFile,
    custom_ids,
    empty_prompt_result,
    is_empty_prompt,
    never_ran_result,
    parse_result_line,
)
from airflow_provider_llmq.core.cost import parse_prices
from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.payload import TRANSIENT_ERROR_CODES
from airflow_provider_llmq.core.progress import Tally
from airflow_provider_llmq.core.result import QueryResult
from airflow_provider_llmq.spark.batch_ledger import (
    FILES_DIR,
    BatchRecord,
    FileRecord,
    file_path,
    open_request_file,
)
from airflow_provider_llmq.spark.placements.base import PlacementStopped, Work
from airflow_provider_llmq.spark.plan import stream_requests


def write_request_files(
    work: Work,
    builder: LineBuilder,
    prefix: str,
    max_requests: int,
    max_bytes: int,
    estimator: LineEstimator,
) -> tuple[list[WrittenFile], int, list[tuple[int, int]]]:
    """Streams the pending requests (never the whole table) into request files under the
    checkpoint, cut at the limits. A null or blank prompt is recorded as ``empty_prompt`` and sent
    nowhere, as live. Returns the files, the count of empty prompts and each file's estimated
    (prompt, completion) tokens."""
    fs, checkpoint = work.checkpoint.fs, work.checkpoint
    fs.create_dir(f"{checkpoint.root}/{FILES_DIR}", recursive=True)

    def open_file(index: int) -> tuple[str, IO[bytes]]:
        name = f"{prefix}-file-{index + 1:04d}.jsonl"
        return name, fs.open_output_stream(file_path(checkpoint, name))

    splitter = FileSplitter(max_requests, max_bytes, open_file)
    empties: list[QueryResult] = []
    recorded = 0
    estimates: list[list[int]] = []
    for key, prompt in stream_requests(work.pending, work.n_buckets):
        if work.stop.is_set():
            raise PlacementStopped("stopped while writing the request files; nothing was sent")
        if is_empty_prompt(prompt):
            empties.append(empty_prompt_result(key))
        else:
            line = builder.line(key, str(prompt))
            try:
                splitter.add(line)
            except ValueError as exc:
                raise LLMQueryConfigError(f"a prompt cannot be sent through the Batch API: {exc}") from None
            index = len(splitter.files)  # the file the line went to (those before it are closed)
            estimates += [[0, 0] for _ in range(index + 1 - len(estimates))]
            prompt_tokens, completion_tokens = estimator(line)
            estimates[index][0] += prompt_tokens
            estimates[index][1] += completion_tokens
        if len(empties) >= work.flush_rows:
            recorded += _record(work, empties)
            empties = []
    recorded += _record(work, empties)
    return splitter.finish(), recorded, [(p, c) for p, c in estimates]


def _record(work: Work, results: list[QueryResult]) -> int:
    if results:
        work.checkpoint.flush(results)
        work.progress.add(len(results), Tally.of(results))
    return len(results)


def collect(
    work: Work, client: BatchApiClient, file: FileRecord, batch: BatchRecord, *, last_try: bool
) -> None:
    """A finished batch's output and error files into the checkpoint, flushed every
    ``work.flush_rows`` results. What it never ran is counted as unsettled (the next try asks it),
    or recorded under its ``batch_*`` code when ``last_try``; transient line errors are recorded
    and counted as unsettled too, as a live request's would be asked again by a later try."""
    _Collector(work, client, file, batch, last_try).collect()


class _Collector:
    def __init__(
        self, work: Work, client: BatchApiClient, file: FileRecord, batch: BatchRecord, last_try: bool
    ) -> None:
        self.work, self.client, self.file, self.batch, self.last_try = work, client, file, batch, last_try
        self.pending: list[QueryResult] = []
        self.seen: set[str] = set()
        self.output = work.options.structured_output()
        self.price = parse_prices(work.options.prices).get(work.endpoint.model or "")

    def collect(self) -> None:
        batch, last_try = self.batch, self.last_try
        # a collection cut short starts over
        batch.answered, batch.unsettled, batch.results = 0, 0, []
        batch.billed_tokens, batch.billed_cost = 0, 0.0
        never: list[QueryResult] = []
        try:
            for file_id in (batch.output_file_id, batch.error_file_id):
                for raw in self.client.file_lines(file_id) if file_id else ():
                    try:
                        outcome = parse_result_line(raw, self.client.scrubber, self.output)
                    except (ValueError, KeyError, TypeError):
                        raise LLMQueryBatchError(
                            f"a line of result file {file_id} could not be read"
                        ) from None
                    self.seen.add(outcome.custom_id)
                    if outcome.result is None:
                        code, message = outcome.never_ran_code, outcome.message
                        never.append(never_ran_result(outcome.custom_id, code or "", message or ""))
                    else:
                        self._add(outcome.result)
            if len(self.seen) < self.file.requests:
                never += self._missing()
            if last_try:
                for result in never:
                    self._add(result)
            else:
                batch.unsettled += len(never)
        finally:
            self._flush()

    def _missing(self) -> list[QueryResult]:
        """Requests in neither result file: never run, as the batch's end tells (None: completed)."""
        code = NEVER_RAN_BY_STATUS.get(self.batch.status)
        message = f"batch {self.batch.id} ended {self.batch.status} before this request ran"
        if self.batch.error_message:
            message += f" ({self.batch.error_message})"
        with open_request_file(self.work.checkpoint, self.file.name) as stream:
            missing = [key for key in custom_ids(stream) if key not in self.seen]
        if code is None:  # a completed batch that lost lines: left to the next try / missing_result
            self.batch.unsettled += len(missing)
            return []
        return [never_ran_result(key, code, message[:500]) for key in missing]

    def _add(self, result: QueryResult) -> None:
        """One row's result, priced as a live row's (its usage at the run's prices, cached prompt
        tokens at the cached rate) and counted as billed."""
        if self.price is not None:
            cost = self.price.cost(
                result.prompt_tokens, result.completion_tokens, result.cached_prompt_tokens
            )
            result = dataclasses.replace(result, cost=cost)
        self.batch.billed_tokens += (result.prompt_tokens or 0) + (result.completion_tokens or 0)
        self.batch.billed_cost += result.cost or 0.0
        self.pending.append(result)
        if result.error_code in TRANSIENT_ERROR_CODES:
            self.batch.unsettled += 1  # a later try asks it again, as for a live request
        if len(self.pending) >= self.work.flush_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        self.batch.results.append(self.work.checkpoint.flush(self.pending))
        self.batch.answered += len(self.pending)
        self.work.progress.add(len(self.pending), Tally.of(self.pending))
        self.pending = []
        if self.work.stop.is_set():
            raise PlacementStopped("stopped while collecting results; what was read is checkpointed")


__all__ = ["collect", "write_request_files"]
