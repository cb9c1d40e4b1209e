"""The fifth operator: the OpenAI / Azure OpenAI Batch API, about half the price per token, on a
separate quota, for work that can wait; the same table of results as the other four."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.operators.base import LLMQueryBaseOperator
from airflow_provider_llmq.spark.batch_ledger import Ledger
from airflow_provider_llmq.spark.checkpoint import sanitize_key
from airflow_provider_llmq.spark.placements import Placement
from airflow_provider_llmq.spark.placements.batch_api import BatchAPIPlacement, BatchSettings, Waiting
from airflow_provider_llmq.spark.placements.batch_packs import estimate_packed
from airflow_provider_llmq.triggers.batch_api import LLMQueryBatchTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context
    from pyspark.sql import DataFrame

    from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
    from airflow_provider_llmq.core.request.options import QueryOptions
    from airflow_provider_llmq.spark.checkpoint import Checkpoint
    from airflow_provider_llmq.spark.placements import Work


class LLMQueryBatchAPIOperator(LLMQueryBaseOperator):
    """Sends the pending requests through the Batch API: JSONL request files (one line per request
    key, split at the API's limits), one batch per file, then every answer mapped back by
    ``custom_id`` into the usual result columns and written with Spark, as the other four do.

    Deferrable by default: while the batches run, the task waits in the triggerer, not on a worker
    slot. The checkpoint records each step (request files, uploads, the intent to create a batch
    and its id), and each batch's metadata names the checkpoint key and its file's digest, so a
    retry, a resume or a re-run with the same ``checkpoint_key`` re-attaches instead of paying again.
    Requests a batch never ran (expired, cancelled) and transient line errors are asked by the next
    try; on the last try they are recorded (``batch_expired``, ``batch_cancelled``, ``batch_failed``).
    A file refused for the enqueued-token quota waits and goes again when an earlier batch finishes;
    one refused while nothing else of the run runs is larger than the whole quota, and is split.

    ``max_total_tokens`` / ``max_cost`` hold across tries: a file goes out only when its whole
    estimate (prompt tokens counted before sending + ``max_tokens``, or
    ``expected_completion_tokens``) fits beside what the run's batches billed and what those still
    running hold; what does not fit is split, waits for their bill, or ends ``budget_exceeded``.

    With ``rows_per_request``, a request line holds a pack of rows in the live envelope: fewer
    lines, and the system prompt once per pack. Each row is matched to its answer by id and checked
    on its own; a row missing, doubled or unknown in a pack's answer is asked again, and a line that
    fails whole (a content filter, an unusable answer, a context length, a 5xx) is asked again as two
    halves, down to single rows, in re-ask files of the same round (one more batch each level).

    :param deferrable: wait in the triggerer (True) or poll in the task (False).
    :param poll_interval: seconds between polls of the batches.
    :param max_requests_per_file: requests per request file, at most; the API's own limit (OpenAI
        50,000, Azure 100,000) applies anyway, and so does 200 MB per file.
    :param cancel_on_kill: a killed task cancels its live batches (their queued work is lost, their
        answers kept); False leaves them running for the retry to re-attach.
    :param batch_api_version: Azure ``api-version`` of the Files and Batches calls (the Batch API
        needs 2024-10-21 or later); None keeps the connection's.
    """

    def __init__(
        self,
        *,
        deferrable: bool = True,
        poll_interval: float = 60.0,
        max_requests_per_file: int | None = None,
        cancel_on_kill: bool = False,
        batch_api_version: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.max_requests_per_file = max_requests_per_file
        self.cancel_on_kill = cancel_on_kill
        self.batch_api_version = batch_api_version

    def execute(self, context: Context) -> dict[str, Any]:
        ti = context.get("ti")
        if ti is None:  # called outside Airflow: this call is the whole run, there is no triggerer
            self._try_id, self._last_try, self._defers = self.task_id, True, False
        else:
            task = f"{ti.dag_id}/{ti.task_id}/{ti.run_id}/{ti.map_index}"
            self._try_id = f"{task}#{ti.try_number}"
            self._last_try = int(ti.try_number or 1) > int(getattr(ti, "max_tries", 0) or 0)
            self._defers = self.deferrable
        return super().execute(context)

    def on_kill(self) -> None:
        """Stops the task; with ``cancel_on_kill`` its live batches are cancelled too (their queued
        work is lost, their answers kept), else they run on and the retry re-attaches to them. A
        task killed while deferred is stopped in the triggerer, whose trigger does the same."""
        super().on_kill()

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resumed by the trigger: the same plan again, which re-attaches to the batches, collects
        what finished, sends what waited for quota, and writes the output once nothing is left."""
        if event and event.get("status") == "error":
            self.log.warning("llmq: the trigger stopped polling: %s", event.get("message"))
        else:
            self.log.info("llmq: batches ready: %s", (event or {}).get("batches"))
        return self.execute(context)

    def _placement(self) -> Placement:
        # a batch is answered at once: there is no second request in which to repair an answer
        if self.repair_invalid_output:
            raise LLMQueryConfigError(
                "repair_invalid_output cannot apply to the Batch API (a batch is sent whole); use a "
                "live operator"
            )
        budgeted = [n for n in ("max_total_tokens", "max_cost") if getattr(self, n) is not None]
        capped = "max_tokens" in (self.request_params or {}) or "max_completion_tokens" in (
            self.request_params or {}
        )
        if budgeted and not capped and self.expected_completion_tokens is None:
            # a batch cannot be stopped once created: each request's completion must be counted
            raise LLMQueryConfigError(
                f"{', '.join(budgeted)} on the Batch API needs each request's completion counted before "
                "its batch is created: set request_params max_tokens (a bound), or "
                "expected_completion_tokens (an expectation, not a bound)"
            )
        if not self.poll_interval > 0:
            raise LLMQueryConfigError(f"poll_interval must be positive, got {self.poll_interval!r}")
        if self.max_requests_per_file is not None and self.max_requests_per_file < 1:
            raise LLMQueryConfigError(f"max_requests_per_file must be >= 1, got {self.max_requests_per_file}")
        placement = BatchAPIPlacement(
            BatchSettings(
                checkpoint_key=sanitize_key(self.checkpoint_key),
                owner=self._try_id,
                last_try=self._last_try,
                max_requests_per_file=self.max_requests_per_file,
                poll_interval=float(self.poll_interval),
                cancel_on_kill=self.cancel_on_kill,
                api_version=self.batch_api_version,
            )
        )
        return _Deferring(placement, self) if self._defers else placement

    def _defer_to(self, waiting: Waiting) -> NoReturn:
        wake_at = None if waiting.wake_after is None else time.time() + waiting.wake_after
        self.log.info(
            "llmq: deferring while %s; polled every %s s in the triggerer",
            waiting.describe(),
            self.poll_interval,
        )
        self.defer(
            trigger=LLMQueryBatchTrigger(
                llm_conn_id=self.llm_conn_id,
                batch_ids=list(waiting.batch_ids),
                poll_interval=float(self.poll_interval),
                wake_on_any=waiting.wake_on_any,
                wake_at=wake_at,
                api_version=self.batch_api_version,
                cancel_on_kill=self.cancel_on_kill,
            ),
            method_name="execute_complete",
        )

    def _summary_completion(self, checkpoint: Checkpoint) -> Callable[[dict[str, Any]], None] | None:
        settled_before = self._ledger(checkpoint).settled_by(self._try_id)  # before a deferral

        def complete(summary: dict[str, Any]) -> None:
            summary["resumed_requests"] = max(0, summary["resumed_requests"] - settled_before)
            summary["batch_api"] = self._ledger(checkpoint).summary()

        return complete

    def _estimate(
        self, pending: DataFrame, rows: int, options: QueryOptions, endpoint: EndpointConfig
    ) -> dict[str, Any]:
        """``estimate_only``: with ``rows_per_request``, the request lines a round would send, packed
        and counted as the budget counts them (the system prompt once per line)."""
        if not options.packed:
            return super()._estimate(pending, rows, options, endpoint)
        found = estimate_packed(pending, options, endpoint)
        self.log.info("llmq estimate (nothing sent): %s", found.to_dict())
        return {"estimate_only": True, "rows": rows, "errors": 0, "errors_by_code": {}, **found.to_dict()}

    def _new_result_names(self, checkpoint: Checkpoint, before: set[str]) -> list[str]:
        # this try's answers may have been collected by an earlier resume of it (a quota wait)
        names = super()._new_result_names(checkpoint, before)
        existing = set(checkpoint.result_names())
        earlier = [n for n in self._ledger(checkpoint).results_of(self._try_id) if n in existing]
        return sorted(set(names) | set(earlier))

    def _ledger(self, checkpoint: Checkpoint) -> Ledger:
        manifest = checkpoint.read_manifest()
        digest = manifest.digest() if manifest is not None else ""
        return Ledger.load(checkpoint, digest, sanitize_key(self.checkpoint_key))


@dataclass(frozen=True)
class _Deferring:
    """The placement, run one pass at a time: while batches run, the task defers to the trigger."""

    placement: BatchAPIPlacement
    operator: LLMQueryBatchAPIOperator
    keeps_its_own_ledger: ClassVar[bool] = True  # the placement's batches.json

    def run(self, work: Work) -> None:
        waiting = self.placement.step(work)
        if waiting is not None:
            self.operator._defer_to(waiting)  # raises TaskDeferred: the lease is released on the way out


__all__ = ["LLMQueryBatchAPIOperator"]
