"""The join and the sink: every row once, with its own result, written where the user asked."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from airflow_provider_llmq.core.accounting.result import STATUS_ERROR
from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.spark.checkpoint import OUTPUT_RECORD, WRITTEN_COL, Checkpoint, to_uri
from airflow_provider_llmq.spark.schema import (
    ERROR_CODE_COL,
    ERROR_COL,
    KEY_COL,
    MISSING_RESULT,
    PROMPT_COL,
    RESPONSE_COL,
    RESULT_COLUMNS,
    RESULT_SQL_TYPES,
    STATUS_COL,
    output_columns,
)
from airflow_provider_llmq.spark.structured import raw_col, typed_columns

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType


def attach_results(
    materialized: DataFrame,
    results: DataFrame,
    *,
    id_col: str,
    response_col: str,
    include_source_columns: bool,
    output_type: StructType | None = None,
    flatten_output: bool | str = False,
) -> DataFrame:
    """Every materialized row once, with the result of its request key (left join).

    :param output_type: the structured output's struct: the raw answers (kept as text in the
        checkpoint) are parsed into it here, so a change of parsing never asks again.
    :param flatten_output: with ``output_type``, its fields as top-level columns (see
        :func:`~airflow_provider_llmq.spark.structured.typed_columns`).
    """
    joined = materialized.join(results.drop(WRITTEN_COL), on=KEY_COL, how="left")
    joined = _mark_missing(joined)
    if response_col != RESPONSE_COL:
        joined = joined.withColumnRenamed(RESPONSE_COL, response_col)
    result_cols = output_columns(response_col)
    if include_source_columns:
        keep = [c for c in materialized.columns if c not in (PROMPT_COL, KEY_COL)]
    else:
        keep = [id_col]
    if output_type is not None:
        others = keep + [c for c in result_cols if c != response_col]
        joined, typed = typed_columns(joined, response_col, output_type, flatten_output, others)
        at = result_cols.index(response_col)
        result_cols = result_cols[:at] + typed + result_cols[at + 1 :]
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
    ``llmq_status="error"``, ``llmq_error_code="missing_result"``, never dropped. The typed columns
    of a structured output (``<response_col>_raw``, flattened fields) come along: every results
    column the source does not have."""
    for name, frame in (("source", source_df), ("results", results_df)):
        if id_col not in frame.columns:
            raise LLMQueryConfigError(f"id_col {id_col!r} is not a column of the {name}: {frame.columns}")
    result_cols = output_columns(response_col)
    flattened = response_col not in results_df.columns and raw_col(response_col) in results_df.columns
    needed = [c for c in (response_col, STATUS_COL, ERROR_CODE_COL) if not (flattened and c == response_col)]
    missing = [c for c in needed if c not in results_df.columns]
    if missing:
        raise LLMQueryConfigError(f"the results lack column(s) {missing}: are they an llmq output?")
    from pyspark.sql import functions as F

    # results written by an earlier llmq lack the newer columns: they come out null, not refused
    older = {c: F.lit(None).cast(RESULT_SQL_TYPES[c]) for c in RESULT_COLUMNS if c not in results_df.columns}
    older.pop(RESPONSE_COL, None)
    results_df = results_df.withColumns(older)
    clash = [c for c in result_cols if c in source_df.columns]
    if clash:
        raise LLMQueryConfigError(f"the source already has result column(s) {clash}")
    carried = [c for c in results_df.columns if c != id_col and c not in source_df.columns]
    results = results_df.select(f"`{id_col}`", *[f"`{c}`" for c in carried]).dropDuplicates([id_col])
    joined = source_df.join(results, on=id_col, how="left")
    return _mark_missing(joined).select(*[f"`{c}`" for c in source_df.columns], *[f"`{c}`" for c in carried])


