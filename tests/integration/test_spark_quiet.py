"""A Spark driver that llmq starts prints nothing on stderr but errors: Airflow shows every stderr
line of a task in red, so start-up warnings and the progress bar made a good run look failed."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import logging, sys, time
from airflow_provider_llmq.spark.session import build_session

logging.basicConfig(stream=sys.stdout, level=logging.DEBUG, format="PY %(name)s %(levelname)s %(message)s")
for noisy in ("py4j", "pyspark"):
    logging.getLogger(noisy).setLevel(logging.WARNING)

spark = build_session(conf={"spark.ui.enabled": "false", "spark.driver.host": "127.0.0.1"})
slow = spark.sparkContext.parallelize(range(8), 8).map(lambda x: time.sleep(0.4) or x)  # > 0.5 s: a bar
print("SUM", sum(slow.collect()), flush=True)
jvm = spark.sparkContext._jvm
print("ROOT", jvm.org.apache.logging.log4j.LogManager.getRootLogger().getLevel().toString(), flush=True)
jvm.org.apache.logging.log4j.LogManager.getLogger("llmq.test").error("boom from the JVM")
time.sleep(1)  # the reader thread hands it over
"""


@pytest.mark.slow  # over 7 s: CI's slow step runs it
def test_the_driver_llmq_starts_is_quiet_on_stderr() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SUM 28" in done.stdout and "ROOT ERROR" in done.stdout
    noise = [line for line in done.stderr.splitlines() if line.strip()]
    assert noise == [], noise  # the JVM's incubator notice included: it goes to the logger at DEBUG
    logged = [
        line for line in done.stdout.splitlines() if line.startswith("PY airflow_provider_llmq.spark.jvm")
    ]
    assert any(
        line.startswith("PY airflow_provider_llmq.spark.jvm DEBUG WARNING: Using incubator")
        for line in logged
    )
    assert any(" ERROR " in line and "boom from the JVM" in line for line in logged), logged
