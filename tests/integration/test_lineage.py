"""Lineage of a real run: the OpenLineage events the provider's listener emits for an llmq task
(source and sink datasets, the model and the counts), and the Asset event of a templated output."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import DAGS_FOLDER, DEPLOYMENT, child_airflow_env, llmq_connection_env

N_ROWS = 20
FILTERED = (3, 11)  # prompts the mock server refuses with content_filter
EMPTY = 5  # a null prompt: recorded empty_prompt, never sent
RETRIED = 8  # answered after one 500

LINEAGE_DAG = """
import sys
from datetime import datetime, timedelta, timezone

from airflow.sdk import DAG

from airflow_provider_llmq.operators.llmq import LLMQueryRateLimitedOperator

with DAG("{dag_id}", schedule=None, start_date=datetime(2026, 1, 1), tags=["test"],
         default_args={{"owner": "tests", "retries": 0, "retry_delay": timedelta(0)}}) as dag:
    LLMQueryRateLimitedOperator(
        task_id="classify",
        # 200 shuffle partitions would cost more than these 20 rows
        spark_conf={{"spark.master": "local[2]", "spark.sql.shuffle.partitions": "2"}},
        source_path="{source}",
        id_col="id",
        output_path="{out}/{{{{ ds_nodash }}}}/answers",
        checkpoint_dir="{ckpt}",
        retry_backoff=0.001,
        max_retry_wait=0.05,
        max_concurrency=8,
        progress_interval=1,
    )

if __name__ == "__main__":
    run = dag.test(logical_date=datetime(2026, 3, 4, tzinfo=timezone.utc))
    print("RUN_STATE", run.state, flush=True)
    sys.exit(0 if run.state == "success" else 3)
"""


def _source(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts: list[str | None] = [f"Review {i}: the kettle is fine." for i in range(N_ROWS)]
    for i in FILTERED:
        prompts[i] = f"Review {i}: [[content_filter]]"
    prompts[EMPTY] = None
    prompts[RETRIED] = f"Review {RETRIED}: [[500]]"
    path.mkdir(parents=True)
    pq.write_table(pa.table({"id": list(range(N_ROWS)), "prompt": prompts}), path / "part-0.parquet")
    return path


def _events(log_file: Path, job: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    return [e for e in lines if e.get("job", {}).get("name") == job]


@pytest.mark.slow  # over 7 s: CI's slow step runs it
def test_a_run_emits_its_lineage_and_an_asset_event_with_the_concrete_output(
    airflow_db: Path, server: Any, tmp_path: Path
) -> None:
    dag_id = "llmq_lineage"
    source = _source(tmp_path / "reviews")
    out, log_file = tmp_path / "out", tmp_path / "openlineage.jsonl"
    path = DAGS_FOLDER / f"{dag_id}.py"
    path.write_text(LINEAGE_DAG.format(dag_id=dag_id, source=source, out=out, ckpt=tmp_path / "ckpt"))
    env = {
        **child_airflow_env(tmp_path),
        **llmq_connection_env(server),
        "AIRFLOW__OPENLINEAGE__DISABLED": "False",
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "llmq-tests",
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(log_file), "append": True}
        ),
    }
    proc = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, timeout=300)
    text = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    concrete = out / "20260304" / "answers"
    assert concrete.is_dir(), "the template was rendered for the run's logical date"
    sent = server.stats()["chat_requests"]
    assert sent == N_ROWS - 1 + 1  # the empty prompt is not sent, the 500 is sent twice
    counts = {
        "rows": N_ROWS,
        "ok": N_ROWS - 3,
        "errors": 3,
        "errors_by_code": {"content_filter": 2, "empty_prompt": 1},
        "requests_sent": sent,
    }

    # OpenLineage: the provider's listener, our facets
    events = _events(log_file, f"{dag_id}.classify")
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"], [e["eventType"] for e in events]
    complete = events[-1]
    assert complete["job"]["namespace"] == "llmq-tests"
    assert [(d["namespace"], d["name"]) for d in complete["inputs"]] == [("file", str(source))]
    assert [(d["namespace"], d["name"]) for d in complete["outputs"]] == [("file", str(concrete))]
    assert complete["outputs"][0]["outputFacets"]["outputStatistics"]["rowCount"] == N_ROWS
    assert complete["inputs"][0]["inputFacets"]["inputStatistics"]["rowCount"] == N_ROWS
    facet = complete["run"]["facets"]["llmq"]
    assert facet["model"] == DEPLOYMENT
    assert {k: facet[k] for k in ("rows", "ok", "errors")} == {k: counts[k] for k in ("rows", "ok", "errors")}
    assert facet["errorsByCode"] == counts["errors_by_code"]
    assert facet["requestsSent"] == sent
    assert facet["_producer"].startswith("https://pypi.org/project/airflow-provider-llmq/")
    assert facet["_schemaURL"].endswith("#/$defs/LLMQueryRunFacet")
    print(
        "openlineage events:",
        json.dumps(
            [
                {
                    "eventType": e["eventType"],
                    "job": f"{e['job']['namespace']}/{e['job']['name']}",
                    "inputs": [
                        (d["namespace"], d["name"], sorted(d.get("inputFacets", {}))) for d in e["inputs"]
                    ],
                    "outputs": [
                        (d["namespace"], d["name"], sorted(d.get("outputFacets", {}))) for d in e["outputs"]
                    ],
                    "run_facets": sorted(e["run"]["facets"]),
                }
                for e in _events(log_file, f"{dag_id}.classify") + _events(log_file, dag_id)
            ],
            indent=1,
        ),
    )

    # the Asset: one per task, its event says where this run wrote and what it counted
    db = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT asset.uri, asset_event.extra, asset_event.source_task_id FROM asset_event "
            "JOIN asset ON asset.id = asset_event.asset_id WHERE asset_event.source_dag_id = ?",
            (dag_id,),
        ).fetchall()
    assert [(uri, task) for uri, _, task in rows] == [(f"x-llmq://{dag_id}/classify", "classify")]
    extra = json.loads(rows[0][1])
    assert extra == {"output": str(concrete), "output_format": "parquet", "model": DEPLOYMENT, **counts}


def _operator(**arguments: Any) -> Any:
    """The mixin on the operator attributes it reads, without Airflow's task machinery."""
    from airflow_provider_llmq.operators.lineage import LineageMixin

    op = LineageMixin()
    fields = dict.fromkeys(("sql", "source_table", "source_path", "output_table", "output_path"))
    fields.update(task_id="t", output_format="parquet", outlets=[])
    for name, value in {**fields, **arguments}.items():
        setattr(op, name, value)
    return op


