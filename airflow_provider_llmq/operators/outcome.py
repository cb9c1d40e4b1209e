"""What a run reports back to Airflow: the errors that fail a task and the error policy (the
output's Asset lives in :mod:`airflow_provider_llmq.operators.lineage`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from airflow.sdk.exceptions import AirflowFailException

from airflow_provider_llmq.core.errors import LLMQueryConfigError, LLMQueryError
from airflow_provider_llmq.core.request.error_codes import BUDGET_EXCEEDED, EMPTY_PROMPT
from airflow_provider_llmq.spark.placements import PlacementStopped

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from airflow_provider_llmq.spark.checkpoint import Checkpoint


class _Log(Protocol):
    def error(self, msg: Any, /, *args: Any) -> Any: ...


class LLMQueryFailedRowsError(LLMQueryError):
    """Raised after the output is written when ``on_error="fail"`` or ``max_error_ratio`` is exceeded."""


class LLMQueryConfigFailure(AirflowFailException, LLMQueryConfigError):
    """A configuration error (an argument, a column, the endpoint, the CA): it fails the task
    without using its retries, since no retry can fix it."""


#: rows a run must have asked before ``max_error_ratio`` may fail it: one bad row of three is no verdict
MIN_ROWS_FOR_ERROR_RATIO = 10
DEFAULT_MAX_ERROR_RATIO = 0.5
# row codes that are not failures of the asking: nothing was asked (a null or empty prompt), or the
# run's budget held it back (asked by a later run)
_NOT_ASKED = (EMPTY_PROMPT, BUDGET_EXCEEDED)


def enforce_error_policy(summary: dict[str, Any], on_error: str, max_error_ratio: float | None) -> None:
    """Fails the task (after the output is written) as ``on_error`` / ``max_error_ratio`` ask, and
    whenever rows were asked and none was answered: green must mean answered. A failed task emits no
    Asset event, so nothing downstream runs on it; its retry asks only the failed rows again."""
    rows, errors, codes = summary["rows"], summary["errors"], summary["errors_by_code"]
    if on_error == "fail" and errors:
        raise LLMQueryFailedRowsError(
            f"{errors} of {rows} rows ended in error {codes} and on_error='fail'; "
            "the output and the checkpoint are written"
        )
    failed = errors - sum(codes.get(code, 0) for code in _NOT_ASKED)
    asked = summary["ok"] + failed
    if asked and not summary["ok"]:
        raise LLMQueryFailedRowsError(
            f"none of the {asked} rows asked was answered: {codes}; the output and the checkpoint are "
            "written, and a retry of this task asks these rows again"
        )
    if max_error_ratio is not None and asked >= MIN_ROWS_FOR_ERROR_RATIO and failed / asked > max_error_ratio:
        raise LLMQueryFailedRowsError(
            f"{failed} of {asked} rows asked ended in error ({failed / asked:.1%} > max_error_ratio "
            f"{max_error_ratio:.1%}): {codes}"
        )


def log_interrupted(
    log: _Log, spark: SparkSession, checkpoint: Checkpoint, total: int, error: LLMQueryError
) -> None:
    """Says where a stopped run's answers are, for the retry that resumes from them."""
    if isinstance(error, PlacementStopped):  # being killed: no time for a Spark job to count
        log.error("llmq stopped (%s); a retry of this task resumes from %s", error, checkpoint.uri)
        return
    done = checkpoint.read_results(spark).count()
    log.error(
        "llmq stopped: %d/%d requests are checkpointed in %s; a retry of this task resumes from there",
        done,
        total,
        checkpoint.uri,
    )
