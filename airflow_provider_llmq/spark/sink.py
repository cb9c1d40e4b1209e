"""The join and the sink: every row once, with its own result, written where the user asked."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.result import STATUS_ERROR
from airflow_provider_llmq.spark.checkpoint import WRITTEN_COL
from airflow_provider_llmq.spark.schema import (
    ERROR_CODE_COL,
    ERROR_COL,
    KEY_COL,
    MISSING_RESULT,
    PROMPT_COL,
    RESPONSE_COL,
    STATUS_COL,
    output_columns,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame


def attach_results(
    materialized: DataFrame,
    results: DataFrame,
    *,
    id_col: str,
    response_col: str,
    include_source_columns: bool,
) -> DataFrame:
    """Every materialized row once, with the result of its request key (left join)."""
    joined = materialized.join(results.drop(WRITTEN_COL), on=KEY_COL, how="left")
    joined = _mark_missing(joined)
    if response_col != RESPONSE_COL:
        joined = joined.withColumnRenamed(RESPONSE_COL, response_col)
    result_cols = output_columns(response_col)
    if include_source_columns:
        keep = [c for c in materialized.columns if c not in (PROMPT_COL, KEY_COL)]
    else:
        keep = [id_col]
    return joined.select(*[f"`{c}`" for c in keep], *[f"`{c}`" for c in result_cols])


def _mark_missing(joined: DataFrame) -> DataFrame:
    from pyspark.sql import functions as F

    missing = F.col(STATUS_COL).isNull()
    return joined.withColumns(
        {
            ERROR_CODE_COL: F.when(missing, F.lit(MISSING_RESULT)).otherwise(F.col(ERROR_CODE_COL)),
            ERROR_COL: F.when(missing, F.lit("no result was recorded for this row")).otherwise(
                F.col(ERROR_COL)
            ),
            STATUS_COL: F.when(missing, F.lit(STATUS_ERROR)).otherwise(F.col(STATUS_COL)),
        }
    )


def join_results(
    source_df: DataFrame, results_df: DataFrame, id_col: str, response_col: str = "response"
) -> DataFrame:
    """Left-joins results (``include_source_columns=False`` output: id + result columns) onto the
    source by ``id_col``. Every source row comes out once; one with no result gets
    ``llmq_status="error"``, ``llmq_error_code="missing_result"``, never dropped."""
    for name, frame in (("source", source_df), ("results", results_df)):
        if id_col not in frame.columns:
            raise LLMQueryConfigError(f"id_col {id_col!r} is not a column of the {name}: {frame.columns}")
    result_cols = output_columns(response_col)
    missing = [c for c in result_cols if c not in results_df.columns]
    if missing:
        raise LLMQueryConfigError(f"the results lack column(s) {missing}: are they an llmq output?")
    clash = [c for c in result_cols if c in source_df.columns]
    if clash:
        raise LLMQueryConfigError(f"the source already has result column(s) {clash}")
    results = results_df.select(f"`{id_col}`", *[f"`{c}`" for c in result_cols]).dropDuplicates([id_col])
    joined = source_df.join(results, on=id_col, how="left")
    return _mark_missing(joined).select(
        *[f"`{c}`" for c in source_df.columns], *[f"`{c}`" for c in result_cols]
    )


def write_output(
    frame: DataFrame,
    *,
    output_table: str | None,
    output_path: str | None,
    output_format: str = "parquet",
    mode: str = "overwrite",
) -> None:
    """Writes the sink: a table, or a path in ``output_format``."""
    writer = frame.write.mode(mode).format(output_format)
    if output_table:
        writer.saveAsTable(output_table)
    else:
        assert output_path is not None
        writer.save(output_path)
