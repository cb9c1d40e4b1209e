"""The Batch API mode's two ends in the checkpoint: pending requests out as request files, one line
per request key; a finished batch's result files back in, each line mapped by ``custom_id`` into a
row result, and what the batch never ran told apart from what it answered."""

from __future__ import annotations

import dataclasses
import json

from airflow_provider_llmq.core.accounting.cost import parse_prices
from airflow_provider_llmq.core.accounting.progress import Tally
from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.batch.batch_api import BatchApiClient, LLMQueryBatchError
from airflow_provider_llmq.core.batch.batch_estimate import LineEstimator
from airflow_provider_llmq.core.batch.batch_files import (
    NEVER_RAN_BY_STATUS,
    custom_ids,
    empty_prompt_result,
    is_empty_prompt,
    never_ran_result,
    parse_result_line,
)
from airflow_provider_llmq.core.batch.batch_packs import (
    PackEntry,
    PackLineBuilder,
    Reask,
    Spent,
    settle_pack,
    with_spent,
)
from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.packing import PackedChatRequest, PackSizer, group_rows
from airflow_provider_llmq.core.packing.envelope import pack_items
from airflow_provider_llmq.core.request.error_codes import TRANSIENT_ERROR_CODES
from airflow_provider_llmq.spark.batch_ledger import BatchRecord, FileRecord, open_request_file
from airflow_provider_llmq.spark.placements.base import PlacementStopped, Work
from airflow_provider_llmq.spark.placements.batch_packs import RequestWriter, read_entries
from airflow_provider_llmq.spark.plan import stream_requests


def write_request_files(
    work: Work,
    lines: PackLineBuilder,
    prefix: str,
    max_requests: int,
    max_bytes: int,
    estimator: LineEstimator,
) -> tuple[list[FileRecord], int]:
    """Streams the pending requests (never the whole table) into request files under the
    checkpoint, cut at the limits: one line per request key, or with ``rows_per_request`` one line
    per pack of keys (formed as live packs are, :func:`~...core.packing.group_rows`). A null or
    blank prompt is recorded as ``empty_prompt`` and sent nowhere, as live. Returns the files (with
    their estimated tokens) and the count of empty prompts."""
    writer = RequestWriter(
        work.checkpoint, lambda i: f"{prefix}-file-{i + 1:04d}.jsonl", max_requests, max_bytes, estimator
    )
    options = work.options
    rows = stream_requests(work.pending, work.n_buckets)
    sizer = PackSizer(options.rows_per_request, lines.builder.request.max_completion_tokens())
    groups = group_rows(rows, sizer) if options.packed else ([row] for row in rows)
    empties: list[QueryResult] = []
    recorded = 0
    for group in groups:
        if work.stop.is_set():
            raise PlacementStopped("stopped while writing the request files; nothing was sent")
        if len(group) == 1 and is_empty_prompt(group[0][1]):
            empties.append(empty_prompt_result(group[0][0]))
        else:
            keys, prompts = [str(k) for k, _ in group], [str(p) for _, p in group]
            custom_id, line = lines.line(keys, prompts)
            try:
                writer.add(custom_id, line, PackEntry(keys) if len(keys) > 1 else None)
            except ValueError as exc:
                raise LLMQueryConfigError(f"a prompt cannot be sent through the Batch API: {exc}") from None
        if len(empties) >= work.flush_rows:
            recorded += _record(work, empties)
            empties = []
    recorded += _record(work, empties)
    return writer.finish(), recorded


def _record(work: Work, results: list[QueryResult]) -> int:
    if results:
        work.checkpoint.flush(results)
        work.progress.add(len(results), Tally.of(results))
    return len(results)


def collect(
    work: Work, client: BatchApiClient, file: FileRecord, batch: BatchRecord, *, last_try: bool
) -> list[Reask]:
    """A finished batch's output and error files into the checkpoint, flushed every
    ``work.flush_rows`` results. What it never ran is counted as unsettled (the next try asks it),
    or recorded under its ``batch_*`` code when ``last_try``; transient line errors are recorded
    and counted as unsettled too, as a live request's would be asked again by a later try. A pack
    line settles the rows it answered; the others are returned, to be asked again."""
    return _Collector(work, client, file, batch, last_try).collect()


