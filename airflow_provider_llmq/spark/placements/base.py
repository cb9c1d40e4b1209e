"""What every placement is given, and what it promises."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from airflow_provider_llmq.core.endpoint import EndpointConfig
from airflow_provider_llmq.core.errors import LLMQueryConfigError, LLMQueryError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from airflow_provider_llmq.core.options import QueryOptions
    from airflow_provider_llmq.core.progress import Progress
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


class PlacementStopped(LLMQueryError):
    """The run was asked to stop; what was answered is in the checkpoint."""


class Placement(Protocol):
    def run(self, work: Work) -> None:
        """Settles every pending request in the checkpoint; an ``LLMQueryError`` ends the run after
        what was answered is checkpointed (:class:`PlacementStopped` when ``work.stop`` was set)."""
        ...


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
