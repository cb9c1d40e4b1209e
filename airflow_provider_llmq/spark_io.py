"""Every Spark read and write of llmq, in one place.

Data flows one way: source -> prompts with stable ids, materialized once under the checkpoint ->
requests not yet answered -> result chunks, each written under a temp name and renamed when whole
-> a left join back onto the materialized input -> the sink. Because the input is read back from
its materialized files, ids never change when a plan is recomputed or a task is retried.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.payload import TRANSIENT_ERROR_CODES
from airflow_provider_llmq.core.result import STATUS_OK, QueryResult

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

LLMQ_ROW_ID = "llmq_row_id"
PROMPT_COL = "__llmq_prompt"
KEY_COL = "__llmq_key"
CHUNK_COL = "__llmq_chunk"
WRITTEN_COL = "__llmq_written_ns"  # when a result was checkpointed: the newest answer of a key wins
RESPONSE_COL = "llmq_response"  # name inside the checkpoint; renamed to response_col on output
MISSING_RESULT = "missing_result"

# (name, Spark SQL type, pyarrow type, QueryResult field)
_RESULT_FIELDS: tuple[tuple[str, str, pa.DataType, str], ...] = (
    (RESPONSE_COL, "string", pa.string(), "response"),
    ("llmq_status", "string", pa.string(), "status"),
    ("llmq_error_code", "string", pa.string(), "error_code"),
    ("llmq_error", "string", pa.string(), "error_message"),
    ("llmq_http_status", "int", pa.int32(), "http_status"),
    ("llmq_attempts", "int", pa.int32(), "attempts"),
    ("llmq_prompt_tokens", "int", pa.int32(), "prompt_tokens"),
    ("llmq_completion_tokens", "int", pa.int32(), "completion_tokens"),
    ("llmq_latency_ms", "double", pa.float64(), "latency_ms"),
    ("llmq_finish_reason", "string", pa.string(), "finish_reason"),
)
RESULT_COLUMNS: tuple[str, ...] = tuple(name for name, *_ in _RESULT_FIELDS)
RESULT_DDL = ", ".join(f"`{name}` {sql_type}" for name, sql_type, *_ in _RESULT_FIELDS)
CHECKPOINT_DDL = f"`{KEY_COL}` string, {RESULT_DDL}, `{WRITTEN_COL}` bigint"
_ARROW_SCHEMA = pa.schema(
    [(KEY_COL, pa.string())]
    + [(name, arrow) for name, _, arrow, _ in _RESULT_FIELDS]
    + [(WRITTEN_COL, pa.int64())]
)


def result_values(result: QueryResult) -> tuple[Any, ...]:
    """A result's values in the order of ``RESULT_COLUMNS`` / ``RESULT_DDL``."""
    return tuple(getattr(result, attribute) for *_, attribute in _RESULT_FIELDS)


def output_columns(response_col: str) -> list[str]:
    """The result columns as they appear on output rows."""
    return [response_col if name == RESPONSE_COL else name for name in RESULT_COLUMNS]


# ---------------------------------------------------------------------------------------------
# session and source


def get_spark_session(
    spark_conn_id: str | None = None, spark_conf: dict[str, Any] | None = None, app_name: str = "llmq"
) -> SparkSession:
    """A session from an apache-spark provider connection (``spark`` or ``spark_connect``), or
    ``local[*]`` when ``spark_conn_id`` is None. Only ``spark_conf`` reaches the Spark conf: an LLM
    key or CA never does."""
    # Spark's Python workers otherwise run `python3` from PATH, which lacks this venv's packages
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    if spark_conn_id is None:
        builder = builder.master("local[*]")
    else:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(spark_conn_id)
        if conn.conn_type == "spark_connect":
            from airflow.providers.apache.spark.hooks.spark_connect import SparkConnectHook

            builder = builder.remote(SparkConnectHook(conn_id=spark_conn_id).get_connection_url())
        elif conn.conn_type == "spark":
            master = conn.host or "local[*]"
            if conn.port and "://" in master:
                master = f"{master}:{conn.port}"
            builder = builder.master(master)
        else:
            raise LLMQueryConfigError(
                f"connection {spark_conn_id!r} has type {conn.conn_type!r}: use a 'spark' or "
                "'spark_connect' connection"
            )
    for key, value in (spark_conf or {}).items():
        builder = builder.config(key, str(value))
    return builder.getOrCreate()


def check_one_source(**sources: str | None) -> None:
    """Exactly one of the given sources (``sql``, ``source_table``, ``source_path``) is set."""
    given = [name for name, value in sources.items() if value]
    if len(given) != 1:
        raise LLMQueryConfigError(f"give exactly one source of {', '.join(sources)} (got {given or 'none'})")


