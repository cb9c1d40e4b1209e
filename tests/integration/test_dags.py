"""The DAGs in dags/: integrity (imports, tags, owners, task graphs, no secrets) and a ``dag.test()``
of llmq_pipeline against the mock server over TLS, triggered the way the REST API does it with
``logical_date: null`` (no data interval, no ``{{ ds }}``)."""

from __future__ import annotations

import ast
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.testing.mock_server import MockConfig, expected_answer, planned_fault
from airflow_provider_llmq.testing.mock_server.structured import expected_structured_answer
from tests.conftest import DAGS_FOLDER, DEPLOYMENT, TEST_KEY, llmq_connection_env

REPO_DAGS = Path(__file__).resolve().parents[2] / "dags"
SAMPLE_ROWS = 200

EXPECTED_GRAPHS: dict[str, dict[str, set[str]]] = {
    "llmq_pipeline": {
        "extract_prompts": set(),
        "query_llm": {"extract_prompts"},
        "join_answers": {"query_llm"},
        "report": {"query_llm", "join_answers"},
    },
    "llmq_udf_example": {"sample_reviews": set(), "classify_reviews": {"sample_reviews"}},
    "llmq_async_batch_example": {"sample_reviews": set(), "classify_reviews": {"sample_reviews"}},
    "llmq_rate_limited_example": {"sample_reviews": set(), "classify_reviews": {"sample_reviews"}},
    "llmq_thread_pool_example": {"sample_reviews": set(), "classify_reviews": {"sample_reviews"}},
    "llmq_taskflow_example": {"sample_reviews": set(), "classify_category": {"sample_reviews"}},
}
SECRET_ARGUMENT = re.compile(r"\b(api_key|password)\s*=")
SECRET_NAMES = {"api_key", "password"}
# template variables present on every run, including one with no logical date / data interval
ALWAYS_IN_CONTEXT = {
    "run_id",
    "dag_run",
    "dag",
    "task",
    "ti",
    "task_instance",
    "params",
    "var",
    "conn",
    "macros",
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The DAG files read LLMQ_DATA_DIR / LLMQ_SAMPLE_ROWS when parsed: set both for the module."""
    path = tmp_path_factory.mktemp("llmq-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMQ_DATA_DIR", str(path))
        mp.setenv("LLMQ_SAMPLE_ROWS", str(SAMPLE_ROWS))
        mp.delenv("LLMQ_SPARK_CONN_ID", raising=False)
        yield path


@pytest.fixture(scope="module")
def dagbag(data_dir: Path) -> Iterator[Any]:
    """dags/*.py copied into a sub-folder of the configured dags folder (``dag.test()`` runs only a
    DAG its dags folder parses) and loaded from there, the way the DAG processor imports them."""
    from airflow.dag_processing.dagbag import DagBag

    target = DAGS_FOLDER / "llmq_examples"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    for source in sorted(REPO_DAGS.glob("*.py")):
        shutil.copy(source, target / source.name)
    yield DagBag(dag_folder=str(target))
    shutil.rmtree(target, ignore_errors=True)  # other tests' dag.test() parse the whole folder


def _dag_files() -> list[Path]:
    files = sorted(REPO_DAGS.glob("*.py"))
    assert files, f"no DAG files in {REPO_DAGS}"
    return files


def test_every_dag_file_imports_without_errors(dagbag: Any) -> None:
    assert dagbag.import_errors == {}
    assert sorted(dagbag.dag_ids) == sorted(EXPECTED_GRAPHS)
    files_with_dags = {Path(dag.fileloc).name for dag in dagbag.dags.values()}
    assert files_with_dags == {path.name for path in _dag_files()}, "a file in dags/ defines no DAG"


@pytest.mark.parametrize("dag_id", sorted(EXPECTED_GRAPHS))
def test_dag_has_tags_owner_and_retry_delay(dagbag: Any, dag_id: str) -> None:
    dag = dagbag.dags[dag_id]
    assert dag.tags and "llmq" in dag.tags
    assert dag.default_args.get("owner") not in (None, "", "airflow")
    assert dag.default_args.get("retry_delay") is not None
    for task in dag.tasks:
        assert task.owner == dag.default_args["owner"], task.task_id


@pytest.mark.parametrize("dag_id", sorted(EXPECTED_GRAPHS))
def test_task_graph(dagbag: Any, dag_id: str) -> None:
    dag = dagbag.dags[dag_id]
    graph = {task.task_id: set(task.upstream_task_ids) for task in dag.tasks}
    assert graph == EXPECTED_GRAPHS[dag_id]


def test_pipeline_is_scheduled_without_catchup(dagbag: Any) -> None:
    from airflow.timetables.simple import NullTimetable

    dag = dagbag.dags["llmq_pipeline"]
    assert not isinstance(dag.timetable, NullTimetable)
    assert dag.catchup is False
    query = dag.get_task("query_llm")
    assert query.include_source_columns is False and query.id_col == "review_id"


@pytest.mark.parametrize("path", _dag_files(), ids=lambda p: p.name)
def test_no_key_in_dag_files(path: Path) -> None:
    text = path.read_text()
    assert TEST_KEY not in text
    assert not SECRET_ARGUMENT.search(text), f"{path.name} passes an api_key= / password= argument"
    nodes = list(ast.walk(ast.parse(text)))
    keywords = {node.arg for node in nodes if isinstance(node, ast.keyword)}
    assert not keywords & SECRET_NAMES


@pytest.mark.parametrize("path", _dag_files(), ids=lambda p: p.name)
def test_templates_use_only_variables_every_run_has(path: Path) -> None:
    """A run triggered through the REST API with logical_date null has no ds, ts, logical_date or
    data_interval_*: a template using them fails to render on such a run."""
    from jinja2 import Environment, meta

    templates = [
        node.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "{{" in node.value
    ]
    env = Environment()
    env.filters.update(dict.fromkeys(("ds", "ds_nodash", "ts", "ts_nodash", "ts_nodash_with_tz"), str))
    for template in templates:
        names = meta.find_undeclared_variables(env.parse(template))
        assert names <= ALWAYS_IN_CONTEXT, f"{path.name}: {template!r} uses {names - ALWAYS_IN_CONTEXT}"


def _rendered_fields(dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
    from airflow.models.renderedtifields import RenderedTaskInstanceFields as RTIF
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(RTIF).filter(RTIF.dag_id == dag_id, RTIF.run_id == run_id).all()
        return {row.task_id: dict(row.rendered_fields) for row in rows}


@pytest.mark.spark
def test_pipeline_runs_against_the_mock_server(
    dagbag: Any,
    data_dir: Path,
    airflow_db: Path,
    spark: Any,
    server: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    faults = {"seed": 11, "fault_rate": 0.08, "content_filter_rate": 0.03, "retry_after_ms": 20}
    server.configure(**faults)
    for name, value in llmq_connection_env(server).items():
        monkeypatch.setenv(name, value)
    dag = dagbag.dags["llmq_pipeline"]
    for task in dag.tasks:
        task.retries = 0  # a failure fails the test now, not after retry_delay
    query = dag.get_task("query_llm")
    query.retry_backoff = 0.01

    # logical_date=None: what a REST API trigger with "logical_date": null creates
    dagrun = dag.test(logical_date=None)

    assert dagrun.state == "success", dagrun.state
    run_dirs = list((data_dir / "llmq_pipeline").glob("*/*"))
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert ":" not in run_dir.name and "+" not in run_dir.name
    assert re.fullmatch(r"\d{8}", run_dir.parent.name)

    source = spark.read.parquet(str(run_dir / "prompts"))
    final = spark.read.parquet(str(run_dir / "classified_reviews"))
    source_ids = sorted(row[0] for row in source.select("review_id").collect())
    rows = final.collect()
    assert len(source_ids) == SAMPLE_ROWS
    assert sorted(row["review_id"] for row in rows) == source_ids  # every source row, each once

    config = MockConfig(api_key="unused", **faults)
    output = QueryOptions(output_schema=query.output_schema).structured_output()
    assert output is not None
    params = {**query.request_params, "response_format": output.response_format()}
    recovered = 0
    for row in rows:
        fate = planned_fault(row["prompt"], config)
        if fate == "content_filter":
            assert (row["llmq_status"], row["llmq_error_code"]) == ("error", "content_filter"), row
            assert row["response_raw"] is None and row["sentiment"] is None
            continue
        assert row["llmq_status"] == "ok", row
        raw = expected_structured_answer(DEPLOYMENT, query.system_prompt, row["prompt"], params)
        assert row["response_raw"] == raw
        # the label is a typed column of its own, one of the schema's enum
        assert row["sentiment"] == json.loads(raw or "")["sentiment"]
        assert row["sentiment"] in ("positive", "neutral", "negative")
        recovered += fate is not None and row["llmq_attempts"] > 1
    assert recovered > 0, "the fault rate should have made some rows recover after a retry"

    report = json.loads((run_dir / "report.json").read_text())
    errors = sum(1 for row in rows if row["llmq_status"] != "ok")
    assert report["final"]["rows"] == SAMPLE_ROWS
    assert report["final"]["by_status"] == {"ok": SAMPLE_ROWS - errors, "error": errors}
    assert sum(report["final"]["by_sentiment"].values()) == SAMPLE_ROWS - errors
    # the mock reads the review's words: its labels agree with the stars, and the report counts it
    agreeing = sum(
        1 for row in rows if row["llmq_status"] == "ok" and row["sentiment"] == row["expected_sentiment"]
    )
    assert report["final"]["agreeing_with_stars"] == agreeing
    assert agreeing >= 0.9 * (SAMPLE_ROWS - errors), (agreeing, SAMPLE_ROWS - errors)
    assert report["query"]["requests_sent"] == server.stats()["chat_requests"]

    rendered = _rendered_fields("llmq_pipeline", dagrun.run_id)
    assert set(rendered) == set(EXPECTED_GRAPHS["llmq_pipeline"])
    assert rendered["query_llm"]["output_path"] == str(run_dir / "llm_results")
    text = json.dumps(rendered)
    assert TEST_KEY not in text
    assert not SECRET_ARGUMENT.search(text)
    assert "{{" not in text


@pytest.mark.spark
def test_taskflow_example_queries_the_category_its_function_selects(
    dagbag: Any,
    data_dir: Path,
    airflow_db: Path,
    spark: Any,
    server: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in llmq_connection_env(server).items():
        monkeypatch.setenv(name, value)
    dag = dagbag.dags["llmq_taskflow_example"]
    for task in dag.tasks:
        task.retries = 0
    dagrun = dag.test(logical_date=None, run_conf={"category": "Home & Office"})

    assert dagrun.state == "success", dagrun.state
    [out] = [p for p in (data_dir / "llmq_taskflow_example").iterdir() if not p.name.startswith(".")]
    reviews = spark.read.parquet(str(data_dir / "source" / "reviews"))
    wanted = {row["review_id"]: row for row in reviews.where("category = 'Home & Office'").collect()}
    rows = spark.read.parquet(str(out)).collect()
    assert wanted and sorted(row["review_id"] for row in rows) == sorted(wanted)  # the templated param
    classify = dag.get_task("classify_category")
    for row in rows:
        source = wanted[row["review_id"]]
        prompt = f"Classify the sentiment of this review of {source['product']}: {source['review_text']}"
        expected = expected_answer(DEPLOYMENT, classify.system_prompt, prompt, classify.request_params)
        assert (row["llmq_status"], row["sentiment"]) == ("ok", expected), row
    assert server.stats()["chat_requests"] == len(wanted)
