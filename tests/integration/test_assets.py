"""Every llmq task has an Asset outlet, the same in every run: a static output's own, else one
named after the task however its output is templated; the run's event carries the concrete output."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from airflow.sdk import DAG, Asset

from airflow_provider_llmq.operators.lineage import record_asset_event, task_asset
from airflow_provider_llmq.operators.llmq import LLMQueryRateLimitedOperator, LLMQueryUDFOperator

TEMPLATED = "/data/answers/{{ ds_nodash }}/{{ run_id }}"


def _dag(dag_id: str, **arguments: Any) -> LLMQueryRateLimitedOperator:
    with DAG(dag_id, schedule=None, start_date=datetime(2026, 1, 1)):
        return LLMQueryRateLimitedOperator(
            task_id="ask", source_path="/data/reviews", checkpoint_key="fixed", **arguments
        )


def test_a_templated_output_has_one_asset_for_every_run() -> None:
    first, second = _dag("answers", output_path=TEMPLATED), _dag("answers", output_path="/x/{{ ds }}")
    assert first.outlets == second.outlets == [Asset(uri="x-llmq://answers/ask")]
    for day in ("20260101", "20260102"):  # each run parses the DAG again, then renders its task
        run = _dag("answers", output_path=TEMPLATED)
        run.render_template_fields({"ds_nodash": day, "run_id": f"manual__{day}"})
        assert run.output_path == f"/data/answers/{day}/manual__{day}"
        assert run.outlets == [Asset(uri="x-llmq://answers/ask")]
    # another task or DAG: another asset
    assert _dag("other", output_path=TEMPLATED).outlets != first.outlets
    with DAG("answers", schedule=None, start_date=datetime(2026, 1, 1)):
        udf = LLMQueryUDFOperator(task_id="ask_udf", source_path="/d", output_table="t_{{ ds_nodash }}")
    assert udf.outlets == [Asset(uri="x-llmq://answers/ask_udf")]


def test_a_static_output_keeps_its_own_asset_and_given_outlets_are_kept() -> None:
    assert _dag("s1", output_path="/data/answers").outlets == [Asset(uri="file:///data/answers")]
    assert _dag("s2", output_table="db.answers").outlets == [
        Asset(name="db.answers", uri="table://db.answers")
    ]
    mine = Asset(uri="s3://bucket/answers")
    assert _dag("s3", output_path=TEMPLATED, outlets=[mine]).outlets == [mine]


def test_the_task_asset_is_a_valid_uri_for_any_task_id() -> None:
    asset = task_asset("my-dag.v2", "group.ask", None, "/out/{{ ds }}")
    assert asset.uri == asset.name == "x-llmq://my-dag.v2/group.ask"


class _Event:
    def __init__(self) -> None:
        self.extra: dict[str, Any] = {"kept": 1}


def test_the_event_extra_goes_to_every_asset_outlet_and_keeps_what_was_there() -> None:
    ours, theirs = Asset(uri="x-llmq://d/t"), Asset(uri="s3://b/k")
    events: dict[Asset, _Event] = {ours: _Event(), theirs: _Event()}
    record_asset_event({"outlet_events": events}, [ours, theirs], {"output": "/o/1", "rows": 3})
    assert events[ours].extra == events[theirs].extra == {"kept": 1, "output": "/o/1", "rows": 3}
    record_asset_event({}, [ours], {"rows": 4})  # outside Airflow: nothing
