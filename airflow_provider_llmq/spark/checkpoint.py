"""One run's checkpoint: its materialized input, its manifest and every result it settled.

Layout under the checkpoint folder::

    manifest.json            what the results answer; written after input/ is whole, so it commits it
    input/                   the prompts with stable ids and request keys (parquet, written by Spark)
    results/flush-*.parquet  results flushed from the driver: written under a temp name, then the
                             file is moved into place
    results/spark-*/         results written by a Spark job (UDF, executors), counted only once
    results/spark-*.done     its commit marker exists

No directory is ever renamed, so the same code works on object stores (S3, flat-namespace ABFS)
that cannot move one. A killed try leaves at most temp files and uncommitted folders, which are
never read and are removed before a resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from airflow_provider_llmq.core.accounting.progress import Tally
from airflow_provider_llmq.core.accounting.result import STATUS_OK, QueryResult
from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.request.error_codes import TRANSIENT_ERROR_CODES
from airflow_provider_llmq.spark.schema import (
    ATTEMPTS_COL,
    CACHED_COL,
    COMPLETION_TOKENS_COL,
    COST_COL,
    ERROR_CODE_COL,
    KEY_COL,
    PROMPT_TOKENS_COL,
    RESULT_ARROW_FIELDS,
    RESULT_DDL,
    STATUS_COL,
    THROTTLED_COL,
    result_columns,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

WRITTEN_COL = "__llmq_written_ns"  # when a result was checkpointed: the newest result of a key wins
CHECKPOINT_DDL = f"`{KEY_COL}` string, {RESULT_DDL}, `{WRITTEN_COL}` bigint"
_ARROW_SCHEMA = pa.schema([(KEY_COL, pa.string()), *RESULT_ARROW_FIELDS, (WRITTEN_COL, pa.int64())])
_TMP = "_tmp-"
MANIFEST = "manifest.json"
OUTPUT_RECORD = "output.json"  # what this run wrote to the sink, so that a retry can replace it
_DONE = ".done"


def sanitize_key(key: str) -> str:
    """A checkpoint key safe in every Hadoop path (``:`` and ``+`` in run ids break them)."""
    parts = [re.sub(r"[^A-Za-z0-9._=-]+", "_", part).strip(".") for part in key.split("/")]
    cleaned = "/".join(part for part in parts if part)
    if not cleaned:
        raise LLMQueryConfigError(f"checkpoint_key {key!r} has no usable characters")
    return cleaned


def to_uri(path: str) -> str:
    """An explicit URI as given; a bare path as an absolute ``file://`` URI."""
    if "://" in path:
        return path.rstrip("/")
    return "file://" + os.path.abspath(path)


def checkpoint_location(
    spark: SparkSession, checkpoint_dir: str | None, output_path: str | None, checkpoint_key: str
) -> str:
    """``checkpoint_dir/checkpoint_key``; without a ``checkpoint_dir``, ``.llmq_checkpoints`` beside the
    output path, or under the warehouse for a table."""
    base = checkpoint_dir
    if not base:
        if output_path:
            base = os.path.join(os.path.dirname(output_path.rstrip("/")) or ".", ".llmq_checkpoints")
        else:
            warehouse = spark.conf.get("spark.sql.warehouse.dir", "spark-warehouse") or "spark-warehouse"
            base = f"{warehouse.rstrip('/')}/.llmq_checkpoints"
    return f"{base.rstrip('/')}/{sanitize_key(checkpoint_key)}"


@dataclass(frozen=True)
class Manifest:
    """What a checkpoint's results answer: a resume must ask the same thing of the same input."""

    fingerprint: dict[str, Any]
    n_buckets: int
    total_rows: int
    total_requests: int

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True, default=str).encode()).hexdigest()


# a record rewritten while it is read tears for one read at most, unless rewritten faster than it is read
_TORN_READ_TRIES = 8


def _unique_name(kind: str) -> str:
    # time first, so a listing is in write order; the uuid keeps concurrent writers apart
    return f"{kind}-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"


