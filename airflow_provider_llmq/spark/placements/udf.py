"""Method 1: a Spark UDF asks each row's prompt on the executors, one Spark job per bucket, each
job's results committed to the checkpoint when it succeeds."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from airflow_provider_llmq.core.errors import LLMQueryConfigError, LLMQueryError
from airflow_provider_llmq.core.methods import sync_client_for
from airflow_provider_llmq.spark.placements.base import PlacementStopped, Work, portable
from airflow_provider_llmq.spark.placements.budget_ledger import JobBudgets
from airflow_provider_llmq.spark.placements.udf_packs import packed_answers
from airflow_provider_llmq.spark.plan import bucket_of, bucket_sizes
from airflow_provider_llmq.spark.schema import KEY_COL, PROMPT_COL, RESULT_DDL, result_values
from airflow_provider_llmq.spark.session import default_parallelism

if TYPE_CHECKING:
    from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
    from airflow_provider_llmq.core.request.options import QueryOptions


_ARROW_CONCURRENCY = "spark.sql.execution.pythonUDF.arrow.concurrency.level"


@dataclass(frozen=True)
class UDFPlacement:
    """:param num_partitions: partitions per bucket job (the article's ``repartition(30)``); None
        keeps Spark's default parallelism.
    :param requests_per_worker: requests in flight per Python worker. 1 is the article's method;
        more runs the UDF Arrow-optimized with that many threads per worker (Spark's
        ``pythonUDF.arrow.concurrency.level``), so a wide cluster is not held to one request per core.
    :param budget_ledger: with a budget, the workers draw it from a ledger this process serves;
        False gives each worker a fixed share of it (what is left where Spark Connect runs).
    """

    keeps_its_own_ledger: ClassVar[bool] = False

    num_partitions: int | None = None
    requests_per_worker: int = 1
    budget_ledger: bool = True

    def __post_init__(self) -> None:
        if self.num_partitions is not None and self.num_partitions < 1:
            raise LLMQueryConfigError(f"num_partitions must be >= 1, got {self.num_partitions}")
        if self.requests_per_worker < 1:
            raise LLMQueryConfigError(f"requests_per_worker must be >= 1, got {self.requests_per_worker}")

    def run(self, work: Work) -> None:
        threaded = self.requests_per_worker > 1
        partitions = self.num_partitions or default_parallelism(work.spark)
        previous = work.spark.conf.get(_ARROW_CONCURRENCY, None)
        if threaded:
            work.spark.conf.set(_ARROW_CONCURRENCY, str(self.requests_per_worker))
        try:
            self._ask_buckets(work, portable(work.endpoint), threaded, partitions)
        finally:  # the user's session keeps its own setting
            if previous is None:
                work.spark.conf.unset(_ARROW_CONCURRENCY)
            else:
                work.spark.conf.set(_ARROW_CONCURRENCY, previous)

    def _ask_buckets(self, work: Work, endpoint: EndpointConfig, threaded: bool, partitions: int) -> None:
        from pyspark.sql import functions as F

        # a budget: each job's Python workers (at most as many as run at once) draw from the
        # driver's ledger, or share what is left where it cannot serve them
        budgets = JobBudgets(work, min(partitions, default_parallelism(work.spark)), self.budget_ledger)
        written: list[str] = []
        for bucket, size in sorted(bucket_sizes(work.pending).items()):
            if work.stop.is_set():
                raise PlacementStopped("stopped between two bucket jobs")
            with budgets.job(written) as options:
                rows = bucket_of(work.pending, bucket).repartition(partitions)
                if options.packed:  # rows_per_request: packs formed over each partition's rows
                    threads = self.requests_per_worker
                    answered = packed_answers(rows, endpoint, options, _scope(options), threads)
                else:
                    ask = _query_udf(endpoint, options, arrow=threaded)
                    answered = rows.select(KEY_COL, ask(F.col(KEY_COL), F.col(PROMPT_COL)).alias("r"))
                    answered = answered.select(KEY_COL, "r.*")
                try:
                    name = work.checkpoint.write_frame(answered)
                except Exception as exc:  # a Spark job failure wraps the executor's Python error
                    if work.stop.is_set():  # the job was cancelled by the stop
                        raise PlacementStopped("stopped: the running bucket job was cancelled") from None
                    raise unwrap_spark_error(exc) from None
                written.append(name)
            work.progress.add(size, work.checkpoint.tally(name))


def _query_udf(endpoint: EndpointConfig, options: QueryOptions, arrow: bool) -> Any:
    """A nondeterministic UDF (so Spark never re-evaluates it for one row) returning every result
    column as a struct. Each Python worker reuses one pooled client across rows and tasks."""
    from pyspark.sql import functions as F

    scope = _scope(options)

    def ask(key: str, prompt: str | None) -> tuple[Any, ...]:
        return result_values(sync_client_for(endpoint, options, scope=scope).query(key, prompt))

    return F.udf(ask, RESULT_DDL, useArrow=arrow).asNondeterministic()


def _scope(options: QueryOptions) -> str | None:
    """A budget is this job's own (a worker's share): its clients are not reused by the next job."""
    budgeted = options.max_total_tokens is not None or options.max_cost is not None
    return uuid.uuid4().hex if budgeted else None


def unwrap_spark_error(exc: Exception) -> Exception:
    """An LLMQueryError raised in an executor reaches the driver as a Spark exception: re-raise
    it as the original class with its message, so auth and config errors read the same."""
    text = str(exc)
    for cls in _subclasses(LLMQueryError):
        marker = f"{cls.__name__}: "
        if marker in text:
            message = text.split(marker, 1)[1].splitlines()[0]
            return cls(message)
    return exc


def _subclasses(cls: type[LLMQueryError]) -> list[type[LLMQueryError]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found
