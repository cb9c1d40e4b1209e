"""Method 1 with ``rows_per_request``: the executors ask packs of rows instead of one row each.

A scalar UDF sees one row at a time, so packs are formed over each Arrow batch of a partition
(``mapInArrow``): the partition's rows are grouped by the worker's pooled client (its sizer), each
pack asked through the pack policy, and every row comes back with its own result columns.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from airflow_provider_llmq.core.methods import sync_client_for
from airflow_provider_llmq.core.packing import group_rows
from airflow_provider_llmq.spark.schema import KEY_COL, PROMPT_COL, RESULT_DDL, results_batch

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from airflow_provider_llmq.core.accounting.result import QueryResult
    from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
    from airflow_provider_llmq.core.request.options import QueryOptions

__all__ = ["packed_answers"]


def packed_answers(
    rows: DataFrame, endpoint: EndpointConfig, options: QueryOptions, scope: str | None, threads: int
) -> DataFrame:
    """``KEY_COL`` and the result columns of every row of ``rows`` (``KEY_COL``, ``PROMPT_COL``),
    asked in packs; ``threads`` packs in flight per Python worker."""
    key_type = rows.schema[KEY_COL].dataType.simpleString()

    def ask(batches: Iterator[Any]) -> Iterator[Any]:
        client = sync_client_for(endpoint, options, scope=scope)
        assert client.sizer is not None
        for batch in batches:
            table = batch.to_pydict()
            items = list(zip(table[KEY_COL], table[PROMPT_COL], strict=True))
            packs = group_rows(items, client.sizer)
            results: list[QueryResult] = []
            if threads > 1:
                with ThreadPoolExecutor(threads, thread_name_prefix="llmq-pack") as pool:
                    for answered in pool.map(client.query_pack, packs):
                        results.extend(answered)
            else:
                for pack in packs:
                    results.extend(client.query_pack(pack))
            yield results_batch(results, batch.schema.field(KEY_COL).type)

    return rows.select(KEY_COL, PROMPT_COL).mapInArrow(ask, f"`{KEY_COL}` {key_type}, {RESULT_DDL}")