class Checkpoint:
    """A folder holding one run's materialized input, its manifest and its results."""

    def __init__(self, location: str) -> None:
        self.uri = to_uri(location)
        self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        self.input_uri = f"{self.uri}/input"
        self.results_uri = f"{self.uri}/results"

    def __repr__(self) -> str:
        return f"Checkpoint({self.uri!r})"

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self._path(*parts)).type != pafs.FileType.NotFound

    def _write_file(self, parts: Sequence[str], payload: bytes) -> None:
        """A small file written whole: under a temp name, then moved (a file move, never a folder)."""
        *folder, name = parts
        self.fs.create_dir(self._path(*folder), recursive=True)
        tmp = self._path(*folder, f"{_TMP}{uuid.uuid4().hex}-{name}")
        with self.fs.open_output_stream(tmp) as stream:
            stream.write(payload)
        self.fs.move(tmp, self._path(*parts))

    def read_json(self, name: str) -> Any:
        """A small JSON record beside the results (manifest, lease, output record); None if absent.

        On S3 a read can tear: pyarrow takes the size from a HEAD and then GETs that many bytes, so
        a record replaced in between (a lease heartbeat) reads cut or padded. Such a read is re-read.
        """
        for attempt in range(_TORN_READ_TRIES):
            try:
                with self.fs.open_input_stream(self._path(name)) as stream:
                    payload = stream.read()
            except FileNotFoundError:
                return None
            try:
                return json.loads(payload)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                if attempt == _TORN_READ_TRIES - 1:
                    raise LLMQueryConfigError(
                        f"{name} in the checkpoint {self.uri} is not valid JSON after {_TORN_READ_TRIES} "
                        f"reads ({error}); remove the file if no task is running on this checkpoint"
                    ) from error
                time.sleep(0.02 * (attempt + 1))
        raise AssertionError("unreachable")

    def write_json(self, name: str, data: Any) -> None:
        self._write_file([name], json.dumps(data, indent=2, sort_keys=True, default=str).encode())

    def delete_file(self, name: str) -> None:
        if self._exists(name):
            self.fs.delete_file(self._path(name))

    # --- input and manifest ---------------------------------------------------------------

    @property
    def has_input(self) -> bool:
        """The manifest is written after the input is whole: together they are a committed input."""
        return self._exists(MANIFEST) and self._exists("input")

    def read_manifest(self) -> Manifest | None:
        data = self.read_json(MANIFEST)
        if data is None:
            return None
        n_buckets = data.get("n_buckets", data.get("n_chunks"))  # n_chunks: checkpoints of 0.1.0
        return Manifest(data["fingerprint"], n_buckets, data["total_rows"], data["total_requests"])

    def write_manifest(self, manifest: Manifest) -> None:
        data = {
            "fingerprint": manifest.fingerprint,
            "digest": manifest.digest(),
            "n_buckets": manifest.n_buckets,
            "total_rows": manifest.total_rows,
            "total_requests": manifest.total_requests,
        }
        self.write_json(MANIFEST, data)

    # --- results ---------------------------------------------------------------------------

    def result_names(self) -> list[str]:
        """Committed result files, oldest first: driver flushes, and Spark folders with a marker."""
        if not self._exists("results"):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self._path("results")))
        names = {info.base_name for info in infos}
        committed = [name for name in names if _is_committed(name, names)]
        return sorted(committed, key=lambda name: name.split("-", 1)[1])

    def flush(self, results: Sequence[QueryResult]) -> str:
        """Writes results from the driver as one parquet file, whole or not at all."""
        columns: dict[str, list[Any]] = {KEY_COL: [str(result.row_id) for result in results]}
        columns.update(result_columns(list(results)))
        columns[WRITTEN_COL] = [time.time_ns()] * len(results)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(columns, schema=_ARROW_SCHEMA), sink)
        name = _unique_name("flush") + ".parquet"
        self._write_file(["results", name], sink.getvalue().to_pybytes())
        return name

    def write_frame(self, answered: DataFrame) -> str:
        """Writes results computed by a Spark job (``KEY_COL`` + the result columns): the job
        writes a new folder, and a marker written after it succeeded commits the folder."""
        from pyspark.sql import functions as F

        name = _unique_name("spark")
        answered.withColumn(WRITTEN_COL, F.lit(time.time_ns())).write.parquet(f"{self.results_uri}/{name}")
        self._write_file(["results", name + _DONE], b"")
        return name

    def write_frame_if_any(self, frame: DataFrame) -> tuple[str, int] | None:
        """Like :meth:`write_frame`, for a frame that may be empty, evaluated once: the rows are
        counted from the written files' footers (no second Spark job), and a folder with none is
        removed instead of committed. Returns (name, rows), None when nothing was written."""
        from pyspark.sql import functions as F

        name = _unique_name("spark")
        frame.withColumn(WRITTEN_COL, F.lit(time.time_ns())).write.parquet(f"{self.results_uri}/{name}")
        path = self._path("results", name)
        files = [
            info.path
            for info in self.fs.get_file_info(pafs.FileSelector(path))
            if info.type == pafs.FileType.File and not info.base_name.startswith(("_", "."))
        ]
        rows = pads.dataset(files, format="parquet", filesystem=self.fs).count_rows() if files else 0
        if not rows:
            self.fs.delete_dir(path)
            return None
        self._write_file(["results", name + _DONE], b"")
        return name, rows

    def tally(self, name: str) -> Tally:
        """What one committed result file came to (errors by code, retries, 429s), for a progress
        line: read with pyarrow, so no Spark job."""
        columns = [STATUS_COL, ERROR_CODE_COL, ATTEMPTS_COL, THROTTLED_COL]
        table = pq.read_table(self._path("results", name), filesystem=self.fs, columns=columns)
        tally = Tally()
        for status, code, attempts, throttled in zip(*table.to_pydict().values(), strict=True):
            tally.count_row(status == STATUS_OK, code, attempts, throttled)
        return tally

    def spent(self, names: Sequence[str]) -> tuple[int, float]:
        """Tokens and cost the given result files' requests used (cache hits excluded: not sent),
        read with pyarrow: how the driver tracks a budget between Spark jobs."""
        tokens, cost = 0, 0.0
        columns = [PROMPT_TOKENS_COL, COMPLETION_TOKENS_COL, COST_COL, CACHED_COL]
        for name in names:
            path = self._path("results", name)
            table = pq.read_table(path, filesystem=self.fs, columns=columns).to_pydict()
            for prompt, completion, row_cost, cached in zip(*table.values(), strict=True):
                if not cached:
                    tokens += (prompt or 0) + (completion or 0)
                    cost += row_cost or 0.0
        return tokens, cost

    def compact(self, spark: SparkSession) -> None:
        """Rewrites the settled results as one result file, once a run is complete, so that a kept
        checkpoint is not thousands of small files. The new file is committed before the old ones go,
        and a key read twice meanwhile is still one result."""
        names = self.result_names()
        if len(names) <= 1:
            return
        name = _unique_name("spark")
        self.read_results(spark, names).coalesce(1).write.parquet(f"{self.results_uri}/{name}")
        self._write_file(["results", name + _DONE], b"")
        for old in names:
            self._delete_result(old)

    def _delete_result(self, name: str) -> None:
        path = self._path("results", name)
        if self.fs.get_file_info(path).type == pafs.FileType.Directory:
            self.delete_file(f"results/{name}{_DONE}")  # uncommit first, then remove
            self.fs.delete_dir(path)
        else:
            self.fs.delete_file(path)

    def clean_temporaries(self) -> None:
        """What a killed try left half-written: never read, removed before a resume."""
        if not self._exists("results"):
            return
        infos = self.fs.get_file_info(pafs.FileSelector(self._path("results")))
        names = {info.base_name for info in infos}
        for info in infos:
            name = info.base_name
            uncommitted_folder = (
                name.startswith("spark-") and not name.endswith(_DONE) and name + _DONE not in names
            )
            if name.startswith(_TMP) or uncommitted_folder:
                if info.type == pafs.FileType.Directory:
                    self.fs.delete_dir(info.path)
                else:
                    self.fs.delete_file(info.path)

    def delete(self) -> None:
        if self._exists():
            self.fs.delete_dir(self.root)

    def reset(self) -> None:
        """Everything a run derived from its input, before it is materialized again; the lease stays."""
        for folder in ("input", "results"):
            if self._exists(folder):
                self.fs.delete_dir(self._path(folder))
        for name in (MANIFEST, OUTPUT_RECORD):
            self.delete_file(name)

    def read_results(self, spark: SparkSession, names: Sequence[str] | None = None) -> DataFrame:
        """Every checkpointed result, one row per request key: an ``ok`` answer if the key has one,
        else its newest result (a transient error retried by a later try is superseded)."""
        from pyspark.sql import Window
        from pyspark.sql import functions as F

        names = self.result_names() if names is None else list(names)
        if not names:
            return spark.createDataFrame([], CHECKPOINT_DDL)
        frame = spark.read.schema(CHECKPOINT_DDL).parquet(*[f"{self.results_uri}/{n}" for n in names])
        best_first = Window.partitionBy(KEY_COL).orderBy(
            (F.col(STATUS_COL) == F.lit(STATUS_OK)).desc(), F.col(WRITTEN_COL).desc()
        )
        return frame.withColumn("__rank", F.row_number().over(best_first)).where("__rank = 1").drop("__rank")


def _is_spark_folder(name: str) -> bool:
    return name.startswith("spark-") and not name.endswith(_DONE)


def _is_committed(name: str, names: set[str]) -> bool:
    """A driver flush is committed once it has its name; a Spark folder once its marker exists."""
    if name.startswith("flush-"):
        return name.endswith(".parquet")
    return _is_spark_folder(name) and name + _DONE in names


def settled(results: DataFrame) -> DataFrame:
    """Results a resume keeps: answers and permanent errors; transient errors are asked again."""
    from pyspark.sql import functions as F

    transient = F.col(ERROR_CODE_COL).isin(*sorted(TRANSIENT_ERROR_CODES))
    return results.where((F.col(STATUS_COL) == F.lit(STATUS_OK)) | ~F.coalesce(transient, F.lit(False)))
