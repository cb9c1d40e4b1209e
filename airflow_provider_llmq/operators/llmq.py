"""The four operators: read prompts with Spark, query every row, write every row back once.

They share one base class that does the Spark read, the checkpointed run and the write; each
operator differs only in how it asks (``_query_stream``), and the UDF operator in where.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, BaseOperator

from airflow_provider_llmq.core.endpoint import EndpointConfig
from airflow_provider_llmq.core.errors import LLMQueryConfigError, LLMQueryError
from airflow_provider_llmq.core.methods import (
    query_async_batches,
    query_async_limited,
    query_thread_pool,
    sync_client_for,
)
from airflow_provider_llmq.core.payload import DEFAULT_SYSTEM_PROMPT
from airflow_provider_llmq.core.result import STATUS_OK, QueryResult
from airflow_provider_llmq.hooks.llmq import LLMQueryHook
from airflow_provider_llmq.spark_io import (
    CHUNK_COL,
    KEY_COL,
    LLMQ_ROW_ID,
    PROMPT_COL,
    RESULT_DDL,
    WRITTEN_COL,
    Checkpoint,
    attach_results,
    check_one_source,
    get_spark_session,
    materialize_input,
    pending_requests,
    read_source,
    requests_frame,
    result_values,
    sanitize_key,
    stream_requests,
    validate_source,
    write_output,
)

if TYPE_CHECKING:
    from airflow.sdk import Context
    from pyspark.sql import DataFrame, SparkSession

WRITE_MODES = ("overwrite", "append", "ignore", "error", "errorifexists")
ON_ERROR = ("record", "fail")
DEFAULT_CHECKPOINT_KEY = "{{ dag.dag_id }}/{{ task.task_id }}/{{ run_id }}"
MAX_CHUNK_SECONDS = 60.0


class LLMQueryFailedRowsError(LLMQueryError):
    """Raised after the output is written when ``on_error="fail"`` or ``max_error_ratio`` is exceeded."""


class _Progress:
    """Logs done/total, rate and ETA at a steady interval, not once per row."""

    def __init__(self, log: Any, total: int, interval: float) -> None:
        self.log, self.total, self.interval = log, total, interval
        self.done = 0
        self.started = self.last = time.monotonic()

    def add(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            elapsed = max(now - self.started, 1e-9)
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate else float("inf")
            self.log.info(
                "llmq progress: %d/%d requests (%.0f%%), %.1f rows/s, ETA %.0f s",
                self.done,
                self.total,
                100.0 * self.done / max(self.total, 1),
                rate,
                eta,
            )


class LLMQueryBaseOperator(BaseOperator):
    """Reads prompts with Spark, asks the LLM for each row, writes every row back exactly once.

    :param llm_conn_id: the ``llmq`` connection (API base, key, api type, deployment, CA).
    :param spark_conn_id: a ``spark`` or ``spark_connect`` connection; None runs ``local[*]``.
    :param spark_conf: extra Spark settings for the session.
    :param sql: source query (templated); exactly one of ``sql``, ``source_table``, ``source_path``.
    :param source_table: source table (templated).
    :param source_path: source path (templated), read with ``source_format``.
    :param source_format: format of ``source_path`` (parquet, json, csv, ...).
    :param prompt_col: column holding the prompt (unused with ``prompt_template``).
    :param id_col: unique id column; None assigns ``llmq_row_id`` once, when the input is materialized.
    :param prompt_template: builds the prompt from ``{column}`` names of the row.
    :param system_prompt: system message for every request; None sends none.
    :param model: overrides the connection's deployment (Azure) / model (OpenAI).
    :param request_params: body fields: temperature, max_tokens, response_format, ...
    :param output_table: sink table (templated); one of ``output_table``, ``output_path``.
    :param output_path: sink path (templated), written with ``output_format``.
    :param output_format: format of ``output_path``.
    :param mode: Spark save mode: overwrite, append, ignore, error.
    :param response_col: name of the answer column.
    :param include_source_columns: True: every source column plus results; False: id plus results.
    :param max_retries: retries per request after the first attempt.
    :param request_timeout: per-request timeout in seconds (overrides the connection's).
    :param max_retry_wait: cap in seconds on one server-requested wait (Retry-After).
    :param retry_backoff: first computed backoff in seconds (doubles per retry).
    :param on_error: "record" keeps going and records errors on rows; "fail" fails the task
        after the output is written when any row ended in error.
    :param max_error_ratio: fail the task (after writing) when more than this fraction of rows failed.
    :param dedupe: send identical prompts once and fan the answer out to every row asking it.
    :param chunk_size: requests per checkpointed chunk.
    :param checkpoint_dir: where checkpoints live; default: ``.llmq_checkpoints`` beside the output.
    :param checkpoint_key: sub-folder of one run's checkpoint (templated); a run given the same
        key resumes instead of asking again.
    :param keep_checkpoint: keep the checkpoint after a successful write.
    :param progress_interval: seconds between progress lines in the log.
    """

    template_fields: Sequence[str] = (
        "sql",
        "source_table",
        "source_path",
        "output_table",
        "output_path",
        "checkpoint_dir",
        "checkpoint_key",
    )  # not prompt_template: Jinja would eat its {{ }} literal braces
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers = {"sql": "sql"}
    ui_color = "#e8f4fd"

    def __init__(
        self,
        *,
        llm_conn_id: str = LLMQueryHook.default_conn_name,
        spark_conn_id: str | None = None,
        spark_conf: dict[str, Any] | None = None,
        sql: str | None = None,
        source_table: str | None = None,
        source_path: str | None = None,
        source_format: str = "parquet",
        prompt_col: str = "prompt",
        id_col: str | None = None,
        prompt_template: str | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        model: str | None = None,
        request_params: dict[str, Any] | None = None,
        output_table: str | None = None,
        output_path: str | None = None,
        output_format: str = "parquet",
        mode: str = "overwrite",
        response_col: str = "response",
        include_source_columns: bool = True,
        max_retries: int = 6,
        request_timeout: float = 60,
        max_retry_wait: float = 60,
        retry_backoff: float = 0.5,
        on_error: str = "record",
        max_error_ratio: float | None = None,
        dedupe: bool = True,
        chunk_size: int = 1000,
        checkpoint_dir: str | None = None,
        checkpoint_key: str = DEFAULT_CHECKPOINT_KEY,
        keep_checkpoint: bool = False,
        progress_interval: float = 30.0,
        **kwargs: Any,
    ) -> None:
        if not kwargs.get("outlets"):
            static_output = _static_asset(output_table, output_path)
            if static_output is not None:
                kwargs["outlets"] = [static_output]
        super().__init__(**kwargs)
        self.llm_conn_id = llm_conn_id
        self.spark_conn_id = spark_conn_id
        self.spark_conf = spark_conf
        self.sql = sql
        self.source_table = source_table
        self.source_path = source_path
        self.source_format = source_format
        self.prompt_col = prompt_col
        self.id_col = id_col
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.model = model
        self.request_params = request_params
        self.output_table = output_table
        self.output_path = output_path
        self.output_format = output_format
        self.mode = mode
        self.response_col = response_col
        self.include_source_columns = include_source_columns
        self.max_retries = max_retries
        self.request_timeout = request_timeout
        self.max_retry_wait = max_retry_wait
        self.retry_backoff = retry_backoff
        self.on_error = on_error
        self.max_error_ratio = max_error_ratio
        self.dedupe = dedupe
        self.chunk_size = chunk_size
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_key = checkpoint_key
        self.keep_checkpoint = keep_checkpoint
        self.progress_interval = progress_interval

    @cached_property
    def hook(self) -> LLMQueryHook:
        return LLMQueryHook(llm_conn_id=self.llm_conn_id)

    # --- what each operator varies ----------------------------------------------------------

    def _query_stream(
        self, endpoint: EndpointConfig, rows: Iterable[tuple[Any, Any]], options: dict[str, Any]
    ) -> Iterator[QueryResult]:
        raise NotImplementedError

    # --- the shared run ---------------------------------------------------------------------

    def _query_options(self) -> dict[str, Any]:
        return {
            "system_prompt": self.system_prompt,
            "model": self.model,
            "request_params": dict(self.request_params or {}),
            "max_retries": self.max_retries,
            "request_timeout": self.request_timeout,
            "max_retry_wait": self.max_retry_wait,
            "retry_backoff": self.retry_backoff,
        }

    def _check_arguments(self) -> None:
        check_one_source(sql=self.sql, source_table=self.source_table, source_path=self.source_path)
        sinks = [n for n in ("output_table", "output_path") if getattr(self, n)]
        if len(sinks) != 1:
            raise LLMQueryConfigError(
                f"give exactly one sink of output_table, output_path (got {sinks or 'none'})"
            )
        if self.mode not in WRITE_MODES:
            raise LLMQueryConfigError(f"mode must be one of {WRITE_MODES}, got {self.mode!r}")
        if self.on_error not in ON_ERROR:
            raise LLMQueryConfigError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.max_error_ratio is not None and not 0 <= self.max_error_ratio <= 1:
            raise LLMQueryConfigError(f"max_error_ratio must be within [0, 1], got {self.max_error_ratio}")
        if self.chunk_size < 1:
            raise LLMQueryConfigError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if not self.response_col:
            raise LLMQueryConfigError("response_col must be a non-empty column name")

    def _checkpoint_location(self, spark: SparkSession) -> str:
        base = self.checkpoint_dir
        if not base:
            if self.output_path:
                base = os.path.join(os.path.dirname(self.output_path.rstrip("/")) or ".", ".llmq_checkpoints")
            else:
                warehouse = spark.conf.get("spark.sql.warehouse.dir", "spark-warehouse") or "spark-warehouse"
                base = f"{warehouse.rstrip('/')}/.llmq_checkpoints"
        return f"{base.rstrip('/')}/{sanitize_key(self.checkpoint_key)}"

    def execute(self, context: Context) -> dict[str, Any]:
        started = time.monotonic()
        self._check_arguments()
        endpoint = self.hook.endpoint.with_options(model=self.model, timeout=self.request_timeout)
        spark = get_spark_session(self.spark_conn_id, self.spark_conf, app_name=f"llmq-{self.task_id}")
        source = read_source(
            spark,
            sql=self.sql,
            source_table=self.source_table,
            source_path=self.source_path,
            source_format=self.source_format,
        )
        validate_source(
            source,
            prompt_col=self.prompt_col,
            id_col=self.id_col,
            prompt_template=self.prompt_template,
            response_col=self.response_col,
        )
        checkpoint = Checkpoint(self._checkpoint_location(spark))
        checkpoint.clean_temporaries()
        fingerprint = {
            "source": {"sql": self.sql, "table": self.source_table, "path": self.source_path},
            "source_schema": source.schema.simpleString(),
            "prompt": self.prompt_template if self.prompt_template is not None else {"col": self.prompt_col},
            "id_col": self.id_col,
            "system_prompt": self.system_prompt,
            "model": endpoint.model,
            "api_base": endpoint.api_base,
            "request_params": dict(self.request_params or {}),
            "dedupe": self.dedupe,
        }
        materialized, manifest, resumed = materialize_input(
            spark,
            source,
            checkpoint,
            prompt_col=self.prompt_col,
            id_col=self.id_col,
            prompt_template=self.prompt_template,
            dedupe=self.dedupe,
            chunk_size=self.chunk_size,
            fingerprint=fingerprint,
        )
        requests = requests_frame(materialized, manifest.n_chunks)
        chunks_before = set(checkpoint.chunk_names())
        pending = pending_requests(requests, checkpoint.read_results(spark))
        to_ask = pending.count() if chunks_before else manifest.total_requests  # a new run asks all
        already = manifest.total_requests - to_ask
        self.log.info(
            "llmq: %d rows, %d distinct requests, %d to ask (%s), checkpoint %s",
            manifest.total_rows,
            manifest.total_requests,
            to_ask,
            f"resumed {already} requests from checkpoint" if resumed else "new run",
            checkpoint.uri,
        )
        if resumed:
            self.log.info("resumed %d rows from checkpoint", already)
        query_started = time.monotonic()
        try:
            if to_ask:
                self._run_queries(spark, endpoint, checkpoint, pending, to_ask, manifest.n_chunks)
        except LLMQueryError:
            self._log_interrupted(spark, checkpoint, manifest.total_requests)
            raise
        query_seconds = time.monotonic() - query_started

        results = checkpoint.read_results(spark)
        output = attach_results(
            materialized,
            results,
            id_col=self.id_col or LLMQ_ROW_ID,
            response_col=self.response_col,
            include_source_columns=self.include_source_columns,
        )
        location = self.output_table or self.output_path
        self.log.info("llmq: writing %d rows to %s (mode %s)", manifest.total_rows, location, self.mode)
        write_output(
            output,
            output_table=self.output_table,
            output_path=self.output_path,
            output_format=self.output_format,
            mode=self.mode,
        )
        new_chunks = [name for name in checkpoint.chunk_names() if name not in chunks_before]
        summary = _summarize(output, checkpoint.read_results(spark, new_chunks) if new_chunks else None)
        seconds = time.monotonic() - started
        summary.update(
            {
                "resumed_requests": already if resumed else 0,
                "seconds": round(seconds, 3),
                "rows_per_second": round(summary["rows"] / seconds, 3) if seconds else None,
                # the querying phase alone, without Spark's reading and writing
                "query_seconds": round(query_seconds, 3),
                "query_requests_per_second": round(to_ask / query_seconds, 3)
                if to_ask and query_seconds
                else None,
                "output": location,
                "checkpoint": checkpoint.uri,
            }
        )
        self.log.info("llmq summary: %s", summary)
        self._enforce_error_policy(summary)
        if not self.keep_checkpoint:
            checkpoint.delete()
            summary["checkpoint"] = None
        return summary

    def _log_interrupted(self, spark: SparkSession, checkpoint: Checkpoint, total: int) -> None:
        done = checkpoint.read_results(spark).count()
        self.log.error(
            "llmq stopped: %d/%d requests are checkpointed in %s; a retry of this task resumes from there",
            done,
            total,
            checkpoint.uri,
        )

    def _enforce_error_policy(self, summary: dict[str, Any]) -> None:
        rows, errors = summary["rows"], summary["errors"]
        if self.on_error == "fail" and errors:
            raise LLMQueryFailedRowsError(
                f"{errors} of {rows} rows ended in error {summary['errors_by_code']} and on_error='fail'; "
                "the output and the checkpoint are written"
            )
        if self.max_error_ratio is not None and rows and errors / rows > self.max_error_ratio:
            raise LLMQueryFailedRowsError(
                f"{errors} of {rows} rows ended in error ({errors / rows:.1%} > max_error_ratio "
                f"{self.max_error_ratio:.1%}): {summary['errors_by_code']}"
            )

    def _run_queries(
        self,
        spark: SparkSession,
        endpoint: EndpointConfig,
        checkpoint: Checkpoint,
        pending: DataFrame,
        to_ask: int,
        n_chunks: int,
    ) -> None:
        """Driver placement (methods 2-4): stream pending requests in, checkpoint results per chunk."""
        progress = _Progress(self.log, to_ask, self.progress_interval)
        stream = self._query_stream(endpoint, stream_requests(pending, n_chunks), self._query_options())
        batch: list[QueryResult] = []
        flushed_at = time.monotonic()
        try:
            for result in stream:
                batch.append(result)
                progress.add(1)
                # a slow endpoint still checkpoints at least once a minute
                if len(batch) >= self.chunk_size or time.monotonic() - flushed_at >= MAX_CHUNK_SECONDS:
                    checkpoint.write_results(batch)
                    batch, flushed_at = [], time.monotonic()
        finally:
            if batch:  # what was answered before an error is kept for the retry
                checkpoint.write_results(batch)
            close = getattr(stream, "close", None)
            if close is not None:
                close()


def _static_asset(output_table: str | None, output_path: str | None) -> Asset | None:
    target = output_table or output_path
    if not target or "{{" in target or "{%" in target:
        return None
    if output_table:
        return Asset(name=output_table, uri=f"table://{output_table}")
    uri = target if "://" in target else "file://" + os.path.abspath(target)
    return Asset(uri=uri)


def _summarize(output: DataFrame, new_results: DataFrame | None) -> dict[str, Any]:
    """Counts from what was written: rows and errors from the output, requests and tokens from
    the results checkpointed by this try (each request once, however many rows it fanned out to)."""
    from pyspark.sql import functions as F

    by_status = {
        (row["llmq_status"], row["llmq_error_code"]): int(row["n"])
        for row in output.groupBy("llmq_status", "llmq_error_code")
        .agg(F.count(F.lit(1)).alias("n"))
        .collect()
    }
    rows = sum(by_status.values())
    ok = sum(n for (status, _), n in by_status.items() if status == STATUS_OK)
    errors_by_code = {
        str(code): n for (status, code), n in sorted(by_status.items(), key=str) if status != STATUS_OK
    }
    sent = {
        "requests_sent": 0,
        "retries": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "requests_answered": 0,
    }
    if new_results is not None:
        totals = new_results.agg(
            F.sum("llmq_attempts").alias("requests_sent"),
            F.sum(F.greatest(F.col("llmq_attempts") - 1, F.lit(0))).alias("retries"),
            F.sum("llmq_prompt_tokens").alias("prompt_tokens"),
            F.sum("llmq_completion_tokens").alias("completion_tokens"),
            F.count(F.lit(1)).alias("requests_answered"),
        ).first()
        assert totals is not None
        sent = {name: int(totals[name] or 0) for name in sent}
    return {"rows": rows, "ok": ok, "errors": rows - ok, "errors_by_code": errors_by_code, **sent}


class LLMQueryAsyncBatchOperator(LLMQueryBaseOperator):
    """Method 2: asyncio + aiohttp, ``batch_size`` requests at a time (the article's
    ``api_call_batch_size``), on the driver, streamed in chunks.

    :param batch_size: requests gathered together; the next batch starts when one finishes.
    """

    def __init__(self, *, batch_size: int = 128, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batch_size = batch_size

    def _query_stream(
        self, endpoint: EndpointConfig, rows: Iterable[tuple[Any, Any]], options: dict[str, Any]
    ) -> Iterator[QueryResult]:
        return query_async_batches(endpoint, rows, batch_size=self.batch_size, **options)


class LLMQueryRateLimitedOperator(LLMQueryBaseOperator):
    """Method 3: asyncio + aiohttp with at most ``max_concurrency`` requests in flight (the
    article's ``max_concurrent_requests``) and optional requests/min and tokens/min caps, spread
    evenly. The one to pick for a deployment with a quota.

    :param max_concurrency: requests in flight at most.
    :param requests_per_minute: requests/min cap; None for none.
    :param tokens_per_minute: tokens/min cap (estimated prompt tokens + max_tokens); None for none.
    """

    def __init__(
        self,
        *,
        max_concurrency: int = 32,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.max_concurrency = max_concurrency
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute

    def _query_stream(
        self, endpoint: EndpointConfig, rows: Iterable[tuple[Any, Any]], options: dict[str, Any]
    ) -> Iterator[QueryResult]:
        return query_async_limited(
            endpoint,
            rows,
            max_concurrency=self.max_concurrency,
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
            **options,
        )


class LLMQueryThreadPoolOperator(LLMQueryBaseOperator):
    """Method 4: ``max_workers`` threads (the article's ``num_workers``) sharing one pooled
    ``requests`` session, on the driver, streamed in chunks.

    :param max_workers: threads, each with one request in flight.
    """

    def __init__(self, *, max_workers: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_workers = max_workers

    def _query_stream(
        self, endpoint: EndpointConfig, rows: Iterable[tuple[Any, Any]], options: dict[str, Any]
    ) -> Iterator[QueryResult]:
        return query_thread_pool(endpoint, rows, max_workers=self.max_workers, **options)


class LLMQueryUDFOperator(LLMQueryBaseOperator):
    """Method 1: a Spark UDF asks each row's prompt on the executors, one request at a time per
    Python worker (the article's ``repartition(30)`` + ``requests`` UDF), reusing one pooled
    session per worker. Results are checkpointed per chunk: one Spark job per chunk of rows.

    :param num_partitions: partitions per chunk job (the article's ``repartition(30)``);
        None keeps Spark's default parallelism.
    """

    def __init__(self, *, num_partitions: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_partitions = num_partitions

    def _run_queries(
        self,
        spark: SparkSession,
        endpoint: EndpointConfig,
        checkpoint: Checkpoint,
        pending: DataFrame,
        to_ask: int,
        n_chunks: int,
    ) -> None:
        from pyspark.sql import functions as F

        if self.num_partitions is not None and self.num_partitions < 1:
            raise LLMQueryConfigError(f"num_partitions must be >= 1, got {self.num_partitions}")
        ask = _query_udf(endpoint, self._query_options())
        sizes = {row[0]: int(row[1]) for row in pending.groupBy(CHUNK_COL).count().collect()}
        partitions = self.num_partitions or _default_parallelism(spark)
        progress = _Progress(self.log, to_ask, self.progress_interval)
        for chunk in sorted(sizes):
            rows = pending.where(F.col(CHUNK_COL) == F.lit(chunk)).repartition(partitions)
            answered = rows.select(KEY_COL, ask(F.col(KEY_COL), F.col(PROMPT_COL)).alias("r"))
            answered = answered.select(KEY_COL, "r.*").withColumn(WRITTEN_COL, F.lit(time.time_ns()))
            name = f"chunk-u{chunk:05d}-{time.time_ns()}"
            tmp = checkpoint.spark_chunk_tmp_uri(name)
            try:
                answered.write.parquet(tmp)
            except Exception as exc:  # a Spark job failure wraps the executor's Python error
                raise _unwrap_spark_error(exc) from None
            checkpoint.commit_spark_chunk(tmp, name)
            progress.add(sizes[chunk])


def _default_parallelism(spark: SparkSession) -> int:
    try:
        return int(spark.sparkContext.defaultParallelism)
    except Exception:  # Spark Connect has no SparkContext
        return int(spark.conf.get("spark.default.parallelism", None) or 8)


def _query_udf(endpoint: EndpointConfig, options: dict[str, Any]) -> Any:
    """A nondeterministic UDF (so Spark never re-evaluates it for one row) returning every result
    column as a struct. Each Python worker reuses one pooled client across rows and tasks."""
    from pyspark.sql import functions as F

    def ask(key: str, prompt: str | None) -> tuple[Any, ...]:
        return result_values(sync_client_for(endpoint, **options).query(key, prompt))

    return F.udf(ask, RESULT_DDL).asNondeterministic()


def _unwrap_spark_error(exc: Exception) -> Exception:
    """An LLMQueryError raised in an executor reaches the driver as a Spark exception: re-raise
    it as the original class with its message, so auth and config errors read the same."""
    from airflow_provider_llmq.core.errors import LLMQueryAuthError

    text = str(exc)
    for cls in (LLMQueryAuthError, LLMQueryConfigError):
        marker = f"{cls.__name__}: "
        if marker in text:
            message = text.split(marker, 1)[1].splitlines()[0]
            return cls(message)
    return exc


__all__ = [
    "LLMQueryAsyncBatchOperator",
    "LLMQueryBaseOperator",
    "LLMQueryFailedRowsError",
    "LLMQueryRateLimitedOperator",
    "LLMQueryThreadPoolOperator",
    "LLMQueryUDFOperator",
]
