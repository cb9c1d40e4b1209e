"""The stages of one try of a query task, in the order they run: materialize the input, plan what
is pending, answer from the cache, ask (the operator's placement), write every row once, summarize.

A mixin of the base operator, apart from its arguments and Airflow hooks, so that the plan reads
in one place; it uses only the Spark layer and the core.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from airflow_provider_llmq.core.accounting.progress import Progress
from airflow_provider_llmq.core.errors import LLMQueryConfigError, LLMQueryError
from airflow_provider_llmq.operators.outcome import log_interrupted
from airflow_provider_llmq.spark.cache import AnswerCache
from airflow_provider_llmq.spark.estimate import estimate
from airflow_provider_llmq.spark.phases import Phases
from airflow_provider_llmq.spark.placements import Placement, Work
from airflow_provider_llmq.spark.placements.base import left_for_this_try
from airflow_provider_llmq.spark.plan import (
    materialize_input,
    pending_requests,
    request_fingerprint,
    requests_frame,
)
from airflow_provider_llmq.spark.schema import LLMQ_ROW_ID, PROMPT_COL
from airflow_provider_llmq.spark.sink import attach_results, refuse_existing_output, write_output
from airflow_provider_llmq.spark.source import check_one_source, read_source, validate_source
from airflow_provider_llmq.spark.summary import observe_outcomes, observed_metrics, rate, summarize

if TYPE_CHECKING:
    import threading

    from pyspark.sql import DataFrame, SparkSession

    from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
    from airflow_provider_llmq.core.request.options import QueryOptions
    from airflow_provider_llmq.spark.checkpoint import Checkpoint
    from airflow_provider_llmq.spark.structured import OutputSpec


WRITE_MODES = ("overwrite", "append", "ignore", "error", "errorifexists")
ON_ERROR = ("record", "fail")


if TYPE_CHECKING:
    from airflow_provider_llmq.operators.arguments import SourceAndSink as _Arguments
else:
    _Arguments = object


class QueryStagesMixin(_Arguments):
    """``_run``: one try's stages; the operator's arguments are its attributes."""

    if TYPE_CHECKING:  # the operator's

        @property
        def log(self) -> Any: ...  # Airflow's structlog logger

        @property
        def _output(self) -> OutputSpec | None: ...

        _stopping: threading.Event
        mode: str
        prompt_col: str
        id_col: str | None
        prompt_template: str | None
        system_prompt: str | None
        request_params: dict[str, Any] | None
        response_col: str
        include_source_columns: bool
        flatten_output: bool | str
        dedupe: bool
        chunk_size: int
        checkpoint_key: str
        keep_checkpoint: bool
        prices: dict[str, Any] | None
        expected_completion_tokens: int | None
        estimate_only: bool
        cache_path: str | None
        progress_interval: float
        on_error: str
        max_error_ratio: float | None
        source_format: str

    def _run(
        self,
        spark: SparkSession,
        source: DataFrame,
        checkpoint: Checkpoint,
        endpoint: EndpointConfig,
        options: QueryOptions,
        placement: Placement,
    ) -> tuple[dict[str, Any], int, float]:
        """read -> checkpoint -> placement -> write -> summary; returns the summary, the requests
        this try asked and the seconds it spent asking."""
        phases = getattr(self, "_phases", None) or Phases()
        complete_summary = self._summary_completion(checkpoint)
        checkpoint.clean_temporaries()
        refuse_existing_output(
            spark,
            output_table=self.output_table,
            output_path=self.output_path,
            mode=self.mode,
            checkpoint=checkpoint,
        )
        materialized, manifest, resumed = materialize_input(
            spark,
            source,
            checkpoint,
            prompt_col=self.prompt_col,
            id_col=self.id_col,
            prompt_template=self.prompt_template,
            dedupe=self.dedupe,
            bucket_size=self.chunk_size,
            fingerprint=self._fingerprint(source, endpoint),
        )
        phases.lap("materialize")  # the source read, its prompts rendered and written: one Spark job
        results_before = set(checkpoint.result_names())
        requests = requests_frame(materialized, manifest.n_buckets)
        pending = pending_requests(requests, checkpoint.read_results(spark))
        to_ask = pending.count() if results_before else manifest.total_requests  # a new run asks all
        phases.lap("plan")
        cache = self._answer_cache(endpoint, options)
        if cache is not None and to_ask:
            # each hit is a distinct pending request, now settled: what is left needs no count
            hits = cache.copy_hits(spark, pending, checkpoint)
            if hits:
                pending = pending_requests(requests, checkpoint.read_results(spark))
                to_ask -= hits
            self.log.info("llmq: %d requests answered from the cache at %s", hits, cache.uri)
            phases.lap("cache")
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
        if self.estimate_only:
            return self._estimate(pending, manifest.total_rows, options, endpoint), 0, 0.0

        query_started = time.monotonic()
        progress = Progress(self.log, to_ask, self.progress_interval)
        if to_ask:
            spent = (0, 0.0)
            if not placement.keeps_its_own_ledger:
                options, spent = left_for_this_try(options, checkpoint)
            if spent[0]:
                self.log.info(
                    "llmq: earlier tries of this run were billed %d tokens (cost %.6g): this try may "
                    "spend what is left of the run's budget",
                    *spent,
                )
            work = Work(
                spark=spark,
                endpoint=endpoint,
                options=options,
                checkpoint=checkpoint,
                pending=pending,
                n_buckets=manifest.n_buckets,
                flush_rows=self.chunk_size,
                progress=progress,
                stop=self._stopping,
                phases=phases,
            )
            try:
                placement.run(work)
            except LLMQueryError as exc:
                log_interrupted(self.log, spark, checkpoint, manifest.total_requests, exc)
                raise
        query_seconds = time.monotonic() - query_started
        phases.lap("ask")
        if cache is not None:
            added = cache.add(spark, materialized, checkpoint)
            self.log.info("llmq: %d answers added to the cache at %s", added, cache.uri)
            phases.lap("cache")

        output = attach_results(
            materialized,
            checkpoint.read_results(spark),
            id_col=self.id_col or LLMQ_ROW_ID,
            response_col=self.response_col,
            include_source_columns=self.include_source_columns,
            output_type=self._output.spark_type if self._output else None,
            flatten_output=self.flatten_output,
        )
        output, observation = observe_outcomes(output)
        location = self.output_table or self.output_path
        self.log.info("llmq: writing %d rows to %s (mode %s)", manifest.total_rows, location, self.mode)
        try:
            wrote = write_output(
                output,
                output_table=self.output_table,
                output_path=self.output_path,
                output_format=self.output_format,
                mode=self.mode,
                checkpoint=checkpoint,
            )
        except Exception:
            # every answer was paid for: say where it is, so nobody pays for it twice
            self.log.error(
                "llmq: the output could not be written to %s; every result is kept in the checkpoint "
                "%s, and a retry of this task (or a run with checkpoint_key=%r) writes them without "
                "asking again",
                location,
                checkpoint.uri,
                self.checkpoint_key,
            )
            raise
        phases.lap("write")  # the join with the results is evaluated by this write
        new_results = self._new_result_names(checkpoint, results_before)
        summary = summarize(
            output,
            checkpoint.read_results(spark, new_results) if new_results else None,
            checkpoint.read_results(spark) if self.prices else None,
            observed=observed_metrics(observation) if observation is not None and wrote else None,
        )
        if self.keep_checkpoint:
            checkpoint.compact(spark)
        summary.update(rate(progress.rate_stats()))
        summary.update(resumed_requests=already if resumed else 0, output=location, checkpoint=checkpoint.uri)
        if complete_summary is not None:
            complete_summary(summary)
        return summary, to_ask, query_seconds

    def _summary_completion(self, checkpoint: Checkpoint) -> Callable[[dict[str, Any]], None] | None:
        """Called as a try starts, before anything is asked; what it returns completes the try's
        summary once the output is written (a placement's own figures). Not called for an estimate."""
        return None

    def _answer_cache(self, endpoint: EndpointConfig, options: QueryOptions) -> AnswerCache | None:
        if not self.cache_path:
            return None
        return AnswerCache(self.cache_path, request_fingerprint(endpoint, options))

    def _estimate(
        self, pending: DataFrame, rows: int, options: QueryOptions, endpoint: EndpointConfig
    ) -> dict[str, Any]:
        """``estimate_only``: what the pending requests would cost; nothing is sent (the input stays in
        the checkpoint, so a run with the same ``checkpoint_key`` resumes from it)."""
        found = estimate(
            pending,
            prompt_col=PROMPT_COL,
            system_prompt=options.system_prompt,
            model=endpoint.model,
            max_tokens=options.chat_request(endpoint).max_completion_tokens(),
            expected_completion_tokens=self.expected_completion_tokens,
            prices=self.prices,
            dedupe=False,  # one row per request already
        )
        self.log.info("llmq estimate (nothing sent): %s", found.to_dict())
        return {"estimate_only": True, "rows": rows, "errors": 0, "errors_by_code": {}, **found.to_dict()}

    def _new_result_names(self, checkpoint: Checkpoint, before: set[str]) -> list[str]:
        """The result files this try added: what the summary counts as asked."""
        return [name for name in checkpoint.result_names() if name not in before]

    def _fingerprint(self, source: DataFrame, endpoint: EndpointConfig) -> dict[str, Any]:
        """What the checkpoint's results answer: a resume with anything else is refused."""
        return {
            "source": {"sql": self.sql, "table": self.source_table, "path": self.source_path},
            "source_schema": source.schema.simpleString(),
            "prompt": self.prompt_template if self.prompt_template is not None else {"col": self.prompt_col},
            "id_col": self.id_col,
            "system_prompt": self.system_prompt,
            "model": endpoint.model,
            "api_base": endpoint.api_base,
            "api_type": endpoint.api_type,
            "api_version": endpoint.api_version,
            "request_params": dict(self.request_params or {}),
            "dedupe": self.dedupe,
            # only when set: checkpoints of free-text runs made before it existed still resume
            **({"output_schema": self._output.schema} if self._output else {}),
        }

    def _read_source(self, spark: SparkSession) -> DataFrame:
        source = read_source(
            spark,
            sql=self.sql,
            source_table=self.source_table,
            source_path=self.source_path,
            source_format=self.source_format,
        )
        return self._validated(source)

    def _validated(self, source: DataFrame) -> DataFrame:
        """The source, once the columns the arguments name are checked (before any request)."""
        validate_source(
            source,
            prompt_col=self.prompt_col,
            id_col=self.id_col,
            prompt_template=self.prompt_template,
            response_col=self.response_col,
        )
        return source

    def _check_source(self) -> None:
        check_one_source(sql=self.sql, source_table=self.source_table, source_path=self.source_path)

    def _check_arguments(self) -> None:
        self._check_source()
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
