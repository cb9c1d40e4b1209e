"""An installed llmq, as a user installed it, runs one operator with ``dag.test()`` (``make test-wheel``,
``make test-preinstalled-spark``).

Run with the Python of a venv that holds the built wheel (not an editable install): it checks that the
package is imported from that venv's site-packages, not from a source tree; that pyspark and any
pyspark-client agree (and, with ``--expect-pyspark``, that the Spark that was there first is still
there); then it starts the bundled mock server over TLS in a child process, writes a DAG file into a
fresh Airflow home, runs ``dag.test()`` on the rate-limited operator over 40 rows, and checks every
output row carries the answer the mock gives for its own prompt. Prints one ``INSTALL`` JSON line: the
versions that the install resolved, and whether the DAG ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from importlib import metadata
from pathlib import Path

ROWS = 40

DAG_FILE = """
import os
from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_provider_llmq.operators.llmq import LLMQueryRateLimitedOperator

with DAG("llmq_install_smoke", start_date=datetime(2026, 1, 1), schedule=None, catchup=False) as dag:
    LLMQueryRateLimitedOperator(
        task_id="ask",
        source_path=os.environ["SMOKE_SOURCE"],
        output_path=os.environ["SMOKE_OUTPUT"],
        id_col="id",
        system_prompt="You are a test.",
        spark_conf={"spark.master": "local[2]", "spark.ui.enabled": "false"},
        max_concurrency=8,
        retries=0,
        retry_delay=timedelta(0),
    )

if __name__ == "__main__":
    run = dag.test()
    print("STATE", run.state)
"""


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expect-pyspark", help="the pyspark version that must still be installed")
    args = parser.parse_args()

    import airflow_provider_llmq
    from airflow_provider_llmq.spark.session import check_spark_install
    from airflow_provider_llmq.testing.mock_server import MockConfig, MockServerProcess
    from airflow_provider_llmq.testing.mock_server.faults import expected_answer

    package_dir = Path(airflow_provider_llmq.__file__).resolve().parent
    if "site-packages" not in package_dir.parts:
        sys.exit(f"llmq was imported from {package_dir}, not from an installed wheel")
    versions = {name: _version(name) for name in ("pyspark", "pyspark-client", "apache-airflow", "pandas")}
    if args.expect_pyspark and versions["pyspark"] != args.expect_pyspark:
        sys.exit(f"the Spark that was installed first changed: pyspark {versions['pyspark']}")
    check_spark_install()  # pyspark, pyspark-client and the jars agree

    import pyarrow as pa
    import pyarrow.parquet as pq

    work = Path(tempfile.mkdtemp(prefix="llmq-install-smoke-"))
    home, dags = work / "airflow", work / "dags"
    dags.mkdir(parents=True)
    (dags / "llmq_install_smoke.py").write_text(textwrap.dedent(DAG_FILE))
    source = work / "source"
    source.mkdir()
    prompts = [f"install smoke prompt {i}" for i in range(ROWS)]
    pq.write_table(pa.table({"id": list(range(ROWS)), "prompt": prompts}), source / "part-0.parquet")
    output = work / "output"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AIRFLOW_CONN_", "AIRFLOW__", "AIRFLOW_HOME"))
    }
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(dags),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        SPARK_LOCAL_IP="127.0.0.1",
        SMOKE_SOURCE=str(source),
        SMOKE_OUTPUT=str(output),
    )
    migrate = [sys.executable, "-m", "airflow", "db", "migrate"]
    subprocess.run(migrate, env=env, check=True, capture_output=True)
    key = "sk-install-smoke"
    config = MockConfig(api_key=key, latency_ms=5)
    with MockServerProcess(config, tls=True, cert_dir=str(work / "ca")) as server:
        env["AIRFLOW_CONN_LLMQ_DEFAULT"] = json.dumps(
            {
                "conn_type": "llmq",
                "host": server.base_url,
                "password": key,
                "extra": {"api_type": "azure", "deployment": "gpt-smoke", "ca_cert": server.ca_path},
            }
        )
        ran = subprocess.run(
            [sys.executable, str(dags / "llmq_install_smoke.py")], env=env, capture_output=True, text=True
        )
    succeeded = ran.returncode == 0 and "STATE success" in ran.stdout
    rows = pq.read_table(output).to_pylist() if succeeded else []
    wrong = [
        row["id"]
        for row in rows
        if row["response"] != expected_answer("gpt-smoke", "You are a test.", row["prompt"], {})
    ]
    report = {**versions, "dag_ran": succeeded, "rows": len(rows), "wrong_answers": len(wrong)}
    print("INSTALL " + json.dumps(report), flush=True)
    if not succeeded or len(rows) != ROWS or wrong:
        sys.stderr.write(ran.stdout[-6000:] + ran.stderr[-6000:])
        sys.exit("the installed llmq did not answer every row with its own answer")


if __name__ == "__main__":
    main()
