"""The prompts' source: read exactly one of a query, a table or a path; check it before any request
is sent; render each row's prompt as a Spark column."""

from __future__ import annotations

import re
import string
from typing import TYPE_CHECKING, Any

from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.spark.schema import LLMQ_ROW_ID, output_columns

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

INTERNAL_PREFIX = "__llmq_"


def check_one_source(**sources: str | None) -> None:
    """Exactly one of the given sources (``sql``, ``source_table``, ``source_path``) is set."""
    given = [name for name, value in sources.items() if value]
    if len(given) != 1:
        raise LLMQueryConfigError(f"give exactly one source of {', '.join(sources)} (got {given or 'none'})")


def read_source(
    spark: SparkSession,
    *,
    sql: str | None = None,
    source_table: str | None = None,
    source_path: str | None = None,
    source_format: str = "parquet",
) -> DataFrame:
    """The prompts' source: exactly one of a query, a table or a path."""
    check_one_source(sql=sql, source_table=source_table, source_path=source_path)
    if sql:
        return spark.sql(sql)
    if source_table:
        return spark.table(source_table)
    assert source_path is not None
    return spark.read.format(source_format).load(source_path)


def template_fields_of(prompt_template: str) -> list[str]:
    """The ``{column}`` names a prompt template refers to."""
    names = []
    for _, field, spec, conversion in string.Formatter().parse(prompt_template):
        if field is None:
            continue
        if not field or spec or conversion or not re.fullmatch(r"[^\[\].!:]+", field):
            raise LLMQueryConfigError(
                f"prompt_template field {{{field}}} is not a plain column name: use {{column}} only "
                "(double braces {{ }} for a literal brace)"
            )
        names.append(field)
    return names


def render_prompt(prompt_col: str, prompt_template: str | None) -> Any:
    """The prompt as a Spark column: ``prompt_col`` as text, or ``prompt_template`` filled from the row
    (a null field renders as empty text)."""
    from pyspark.sql import functions as F

    if prompt_template is None:
        return F.col(f"`{prompt_col}`").cast("string")
    parts = []
    for literal, field, _, _ in string.Formatter().parse(prompt_template):
        if literal:
            parts.append(F.lit(literal))
        if field is not None:
            parts.append(F.coalesce(F.col(f"`{field}`").cast("string"), F.lit("")))
    return F.concat(*parts) if parts else F.lit("")


def validate_source(
    df: DataFrame, *, prompt_col: str, id_col: str | None, prompt_template: str | None, response_col: str
) -> None:
    """Errors a user can fix, raised before any request is sent."""
    columns = df.columns
    needed = template_fields_of(prompt_template) if prompt_template is not None else [prompt_col]
    missing = [name for name in needed if name not in columns]
    if missing:
        what = "prompt_template refers to" if prompt_template is not None else "prompt_col is"
        raise LLMQueryConfigError(f"{what} missing column(s) {missing}; the source has {columns}")
    if id_col is not None and id_col not in columns:
        raise LLMQueryConfigError(f"id_col {id_col!r} is not a column of the source; it has {columns}")
    if id_col is None and LLMQ_ROW_ID in columns:
        raise LLMQueryConfigError(
            f"the source already has a column {LLMQ_ROW_ID!r}: pass id_col={LLMQ_ROW_ID!r} to use it"
        )
    taken = set(output_columns(response_col)).intersection(columns)
    if taken:
        raise LLMQueryConfigError(
            f"the source already has result column(s) {sorted(taken)}: rename them or set response_col"
        )
    internal = [name for name in columns if name.startswith(INTERNAL_PREFIX)]
    if internal:
        raise LLMQueryConfigError(f"column names starting with {INTERNAL_PREFIX} are reserved: {internal}")
