"""``@task.llmq``: a TaskFlow task whose function returns the prompts (a Spark DataFrame, a table
name or SQL) and which then queries every row like ``LLMQueryRateLimitedOperator``, with the same
checkpoint, output and summary. No extract-to-path step between two tasks."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk.bases.decorator import DecoratedOperator, TaskDecorator, task_decorator_factory

from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.operators.llmq import LLMQueryRateLimitedOperator

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig

SPARK_ARG = "spark"


class _LLMQueryDecoratedOperator(DecoratedOperator, LLMQueryRateLimitedOperator):
    """The function's prompts, queried by the rate-limited operator.

    :param python_callable: receives the Spark session as its ``spark`` argument and returns a
        DataFrame, a table name, or SQL (any text with a space in it).
    """

    custom_operator_name: ClassVar[str] = "@task.llmq"
    template_fields: Sequence[str] = (
        *DecoratedOperator.template_fields,
        *LLMQueryRateLimitedOperator.template_fields,
    )

    def __init__(
        self,
        *,
        python_callable: Callable[..., Any],
        op_args: Collection[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if SPARK_ARG not in inspect.signature(python_callable).parameters:
            raise LLMQueryConfigError(
                f"an @task.llmq function takes the Spark session as its {SPARK_ARG!r} argument, e.g. "
                "def prompts(spark): return spark.table('reviews')"
            )
        # filled in when the task runs: the session exists only then
        kwargs_with_spark = {**(op_kwargs or {}), SPARK_ARG: None}
        super().__init__(
            python_callable=python_callable, op_args=op_args, op_kwargs=kwargs_with_spark, **kwargs
        )

    def _check_source(self) -> None:
        pass  # the function is the source

    def _read_source(self, spark: SparkSession) -> DataFrame:
        from pyspark.sql import DataFrame as SparkDataFrame

        prompts = self.python_callable(*self.op_args, **{**self.op_kwargs, SPARK_ARG: spark})
        if isinstance(prompts, str):
            prompts = (
                spark.sql(prompts) if any(c.isspace() for c in prompts.strip()) else spark.table(prompts)
            )
        if not isinstance(prompts, SparkDataFrame):
            raise LLMQueryConfigError(
                f"the @task.llmq function returned {type(prompts).__name__}: return a Spark DataFrame, "
                "a table name or SQL"
            )
        return self._validated(prompts)

    def _fingerprint(self, source: DataFrame, endpoint: EndpointConfig) -> dict[str, Any]:
        fingerprint = super()._fingerprint(source, endpoint)
        fingerprint["source"] = {"function": getattr(self.python_callable, "__qualname__", "?")}
        return fingerprint


def llmq_task(python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> TaskDecorator:
    """``@task.llmq(output_path=..., id_col=..., ...)``: the arguments of
    :class:`LLMQueryRateLimitedOperator`, the source given by the decorated function."""
    return task_decorator_factory(
        python_callable=python_callable,
        decorated_operator_class=_LLMQueryDecoratedOperator,
        **kwargs,
    )


__all__ = ["llmq_task"]
