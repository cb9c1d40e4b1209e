"""Methods 2-4 on the executors: each Spark partition runs its own event loop or thread pool
inside ``mapInArrow``, one Spark job per bucket, each job's results committed to the checkpoint by
Spark itself (so the checkpoint lives wherever the cluster can write).

The global caps hold across the cluster: a job has at most as many partitions as can run at once,
and each partition gets an equal share of ``max_concurrency``, ``requests_per_minute`` and
``tokens_per_minute``, never more than the whole together; with fewer concurrency units than task
slots, the job has that many partitions of one each.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
import pyarrow.fs as pafs

from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.spark.placements.base import PlacementStopped, Work, portable
from airflow_provider_llmq.spark.placements.budget_ledger import JobBudgets
from airflow_provider_llmq.spark.placements.driver import QueryMethod
from airflow_provider_llmq.spark.placements.udf import unwrap_spark_error
from airflow_provider_llmq.spark.plan import BUCKET_COL, bucket_of, bucket_sizes, job_groups
from airflow_provider_llmq.spark.schema import KEY_COL, PROMPT_COL, RESULT_DDL, results_batch
from airflow_provider_llmq.spark.session import default_parallelism

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
    from airflow_provider_llmq.core.request.options import QueryOptions

_OUTPUT_DDL = f"`{KEY_COL}` string, {RESULT_DDL}"
_BATCH_ROWS = 500  # results handed back to Spark per Arrow batch
JOB_SECONDS = 30.0  # how long a bucket job should run, once the rate is known
_STAGED = "pending-"  # the pending requests of one try, one folder per bucket


@dataclass(frozen=True)
class Share:
    """What one partition may use: ``partitions`` of these together are the global caps."""

    partitions: int
    concurrency: int
    requests_per_minute: float | None
    tokens_per_minute: float | None


def share_caps(concurrency: int, options: QueryOptions, slots: int) -> Share:
    """Splits the global caps between the partitions that can run at once."""
    if concurrency < 1:
        raise LLMQueryConfigError(f"the concurrency must be >= 1, got {concurrency}")
    partitions = max(1, min(slots, concurrency))
    rpm, tpm = options.requests_per_minute, options.tokens_per_minute
    return Share(
        partitions=partitions,
        concurrency=concurrency // partitions,
        requests_per_minute=rpm / partitions if rpm else None,
        tokens_per_minute=tpm / partitions if tpm else None,
    )


@dataclass(frozen=True)
class ExecutorPlacement:
    """Runs a core method in every partition of a Spark job.

    :param method: a core method, called as ``method(endpoint, rows, options=..., **{concurrency_arg: n})``.
    :param concurrency_arg: the method's scheduling argument (``max_concurrency``, ``batch_size``,
        ``max_workers``).
    :param concurrency: its global value, shared between the partitions.
    :param parallelism: task slots, where Spark cannot tell them (Spark Connect); None reads them.
    :param budget_ledger: with a budget, the partitions draw it from a ledger this process serves;
        False gives each partition a fixed share of it (what is left where Spark Connect runs).
    """

    keeps_its_own_ledger: ClassVar[bool] = False

    method: QueryMethod
    concurrency_arg: str
    concurrency: int
    parallelism: int | None = None
    budget_ledger: bool = True

    def run(self, work: Work) -> None:
        pending, staged = _stage(work)
        try:
            self._run(dataclasses.replace(work, pending=pending))
        finally:
            work.checkpoint.fs.delete_dir(staged)

    def _run(self, work: Work) -> None:
        from pyspark.sql import functions as F

        slots = self.parallelism or default_parallelism(work.spark)
        share = share_caps(self.concurrency, work.options, slots)
        endpoint = portable(work.endpoint)
        budgets = JobBudgets(work, share.partitions, self.budget_ledger)
        # The first job asks one bucket; later jobs are sized to about JOB_SECONDS at the rate
        # measured so far, so that each Spark job's fixed cost (scheduling, worker start, TLS
        # handshakes, the commit) is paid rarely while a killed driver still loses at most about
        # that much work (a job's results are committed when it ends).
        remaining = bucket_sizes(work.pending)
        rate = 0.0
        written: list[str] = []
        while remaining:
            if work.stop.is_set():
                raise PlacementStopped("stopped between two bucket jobs")
            group = job_groups(remaining, rate * JOB_SECONDS)[0]
            started = time.monotonic()
            rows = bucket_of(work.pending, *group).repartition(share.partitions, F.col(KEY_COL))
            # a budget: the partitions draw from the driver's ledger, or share what is left
            with budgets.job(written) as options:
                ask = _partition_asker(
                    self.method,
                    endpoint,
                    dataclasses.replace(
                        options,
                        requests_per_minute=share.requests_per_minute,
                        tokens_per_minute=share.tokens_per_minute,
                    ),
                    {self.concurrency_arg: share.concurrency},
                )
                try:
                    written_file = work.checkpoint.write_frame(rows.mapInArrow(ask, _OUTPUT_DDL))
                except Exception as exc:
                    if work.stop.is_set():
                        raise PlacementStopped("stopped: the running bucket job was cancelled") from None
                    raise unwrap_spark_error(exc) from None
                written.append(written_file)
            asked = sum(remaining.pop(bucket) for bucket in group)
            rate = asked / max(time.monotonic() - started, 1e-3)
            work.progress.add(asked, work.checkpoint.tally(written_file))


def _stage(work: Work) -> tuple[DataFrame, str]:
    """The pending requests written once under the checkpoint, one folder per bucket, and read back
    (with the folder's path, to remove it). A bucket job then reads only its buckets' files: without
    this, every job planned the pending requests again (the whole input, its dedupe, the anti-join
    with the results), so the Spark work per job grew with the table and the run's quadratically."""
    fs, root = work.checkpoint.fs, work.checkpoint.root
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.base_name.startswith(_STAGED):  # left by a killed try
            fs.delete_dir(info.path)
    name = f"{_STAGED}{uuid.uuid4().hex[:12]}"
    uri = f"{work.checkpoint.uri}/{name}"
    frame = work.pending.select(KEY_COL, PROMPT_COL, BUCKET_COL)
    frame.write.partitionBy(BUCKET_COL).parquet(uri)
    # the schema given: an empty folder has none to infer
    return work.spark.read.schema(frame.schema).parquet(uri), f"{root}/{name}"


def _partition_asker(
    method: QueryMethod, endpoint: EndpointConfig, options: QueryOptions, scheduling: dict[str, int]
) -> Any:
    """What each partition runs: its (key, prompt) rows through the method, results back as Arrow
    batches. The key travels in this closure, never in Spark conf."""

    def ask(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        rows = (
            (key, prompt)
            for batch in batches
            for key, prompt in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True)
        )
        results = method(endpoint, rows, options=options, **scheduling)
        done = []
        for result in results:
            done.append(result)
            if len(done) >= _BATCH_ROWS:
                yield results_batch(done)
                done = []
        if done:
            yield results_batch(done)

    return ask
