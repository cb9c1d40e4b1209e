"""What a Batch API run is given (:class:`BatchSettings`) and what one pass of it leaves it waiting
for (:class:`Waiting`), shared by the placement, the operator and its trigger."""

from __future__ import annotations

from dataclasses import dataclass

from airflow_provider_llmq.core.batch.batch_api import MAX_FILE_BYTES, LLMQueryBatchError

__all__ = ["BatchSettings", "LLMQueryBatchIncompleteError", "Waiting"]


@dataclass(frozen=True)
class BatchSettings:
    """How a Batch API run goes.

    :param checkpoint_key: what each batch's metadata names, with its file's digest.
    :param owner: this try (task instance and try number): a new try plans a new round once the
        last one is over, the same try (resumed after a deferral) carries on with it.
    :param last_try: no retry is left: requests the batches never ran are recorded (as
        ``batch_expired``, ``batch_cancelled`` or ``batch_failed``) instead of left to the next try.
    :param max_requests_per_file: lowers the API's limit (OpenAI 50,000, Azure 100,000).
    :param max_file_bytes: bytes per request file.
    :param poll_interval: seconds between polls.
    :param cancel_on_kill: a stop cancels the live batches (their queued work is thrown away).
    :param api_version: Azure ``api-version`` of the Files and Batches calls; None: the connection's.
    """

    checkpoint_key: str
    owner: str
    last_try: bool = True
    max_requests_per_file: int | None = None
    max_file_bytes: int = MAX_FILE_BYTES
    poll_interval: float = 60.0
    cancel_on_kill: bool = False
    api_version: str | None = None


@dataclass(frozen=True)
class Waiting:
    """What a run waits for.

    :param batch_ids: batches the API is working on.
    :param wake_on_any: a file waits for the enqueued-token quota: any finished batch frees some.
    :param wake_after: with no batch running, seconds until a refused file is sent again.
    :param states: the status of each of ``batch_ids``.
    :param files_waiting: request files waiting for the enqueued-token quota or the budget.
    """

    batch_ids: tuple[str, ...]
    wake_on_any: bool = False
    wake_after: float | None = None
    states: tuple[str, ...] = ()  # of batch_ids
    files_waiting: int = 0  # for the quota or the budget

    def describe(self, shown: int = 5) -> str:
        """What the run waits for, for the log: the batches that run (ids and states, a few)."""
        named = [f"{b} ({state})" for b, state in zip(self.batch_ids, self.states, strict=False)]
        more = f" and {len(named) - shown} more" if len(named) > shown else ""
        text = f"batches {', '.join(named[:shown])}{more} run" if named else "no batch runs"
        if self.files_waiting:
            text += f"; {self.files_waiting} request files wait for the enqueued-token quota or the budget"
        if self.wake_after is not None and not named:
            text += f"; next attempt in {self.wake_after:.0f} s"
        return text


class LLMQueryBatchIncompleteError(LLMQueryBatchError):
    """The batches are over and some requests never ran (expired, cancelled) or failed transiently;
    their answers are checkpointed and the next try asks only the rest."""