def read_source(
    spark: SparkSession,
    *,
    sql: str | None = None,
    source_table: str | None = None,
    source_path: str | None = None,
    source_format: str = "parquet",
) -> DataFrame:
    """The prompts' source: exactly one of a query, a table or a path."""
    check_one_source(sql=sql, source_table=source_table, source_path=source_path)
    if sql:
        return spark.sql(sql)
    if source_table:
        return spark.table(source_table)
    assert source_path is not None
    return spark.read.format(source_format).load(source_path)


def template_fields_of(prompt_template: str) -> list[str]:
    """The ``{column}`` names a prompt template refers to."""
    names = []
    for _, field, spec, conversion in string.Formatter().parse(prompt_template):
        if field is None:
            continue
        if not field or spec or conversion or not re.fullmatch(r"[^\[\].!:]+", field):
            raise LLMQueryConfigError(
                f"prompt_template field {{{field}}} is not a plain column name: use {{column}} only "
                "(double braces {{ }} for a literal brace)"
            )
        names.append(field)
    return names


def _render_prompt(df: DataFrame, prompt_col: str, prompt_template: str | None) -> Any:
    from pyspark.sql import functions as F

    if prompt_template is None:
        return F.col(f"`{prompt_col}`").cast("string")
    parts = []
    for literal, field, _, _ in string.Formatter().parse(prompt_template):
        if literal:
            parts.append(F.lit(literal))
        if field is not None:
            parts.append(F.coalesce(F.col(f"`{field}`").cast("string"), F.lit("")))
    return F.concat(*parts) if parts else F.lit("")


def validate_source(
    df: DataFrame, *, prompt_col: str, id_col: str | None, prompt_template: str | None, response_col: str
) -> None:
    """Errors a user can fix, raised before any request is sent."""
    columns = df.columns
    needed = template_fields_of(prompt_template) if prompt_template is not None else [prompt_col]
    missing = [name for name in needed if name not in columns]
    if missing:
        what = "prompt_template refers to" if prompt_template is not None else "prompt_col is"
        raise LLMQueryConfigError(f"{what} missing column(s) {missing}; the source has {columns}")
    if id_col is not None and id_col not in columns:
        raise LLMQueryConfigError(f"id_col {id_col!r} is not a column of the source; it has {columns}")
    if id_col is None and LLMQ_ROW_ID in columns:
        raise LLMQueryConfigError(
            f"the source already has a column {LLMQ_ROW_ID!r}: pass id_col={LLMQ_ROW_ID!r} to use it"
        )
    taken = set(output_columns(response_col)).intersection(columns)
    if taken:
        raise LLMQueryConfigError(
            f"the source already has result column(s) {sorted(taken)}: rename them or set response_col"
        )
    internal = [name for name in columns if name.startswith("__llmq_")]
    if internal:
        raise LLMQueryConfigError(f"column names starting with __llmq_ are reserved: {internal}")


# ---------------------------------------------------------------------------------------------
# checkpoint: materialized input, manifest, result chunks


def sanitize_key(key: str) -> str:
    """A checkpoint key safe in every Hadoop path (``:`` and ``+`` in run ids break them)."""
    parts = [re.sub(r"[^A-Za-z0-9._=-]+", "_", part).strip(".") for part in key.split("/")]
    cleaned = "/".join(part for part in parts if part)
    if not cleaned:
        raise LLMQueryConfigError(f"checkpoint_key {key!r} has no usable characters")
    return cleaned


def _to_uri(path: str) -> str:
    if "://" in path:
        return path.rstrip("/")
    return "file://" + os.path.abspath(path)


@dataclass(frozen=True)
class Manifest:
    """What a checkpoint's results answer: a resume must ask the same thing of the same input."""

    fingerprint: dict[str, Any]
    n_chunks: int
    total_rows: int
    total_requests: int

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True, default=str).encode()).hexdigest()


