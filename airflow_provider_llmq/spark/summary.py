"""The run's counts, taken from what was written, never by evaluating the query plan again."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from airflow_provider_llmq.core.adaptive import AdaptiveStats
from airflow_provider_llmq.core.progress import OUTCOMES, row_outcome
from airflow_provider_llmq.core.result import STATUS_OK
from airflow_provider_llmq.spark.schema import (
    ATTEMPTS_COL,
    CACHED_COL,
    COMPLETION_TOKENS_COL,
    COST_COL,
    ERROR_CODE_COL,
    PACK_ROWS_COL,
    PROMPT_TOKENS_COL,
    REQUESTS_COL,
    STATUS_COL,
    THROTTLED_COL,
    TOKENS_SAVED_COL,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

# the summary's keys and meanings: raised when one changes, so downstream tasks can check it
# 3: throttled, admitted_requests_per_second; 4: cost, cost_this_try, cache_hits; 5: answered,
# failed, skipped, not_sent (adding up to rows), requests_answered counts answers only
SCHEMA_VERSION = 5

_SENT = ("requests_sent", "retries", "throttled", "prompt_tokens", "completion_tokens", "requests_answered")


def summarize(
    output: DataFrame, new_results: DataFrame | None, all_results: DataFrame | None = None
) -> dict[str, Any]:
    """Rows and errors from the output; requests, tokens and this try's cost from the results this
    try checkpointed (each request once, however many rows it fanned out to; cache hits apart, as
    they were not sent); the run's ``cost`` from every result of the checkpoint (``all_results``),
    None when no result carries a cost (no ``prices``)."""
    from pyspark.sql import functions as F

    cached = F.coalesce(F.col(CACHED_COL), F.lit(False))

    asked = (F.coalesce(F.col(ATTEMPTS_COL), F.lit(0)) > 0).alias("asked")
    groups = output.groupBy(STATUS_COL, ERROR_CODE_COL, asked).agg(F.count(F.lit(1)).alias("n")).collect()
    outcomes = dict.fromkeys(OUTCOMES, 0)
    by_code: Counter[str] = Counter()
    for group in groups:
        ok = group[STATUS_COL] == STATUS_OK
        outcomes[row_outcome(ok, group[ERROR_CODE_COL], int(group["asked"]))] += int(group["n"])
        if not ok:
            by_code[str(group[ERROR_CODE_COL])] += int(group["n"])
    rows = sum(outcomes.values())
    ok = outcomes["answered"]
    errors_by_code = dict(sorted(by_code.items()))
    sent: dict[str, Any] = dict.fromkeys(_SENT, 0)
    extra: dict[str, Any] = {"cost": None, "cost_this_try": None, "cache_hits": 0}
    if new_results is not None:
        hits = new_results.where(cached).count()
        new_results = new_results.where(~cached)
        totals = new_results.agg(
            # a packed row's share of its requests (rows_per_request), else its attempts
            F.sum(F.coalesce(F.col(REQUESTS_COL), F.col(ATTEMPTS_COL).cast("double"))).alias("requests_sent"),
            # a 429 is congestion, not a retry: counted apart
            F.sum(
                F.greatest(F.col(ATTEMPTS_COL) - 1 - F.coalesce(F.col(THROTTLED_COL), F.lit(0)), F.lit(0))
            ).alias("retries"),
            F.sum(THROTTLED_COL).alias("throttled"),
            F.sum(PROMPT_TOKENS_COL).alias("prompt_tokens"),
            F.sum(COMPLETION_TOKENS_COL).alias("completion_tokens"),
            F.count(F.when(F.col(STATUS_COL) == F.lit(STATUS_OK), 1)).alias("requests_answered"),
            F.sum(COST_COL).alias("cost"),
        ).first()
        assert totals is not None
        sent = {name: round(totals[name] or 0) for name in _SENT}
        extra.update(cache_hits=hits, cost_this_try=_rounded(totals["cost"]))
        packing = _packing(new_results)
        if packing is not None:
            extra["packing"] = packing
    if all_results is not None:
        total = all_results.agg(F.sum(COST_COL).alias("cost")).first()
        extra["cost"] = _rounded(total["cost"] if total is not None else None)
    if extra["cost"] is not None and extra["cost_this_try"] is None:
        extra["cost_this_try"] = 0.0
    counts = {
        "rows": rows,
        "ok": ok,
        "errors": rows - ok,
        **outcomes,  # answered + failed + skipped + not_sent == rows
        "errors_by_code": errors_by_code,
        **sent,
    }
    return {"schema_version": SCHEMA_VERSION, **counts, **extra}


def _packing(new_results: DataFrame) -> dict[str, Any] | None:
    """What ``rows_per_request`` did this try: the packs that answered rows, rows per pack, and the
    prompt tokens saved against one row per request (counted before sending); None when no row of
    this try was answered from a pack."""
    from pyspark.sql import functions as F

    packed = F.coalesce(F.col(PACK_ROWS_COL), F.lit(1)) > 1
    row = (
        new_results.where(packed)
        .agg(
            F.count(F.lit(1)).alias("rows"),
            F.sum(1.0 / F.col(PACK_ROWS_COL)).alias("packs"),
            F.sum(TOKENS_SAVED_COL).alias("saved"),
        )
        .first()
    )
    if row is None or not row["rows"]:
        return None
    packs = max(1, round(row["packs"]))
    return {
        "packs_answered": packs,
        "packed_rows": int(row["rows"]),
        "rows_per_pack": round(row["rows"] / packs, 2),
        "prompt_tokens_saved": int(row["saved"] or 0),
    }


def _rounded(cost: float | None) -> float | None:
    return None if cost is None else round(float(cost), 9)


def timings(
    rows: int, requests: int, seconds: float, query_seconds: float, phases: dict[str, float] | None = None
) -> dict[str, Any]:
    """The whole task's time and rate, the querying phase's alone (without Spark's reading and
    writing), and the seconds of each phase (``spark.phases``), which add up to ``seconds``."""
    return {
        "phases": phases or {},
        "seconds": round(seconds, 3),
        "rows_per_second": round(rows / seconds, 3) if seconds else None,
        "query_seconds": round(query_seconds, 3),
        "query_requests_per_second": round(requests / query_seconds, 3)
        if requests and query_seconds
        else None,
    }


def rate(stats: AdaptiveStats | None) -> dict[str, Any]:
    """The request rate the client admitted when the run ended, learned from the server's answers
    (None when unlimited, or when the clients ran in other processes: the UDF and executors)."""
    admitted = None if stats is None or stats.rate is None else round(stats.rate, 3)
    return {"admitted_requests_per_second": admitted}