def test_tables_and_queries_are_named_by_their_location_as_openlineage_spark_names_them(spark: Any) -> None:
    from airflow_provider_llmq.operators.lineage import DatasetId

    spark.sql("CREATE DATABASE IF NOT EXISTS llmq_lineage")
    # a column named like the detail row the location is read from
    spark.createDataFrame([(1, "a", "x")], "id int, prompt string, Location string").write.mode(
        "overwrite"
    ).saveAsTable("llmq_lineage.reviews")
    spark.createDataFrame([(1, "a")], "id int, response string").write.mode("overwrite").saveAsTable(
        "llmq_lineage.answers"
    )
    warehouse = spark.conf.get("spark.sql.warehouse.dir").removeprefix("file:")
    database = f"{warehouse}/llmq_lineage.db"

    summary = {"rows": 1, "ok": 1, "errors": 0, "errors_by_code": {}, "requests_sent": 1}
    op = _operator(source_table="llmq_lineage.reviews", output_table="llmq_lineage.answers")
    op._record_lineage({}, spark, summary, "gpt-x")
    reviews = DatasetId("file", f"{database}/reviews", (database, "llmq_lineage.reviews"))
    answers = DatasetId("file", f"{database}/answers", (database, "llmq_lineage.answers"))
    assert op._llmq_lineage is not None
    assert op._llmq_lineage.inputs == (reviews,) and op._llmq_lineage.output == answers

    lineage = op.get_openlineage_facets_on_complete(None)
    [table] = lineage.outputs
    assert (table.namespace, table.name) == ("file", f"{database}/answers")
    [symlink] = table.facets["symlinks"].identifiers
    assert (symlink.namespace, symlink.name, symlink.type) == (database, "llmq_lineage.answers", "TABLE")
    assert lineage.run_facets["llmq"].model == "gpt-x"

    op.source_table, op.sql = None, "SELECT r.id, r.prompt FROM llmq_lineage.reviews r WHERE r.id > 0"
    op._record_lineage({}, spark, summary, "gpt-x")
    assert op._llmq_lineage.inputs == (reviews,)


