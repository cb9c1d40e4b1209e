"""Splitting a Batch API request file into parts, each request in exactly one of them.

A file is split when its batch was refused for the enqueued-token quota while nothing else of the
run was running (it is larger than the whole quota), or when only its first lines fit what is left
of the budget. The parts are written whole under the checkpoint (named after the file, so a try
killed before the ledger names them writes the same parts again), then recorded in the ledger with
the file marked split, in one save: from then on the file is never sent, its parts are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from airflow_provider_llmq.core.batch.batch_files import custom_ids
from airflow_provider_llmq.spark.batch_ledger import FileRecord, Round, file_path, open_request_file
from airflow_provider_llmq.spark.checkpoint import Checkpoint
from airflow_provider_llmq.spark.placements.batch_packs import read_entries, write_entries

Estimate = Callable[[bytes], tuple[int, int]]

__all__ = ["halves", "larger_than_the_quota", "line_estimates", "split_file"]


def _lines(checkpoint: Checkpoint, file: FileRecord) -> list[bytes]:
    with open_request_file(checkpoint, file.name) as stream:
        return [line for line in stream if line.strip()]


def line_estimates(checkpoint: Checkpoint, file: FileRecord, estimate: Estimate) -> list[tuple[int, int]]:
    """Each line's estimated (prompt, completion) tokens, in file order."""
    return [estimate(line) for line in _lines(checkpoint, file)]


def halves(file: FileRecord) -> list[int]:
    """Line counts of two halves (the first one the larger)."""
    first = (file.requests + 1) // 2
    return [first, file.requests - first]


def split_file(
    checkpoint: Checkpoint, current: Round, file: FileRecord, sizes: list[int], estimate: Estimate
) -> list[FileRecord]:
    """Writes ``file``'s lines as parts of ``sizes`` lines each, in order, and records them in the
    round after the file (which names them in ``split_into``); the caller saves the ledger."""
    lines = _lines(checkpoint, file)
    entries = read_entries(checkpoint, file.name)  # the rows of its pack lines go with them
    if sum(sizes) != len(lines) or any(n < 1 for n in sizes):
        raise ValueError(f"cannot split the {len(lines)} lines of {file.name} into {sizes}")
    stem = file.name.removesuffix(".jsonl")
    parts: list[FileRecord] = []
    start = 0
    for index, size in enumerate(sizes, 1):
        chunk = lines[start : start + size]
        start += size
        name = f"{stem}-part{index}.jsonl"
        data = b"".join(line if line.endswith(b"\n") else line + b"\n" for line in chunk)
        with checkpoint.fs.open_output_stream(file_path(checkpoint, name)) as stream:
            stream.write(data)
        ids = set(custom_ids(chunk))
        write_entries(checkpoint, name, {i: entry for i, entry in entries.items() if i in ids})
        counted = [estimate(line) for line in chunk]
        parts.append(
            FileRecord(
                name,
                hashlib.sha256(data).hexdigest(),
                len(chunk),
                len(data),
                prompt_tokens=sum(p for p, _ in counted),
                completion_tokens=sum(c for _, c in counted),
                rows=sum(len(entries[i].keys) if i in entries else 1 for i in ids),
            )
        )
    file.split_into = [part.name for part in parts]
    at = current.files.index(file) + 1
    current.files[at:at] = parts
    return parts


def larger_than_the_quota(current: Round, file: FileRecord) -> bool:
    """For a file refused for the enqueued-token quota with nothing else of the run running: True
    when no file as large was ever accepted, so the quota is smaller than the file; the round's
    ``quota_ceiling`` then notes it, and files this large are split before they are sent."""
    accepted = [f.prompt_tokens for f in current.files if f.accepted]
    if accepted and max(accepted) >= file.prompt_tokens:
        return False  # as large a file went through: other work holds the quota now
    ceiling = current.quota_ceiling
    current.quota_ceiling = file.prompt_tokens if ceiling is None else min(ceiling, file.prompt_tokens)
    return True
