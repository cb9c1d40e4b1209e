"""Request files whose lines may hold several rows (``rows_per_request``), in the checkpoint.

A request file is written through :class:`RequestWriter`: lines cut into files at the limits (lines
and bytes), each file's estimate, and beside each file the rows of its pack lines and of its rows
asked again (``<file>.rows.json``: ``custom_id`` -> :class:`~...core.batch.batch_packs.PackEntry`), which
never goes to the API. A file without one holds one row per line, its key the ``custom_id``.

What a pack's answer did not settle is asked again in a *re-ask file* of the same round, written
when its batch is collected (:func:`add_reask_files`) and recorded right after it in the round, so
the round is over only once every row has its own result: a row left out of an answer is asked again
with the others left out, a line that failed whole as two halves, down to single rows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING

from airflow_provider_llmq.core.accounting.cost import RequestEstimate, parse_prices
from airflow_provider_llmq.core.batch.batch_estimate import LineEstimator
from airflow_provider_llmq.core.batch.batch_files import FileSplitter, LineBuilder, custom_ids
from airflow_provider_llmq.core.batch.batch_packs import (
    PackEntry,
    PackLineBuilder,
    Reask,
    Spent,
    estimate_lines,
)
from airflow_provider_llmq.spark.batch_ledger import (
    FILES_DIR,
    FileRecord,
    Round,
    file_path,
    open_request_file,
)
from airflow_provider_llmq.spark.checkpoint import Checkpoint
from airflow_provider_llmq.spark.schema import KEY_COL, PROMPT_COL

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
    from airflow_provider_llmq.core.request.options import QueryOptions

__all__ = [
    "RequestWriter",
    "add_reask_files",
    "estimate_packed",
    "file_rows",
    "read_entries",
    "write_entries",
]

_ROWS_SUFFIX = ".rows.json"
log = logging.getLogger(__name__)


def _rows_name(name: str) -> str:
    return f"{FILES_DIR}/{name.removesuffix('.jsonl')}{_ROWS_SUFFIX}"


def write_entries(checkpoint: Checkpoint, name: str, entries: dict[str, PackEntry]) -> None:
    """The rows of a request file's lines that are not one row each (nothing when there are none);
    written before the ledger records the file, so a try killed in between writes them again."""
    if not entries:
        return
    data = {custom_id: entry.to_json() for custom_id, entry in entries.items()}
    with checkpoint.fs.open_output_stream(f"{checkpoint.root}/{_rows_name(name)}") as stream:
        stream.write(json.dumps(data, separators=(",", ":")).encode("utf-8"))


def read_entries(checkpoint: Checkpoint, name: str) -> dict[str, PackEntry]:
    data = checkpoint.read_json(_rows_name(name)) or {}
    return {str(custom_id): PackEntry.from_json(entry) for custom_id, entry in data.items()}


def file_rows(checkpoint: Checkpoint, file: FileRecord) -> Iterator[tuple[str, Spent]]:
    """The request key of every row a request file asks, with what its earlier lines spent."""
    entries = read_entries(checkpoint, file.name)
    with open_request_file(checkpoint, file.name) as stream:
        for custom_id in custom_ids(stream):
            entry = entries.get(custom_id)
            if entry is None:
                yield custom_id, Spent()
                continue
            for index, key in enumerate(entry.keys):
                yield key, entry.spent_of(index)


class RequestWriter:
    """Lines into request files under the checkpoint, cut at ``max_requests`` lines and
    ``max_bytes`` bytes; :meth:`finish` writes each file's rows and returns the files' records.

    :param name_of: the ``index``-th file's name.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        name_of: Callable[[int], str],
        max_requests: int,
        max_bytes: int,
        estimator: LineEstimator,
    ) -> None:
        self.checkpoint, self.estimator = checkpoint, estimator
        checkpoint.fs.create_dir(f"{checkpoint.root}/{FILES_DIR}", recursive=True)

        def open_file(index: int) -> tuple[str, IO[bytes]]:
            name = name_of(index)
            return name, checkpoint.fs.open_output_stream(file_path(checkpoint, name))

        self._splitter = FileSplitter(max_requests, max_bytes, open_file)
        self._estimates: list[list[int]] = []  # per file: prompt, completion, rows
        self._entries: list[dict[str, PackEntry]] = []

    def add(self, custom_id: str, line: bytes, entry: PackEntry | None = None) -> None:
        self._splitter.add(line)  # ValueError: one line over max_bytes
        index = len(self._splitter.files)  # the file the line went to (those before it are closed)
        while len(self._estimates) <= index:
            self._estimates.append([0, 0, 0])
            self._entries.append({})
        prompt, completion = self.estimator(line)
        self._estimates[index][0] += prompt
        self._estimates[index][1] += completion
        self._estimates[index][2] += 1 if entry is None else len(entry.keys)
        if entry is not None:
            self._entries[index][custom_id] = entry

    def finish(self) -> list[FileRecord]:
        records = []
        for index, written in enumerate(self._splitter.finish()):
            write_entries(self.checkpoint, written.name, self._entries[index])
            prompt, completion, rows = self._estimates[index]
            records.append(
                FileRecord(
                    written.name,
                    written.digest,
                    written.requests,
                    written.bytes,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    rows=rows,
                )
            )
        return records


def add_reask_files(
    checkpoint: Checkpoint,
    current: Round,
    file: FileRecord,
    reasks: list[Reask],
    lines: PackLineBuilder,
    limits: tuple[int, int],
    estimator: LineEstimator,
) -> list[FileRecord]:
    """Writes the rows a batch of ``file`` left to ask again as re-ask files (named after it, so a
    try killed before the ledger names them writes the same files) and records them in the round
    right after it; the caller saves the ledger."""
    stem = file.name.removesuffix(".jsonl")
    writer = RequestWriter(checkpoint, lambda i: f"{stem}-reask{i + 1}.jsonl", *limits, estimator)
    for reask in reasks:
        custom_id, line = lines.line(reask.keys, reask.prompts)
        spent = reask.spent if any(s.attempts for s in reask.spent) else []
        writer.add(custom_id, line, PackEntry(reask.keys, spent) if len(reask.keys) > 1 or spent else None)
    records = writer.finish()
    at = current.files.index(file) + 1
    current.files[at:at] = records
    log.info(
        "llmq: %d rows of %s asked again in %d lines (%s)",
        sum(len(r.keys) for r in reasks), file.name, sum(r.requests for r in records),
        ", ".join(r.name for r in records),
    )  # fmt: skip
    return records


def estimate_packed(pending: DataFrame, options: QueryOptions, endpoint: EndpointConfig) -> RequestEstimate:
    """``estimate_only`` with ``rows_per_request``: the request lines a round would send, packed and
    counted as the budget counts them (the system prompt once per line); the rows stream to the
    driver one partition at a time."""
    # imported here: batch_budget imports this module (file_rows)
    from airflow_provider_llmq.spark.placements.batch_budget import completion_basis, line_estimator

    request = options.chat_request(endpoint)
    rows = pending.select(KEY_COL, PROMPT_COL).toLocalIterator(prefetchPartitions=False)
    return estimate_lines(
        ((str(row[0]), row[1]) for row in rows),
        PackLineBuilder(LineBuilder(request, "/chat/completions", endpoint.model or "")),
        options.rows_per_request,
        line_estimator(options, request),
        parse_prices(options.prices).get(endpoint.model or ""),
        completion_basis(options, request),
    )