class Checkpoint:
    """A folder holding one run's materialized input, its manifest and its result chunks.

    Layout: ``input/`` (parquet, prompts with ids), ``manifest.json``, ``results/chunk-*/`` (one
    folder per chunk; written as ``results/_tmp-*`` and renamed when complete, so a half-written
    chunk never counts).
    """

    def __init__(self, location: str) -> None:
        self.uri = _to_uri(location)
        self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        self.input_uri = f"{self.uri}/input"
        self.results_uri = f"{self.uri}/results"

    def __repr__(self) -> str:
        return f"Checkpoint({self.uri!r})"

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self._path(*parts)).type != pafs.FileType.NotFound

    @property
    def has_input(self) -> bool:
        return self._exists("manifest.json") and self._exists("input", "_SUCCESS")

    def read_manifest(self) -> Manifest | None:
        if not self._exists("manifest.json"):
            return None
        with self.fs.open_input_stream(self._path("manifest.json")) as stream:
            data = json.loads(stream.read())
        return Manifest(data["fingerprint"], data["n_chunks"], data["total_rows"], data["total_requests"])

    def write_manifest(self, manifest: Manifest) -> None:
        data = {
            "fingerprint": manifest.fingerprint,
            "digest": manifest.digest(),
            "n_chunks": manifest.n_chunks,
            "total_rows": manifest.total_rows,
            "total_requests": manifest.total_requests,
        }
        self._write_atomically(
            "manifest.json", json.dumps(data, indent=2, sort_keys=True, default=str).encode()
        )

    def _write_atomically(self, name: str, payload: bytes) -> None:
        tmp = self._path(f"_tmp-{uuid.uuid4().hex}-{name}")
        self.fs.create_dir(self.root, recursive=True)
        with self.fs.open_output_stream(tmp) as stream:
            stream.write(payload)
        self.fs.move(tmp, self._path(name))

    def chunk_names(self) -> list[str]:
        if not self._exists("results"):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self._path("results")))
        return sorted(info.base_name for info in infos if info.base_name.startswith("chunk-"))

    def write_results(self, results: Sequence[QueryResult], name: str | None = None) -> str:
        """Writes a chunk of results from the driver (methods 2-4) as one parquet file, atomically."""
        name = name or f"chunk-d{uuid.uuid4().hex}"
        columns: dict[str, list[Any]] = {KEY_COL: [str(result.row_id) for result in results]}
        for index, (column, *_) in enumerate(_RESULT_FIELDS):
            columns[column] = [values[index] for values in map(result_values, results)]
        columns[WRITTEN_COL] = [time.time_ns()] * len(results)
        table = pa.table(columns, schema=_ARROW_SCHEMA)
        tmp_dir = self._path("results", f"_tmp-{name}")
        self.fs.create_dir(tmp_dir, recursive=True)
        pq.write_table(table, f"{tmp_dir}/part-00000.parquet", filesystem=self.fs)
        self.fs.move(tmp_dir, self._path("results", name))
        return name

    def spark_chunk_tmp_uri(self, name: str) -> str:
        return f"{self.results_uri}/_tmp-{name}-{uuid.uuid4().hex[:8]}"

    def commit_spark_chunk(self, tmp_uri: str, name: str) -> None:
        """Renames a chunk Spark has finished writing into place."""
        tmp_path = self._path("results", tmp_uri.rsplit("/", 1)[1])
        self.fs.move(tmp_path, self._path("results", name))

    def clean_temporaries(self) -> None:
        """Half-written chunks of a killed try: never read, removed before a resume."""
        if not self._exists("results"):
            return
        for info in self.fs.get_file_info(pafs.FileSelector(self._path("results"))):
            if info.base_name.startswith("_tmp-"):
                self.fs.delete_dir(
                    info.path
                ) if info.type == pafs.FileType.Directory else self.fs.delete_file(info.path)

    def delete(self) -> None:
        if self._exists():
            self.fs.delete_dir(self.root)

    def read_results(self, spark: SparkSession, names: Sequence[str] | None = None) -> DataFrame:
        """Every checkpointed result, one row per request key: an ``ok`` answer if the key has one,
        else its newest result (a transient error retried by a later try is superseded)."""
        from pyspark.sql import Window
        from pyspark.sql import functions as F

        names = self.chunk_names() if names is None else list(names)
        if not names:
            return spark.createDataFrame([], CHECKPOINT_DDL)
        frame = spark.read.schema(CHECKPOINT_DDL).parquet(*[f"{self.results_uri}/{n}" for n in names])
        best_first = Window.partitionBy(KEY_COL).orderBy(
            (F.col("llmq_status") == F.lit(STATUS_OK)).desc(), F.col(WRITTEN_COL).desc()
        )
        return frame.withColumn("__rank", F.row_number().over(best_first)).where("__rank = 1").drop("__rank")


def settled(results: DataFrame) -> DataFrame:
    """Results a resume keeps: answers and permanent errors; transient errors are asked again."""
    from pyspark.sql import functions as F

    transient = F.col("llmq_error_code").isin(*sorted(TRANSIENT_ERROR_CODES))
    return results.where((F.col("llmq_status") == F.lit(STATUS_OK)) | ~F.coalesce(transient, F.lit(False)))


