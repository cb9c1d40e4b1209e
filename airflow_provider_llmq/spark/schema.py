"""The result columns, declared once: their names, Spark DDL, Arrow schema and how a
:class:`QueryResult` fills them. A new result column is one line in ``_RESULT_FIELDS``."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from airflow_provider_llmq.core.accounting.result import QueryResult

LLMQ_ROW_ID = "llmq_row_id"  # the id column llmq assigns when the user gives no id_col
RESPONSE_COL = "llmq_response"  # name inside the checkpoint; renamed to response_col on output
STATUS_COL = "llmq_status"
ERROR_CODE_COL = "llmq_error_code"
ERROR_COL = "llmq_error"
ATTEMPTS_COL = "llmq_attempts"
PROMPT_TOKENS_COL = "llmq_prompt_tokens"
COMPLETION_TOKENS_COL = "llmq_completion_tokens"
THROTTLED_COL = "llmq_throttled"
COST_COL = "llmq_cost"
CACHED_COL = "llmq_cached"
PACK_ROWS_COL = "llmq_pack_rows"
REQUESTS_COL = "llmq_requests"
TOKENS_SAVED_COL = "llmq_prompt_tokens_saved"
MISSING_RESULT = "missing_result"

# (name, Spark SQL type, pyarrow type, QueryResult field)
_RESULT_FIELDS: tuple[tuple[str, str, pa.DataType, str], ...] = (
    (RESPONSE_COL, "string", pa.string(), "response"),
    (STATUS_COL, "string", pa.string(), "status"),
    (ERROR_CODE_COL, "string", pa.string(), "error_code"),
    (ERROR_COL, "string", pa.string(), "error_message"),
    ("llmq_http_status", "int", pa.int32(), "http_status"),
    (ATTEMPTS_COL, "int", pa.int32(), "attempts"),
    (PROMPT_TOKENS_COL, "int", pa.int32(), "prompt_tokens"),
    (COMPLETION_TOKENS_COL, "int", pa.int32(), "completion_tokens"),
    ("llmq_latency_ms", "double", pa.float64(), "latency_ms"),
    ("llmq_finish_reason", "string", pa.string(), "finish_reason"),
    (THROTTLED_COL, "int", pa.int32(), "throttled"),
    (COST_COL, "double", pa.float64(), "cost"),
    (CACHED_COL, "boolean", pa.bool_(), "cached"),
    (PACK_ROWS_COL, "int", pa.int32(), "pack_rows"),
    (REQUESTS_COL, "double", pa.float64(), "requests"),
    (TOKENS_SAVED_COL, "int", pa.int32(), "prompt_tokens_saved"),
)
RESULT_COLUMNS: tuple[str, ...] = tuple(name for name, *_ in _RESULT_FIELDS)
RESULT_SQL_TYPES: dict[str, str] = {name: sql_type for name, sql_type, *_ in _RESULT_FIELDS}
RESULT_DDL = ", ".join(f"`{name}` {sql_type}" for name, sql_type, *_ in _RESULT_FIELDS)
RESULT_ARROW_FIELDS: tuple[tuple[str, pa.DataType], ...] = tuple(
    (name, arrow) for name, _, arrow, _ in _RESULT_FIELDS
)


def result_values(result: QueryResult) -> tuple[Any, ...]:
    """A result's values in the order of ``RESULT_COLUMNS`` / ``RESULT_DDL``."""
    return tuple(getattr(result, attribute) for *_, attribute in _RESULT_FIELDS)


def result_columns(results: list[QueryResult]) -> dict[str, list[Any]]:
    """Results as columns (name -> values), in the order of ``RESULT_COLUMNS``."""
    rows = [result_values(result) for result in results]
    return {name: [row[index] for row in rows] for index, name in enumerate(RESULT_COLUMNS)}


def results_batch(results: list[QueryResult], key_type: pa.DataType | None = None) -> pa.RecordBatch:
    """Results as one Arrow batch: ``KEY_COL`` (the row ids, as strings unless ``key_type`` says
    otherwise) and the result columns: what a placement's ``mapInArrow`` yields."""
    key_type = key_type or pa.string()
    ids = [r.row_id for r in results]
    keys = [str(i) for i in ids] if pa.types.is_string(key_type) else ids
    schema = pa.schema([(KEY_COL, key_type), *RESULT_ARROW_FIELDS])
    return pa.RecordBatch.from_pydict({KEY_COL: keys, **result_columns(results)}, schema=schema)


def output_columns(response_col: str) -> list[str]:
    """The result columns as they appear on output rows."""
    return [response_col if name == RESPONSE_COL else name for name in RESULT_COLUMNS]


# internal columns of the materialized input and the checkpoint: never on output rows
PROMPT_COL = "__llmq_prompt"
KEY_COL = "__llmq_key"  # the request key: sha256 of the prompt when deduped, else the row id
