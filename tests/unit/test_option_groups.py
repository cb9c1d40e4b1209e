"""The operators' arguments by subject: a group's fields are the flat arguments of the same names
and defaults, a group sets them, and a field given both ways with two values is refused."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.operators.base import LLMQueryBaseOperator
from airflow_provider_llmq.operators.llmq import LLMQueryRateLimitedOperator
from airflow_provider_llmq.operators.option_groups import (
    GROUPS,
    BudgetOptions,
    CheckpointOptions,
    ErrorPolicy,
    RetryOptions,
)

COMMON = {"source_table": "t", "output_table": "o"}


@pytest.mark.parametrize("name", list(GROUPS))
def test_a_group_has_the_flat_arguments_names_and_defaults(name: str) -> None:
    flat = inspect.signature(LLMQueryBaseOperator.__init__).parameters
    assert name in flat and flat[name].default is None
    for field in dataclasses.fields(GROUPS[name]):
        assert field.name in flat, field.name
        assert flat[field.name].default == field.default, field.name


def test_groups_set_the_operator_and_the_flat_form_still_works() -> None:
    grouped = LLMQueryRateLimitedOperator(
        task_id="grouped",
        retry=RetryOptions(max_retries=9, patience=60.0),
        budget=BudgetOptions(max_cost=2.5),
        checkpointing=CheckpointOptions(checkpoint_key="k/{{ ds }}", chunk_size=50),
        errors=ErrorPolicy(on_error="fail"),
        max_retry_wait=5,  # flat and grouped side by side: different fields
        **COMMON,
    )
    assert (grouped.max_retries, grouped.patience, grouped.max_retry_wait) == (9, 60.0, 5)
    assert (grouped.max_cost, grouped.chunk_size, grouped.on_error) == (2.5, 50, "fail")
    assert grouped.checkpoint_key == "k/{{ ds }}" and "checkpoint_key" in grouped.template_fields
    flat = LLMQueryRateLimitedOperator(
        task_id="flat", max_retries=9, patience=60.0, max_retry_wait=5, **COMMON
    )
    assert flat._query_options() == dataclasses.replace(grouped._query_options(), max_cost=None)
    # the same value both ways is one value, not a conflict
    same = LLMQueryRateLimitedOperator(
        task_id="same", max_retries=9, retry=RetryOptions(max_retries=9), **COMMON
    )
    assert same.max_retries == 9


def test_a_field_given_twice_and_a_group_of_the_wrong_kind_are_refused() -> None:
    with pytest.raises(
        LLMQueryConfigError, match=r"max_retries is given twice.*RetryOptions\(max_retries=9\)"
    ):
        LLMQueryRateLimitedOperator(
            task_id="twice", max_retries=3, retry=RetryOptions(max_retries=9), **COMMON
        )
    with pytest.raises(LLMQueryConfigError, match="budget must be a BudgetOptions, got RetryOptions"):
        LLMQueryRateLimitedOperator(task_id="kind", budget=RetryOptions(), **COMMON)  # type: ignore[arg-type]
