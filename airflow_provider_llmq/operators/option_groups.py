"""The query operators' arguments by subject, for a DAG that reads by subject.

Forty keyword arguments side by side hide which ones belong together. A group names its subject::

    LLMQueryRateLimitedOperator(
        task_id="classify",
        source_table="reviews",
        output_table="labels",
        retry=RetryOptions(max_retries=8, patience=600),
        budget=BudgetOptions(max_cost=5.0, prices={"gpt-4o-mini": {"input": 0.15, "output": 0.6}}),
    )

The flat form (``max_retries=8``) stays accepted, and a group's fields are the flat arguments of the
same names and defaults. A field given both ways with two different values is refused; a group's
field left at its default leaves the flat argument as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.operators.outcome import DEFAULT_MAX_ERROR_RATIO

# mapped instances (.expand) each get their own checkpoint
DEFAULT_CHECKPOINT_KEY = (
    "{{ dag.dag_id }}/{{ task.task_id }}/{{ run_id }}"
    "{% if ti.map_index is not none and ti.map_index >= 0 %}/map-{{ ti.map_index }}{% endif %}"
)


@dataclass(frozen=True)
class RetryOptions:
    """How each request is retried and paced: the operator's arguments of the same names."""

    max_retries: int = 6
    request_timeout: float | None = None
    max_retry_wait: float = 60
    retry_backoff: float = 0.5
    adaptive: bool = True
    patience: float = 1800.0


@dataclass(frozen=True)
class BudgetOptions:
    """What the run may spend and how it is priced."""

    prices: dict[str, Any] | None = None
    max_total_tokens: int | None = None
    max_cost: float | None = None
    expected_completion_tokens: int | None = None
    estimate_only: bool = False


@dataclass(frozen=True)
class CheckpointOptions:
    """Where a run keeps what it settled, so that a retry or a re-run never pays twice."""

    chunk_size: int = 1000
    checkpoint_dir: str | None = None
    checkpoint_key: str = DEFAULT_CHECKPOINT_KEY
    keep_checkpoint: bool = False
    cache_path: str | None = None


@dataclass(frozen=True)
class StructuredOptions:
    """Structured output: the schema every answer follows, and how it lands in columns."""

    output_schema: Any = None  # a DDL string, a StructType or a JSON schema (dict)
    flatten_output: bool | str = False
    repair_invalid_output: bool = False


@dataclass(frozen=True)
class ErrorPolicy:
    """When rows that ended in error fail the task (after the output is written)."""

    on_error: str = "record"
    max_error_ratio: float | None = DEFAULT_MAX_ERROR_RATIO
    fail_on_empty: bool = False


#: the operator's argument naming each group
GROUPS: dict[str, type] = {
    "retry": RetryOptions,
    "budget": BudgetOptions,
    "checkpointing": CheckpointOptions,
    "structured": StructuredOptions,
    "errors": ErrorPolicy,
}


def apply_option_groups(operator: object, **groups: object) -> None:
    """Sets the operator's attributes from the groups given (None: not given).

    :raises LLMQueryConfigError: a group of the wrong type, or a field given flat and in a group
        with two different values.
    """
    for name, group in groups.items():
        if group is None:
            continue
        kind = GROUPS[name]
        if not isinstance(group, kind):
            raise LLMQueryConfigError(f"{name} must be a {kind.__name__}, got {type(group).__name__}")
        for field in dataclasses.fields(group):  # type: ignore[arg-type]  # a dataclass of GROUPS
            value, default = getattr(group, field.name), field.default
            if value == default:
                continue  # not set in the group: the flat argument stands
            flat = getattr(operator, field.name)
            if flat != default and flat != value:
                raise LLMQueryConfigError(
                    f"{field.name} is given twice, as {field.name}={flat!r} and as "
                    f"{name}={kind.__name__}({field.name}={value!r}): give it once"
                )
            setattr(operator, field.name, value)
