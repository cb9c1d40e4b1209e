"""The run's counts, taken from what was written, never by evaluating the query plan again."""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from airflow_provider_llmq.core.accounting.progress import OUTCOMES, row_outcome
from airflow_provider_llmq.core.accounting.result import STATUS_OK
from airflow_provider_llmq.core.pacing.adaptive import AdaptiveStats
from airflow_provider_llmq.core.request.error_codes import EMPTY_PROMPT, RECORDED_ERROR_CODES
from airflow_provider_llmq.spark.schema import (
    ATTEMPTS_COL,
    CACHED_COL,
    COMPLETION_TOKENS_COL,
    COST_COL,
    ERROR_CODE_COL,
    MISSING_RESULT,
    PACK_ROWS_COL,
    PROMPT_TOKENS_COL,
    REQUESTS_COL,
    STATUS_COL,
    THROTTLED_COL,
    TOKENS_SAVED_COL,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, Observation, Row

# the summary's keys and meanings: raised when one changes, so downstream tasks can check it
# 3: throttled, admitted_requests_per_second; 4: cost, cost_this_try, cache_hits; 5: answered,
# failed, skipped, not_sent (adding up to rows), requests_answered counts answers only
SCHEMA_VERSION = 5

# the codes a row's error can have, counted while the output is written; another code makes the
# summary count the output again (exact either way)
_CODES = (*RECORDED_ERROR_CODES, MISSING_RESULT)
_SENT = ("requests_sent", "retries", "throttled", "prompt_tokens", "completion_tokens", "requests_answered")


def observe_outcomes(output: DataFrame) -> tuple[DataFrame, Observation | None]:
    """The output, counting its rows' outcomes and error codes while it is written: the summary then
    needs no second evaluation of the join of input and results (a full pass at a million rows).

    Spark Connect answers an observation of a write on its own terms: there it is counted after the
    write, as before (None)."""
    from pyspark.sql import Observation
    from pyspark.sql import functions as F

    if type(output).__module__.startswith("pyspark.sql.connect"):
        return output, None
    ok = F.coalesce(F.col(STATUS_COL) == F.lit(STATUS_OK), F.lit(False))  # a null status is not an answer
    failed = ~ok
    code = F.col(ERROR_CODE_COL)
    not_empty = F.coalesce(code, F.lit("")) != F.lit(EMPTY_PROMPT)
    asked = F.coalesce(F.col(ATTEMPTS_COL), F.lit(0)) > 0
    observation = Observation("llmq_outcomes")
    counted = output.observe(
        observation,
        F.count(F.when(ok, 1)).alias("answered"),
        F.count(F.when(failed & ~not_empty, 1)).alias("skipped"),
        F.count(F.when(failed & not_empty & asked, 1)).alias("failed"),
        F.count(F.when(failed & not_empty & ~asked, 1)).alias("not_sent"),
        F.count(F.when(failed & code.isNull(), 1)).alias("code_None"),
        *(F.count(F.when(failed & (code == F.lit(name)), 1)).alias(f"code_{name}") for name in _CODES),
    )
    return counted, observation


def observed_metrics(observation: Observation, wait: float = 10.0) -> dict[str, Any] | None:
    """The counts the write observed, or None when they did not come (a sink ``mode="ignore"`` left
    as it was, a Spark without the future polled here): never the unbounded wait of
    ``Observation.get`` before an action that did not run. The summary then counts the output."""
    try:  # the JVM Observation's future: pyspark has no public poll
        future = observation._jo.future()  # type: ignore[union-attr]
    except Exception:  # py4j raises its own errors for a member this Spark lacks
        return None
    deadline = time.monotonic() + wait
    while not future.isCompleted():
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)
    return dict(observation.get)


def _observed(metrics: dict[str, Any]) -> tuple[dict[str, int], Counter[str]] | None:
    """Outcomes and errors by code from an observation; None when an error code outside the known
    ones was written (its rows are not in any ``code_`` count): then the output is counted again."""
    outcomes = {name: int(metrics[name]) for name in OUTCOMES}
    by_code = Counter({key[5:]: int(n) for key, n in metrics.items() if key.startswith("code_") and n})
    errors = sum(outcomes.values()) - outcomes["answered"]
    return (outcomes, by_code) if sum(by_code.values()) == errors else None


