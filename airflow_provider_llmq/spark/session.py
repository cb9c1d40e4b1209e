"""A Spark session from a master URL or a Spark Connect URL. Which connection names them is the
hooks' business (``hooks.spark_session``); nothing here knows Airflow."""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def build_session(
    *,
    master: str | None = None,
    remote: str | None = None,
    conf: dict[str, Any] | None = None,
    app_name: str = "llmq",
) -> SparkSession:
    """``remote`` (``sc://host:port``) for Spark Connect, else ``master`` (default ``local[*]``).
    Only ``conf`` reaches the Spark conf: an LLM key or CA never does."""
    check_spark_install()
    # Spark's Python workers otherwise run `python3` from PATH, which lacks this venv's packages
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    builder = builder.remote(remote) if remote else builder.master(master or "local[*]")
    settings = dict(conf or {})
    if not remote:  # a driver this process starts: no console progress bar, Spark's log quiet
        for key, value in QUIET_DRIVER.items():
            settings.setdefault(key, value)
    for key, value in settings.items():
        builder = builder.config(key, str(value))
    if not remote:
        _launch_driver_jvm({"spark.master": master or "local[*]", "spark.app.name": app_name, **settings})
    return builder.getOrCreate()


JVM_LOGGER = "airflow_provider_llmq.spark.jvm"
# printed by the JVM itself for the module Spark 4's launcher always adds; no flag turns it off
_JVM_NOTICES = ("WARNING: Using incubator modules",)


def _launch_driver_jvm(settings: dict[str, Any]) -> None:
    """Starts the driver JVM the way pyspark would, but with its stderr read by a thread that hands
    each line to the ``airflow_provider_llmq.spark.jvm`` logger: Airflow shows raw stderr lines as red
    ERRORs in a task that succeeded, while logged ones keep their level (the JVM's own notices go to
    DEBUG). Does nothing when this process already has a JVM, or is itself started by spark-submit."""
    from pyspark import SparkConf, SparkContext
    from pyspark.java_gateway import launch_gateway

    if "PYSPARK_GATEWAY_PORT" in os.environ:
        return
    with SparkContext._lock:
        if SparkContext._gateway is not None:
            return
        read_end, write_end = os.pipe()
        # read from before the launch: a JVM that fails to start says why on stderr
        stream = os.fdopen(read_end, encoding="utf-8", errors="replace")
        reader = threading.Thread(target=_forward_jvm_stderr, args=(stream,), name="llmq-jvm-stderr")
        reader.daemon = True
        reader.start()
        conf = SparkConf(loadDefaults=False).setAll([(key, str(value)) for key, value in settings.items()])
        try:
            gateway = launch_gateway(conf, popen_kwargs={"stderr": write_end})
        finally:
            os.close(write_end)  # the JVM holds its own copy; the reader ends when the JVM does
        SparkContext._gateway = gateway
        SparkContext._jvm = gateway.jvm


def _forward_jvm_stderr(stream: Any) -> None:
    log = logging.getLogger(JVM_LOGGER)
    for raw in stream:
        line = raw.rstrip()
        if not line:
            continue
        if line.startswith(_JVM_NOTICES):
            log.debug("%s", line)
        elif " ERROR " in line or line.startswith(("Exception", "\tat ", "Caused by")):
            log.error("%s", line)
        else:
            log.warning("%s", line)


QUIET_DRIVER = {
    "spark.ui.showConsoleProgress": "false",
    "spark.driver.extraJavaOptions": "-Dlog4j2.configurationFile=file:"
    + os.path.join(os.path.dirname(os.path.abspath(__file__)), "log4j2-quiet.properties"),
}


def check_spark_install(versions: dict[str, str | None] | None = None) -> None:
    """pyspark and pyspark-client write into one ``pyspark/`` folder: with different versions the
    Python side of one meets the jars of the other, and every Python UDF fails with a cryptic
    ``Py4JException``. Refuse to start then, naming the fix."""
    from airflow_provider_llmq.core.errors import LLMQueryConfigError

    found = versions if versions is not None else installed_spark_versions()
    known = {name: version for name, version in found.items() if version}
    if len(set(known.values())) > 1:
        listing = ", ".join(f"{name} {version}" for name, version in sorted(known.items()))
        wanted = known.get("pyspark-client") or max(known.values())
        raise LLMQueryConfigError(
            f"mismatched Spark packages in one folder ({listing}): install equal versions, e.g. "
            f"pip install 'pyspark=={wanted}' 'pyspark-client=={wanted}' (or install with llmq's "
            "constraints file)"
        )


def installed_spark_versions() -> dict[str, str | None]:
    """The pyspark and pyspark-client distributions, and the Spark jars they left in ``pyspark/jars``."""
    from importlib import metadata
    from pathlib import Path

    versions: dict[str, str | None] = {}
    for name in ("pyspark", "pyspark-client"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import pyspark

    jars = sorted((Path(pyspark.__file__).parent / "jars").glob("spark-core_*.jar"))
    versions["Spark jars"] = jars[0].stem.rsplit("-", 1)[-1] if jars else None
    return versions


def default_parallelism(spark: SparkSession) -> int:
    """Task slots Spark would use; Spark Connect has no SparkContext, so its conf or 8."""
    try:
        return int(spark.sparkContext.defaultParallelism)
    except Exception:
        return int(spark.conf.get("spark.default.parallelism", None) or 8)


def cancel_tagged_jobs(spark: SparkSession, tag: str) -> None:
    """Cancels the running jobs that carry ``tag`` (``spark.addTag``), classic or Spark Connect."""
    spark.interruptTag(tag)


def spark_master(spark: SparkSession) -> str | None:
    """The master URL (``local[*]``, ``spark://...``), or None where the session does not say."""
    try:
        return str(spark.conf.get("spark.master"))
    except Exception:  # Spark Connect may not expose the server's master
        return None


def require_shared_paths(spark: SparkSession, **paths: str | None) -> None:
    """On a cluster, every path must be one that each node can reach: a bare local path is refused."""
    from airflow_provider_llmq.core.errors import LLMQueryConfigError

    master = spark_master(spark)
    if master is None or master.startswith("local"):
        return
    bare = {name: path for name, path in paths.items() if path and "://" not in path}
    if bare:
        name, path = next(iter(bare.items()))
        raise LLMQueryConfigError(
            f"{name} {path!r} is a local path, but Spark runs on {master}: its executors cannot reach "
            "this machine's disk. Give a URI that every node can reach: file:///shared/... on a mount "
            "they all have, hdfs://..., s3a://... or abfss://..."
        )
