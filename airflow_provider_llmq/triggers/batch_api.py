"""The trigger a deferred :class:`LLMQueryBatchAPIOperator` waits on: it polls the task's batches in
the triggerer and fires once the task has something to do."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_llmq.core.batch.batch_api import BatchApiClient, BatchInfo
from airflow_provider_llmq.core.errors import LLMQueryError

MAX_POLL_FAILURES = 5  # polls in a row that failed on the network before the task is woken to decide


class LLMQueryBatchTrigger(BaseTrigger):
    """Polls Batch API batches; fires when every one has finished, or (a file waits for the
    enqueued-token quota) when any one has, or when a refused file is due to be sent again.

    It only reads: the task collects the results and creates batches when it resumes, with its
    checkpoint, so the triggerer writes nothing and a triggerer restart loses nothing. The
    connection is resolved in the triggerer, so no key travels in the trigger's arguments; with
    Entra ID, the triggerer process keeps its own token (shared by its triggers of the same
    credential, refreshed before it expires), as every llmq client does.

    :param llm_conn_id: the ``llmq`` connection.
    :param batch_ids: the batches to watch.
    :param poll_interval: seconds between polls.
    :param wake_on_any: fire as soon as any watched batch has finished (it frees enqueued tokens).
    :param wake_at: fire at this time (epoch seconds) at the latest; None for no such time.
    :param api_version: Azure ``api-version`` of the Batches calls; None: the connection's.
    :param cancel_on_kill: cancel the batches when a user kills the deferred task (their queued
        work is thrown away; what they answered is kept).
    """

    def __init__(
        self,
        *,
        llm_conn_id: str,
        batch_ids: list[str],
        poll_interval: float,
        wake_on_any: bool = False,
        wake_at: float | None = None,
        api_version: str | None = None,
        cancel_on_kill: bool = False,
    ) -> None:
        super().__init__()
        self.llm_conn_id = llm_conn_id
        self.batch_ids = list(batch_ids)
        self.poll_interval = float(poll_interval)
        self.wake_on_any = wake_on_any
        self.wake_at = wake_at
        self.api_version = api_version
        self.cancel_on_kill = cancel_on_kill

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "llm_conn_id": self.llm_conn_id,
                "batch_ids": self.batch_ids,
                "poll_interval": self.poll_interval,
                "wake_on_any": self.wake_on_any,
                "wake_at": self.wake_at,
                "api_version": self.api_version,
                "cancel_on_kill": self.cancel_on_kill,
            },
        )

    def _client(self) -> BatchApiClient:
        from airflow_provider_llmq.hooks.llmq import LLMQueryHook

        return BatchApiClient(
            LLMQueryHook(llm_conn_id=self.llm_conn_id).endpoint, api_version=self.api_version
        )

    def _statuses(self, client: BatchApiClient) -> list[BatchInfo]:
        return [client.get_batch(batch_id) for batch_id in self.batch_ids]

    def _due(self, infos: list[BatchInfo]) -> bool:
        """Whether the task has something to do: collect, or send a file again."""
        if self.wake_at is not None and time.time() >= self.wake_at:
            return True
        finished = [info for info in infos if not info.active]
        return bool(infos) and (len(finished) == len(infos) or (self.wake_on_any and bool(finished)))

    async def run(self) -> AsyncIterator[TriggerEvent]:
        # resolving the connection and each poll are blocking calls: never on the triggerer's loop
        client = await asyncio.to_thread(self._client)
        failures = 0
        try:
            while True:
                pause = self.poll_interval
                if self.wake_at is not None:
                    pause = max(0.0, min(pause, self.wake_at - time.time()))
                await asyncio.sleep(pause)
                if not self.batch_ids:
                    if self._due([]):
                        yield TriggerEvent({"status": "ready", "batches": {}})
                        return
                    continue
                try:
                    infos = await asyncio.to_thread(self._statuses, client)
                except LLMQueryError as exc:  # refused, or still failing after the client's retries
                    yield TriggerEvent({"status": "error", "message": str(exc)})
                    return
                except Exception as exc:
                    failures += 1
                    self.log.warning("llmq: polling batches failed (%d in a row): %s", failures, exc)
                    if failures >= MAX_POLL_FAILURES:
                        yield TriggerEvent({"status": "error", "message": f"{type(exc).__name__}: {exc}"})
                        return
                    continue
                failures = 0
                if self._due(infos):
                    yield TriggerEvent({"status": "ready", "batches": {i.id: i.status for i in infos}})
                    return
                self.log.debug("llmq: batches %s", {i.id: i.status for i in infos})
        finally:
            await asyncio.to_thread(client.close)

    async def on_kill(self) -> None:
        """A user killed the deferred task: cancel its batches only when asked to."""
        if not self.cancel_on_kill:
            return
        client = await asyncio.to_thread(self._client)
        try:
            for batch_id in self.batch_ids:
                try:
                    await asyncio.to_thread(client.cancel_batch, batch_id)
                    self.log.info("llmq: cancelled batch %s", batch_id)
                except Exception as exc:
                    self.log.warning("llmq: could not cancel batch %s: %s", batch_id, exc)
        finally:
            await asyncio.to_thread(client.close)


__all__ = ["LLMQueryBatchTrigger"]