def summarize(
    output: DataFrame,
    new_results: DataFrame | None,
    all_results: DataFrame | None = None,
    observed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Rows and errors from the output (``observed`` while it was written, by
    :func:`observe_outcomes`, else counted from it); requests, tokens and this try's cost from the
    results this try checkpointed (each request once, however many rows it fanned out to; cache hits
    apart, as they were not sent); the run's ``cost`` from every result of the checkpoint
    (``all_results``), None when no result carries a cost (no ``prices``)."""
    from pyspark.sql import functions as F

    cached = F.coalesce(F.col(CACHED_COL), F.lit(False))
    counted = _observed(observed) if observed else None
    if counted is None:
        counted = _counted(output)
    outcomes, by_code = counted
    rows = sum(outcomes.values())
    ok = outcomes["answered"]
    errors_by_code = dict(sorted(by_code.items()))
    sent: dict[str, Any] = dict.fromkeys(_SENT, 0)
    extra: dict[str, Any] = {"cost": None, "cost_this_try": None, "cache_hits": 0}
    if new_results is not None:
        # one job for every count of this try's results: hits apart, the rest over what was sent
        sent_only = ~cached
        packed = sent_only & (F.coalesce(F.col(PACK_ROWS_COL), F.lit(1)) > 1)
        totals = new_results.agg(
            F.count(F.when(cached, 1)).alias("cache_hits"),
            # a packed row's share of its requests (rows_per_request), else its attempts
            F.sum(
                F.when(sent_only, F.coalesce(F.col(REQUESTS_COL), F.col(ATTEMPTS_COL).cast("double")))
            ).alias("requests_sent"),
            # a 429 is congestion, not a retry: counted apart
            F.sum(
                F.when(
                    sent_only,
                    F.greatest(
                        F.col(ATTEMPTS_COL) - 1 - F.coalesce(F.col(THROTTLED_COL), F.lit(0)), F.lit(0)
                    ),
                )
            ).alias("retries"),
            F.sum(F.when(sent_only, F.col(THROTTLED_COL))).alias("throttled"),
            F.sum(F.when(sent_only, F.col(PROMPT_TOKENS_COL))).alias("prompt_tokens"),
            F.sum(F.when(sent_only, F.col(COMPLETION_TOKENS_COL))).alias("completion_tokens"),
            F.count(F.when(sent_only & (F.col(STATUS_COL) == F.lit(STATUS_OK)), 1)).alias(
                "requests_answered"
            ),
            F.sum(F.when(sent_only, F.col(COST_COL))).alias("cost"),
            F.count(F.when(packed, 1)).alias("packed_rows"),
            F.sum(F.when(packed, 1.0 / F.col(PACK_ROWS_COL))).alias("packs"),
            F.sum(F.when(packed, F.col(TOKENS_SAVED_COL))).alias("saved"),
        ).first()
        assert totals is not None
        sent = {name: round(totals[name] or 0) for name in _SENT}
        extra.update(cache_hits=int(totals["cache_hits"]), cost_this_try=_rounded(totals["cost"]))
        packing = _packing(totals)
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


def _packing(totals: Row) -> dict[str, Any] | None:
    """What ``rows_per_request`` did this try: the packs that answered rows, rows per pack, and the
    prompt tokens saved against one row per request (counted before sending); None when no row of
    this try was answered from a pack."""
    if not totals["packed_rows"]:
        return None
    packs = max(1, round(totals["packs"]))
    return {
        "packs_answered": packs,
        "packed_rows": int(totals["packed_rows"]),
        "rows_per_pack": round(totals["packed_rows"] / packs, 2),
        "prompt_tokens_saved": int(totals["saved"] or 0),
    }


def _counted(output: DataFrame) -> tuple[dict[str, int], Counter[str]]:
    """Outcomes and errors by code, by a group-by over the output (a second evaluation of it)."""
    from pyspark.sql import functions as F

    asked = (F.coalesce(F.col(ATTEMPTS_COL), F.lit(0)) > 0).alias("asked")
    groups = output.groupBy(STATUS_COL, ERROR_CODE_COL, asked).agg(F.count(F.lit(1)).alias("n")).collect()
    outcomes = dict.fromkeys(OUTCOMES, 0)
    by_code: Counter[str] = Counter()
    for group in groups:
        ok = group[STATUS_COL] == STATUS_OK
        outcomes[row_outcome(ok, group[ERROR_CODE_COL], int(group["asked"]))] += int(group["n"])
        if not ok:
            by_code[str(group[ERROR_CODE_COL])] += int(group["n"])
    return outcomes, by_code


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
