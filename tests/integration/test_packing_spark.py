"""rows_per_request through the operators: the Spark UDF path, resume and the answer cache.

Each row's answer is checked against the mock's ``expected_answer`` of its own prompt, and the
server's per-prompt counts show which rows were asked (alone or inside a pack) and how often.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmq.testing.mock_server import expected_answer
from airflow_provider_llmq.testing.mock_server.faults import prompt_hash
from tests.conftest import DEPLOYMENT, llmq_connection_env, run_dag_file

# a dag.test() with Spark each: about 30 s on an idle 2-core machine
pytestmark = pytest.mark.slow
SYSTEM = "Answer with exactly one word: positive, neutral or negative. " * 8
MAX_TOKENS = 32  # room for the mock's whole answer (about 20 tokens): nothing is cut

DAG = """
import json
from datetime import datetime, timedelta

from airflow.sdk import DAG, task

from airflow_provider_llmq.operators import llmq

with DAG(
    "{dag_id}",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    default_args={{"owner": "tests", "retries": 0, "retry_delay": timedelta(0)}},
) as dag:
    previous = None
    for name, operator, kwargs in {tasks!r}:
        step = getattr(llmq, operator)(
            task_id=name,
            id_col="review_id",
            system_prompt="{system}",
            request_params={{"max_tokens": {max_tokens}}},
            checkpoint_dir="{out}/checkpoints",
            output_path="{out}/" + name,
            retry_backoff=0.001,
            progress_interval=1,
            **kwargs,
        )

        @task(task_id="save_" + name)
        def save(summary, name=name):
            with open("{out}/" + name + ".summary.json", "w") as f:
                json.dump(summary, f)

        save(step.output)
        if previous is not None:
            previous >> step
        previous = step
"""


def _write(spark: Any, path: Path, n: int, marks: dict[int, str] | None = None) -> list[tuple[str, str]]:
    marks = marks or {}
    rows = [
        (f"R{i:04d}", f"Review {i}: the kettle is {'great' if i % 2 else 'poor'}. {marks.get(i, '')}".strip())
        for i in range(n)
    ]
    spark.createDataFrame(rows, "review_id string, prompt string").coalesce(1).write.parquet(str(path))
    return rows


def _run(
    tmp_path: Path, dag_id: str, tasks: list[tuple[str, str, dict[str, Any]]]
) -> dict[str, dict[str, Any]]:
    out = tmp_path / "out"
    source = DAG.format(dag_id=dag_id, tasks=tasks, system=SYSTEM, max_tokens=MAX_TOKENS, out=out)
    run = run_dag_file(source, dag_id)
    assert run.state == "success"
    return {name: json.loads((out / f"{name}.summary.json").read_text()) for name, _, _ in tasks}


def _expected(prompt: str) -> str:
    return expected_answer(DEPLOYMENT, SYSTEM, prompt, {"max_tokens": MAX_TOKENS})


def _asked(server: Any, prompt: str) -> int:
    return int(server.stats()["requests_per_prompt"].get(prompt_hash(prompt), 0))


@pytest.fixture
def connection(server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in llmq_connection_env(server).items():
        monkeypatch.setenv(name, value)
    return server


def test_the_udf_operator_asks_packs_and_every_row_keeps_its_own_fate(
    airflow_db: Path, spark: Any, connection: Any, tmp_path: Path
) -> None:
    server = connection
    rows = _write(
        spark, tmp_path / "reviews", 48, {5: "[[content_filter]]", 17: "[[pack_drop]]", 30: "[[500]]"}
    )
    summary = _run(
        tmp_path,
        "llmq_packing_udf",
        [
            (
                "udf",
                "LLMQueryUDFOperator",
                {"source_path": str(tmp_path / "reviews"), "rows_per_request": 8, "num_partitions": 2},
            )
        ],
    )["udf"]
    out = {r["review_id"]: r for r in spark.read.parquet(str(tmp_path / "out" / "udf")).collect()}
    prompts = dict(rows)
    assert len(out) == 48
    assert out["R0005"]["llmq_error_code"] == "content_filter"
    wrong = [i for i, r in out.items() if i != "R0005" and r["response"] != _expected(prompts[i])]
    assert wrong == []  # every other row answered, none with another row's answer
    assert summary["ok"] == 47 and summary["errors_by_code"] == {"content_filter": 1}
    # far fewer requests than rows, and the summary counts a pack once, as the server saw it
    assert summary["requests_sent"] == server.stats()["chat_requests"] < 48
    packing = summary["packing"]
    assert (
        packing["packed_rows"] >= 40 and packing["rows_per_pack"] > 4 and packing["prompt_tokens_saved"] > 0
    )
    assert out["R0017"]["llmq_pack_rows"] == 1 and out["R0000"]["llmq_pack_rows"] > 1
    assert _asked(server, prompts["R0017"]) == 2  # in its pack, then alone


def test_a_resumed_and_a_cached_run_ask_only_the_unanswered_rows_packed_again(
    airflow_db: Path, spark: Any, connection: Any, tmp_path: Path
) -> None:
    server = connection
    day1 = _write(spark, tmp_path / "day1", 60)
    day2 = _write(spark, tmp_path / "day2", 72)  # the same 60 rows and 12 new ones
    cache = str(tmp_path / "cache")
    common = {"rows_per_request": 10, "max_concurrency": 1, "cache_path": cache}
    summaries = _run(
        tmp_path,
        "llmq_packing_resume_cache",
        [
            (
                "small",
                "LLMQueryRateLimitedOperator",
                {
                    **common,
                    "source_path": str(tmp_path / "day1"),
                    "checkpoint_key": "d1",
                    "max_total_tokens": 2500,
                },
            ),
            (
                "larger",
                "LLMQueryRateLimitedOperator",
                {**common, "source_path": str(tmp_path / "day1"), "checkpoint_key": "d1"},
            ),
            (
                "day2",
                "LLMQueryRateLimitedOperator",
                {**common, "source_path": str(tmp_path / "day2"), "checkpoint_key": "d2"},
            ),
        ],
    )
    small, larger, second_day = summaries["small"], summaries["larger"], summaries["day2"]
    unsent = small["errors_by_code"]["budget_exceeded"]
    assert 0 < unsent < 60
    assert larger["ok"] == 60 and larger["errors"] == 0
    assert larger["packing"]["packed_rows"] == unsent  # only the rows the first try did not send
    assert second_day["cache_hits"] == 60 and second_day["ok"] == 72
    assert second_day["packing"]["packed_rows"] == 12  # only the new rows, packed
    # each prompt was asked exactly once over the three runs (no fault, no split)
    assert all(_asked(server, prompt) == 1 for _, prompt in day2)
    final = {r["review_id"]: r for r in spark.read.parquet(str(tmp_path / "out" / "day2")).collect()}
    assert all(final[i]["response"] == _expected(p) for i, p in day2)
    hits = [r for r in final.values() if r["llmq_cached"]]
    assert len(hits) == 60 and all(r["llmq_requests"] == 0 and r["llmq_attempts"] == 0 for r in hits)
    assert all(r["llmq_pack_rows"] > 1 for r in final.values() if not r["llmq_cached"])  # 12 rows: 10 + 2
    assert len(day1) == 60
