"""Many rows in one request (``rows_per_request``): a layer above the per-row engine.

``envelope`` builds a pack's request, ``unpack`` matches its answer back to the rows by id,
``sizer`` picks the pack size, ``runner`` is the pack policy (split, re-ask, per-row usage).
"""

from airflow_provider_llmq.core.packing.envelope import PACK_INSTRUCTION, PACK_SCHEMA_NAME, PackedChatRequest
from airflow_provider_llmq.core.packing.runner import PackContext, group_rows, pack_attempts, pack_policy_of
from airflow_provider_llmq.core.packing.sizer import AUTO, PackSizer, PackStats

__all__ = [
    "AUTO",
    "PACK_INSTRUCTION",
    "PACK_SCHEMA_NAME",
    "PackContext",
    "PackSizer",
    "PackStats",
    "PackedChatRequest",
    "group_rows",
    "pack_attempts",
    "pack_policy_of",
]
