"""The base of the four operators: read prompts with Spark, query every row, write every row back once.

It is Airflow only: arguments, templating and ``execute`` reading as the plan (read -> checkpoint
-> placement -> write -> summary). The Spark work lives in :mod:`airflow_provider_llmq.spark`;
each operator differs only in its placement (``_placement``): which core method asks, with which
scheduling argument, and where it runs.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator

from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.request.error_codes import BUDGET_EXCEEDED
from airflow_provider_llmq.core.request.options import QueryOptions, check_rows_per_request
from airflow_provider_llmq.core.request.payload import DEFAULT_SYSTEM_PROMPT
from airflow_provider_llmq.hooks.llmq import LLMQueryHook
from airflow_provider_llmq.hooks.spark_session import get_spark_session
from airflow_provider_llmq.operators.lineage import LineageMixin, task_asset
from airflow_provider_llmq.operators.option_groups import (
    DEFAULT_CHECKPOINT_KEY,
    BudgetOptions,
    CheckpointOptions,
    ErrorPolicy,
    RetryOptions,
    StructuredOptions,
    apply_option_groups,
)
from airflow_provider_llmq.operators.outcome import (
    DEFAULT_MAX_ERROR_RATIO,
    LLMQueryConfigFailure,
    LLMQueryFailedRowsError,
    enforce_error_policy,
)
from airflow_provider_llmq.operators.stages import QueryStagesMixin
from airflow_provider_llmq.spark.checkpoint import Checkpoint, checkpoint_location
from airflow_provider_llmq.spark.lease import Lease, Owner
from airflow_provider_llmq.spark.phases import Phases
from airflow_provider_llmq.spark.placements import Placement
from airflow_provider_llmq.spark.session import cancel_tagged_jobs, require_shared_paths
from airflow_provider_llmq.spark.structured import OutputSpec, output_spec
from airflow_provider_llmq.spark.summary import timings
from airflow_provider_llmq.spark.summary_text import summary_block

if TYPE_CHECKING:
    from airflow.sdk import Context
    from pyspark.sql.types import StructType


def _owner(context: Context, task_id: str) -> Owner:
    """This try, as a checkpoint lease owner: the task instance and its try number."""
    ti = context.get("ti")
    if ti is None:  # execute() called outside Airflow
        return Owner(task=task_id)
    return Owner(task=f"{ti.dag_id}/{ti.task_id}/{ti.run_id}/{ti.map_index}", attempt=int(ti.try_number or 1))


class LLMQueryBaseOperator(QueryStagesMixin, LineageMixin, BaseOperator):
    """Reads prompts with Spark, asks the LLM for each row, writes every row back exactly once.

    :param llm_conn_id: the ``llmq`` connection (API base, key, api type, deployment, CA) (templated).
    :param spark_conn_id: a ``spark`` or ``spark_connect`` connection; None runs ``local[*]`` (templated).
    :param spark_conf: extra Spark settings for the session.
    :param sql: source query (templated); exactly one of ``sql``, ``source_table``, ``source_path``.
    :param source_table: source table (templated).
    :param source_path: source path (templated), read with ``source_format``.
    :param source_format: format of ``source_path`` (parquet, json, csv, ...).
    :param prompt_col: column holding the prompt (unused with ``prompt_template``).
    :param id_col: unique id column; None assigns ``llmq_row_id`` once, when the input is materialized.
    :param prompt_template: builds the prompt from ``{column}`` names of the row.
    :param system_prompt: system message for every request; None sends none (templated).
    :param model: overrides the connection's deployment (Azure) / model (OpenAI) (templated).
    :param request_params: body fields: temperature, max_tokens, response_format, ...
    :param output_table: sink table (templated); one of ``output_table``, ``output_path``.
    :param output_path: sink path (templated), written with ``output_format``.
    :param output_format: format of ``output_path``.
    :param mode: Spark save mode: overwrite, append, ignore, error.
    :param response_col: name of the answer column.
    :param include_source_columns: True: every source column plus results; False: id plus results.
    :param max_retries: retries per request after the first attempt.
    :param request_timeout: per-request timeout in seconds; None (default) keeps the connection's
        ``timeout`` extra (60 s when it has none).
    :param max_retry_wait: cap in seconds on one server-requested wait (Retry-After).
    :param retry_backoff: first computed backoff in seconds (doubles per retry).
    :param adaptive: learn the request rate the server allows from its 429s, rate headers and retry
        hints (``requests_per_minute``, where an operator has it, is then a ceiling); False sends at
        exactly the configured rate.
    :param patience: seconds the run keeps asking while every request is refused with a 429 and none
        is answered; then the waiting rows end ``rate_limited`` (a 429 spends no retry).
    :param on_error: "record" keeps going and records errors on rows; "fail" fails the task
        after the output is written when any row ended in error.
    :param max_error_ratio: fail the task (after writing) when more than this fraction of the rows
        asked failed (rows with a null or empty prompt and rows the budget held back are not asked),
        once at least 10 rows were asked; None: never. Whatever it is, a run that asked rows and got
        no answer at all fails.
    :param fail_on_empty: fail the task when the input has no rows; False: a warning and a summary
        of 0 rows.
    :param dedupe: send identical prompts once and fan the answer out to every row asking it.
    :param chunk_size: requests per checkpointed chunk.
    :param checkpoint_dir: where checkpoints live; default: ``.llmq_checkpoints`` beside the output.
    :param checkpoint_key: sub-folder of one run's checkpoint (templated); a run given the same
        key resumes instead of asking again.
    :param keep_checkpoint: keep the checkpoint after a successful write.
    :param progress_interval: seconds between progress lines in the log.
    :param prices: model or deployment -> input and output price per million tokens
        (``{"gpt-4o-mini": {"input": 0.15, "output": 0.6}}``); each row then carries its cost
        (``llmq_cost``) and the summary the total. No price table ships.
    :param max_total_tokens: tokens (prompt + completion) this run may spend, over all its tries
        (what earlier tries were billed is read from the checkpoint). Each request reserves its
        worst case before it is sent; without ``max_tokens`` llmq sets one from the answers seen.
        A request that would pass the budget is not sent and its row ends ``budget_exceeded``
        (asked again by a run with a larger budget).
    :param max_cost: cost this run may spend at ``prices``, the same way.
    :param expected_completion_tokens: completion tokens to count per request before it is sent
        (the estimate; with a budget, the first limit llmq sets is twice it).
    :param estimate_only: count the pending requests' tokens and cost, send nothing, and return
        the estimate.
    :param cache_path: a cross-run answer cache (a folder or URI): pending requests answered by an
        earlier run with the same request are copied from it, and this run's answers are added.
    :param output_schema: structured output: a Spark DDL string (``"label string, score int"``), a
        ``StructType`` or a JSON schema (dict) every answer must follow; the answers become the
        struct column ``response_col`` (raw text in ``<response_col>_raw``), and an answer that does
        not follow it is the row error ``invalid_output``. None: free text.
    :param flatten_output: with ``output_schema``, the struct's fields as top-level columns named
        ``<response_col>_<field>`` (True) or ``<prefix><field>`` (a string prefix).
    :param repair_invalid_output: with ``output_schema``, follow an invalid answer with one more
        request that shows the model its invalid text and the reason.
    :param rows_per_request: ``int | "auto"``: rows sent in one request, as one JSON envelope answered
        with a JSON schema (see README, "Packing rows"). 1 (default): one row per request; an integer
        > 1: that many; ``"auto"``: about 2,000 prompt tokens per request, at most 64 rows, smaller
        after packs that fail or come back incomplete (``max_tokens`` stays a row's).
        Each row keeps its own answer or error: a row missing from an answer is asked again, a pack
        that fails whole is split down to the row that made it fail. Not for long prompts, for
        tasks where rows would influence each other, nor for models that follow JSON schemas poorly.
    :param retry: :class:`RetryOptions`, the retry and pacing arguments as one group (the flat
        arguments of the same names stay accepted; see :mod:`~.option_groups`).
    :param budget: :class:`BudgetOptions`: prices, budget, estimate.
    :param checkpointing: :class:`CheckpointOptions`: chunk size, checkpoint folder and key, cache.
    :param structured: :class:`StructuredOptions`: output schema, flattening, repair.
    :param errors: :class:`ErrorPolicy`: on_error, max_error_ratio, fail_on_empty.
    """

    template_fields: Sequence[str] = (
        "llm_conn_id",
        "spark_conn_id",
        "sql",
        "source_table",
        "source_path",
        "system_prompt",
        "model",
        "output_table",
        "output_path",
        "checkpoint_dir",
        "checkpoint_key",
        "cache_path",
    )  # not prompt_template: Jinja would eat its {{ }} literal braces
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers = {"sql": "sql"}
    #: whether ``rows_per_request`` > 1 is supported (every operator, the Batch API too)
    packs_rows: ClassVar[bool] = True
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
        request_timeout: float | None = None,
        max_retry_wait: float = 60,
        retry_backoff: float = 0.5,
        adaptive: bool = True,
        patience: float = 1800.0,
        on_error: str = "record",
        max_error_ratio: float | None = DEFAULT_MAX_ERROR_RATIO,
        fail_on_empty: bool = False,
        dedupe: bool = True,
        chunk_size: int = 1000,
        checkpoint_dir: str | None = None,
        checkpoint_key: str = DEFAULT_CHECKPOINT_KEY,
        keep_checkpoint: bool = False,
        progress_interval: float = 30.0,
        prices: dict[str, Any] | None = None,
        max_total_tokens: int | None = None,
        max_cost: float | None = None,
        expected_completion_tokens: int | None = None,
        estimate_only: bool = False,
        cache_path: str | None = None,
        output_schema: str | StructType | dict[str, Any] | None = None,
        flatten_output: bool | str = False,
        repair_invalid_output: bool = False,
        rows_per_request: int | str = 1,
        retry: RetryOptions | None = None,
        budget: BudgetOptions | None = None,
        checkpointing: CheckpointOptions | None = None,
        structured: StructuredOptions | None = None,
        errors: ErrorPolicy | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_rows_per_request(rows_per_request)  # at parse time: nothing is started for a bad value
        if rows_per_request != 1 and not self.packs_rows:
            raise LLMQueryConfigError(f"{type(self).__name__} does not support rows_per_request (use 1)")
        self.rows_per_request = rows_per_request
        if not self.outlets:
            self.outlets = [task_asset(self.dag_id, self.task_id, output_table, output_path)]
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
        self.adaptive = adaptive
        self.patience = patience
        self.on_error = on_error
        self.max_error_ratio = max_error_ratio
        self.fail_on_empty = fail_on_empty
        self.dedupe = dedupe
        self.chunk_size = chunk_size
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_key = checkpoint_key
        self.keep_checkpoint = keep_checkpoint
        self.progress_interval = progress_interval
        self.prices = prices
        self.max_total_tokens = max_total_tokens
        self.max_cost = max_cost
        self.expected_completion_tokens = expected_completion_tokens
        self.estimate_only = estimate_only
        self.cache_path = cache_path
        self.output_schema = output_schema
        self.flatten_output = flatten_output
        self.repair_invalid_output = repair_invalid_output
        apply_option_groups(
            self,
            retry=retry,
            budget=budget,
            checkpointing=checkpointing,
            structured=structured,
            errors=errors,
        )

    @cached_property
    def hook(self) -> LLMQueryHook:
        return LLMQueryHook(llm_conn_id=self.llm_conn_id)

    def _placement(self) -> Placement:
        """Where and how this operator asks: the one thing each operator defines."""
        raise NotImplementedError

    def _query_options(self) -> QueryOptions:
        return QueryOptions(
            system_prompt=self.system_prompt,
            model=self.model,
            request_params=self.request_params or {},
            max_retries=self.max_retries,
            request_timeout=self.request_timeout,
            max_retry_wait=self.max_retry_wait,
            retry_backoff=self.retry_backoff,
            adaptive=self.adaptive,
            patience=self.patience,
            output_schema=self._output.schema if self._output else None,
            output_check_schema=self._output.check_schema if self._output else None,
            repair_invalid_output=self.repair_invalid_output,
            prices=self.prices,
            max_total_tokens=self.max_total_tokens,
            max_cost=self.max_cost,
            expected_completion_tokens=self.expected_completion_tokens,
            rows_per_request=self.rows_per_request,
        )

    @cached_property
    def _output(self) -> OutputSpec | None:
        """``output_schema`` as JSON schemas and a Spark type; None: free text. Spark's own parser reads
        a DDL string, so the session starts here then (the same session ``execute`` gets)."""
        app_name = f"llmq-{self.task_id}"
        session = partial(get_spark_session, self.spark_conn_id, self.spark_conf, app_name=app_name)
        return output_spec(self.output_schema, self.flatten_output, session)

    def execute(self, context: Context) -> dict[str, Any]:
        self._stopping = threading.Event()
        self._cancel_jobs: Callable[[], None] | None = None
        try:
            return self._execute(context)
        except LLMQueryConfigError as exc:
            raise LLMQueryConfigFailure(str(exc)) from exc  # no Airflow retry can fix it

    def on_kill(self) -> None:
        """Stop sending, flush what was answered and cancel this task's Spark jobs; the try fails and
        its retry asks only what was not answered."""
        stopping = getattr(self, "_stopping", None)
        if stopping is not None:
            stopping.set()
        cancel = getattr(self, "_cancel_jobs", None)
        if cancel is not None:
            # on_kill runs in a signal handler, possibly in the middle of a py4j call on this thread:
            # a second call from the same thread could deadlock on its pinned connection
            threading.Thread(target=cancel, name="llmq-cancel", daemon=True).start()

    def _execute(self, context: Context) -> dict[str, Any]:
        self._phases = phases = Phases()
        self._check_arguments()
        options, placement = self._query_options(), self._placement()
        endpoint = options.bind(self.hook.endpoint)
        if endpoint.is_tls:
            endpoint.ssl_context()  # a CA that cannot be loaded fails here, not after Spark started
        spark = get_spark_session(self.spark_conn_id, self.spark_conf, app_name=f"llmq-{self.task_id}")
        phases.lap("spark_start")
        location = checkpoint_location(spark, self.checkpoint_dir, self.output_path, self.checkpoint_key)
        require_shared_paths(
            spark,
            source_path=self.source_path,
            output_path=self.output_path,
            checkpoint=location,
            cache_path=self.cache_path,
        )
        source = self._read_source(spark)
        checkpoint = Checkpoint(location)
        lease = Lease(checkpoint, _owner(context, self.task_id))
        taken_over = lease.acquire()
        if taken_over:
            self.log.info("llmq: took the checkpoint over: %s", taken_over)
        tag = f"llmq-{uuid.uuid4().hex}"
        spark.addTag(tag)
        self._cancel_jobs = partial(cancel_tagged_jobs, spark, tag)
        try:
            summary, asked, query_seconds = self._run(spark, source, checkpoint, endpoint, options, placement)
        finally:
            self._cancel_jobs = None
            spark.removeTag(tag)
            lease.release()
        phases.lap("summary")
        seconds = time.monotonic() - phases.started
        summary.update(timings(summary["rows"], asked, seconds, query_seconds, phases.report(seconds)))
        self.log.info("%s", summary_block(summary))
        self._record_lineage(context, spark, summary, endpoint.model)
        if summary.get("estimate_only"):
            return summary  # nothing was asked: the checkpoint (answers already paid for) stays
        if not summary["rows"]:
            if self.fail_on_empty:
                raise LLMQueryFailedRowsError("the input has no rows and fail_on_empty=True")
            self.log.warning("llmq: the input has no rows: nothing was asked, the output is empty")
        enforce_error_policy(summary, self.on_error, self.max_error_ratio)
        unsent = summary.get("errors_by_code", {}).get(BUDGET_EXCEEDED, 0)
        if unsent:  # kept, so that a run given this checkpoint_key and a larger budget asks them
            self.log.warning(
                "llmq: %d rows were not sent (budget_exceeded); the checkpoint %s is kept: a run with "
                "the same checkpoint_key and a larger budget asks exactly those",
                unsent,
                checkpoint.uri,
            )
        elif not self.keep_checkpoint:
            checkpoint.delete()
            summary["checkpoint"] = None
        return summary


__all__ = ["LLMQueryBaseOperator"]
