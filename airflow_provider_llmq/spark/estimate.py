"""What asking a DataFrame's prompts would cost, counted before anything is sent.

The prompts stream to the driver one partition at a time (never the whole table) and are counted
with :class:`~airflow_provider_llmq.core.accounting.cost.TokenCounter`: tiktoken when it loads, else the
heuristic; the result says which.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from airflow_provider_llmq.core.accounting.cost import RequestEstimate, estimate_prompts
from airflow_provider_llmq.core.request.payload import DEFAULT_SYSTEM_PROMPT
from airflow_provider_llmq.spark.source import render_prompt

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

__all__ = ["estimate"]


def estimate(
    df: DataFrame,
    *,
    prompt_col: str = "prompt",
    prompt_template: str | None = None,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    model: str | None = None,
    max_tokens: int | None = None,
    expected_completion_tokens: int | None = None,
    prices: Mapping[str, Any] | None = None,
    dedupe: bool = True,
) -> RequestEstimate:
    """Requests, tokens and cost of asking every row of ``df``, without sending anything.

    :param df: the source rows.
    :param prompt_col: the column holding the prompt (unused with ``prompt_template``).
    :param prompt_template: builds the prompt from the row's ``{column}`` names, as the operators do.
    :param system_prompt: the system message sent with each prompt.
    :param model: the model or deployment ``prices`` are looked up by.
    :param max_tokens: the completion cap each request would send.
    :param expected_completion_tokens: the completion length expected per request.
    :param prices: model -> price per million tokens.
    :param dedupe: identical prompts are sent once (the operators' default).
    """
    prompts = df.select(render_prompt(prompt_col, prompt_template).alias("__prompt"))
    if dedupe:
        prompts = prompts.dropDuplicates(["__prompt"])
    return estimate_prompts(
        _stream(prompts),
        system_prompt=system_prompt,
        model=model,
        max_tokens=max_tokens,
        expected_completion_tokens=expected_completion_tokens,
        prices=prices,
    )


def _stream(prompts: DataFrame) -> Iterator[str | None]:
    for row in prompts.toLocalIterator(prefetchPartitions=False):
        yield row[0]