def materialize_input(
    spark: SparkSession,
    source: DataFrame,
    checkpoint: Checkpoint,
    *,
    prompt_col: str,
    id_col: str | None,
    prompt_template: str | None,
    dedupe: bool,
    chunk_size: int,
    fingerprint: dict[str, Any],
) -> tuple[DataFrame, Manifest, bool]:
    """The input with stable ids, prompts and request keys, written once under the checkpoint.

    Returns (input read back from its files, manifest, resumed). A checkpoint written for another
    source, template, system prompt, model or params is refused rather than mixed.
    """
    from pyspark.sql import functions as F

    existing = checkpoint.read_manifest()
    if existing is not None and checkpoint.has_input:
        if existing.fingerprint != fingerprint:
            changed = sorted(
                key
                for key in set(existing.fingerprint) | set(fingerprint)
                if existing.fingerprint.get(key) != fingerprint.get(key)
            )
            raise LLMQueryConfigError(
                f"the checkpoint at {checkpoint.uri} was made with a different {', '.join(changed)}: "
                "refusing to mix its results. Use another checkpoint_key, or delete that folder"
            )
        return spark.read.parquet(checkpoint.input_uri), existing, True

    id_name = id_col or LLMQ_ROW_ID
    frame = source
    if id_col is None:
        # evaluated once, in the job that writes the files below; read back from them afterwards
        frame = frame.withColumn(LLMQ_ROW_ID, F.monotonically_increasing_id())
    frame = frame.withColumn(PROMPT_COL, _render_prompt(frame, prompt_col, prompt_template))
    prompt = F.col(PROMPT_COL)
    if dedupe:
        key = F.when(prompt.isNull(), F.lit("null")).otherwise(F.sha2(prompt, 256))
    else:
        key = F.col(f"`{id_name}`").cast("string")
    frame = frame.withColumn(KEY_COL, key)
    checkpoint.delete()
    frame.write.mode("overwrite").parquet(checkpoint.input_uri)
    materialized = spark.read.parquet(checkpoint.input_uri)

    counts = materialized.agg(
        F.count(F.lit(1)).alias("rows"),
        F.countDistinct(F.col(f"`{id_name}`")).alias("ids"),
        F.count(F.col(f"`{id_name}`")).alias("non_null_ids"),
        F.countDistinct(F.col(KEY_COL)).alias("keys"),
    ).first()
    assert counts is not None
    if id_col is not None and (counts["ids"] != counts["rows"] or counts["non_null_ids"] != counts["rows"]):
        checkpoint.delete()
        raise LLMQueryConfigError(
            f"id_col {id_col!r} must be unique and non-null: {counts['rows']} rows have "
            f"{counts['ids']} distinct non-null ids"
        )
    n_chunks = max(1, -(-int(counts["keys"]) // max(1, chunk_size)))
    manifest = Manifest(fingerprint, n_chunks, int(counts["rows"]), int(counts["keys"]))
    checkpoint.write_manifest(manifest)
    return materialized, manifest, False


def requests_frame(materialized: DataFrame, n_chunks: int) -> DataFrame:
    """One row per request key (a deduped prompt asked once), with the chunk it belongs to."""
    from pyspark.sql import functions as F

    return (
        materialized.select(KEY_COL, PROMPT_COL)
        .dropDuplicates([KEY_COL])
        .withColumn(CHUNK_COL, F.pmod(F.xxhash64(F.col(KEY_COL)), F.lit(n_chunks)).cast("int"))
    )


def pending_requests(requests: DataFrame, results: DataFrame) -> DataFrame:
    """Requests with no settled result yet: what this try must ask."""
    return requests.join(settled(results).select(KEY_COL), on=KEY_COL, how="left_anti")


def stream_requests(pending: DataFrame, n_chunks: int) -> Iterator[tuple[str, str | None]]:
    """(key, prompt) pairs pulled to the driver one small partition at a time, never the table."""
    from pyspark.sql import functions as F

    frame = pending.repartition(max(1, n_chunks), F.col(CHUNK_COL)).select(KEY_COL, PROMPT_COL)
    for row in frame.toLocalIterator(prefetchPartitions=False):
        yield row[0], row[1]


# ---------------------------------------------------------------------------------------------
# join and sink


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

    missing = F.col("llmq_status").isNull()
    return joined.withColumn(
        "llmq_error_code", F.when(missing, F.lit(MISSING_RESULT)).otherwise(F.col("llmq_error_code"))
    ).withColumns(
        {
            "llmq_error": F.when(missing, F.lit("no result was recorded for this row")).otherwise(
                F.col("llmq_error")
            ),
            "llmq_status": F.when(missing, F.lit("error")).otherwise(F.col("llmq_status")),
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
