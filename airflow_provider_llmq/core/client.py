"""The two clients of the request engine, where callers have always imported them from.

``SyncClient`` (``requests``, :mod:`.sync_client`) and ``AsyncClient`` (``aiohttp``,
:mod:`.async_client`) perform the steps of one per-row policy (:mod:`.engine`): limiter slot, send,
classify, retry, and an adaptive rate learned from the answers. They share every rule about
payloads, errors, retries, pauses, limits and secrets, and differ only in I/O.
"""

from airflow_provider_llmq.core.async_client import AsyncClient
from airflow_provider_llmq.core.options import QueryOptions
from airflow_provider_llmq.core.sync_client import SyncClient

__all__ = ["AsyncClient", "QueryOptions", "SyncClient"]
