"""A Spark session from an apache-spark provider connection (``spark`` or ``spark_connect``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.spark.session import build_session

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def get_spark_session(
    spark_conn_id: str | None = None, spark_conf: dict[str, Any] | None = None, app_name: str = "llmq"
) -> SparkSession:
    """A session from a ``spark`` connection (its host is the master, e.g. ``spark://host`` with the
    port in its own field), a ``spark_connect`` connection, or ``local[*]`` when ``spark_conn_id``
    is None. Only ``spark_conf`` reaches the Spark conf."""
    if spark_conn_id is None:
        return build_session(conf=spark_conf, app_name=app_name)
    conn = BaseHook.get_connection(spark_conn_id)
    if conn.conn_type == "spark_connect":
        from airflow.providers.apache.spark.hooks.spark_connect import SparkConnectHook

        remote = SparkConnectHook(conn_id=spark_conn_id).get_connection_url()
        return build_session(remote=remote, conf=spark_conf, app_name=app_name)
    if conn.conn_type == "spark":
        master = conn.host or "local[*]"
        if conn.port and "://" in master:
            master = f"{master}:{conn.port}"
        return build_session(master=master, conf=spark_conf, app_name=app_name)
    raise LLMQueryConfigError(
        f"connection {spark_conn_id!r} has type {conn.conn_type!r}: "
        "use a 'spark' or 'spark_connect' connection"
    )
