"""Where an operator reads from and writes to, as its mixins see it: one declaration of those
arguments for the stages (:mod:`.stages`) and the lineage (:mod:`.lineage`)."""

from __future__ import annotations

from typing import Protocol


class SourceAndSink(Protocol):
    """The source (exactly one of ``sql``, ``source_table``, ``source_path``) and the output."""

    sql: str | None
    source_table: str | None
    source_path: str | None
    output_table: str | None
    output_path: str | None
    output_format: str