def write_output(
    frame: DataFrame,
    *,
    output_table: str | None,
    output_path: str | None,
    output_format: str = "parquet",
    mode: str = "overwrite",
    checkpoint: Checkpoint | None = None,
) -> bool:
    """Writes the sink: a table, or a path in ``output_format``; False when ``mode="ignore"`` left
    a sink that was there untouched (nothing was written).

    With a ``checkpoint``, the write is safe when the task is retried: what an earlier try of the
    run wrote is replaced, never added to. In append mode the files that try appended are removed
    first, and rows the sink held before the run are untouched; in the other modes a sink the
    earlier try created is overwritten, so a retry neither fails on nor ignores its own output.
    """
    spark = frame.sparkSession
    previous = checkpoint.read_json(OUTPUT_RECORD) if checkpoint is not None else None
    folder = _sink_folder(spark, output_table, output_path)
    existed = _sink_exists(spark, output_table, folder)
    effective = mode
    if previous and mode == "append":
        _delete_files(previous.get("files", []))
        if output_table:
            spark.catalog.refreshTable(output_table)
    elif previous and previous.get("created"):
        effective = "overwrite"
    before = set(_data_files(folder)) if mode == "append" else set()
    writer = frame.write.mode(effective).format(output_format)
    if output_table:
        writer.saveAsTable(output_table)
    else:
        assert output_path is not None
        writer.save(output_path)
    if checkpoint is not None:
        if mode == "append" and folder is None:
            folder = _sink_folder(spark, output_table, output_path)  # a table created just now
        checkpoint.write_json(
            OUTPUT_RECORD,
            {
                "sink": output_table or output_path,
                "mode": mode,
                "created": bool(previous["created"]) if previous else not existed,
                "files": sorted(set(_data_files(folder)) - before) if mode == "append" else [],
            },
        )
    return not (effective == "ignore" and existed)


def refuse_existing_output(
    spark: SparkSession,
    *,
    output_table: str | None,
    output_path: str | None,
    mode: str,
    checkpoint: Checkpoint,
) -> None:
    """With ``mode="error"``, a sink that is already there fails the write: say so before anything
    is asked and paid for, not after. A sink an earlier try of this run created is its own output
    (``write_output`` overwrites it), not a reason to fail.

    :raises LLMQueryConfigError: the sink exists and the mode refuses to write over it.
    """
    if mode not in ("error", "errorifexists"):
        return
    previous = checkpoint.read_json(OUTPUT_RECORD)
    if previous and previous.get("created"):
        return
    folder = None if output_table else _sink_folder(spark, None, output_path)
    if _sink_exists(spark, output_table, folder):
        raise LLMQueryConfigError(
            f"the output {output_table or output_path} already exists and mode={mode!r} refuses to "
            "write over it: nothing was asked. Pick another output, or mode='overwrite' or 'append'"
        )


def _sink_exists(spark: SparkSession, output_table: str | None, folder: str | None) -> bool:
    """Whether the sink is there: the table, or the path's folder."""
    return spark.catalog.tableExists(output_table) if output_table else _exists(folder)


def _sink_folder(spark: SparkSession, output_table: str | None, output_path: str | None) -> str | None:
    """The sink's folder as a URI; None for a table whose location Spark does not report."""
    if output_path:
        return to_uri(output_path)
    assert output_table is not None
    if not spark.catalog.tableExists(output_table):
        return None
    for row in spark.sql(f"DESCRIBE TABLE EXTENDED {output_table}").collect():
        if row[0] == "Location" and row[1]:
            return to_uri(str(row[1]))
    return None


def _exists(uri: str | None) -> bool:
    if uri is None:
        return False
    fs, path = pafs.FileSystem.from_uri(uri)
    return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)


def _data_files(uri: str | None) -> list[str]:
    """Every data file under the sink (Spark's ``_SUCCESS`` and hidden files aside), as URIs."""
    if not _exists(uri):
        return []
    assert uri is not None
    fs, root = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return [
        uri + info.path[len(root) :]
        for info in infos
        if info.type == pafs.FileType.File and not info.base_name.startswith(("_", "."))
    ]


def _delete_files(uris: list[str]) -> None:
    for uri in uris:
        fs, path = pafs.FileSystem.from_uri(uri)
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