def test_a_table_the_catalog_cannot_name_is_left_out(spark: Any) -> None:
    from airflow_provider_llmq.operators.lineage import DatasetId

    op = _operator(source_table="no_such_db.no_such_table", output_path="/tmp/out")
    summary = {"rows": 2, "ok": 2, "errors": 0, "errors_by_code": {}, "requests_sent": 2}
    op._record_lineage({}, spark, summary, None)
    assert op._llmq_lineage is not None
    assert op._llmq_lineage.inputs == () and op._llmq_lineage.output == DatasetId("file", "/tmp/out")
    assert op.get_openlineage_facets_on_complete(None).run_facets["llmq"].rows == 2


def test_an_estimate_records_no_output_and_no_counts() -> None:
    from airflow.sdk import Asset

    asset, event = Asset(uri="x-llmq://d/t"), SimpleNamespace(extra={})
    op = _operator(source_path="/data/reviews", output_path="/data/answers", outlets=[asset])
    estimate = {"estimate_only": True, "rows": 5, "errors": 0, "errors_by_code": {}}
    op._record_lineage({"outlet_events": {asset: event}}, None, estimate, "m")
    assert event.extra == {"estimate_only": True, "model": "m"}
    lineage = op.get_openlineage_facets_on_complete(None)
    assert [(d.namespace, d.name) for d in lineage.inputs] == [("file", "/data/reviews")]
    assert lineage.outputs == [] and lineage.run_facets == {}


def test_operators_import_and_record_without_the_openlineage_provider(tmp_path: Path) -> None:
    script = """
import sys


class Block:  # the openlineage client as if not installed (Airflow still reads the provider's metadata)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("openlineage", "openlineage_sql") or name.startswith(
            ("airflow.providers.openlineage.extractors", "airflow.providers.openlineage.plugins")
        ):
            raise ImportError(f"blocked {name}")
        return None


sys.meta_path.insert(0, Block())
from datetime import datetime

from airflow.sdk import DAG

from airflow_provider_llmq.decorators.llmq import llmq_task
from airflow_provider_llmq.operators.batch_api import LLMQueryBatchAPIOperator
from airflow_provider_llmq.operators.llmq import LLMQueryThreadPoolOperator

with DAG("no_ol", schedule=None, start_date=datetime(2026, 1, 1)):
    op = LLMQueryThreadPoolOperator(task_id="t", sql="SELECT 1 AS prompt", output_path="/tmp/{{ ds }}")
    LLMQueryBatchAPIOperator(task_id="b", source_path="/tmp/in", output_path="/tmp/out")
op._record_lineage({}, None, {"rows": 1, "ok": 1, "errors": 0, "errors_by_code": {}, "requests_sent": 1}, "m")
assert op._llmq_lineage.inputs == (), op._llmq_lineage
assert op._llmq_lineage.output.name == "/tmp/{{ ds }}"
try:
    op.get_openlineage_facets_on_complete(None)
except ImportError:
    print("OK", [m for m in sys.modules if m.split(".")[0] in ("openlineage", "openlineage_sql")])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    assert proc.stdout.decode().strip().splitlines()[-1] == "OK []"


@pytest.mark.parametrize(
    ("location", "namespace", "name"),
    [
        ("/data/reviews", "file", "/data/reviews"),
        ("file:///data/reviews/", "file", "/data/reviews"),
        ("s3://bucket/a/b/", "s3://bucket", "a/b"),
        ("s3a://bucket/a/b", "s3://bucket", "a/b"),
        ("gs://bucket/k", "gs://bucket", "k"),
        ("hdfs://nn:8020/user/x", "hdfs://nn:8020", "user/x"),
    ],
)
def test_paths_are_named_as_the_openlineage_naming_helpers_name_them(
    location: str, namespace: str, name: str
) -> None:
    from openlineage.client.naming import dataset as naming

    from airflow_provider_llmq.operators.lineage import path_dataset

    found = path_dataset(location)
    assert (found.namespace, found.name) == (namespace, name)
    helper = {
        "file": lambda: naming.LocalFileSystem(path=name),
        "s3://bucket": lambda: naming.S3(bucket_name="bucket", object_key=name),
        "gs://bucket": lambda: naming.GCS(bucket_name="bucket", object_key=name),
        "hdfs://nn:8020": lambda: naming.HDFS(namenode_host="nn", namenode_port="8020", path=name),
    }[namespace]()
    assert (helper.get_namespace(), helper.get_name()) == (found.namespace, found.name)
