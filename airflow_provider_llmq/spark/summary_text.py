"""The task's summary as one block a person reads in the log: the XCom keeps the dict.

A dict of thirty keys on one log line is cut by every log viewer; the block puts one subject per
line (rows, requests, tokens and cost, time, where the output is), in the words of the progress line.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_llmq.spark.phases import describe


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{code} {n:,}" for code, n in sorted(counts.items())) or "none"


def summary_block(summary: dict[str, Any]) -> str:
    """``llmq summary: N rows in S s`` and an indented line per subject."""
    lines = [
        f"rows: answered {summary.get('answered', 0):,}, failed {summary.get('failed', 0):,}, "
        f"skipped {summary.get('skipped', 0):,}, not sent {summary.get('not_sent', 0):,}; "
        f"errors by code: {_counts(summary.get('errors_by_code') or {})}",
        f"requests: {summary.get('requests_sent', 0):,} sent ({summary.get('retries', 0):,} retries, "
        f"{summary.get('throttled', 0):,} refused with 429); {summary.get('resumed_requests', 0):,} "
        f"resumed from the checkpoint, {summary.get('cache_hits', 0):,} from the cache",
    ]
    cost = summary.get("cost")
    lines.append(
        f"tokens: prompt {summary.get('prompt_tokens', 0):,}, "
        f"completion {summary.get('completion_tokens', 0):,}" + ("" if cost is None else f"; cost {cost:.6g}")
    )
    packing = summary.get("packing") or {}
    if packing.get("packs_answered"):
        lines.append(
            f"packs: {packing['packs_answered']:,} answered, {packing.get('rows_per_pack')} rows each on "
            f"average, {packing.get('prompt_tokens_saved', 0):,} prompt tokens saved"
        )
    rate = summary.get("query_requests_per_second")
    admitted = summary.get("admitted_requests_per_second")
    lines.append(
        f"asking: {summary.get('query_seconds', 0):.1f} s"
        + ("" if rate is None else f", {rate:.1f} requests/s")
        + ("" if admitted is None else f" (the limiter admitted {admitted:.1f}/s at the end)")
    )
    if summary.get("phases"):
        lines.append(f"time: {describe(summary['phases'])}")
    lines.append(f"output: {summary.get('output') or '-'}")
    if summary.get("checkpoint"):
        lines.append(f"checkpoint: {summary['checkpoint']}")
    head = f"llmq summary: {summary.get('rows', 0):,} rows in {summary.get('seconds', 0):.1f} s"
    return head + "".join(f"\n  {line}" for line in lines)
