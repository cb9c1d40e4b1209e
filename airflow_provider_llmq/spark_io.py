"""Deprecated: the Spark layer now lives in :mod:`airflow_provider_llmq.spark` (one module per job)
and the session from an Airflow connection in :mod:`airflow_provider_llmq.hooks.spark_session`.

The names DAGs imported from here keep working for one release, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import warnings
from typing import Any

_MOVED = {
    "join_results": "airflow_provider_llmq.spark.sink",
    "write_output": "airflow_provider_llmq.spark.sink",
    "get_spark_session": "airflow_provider_llmq.hooks.spark_session",
    "output_columns": "airflow_provider_llmq.spark.schema",
    "read_source": "airflow_provider_llmq.spark.source",
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"airflow_provider_llmq.spark_io.{name} is deprecated: import it from {module}",
        DeprecationWarning,
        stacklevel=2,
    )
    import importlib

    return getattr(importlib.import_module(module), name)
