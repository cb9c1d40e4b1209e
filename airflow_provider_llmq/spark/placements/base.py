"""What every placement is given, and what it promises."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.errors import LLMQueryConfigError, LLMQueryError
from airflow_provider_llmq.spark.phases import Phases

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from airflow_provider_llmq.core.accounting.progress import Progress
    from airflow_provider_llmq.core.request.options import QueryOptions
    from airflow_provider_llmq.spark.checkpoint import Checkpoint


@dataclass(frozen=True)
class Work:
    """One try's pending requests and where their results go.

    :param spark: the session.
    :param endpoint: where to send (the connection's endpoint).
    :param options: the run's request and retry settings.
    :param checkpoint: where results are settled.
    :param pending: requests with no settled result (``plan.pending_requests``).
    :param n_buckets: the hash buckets the requests are spread over.
    :param flush_rows: results per checkpoint write, at most.
    :param progress: counts settled requests.
    :param stop: set when the task is being stopped: send nothing more, keep what was answered.
    :param phases: the task's phase timer; a placement times its checkpoint writes as ``flush`` (the
        Batch API also its request files, uploads and collection).
    """

    spark: SparkSession
    endpoint: EndpointConfig
    options: QueryOptions
    checkpoint: Checkpoint
    pending: DataFrame
    n_buckets: int
    flush_rows: int
    progress: Progress
    stop: threading.Event = field(default_factory=threading.Event)
    phases: Phases = field(default_factory=Phases)


class PlacementStopped(LLMQueryError):
    """The run was asked to stop; what was answered is in the checkpoint."""


class Placement(Protocol):
    #: the placement counts what earlier tries of the run billed itself (the Batch API's ledger);
    #: False: the operator gives a try what the checkpoint's results say the budget has left
    keeps_its_own_ledger: ClassVar[bool]

    def run(self, work: Work) -> None:
        """Settles every pending request in the checkpoint; an ``LLMQueryError`` ends the run after
        what was answered is checkpointed (:class:`PlacementStopped` when ``work.stop`` was set)."""
        ...


def job_share(options: QueryOptions, spent: tuple[int, float], partitions: int) -> QueryOptions:
    """The budget of one partition of the next Spark job (UDF, executors) where the driver's
    ledger cannot serve it (:class:`~.budget_ledger.JobBudgets`): an equal share of what this try
    has left after the jobs before it (``spent``, read from their result files).

    Each partition's client keeps its own share, so a job spends at most what was left, plus what
    its requests in flight used beyond their reservation; a share too small for a request ends
    that partition's remaining rows ``budget_exceeded`` while another partition may still send,
    so a run can stop with up to ``partitions`` reservations of its budget unspent. A job whose
    share is 0 sends nothing: its rows all end ``budget_exceeded``."""
    if options.max_total_tokens is None and options.max_cost is None:
        return options
    parts = max(1, partitions)
    tokens = None
    if options.max_total_tokens is not None:
        tokens = max(0, options.max_total_tokens - spent[0]) // parts
    cost = None if options.max_cost is None else max(0.0, options.max_cost - spent[1]) / parts
    return dataclasses.replace(options, max_total_tokens=tokens, max_cost=cost)


def left_for_this_try(
    options: QueryOptions, checkpoint: Checkpoint
) -> tuple[QueryOptions, tuple[int, float]]:
    """A budget is the logical run's, not one try's: this try may spend what the checkpoint's result
    files say earlier tries of the run (a retry, a re-run after a kill, a clear) were billed. Returns
    the options with what is left and what was spent (requests a killed try had in flight when it
    died are not in the checkpoint: their usage never came back)."""
    if options.max_total_tokens is None and options.max_cost is None:
        return options, (0, 0.0)
    spent = checkpoint.spent(checkpoint.result_names())
    return job_share(options, spent, 1), spent


def portable(endpoint: EndpointConfig) -> EndpointConfig:
    """The endpoint as executors need it: a CA given as a driver-side path travels as its PEM text."""
    ca = endpoint.ca_cert
    if not ca or "-----BEGIN" in ca:
        return endpoint
    try:
        with open(ca, encoding="utf-8") as handle:
            pem = handle.read()
    except OSError as exc:
        raise LLMQueryConfigError(f"CA certificate file could not be read: {ca} ({exc.strerror})") from None
    return dataclasses.replace(endpoint, ca_cert=pem)