class _Collector:
    def __init__(
        self, work: Work, client: BatchApiClient, file: FileRecord, batch: BatchRecord, last_try: bool
    ) -> None:
        self.work, self.client, self.file, self.batch, self.last_try = work, client, file, batch, last_try
        self.pending: list[QueryResult] = []
        self.seen: set[str] = set()
        self.output = work.options.structured_output()
        self.price = parse_prices(work.options.prices).get(work.endpoint.model or "")
        self.entries = read_entries(work.checkpoint, file.name)
        self.packs = {custom_id for custom_id, entry in self.entries.items() if len(entry.keys) > 1}
        self.request = PackedChatRequest.of(work.options.chat_request(work.endpoint))
        self.reasks: list[Reask] = []
        self._prompts: dict[str, list[str]] | None = None

    def collect(self) -> list[Reask]:
        batch, last_try = self.batch, self.last_try
        # a collection cut short starts over
        batch.answered, batch.unsettled, batch.results = 0, 0, []
        batch.billed_tokens, batch.billed_cost = 0, 0.0
        never: list[QueryResult] = []
        try:
            for file_id in (batch.output_file_id, batch.error_file_id):
                for raw in self.client.file_lines(file_id) if file_id else ():
                    try:
                        outcome = parse_result_line(raw, self.client.scrubber, self.output, self.packs)
                    except (ValueError, KeyError, TypeError):
                        raise LLMQueryBatchError(
                            f"a line of result file {file_id} could not be read"
                        ) from None
                    custom_id = outcome.custom_id
                    self.seen.add(custom_id)
                    if outcome.result is None:
                        code, message = outcome.never_ran_code or "", outcome.message or ""
                        never += [
                            with_spent(never_ran_result(key, code, message), spent)
                            for key, spent in self._rows(custom_id)
                        ]
                    elif custom_id in self.packs:
                        self._settle(outcome.result, custom_id)
                    else:
                        self._add(outcome.result, self._rows(custom_id)[0][1])
            if len(self.seen) < self.file.requests:
                never += self._missing()
            if last_try:
                for result in never:
                    self._add(result, billed=False)
            else:
                batch.unsettled += len(never)
        finally:
            self._flush()
        return self.reasks

    def _rows(self, custom_id: str) -> list[tuple[str, Spent]]:
        """The request keys of a line, with what their earlier lines spent."""
        entry = self.entries.get(custom_id)
        if entry is None:
            return [(custom_id, Spent())]
        return [(key, entry.spent_of(index)) for index, key in enumerate(entry.keys)]

    def _settle(self, line: QueryResult, custom_id: str) -> None:
        """A pack line: billed once, its answered rows recorded, the others asked again."""
        self._bill(line.prompt_tokens, line.completion_tokens, line.cached_prompt_tokens)
        if self._prompts is None:
            self._prompts = self._pack_prompts()
        settled = settle_pack(
            line, self.entries[custom_id], self._prompts[custom_id], self.request, self.output
        )
        for result in settled.results:
            self._add(result, billed=False)
        self.reasks += settled.reasks

    def _pack_prompts(self) -> dict[str, list[str]]:
        prompts: dict[str, list[str]] = {}
        with open_request_file(self.work.checkpoint, self.file.name) as stream:
            for raw in stream:
                if raw.strip():
                    line = json.loads(raw)
                    if line["custom_id"] in self.packs:
                        prompts[line["custom_id"]] = pack_items(line["body"]) or []
        return prompts

    def _missing(self) -> list[QueryResult]:
        """Requests in neither result file: never run, as the batch's end tells (None: completed)."""
        code = NEVER_RAN_BY_STATUS.get(self.batch.status)
        message = f"batch {self.batch.id} ended {self.batch.status} before this request ran"
        if self.batch.error_message:
            message += f" ({self.batch.error_message})"
        with open_request_file(self.work.checkpoint, self.file.name) as stream:
            lines = [custom_id for custom_id in custom_ids(stream) if custom_id not in self.seen]
        missing = [row for custom_id in lines for row in self._rows(custom_id)]
        if code is None:  # a completed batch that lost lines: left to the next try / missing_result
            self.batch.unsettled += len(missing)
            return []
        return [with_spent(never_ran_result(key, code, message[:500]), spent) for key, spent in missing]

    def _bill(self, prompt: int | None, completion: int | None, cached: int | None) -> None:
        """What one result line's usage billed, at the run's prices."""
        self.batch.billed_tokens += (prompt or 0) + (completion or 0)
        if self.price is not None:
            self.batch.billed_cost += self.price.cost(prompt, completion, cached) or 0.0

    def _add(self, result: QueryResult, spent: Spent | None = None, *, billed: bool = True) -> None:
        """One row's result, priced as a live row's (its usage at the run's prices, cached prompt
        tokens at the cached rate, with what its earlier lines spent); ``billed``: its own usage is
        what its line billed (a pack line is billed once, by :meth:`_settle`)."""
        if billed:
            self._bill(result.prompt_tokens, result.completion_tokens, result.cached_prompt_tokens)
        if spent is not None:
            result = with_spent(result, spent)
        if self.price is not None:
            cost = self.price.cost(
                result.prompt_tokens, result.completion_tokens, result.cached_prompt_tokens
            )
            result = dataclasses.replace(result, cost=cost)
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
