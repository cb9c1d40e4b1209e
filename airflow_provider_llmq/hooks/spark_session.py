"""A Spark session from an apache-spark provider connection (``spark`` or ``spark_connect``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from airflow.sdk import BaseHook, Connection

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
        return build_session(remote=spark_connect_url(conn), conf=spark_conf, app_name=app_name)
    if conn.conn_type == "spark":
        master = conn.host or "local[*]"
        if conn.port and "://" in master:
            master = f"{master}:{conn.port}"
        return build_session(master=master, conf=spark_conf, app_name=app_name)
    raise LLMQueryConfigError(
        f"connection {spark_conn_id!r} has type {conn.conn_type!r}: "
        "use a 'spark' or 'spark_connect' connection"
    )


def spark_connect_url(conn: Connection) -> str:
    """``sc://host:port/;user_id=...;token=...;use_ssl=...`` from a ``spark_connect`` connection,
    read as the apache-spark provider's ``SparkConnectHook.get_connection_url`` reads it.

    Not imported from the provider: it requires ``pyspark-client``, which pip pairs with any pyspark
    version into one folder, so llmq does not depend on it (see setup.cfg)."""
    host = conn.host or ""
    if "://" not in host:
        host = f"sc://{host}"
    if conn.port:
        host = f"{host}:{conn.port}"
    parts = urlsplit(host)
    if parts.path.strip("/"):
        raise LLMQueryConfigError("a spark_connect connection's host must not carry a path")
    params = []
    if conn.login:
        params.append(f"user_id={quote(conn.login)}")
    if conn.password:
        params.append(f"token={quote(conn.password)}")
    use_ssl = conn.extra_dejson.get("use_ssl")
    if use_ssl is not None:
        params.append(f"use_ssl={quote(str(use_ssl))}")
    url = f"sc://{parts.netloc}/"
    return f"{url};{';'.join(params)}" if params else url
