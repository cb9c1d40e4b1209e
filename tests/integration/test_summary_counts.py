"""The summary's row counts observed while the output is written are the counts a group-by over the
output gives, for every outcome; a code nobody listed, or a write that wrote nothing, falls back to
that group-by rather than to a wrong count or a wait."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmq.spark.sink import write_output
from airflow_provider_llmq.spark.summary import observe_outcomes, observed_metrics, summarize

pytestmark = pytest.mark.spark

ROWS = [
    ("ok", None, 1),
    ("ok", None, 0),  # a cache hit: answered, never sent by this run
    ("error", "content_filter", 1),
    ("error", "content_filter", 2),
    ("error", "empty_prompt", 0),
    ("error", "budget_exceeded", 0),
    ("error", "missing_result", None),
    ("error", None, 1),
]
DDL = "llmq_status string, llmq_error_code string, llmq_attempts int"


def _written(spark: Any, rows: list[tuple[Any, ...]], path: Path, mode: str = "overwrite") -> tuple[Any, Any]:
    frame, observation = observe_outcomes(spark.createDataFrame(rows, DDL))
    wrote = write_output(frame, output_table=None, output_path=str(path), mode=mode)
    return frame, observed_metrics(observation, wait=2.0) if wrote else None


def test_observed_counts_are_the_group_by_counts(spark: Any, tmp_path: Path) -> None:
    frame, observed = _written(spark, ROWS, tmp_path / "out")
    assert observed is not None
    by_observation = summarize(frame, None, observed=observed)
    assert by_observation == summarize(frame, None)
    assert {k: by_observation[k] for k in ("answered", "failed", "skipped", "not_sent")} == {
        "answered": 2,
        "failed": 3,
        "skipped": 1,
        "not_sent": 2,
    }
    assert by_observation["errors_by_code"] == {
        "None": 1,
        "budget_exceeded": 1,
        "content_filter": 2,
        "empty_prompt": 1,
        "missing_result": 1,
    }


def test_an_unlisted_code_and_an_ignored_write_are_counted_by_a_group_by(spark: Any, tmp_path: Path) -> None:
    rows = [*ROWS, ("error", "a_code_of_the_future", 1)]
    frame, observed = _written(spark, rows, tmp_path / "out")
    assert observed is not None
    summary = summarize(frame, None, observed=observed)
    assert summary["errors_by_code"]["a_code_of_the_future"] == 1 and summary["failed"] == 4
    # mode="ignore" over a sink that is there writes nothing: no observation to wait for
    frame, observed = _written(spark, ROWS, tmp_path / "out", mode="ignore")
    assert observed is None
    assert summarize(frame, None)["rows"] == len(ROWS)
