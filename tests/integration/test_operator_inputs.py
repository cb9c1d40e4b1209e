"""Operators called directly (no scheduler): sources, sinks, validation, empty input, dedupe,
error policy and resume, against local Spark and the mock server over TLS."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmq.core.errors import LLMQueryAuthError, LLMQueryConfigError, LLMQueryUnreachableError
from airflow_provider_llmq.operators.llmq import (
    LLMQueryAsyncBatchOperator,
    LLMQueryConfigFailure,
    LLMQueryFailedRowsError,
    LLMQueryRateLimitedOperator,
    LLMQueryThreadPoolOperator,
    LLMQueryUDFOperator,
)
from airflow_provider_llmq.spark.schema import output_columns
from airflow_provider_llmq.spark.sink import join_results
from airflow_provider_llmq.testing.mock_server import expected_answer
from tests.conftest import DEPLOYMENT, llmq_connection_env

SYSTEM = "You are a helpful assistant."


@pytest.fixture
def llm(server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in llmq_connection_env(server).items():
        monkeypatch.setenv(name, value)
    server.configure(retry_after_ms=5)
    return server


@pytest.fixture
def source(spark: Any, tmp_path: Path) -> str:
    rows = [(i, f"question {i}?", f"cat{i % 4}") for i in range(120)]
    path = str(tmp_path / "source")
    spark.createDataFrame(rows, "id long, prompt string, cat string").write.parquet(path)
    return path


def _run(cls: type = LLMQueryRateLimitedOperator, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("task_id", "ask")
    kwargs.setdefault("checkpoint_key", "test")
    kwargs.setdefault("retry_backoff", 0.001)
    return cls(**kwargs).execute({})


def _stable(rows: Any, key: str = "id") -> dict[Any, Any]:
    """Rows by id, without the one column that differs between two runs (latency)."""
    return {r[key]: {c: v for c, v in r.asDict().items() if c != "llmq_latency_ms"} for r in rows}


def _answers(spark: Any, path: str, key: str = "id") -> dict[Any, Any]:
    return _stable(spark.read.parquet(path).collect(), key)


@pytest.mark.slow  # over 7 s: CI's slow step runs it
def test_sql_table_and_path_sources_give_the_same_rows(
    llm: Any, spark: Any, source: str, tmp_path: Path
) -> None:
    spark.read.parquet(source).write.mode("overwrite").saveAsTable("llmq_test_prompts")
    outputs = {}
    for kind, arg in (
        ("path", {"source_path": source}),
        ("table", {"source_table": "llmq_test_prompts"}),
        ("sql", {"sql": "SELECT * FROM llmq_test_prompts WHERE id >= 0"}),
    ):
        out = str(tmp_path / f"out_{kind}")
        summary = _run(id_col="id", output_path=out, **arg)
        assert summary["rows"] == 120 and summary["ok"] == 120
        outputs[kind] = _answers(spark, out)
    assert outputs["path"] == outputs["table"] == outputs["sql"]
    row = outputs["path"][5]
    assert row["response"] == expected_answer(DEPLOYMENT, SYSTEM, "question 5?", None)
    assert row["cat"] == "cat1" and row["llmq_status"] == "ok"


def test_results_only_then_join_equals_full_output(llm: Any, spark: Any, source: str, tmp_path: Path) -> None:
    full, results = str(tmp_path / "full"), str(tmp_path / "results")
    _run(LLMQueryThreadPoolOperator, source_path=source, id_col="id", output_path=full)
    _run(
        LLMQueryThreadPoolOperator,
        source_path=source,
        id_col="id",
        output_path=results,
        include_source_columns=False,
        checkpoint_key="second",
    )
    assert spark.read.parquet(results).columns == ["id", *output_columns("response")]
    joined = join_results(spark.read.parquet(source), spark.read.parquet(results), "id")
    assert _stable(joined.collect()) == _answers(spark, full)


def test_join_keeps_source_rows_without_results(spark: Any) -> None:
    source = spark.createDataFrame([(1, "a"), (2, "b")], "id int, prompt string")
    results = spark.createDataFrame(
        [(1, "A", "ok", None, None, 200, 1, 3, 1, 5.0, "stop")],
        "id int, response string, llmq_status string, llmq_error_code string, llmq_error string, "
        "llmq_http_status int, llmq_attempts int, llmq_prompt_tokens int, llmq_completion_tokens int, "
        "llmq_latency_ms double, llmq_finish_reason string",
    )
    rows = {r["id"]: r for r in join_results(source, results, "id").collect()}
    assert rows[1]["response"] == "A" and rows[1]["llmq_status"] == "ok"
    assert (rows[2]["llmq_status"], rows[2]["llmq_error_code"]) == ("error", "missing_result")


def test_assigned_ids_template_and_null_prompts(llm: Any, spark: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "src")
    spark.createDataFrame(
        [("kettle", "leaks", None), ("lamp", "bright", ""), ("fan", None, "  ")],
        "product string, review string, prompt string",
    ).write.parquet(path)
    out = str(tmp_path / "out")
    _run(source_path=path, output_path=str(tmp_path / "nulls"), checkpoint_key="nulls")
    empties = spark.read.parquet(str(tmp_path / "nulls")).collect()
    assert [(r["llmq_error_code"], r["llmq_attempts"]) for r in empties] == [("empty_prompt", 0)] * 3
    assert llm.stats()["chat_requests"] == 0
    _run(source_path=path, output_path=out, prompt_template="Is this {product} review positive? {review}")
    rows = spark.read.parquet(out).collect()
    assert sorted(r["llmq_row_id"] for r in rows) == sorted({r["llmq_row_id"] for r in rows})
    by_product = {r["product"]: r for r in rows}
    assert by_product["fan"]["response"] == expected_answer(
        DEPLOYMENT, SYSTEM, "Is this fan review positive? ", None
    )
    assert by_product["kettle"]["response"] == expected_answer(
        DEPLOYMENT, SYSTEM, "Is this kettle review positive? leaks", None
    )


def test_empty_source_writes_an_empty_output_with_the_full_schema(
    llm: Any, spark: Any, tmp_path: Path
) -> None:
    path = str(tmp_path / "empty")
    spark.createDataFrame([], "id long, prompt string").write.parquet(path)
    out = str(tmp_path / "out")
    for cls in (LLMQueryUDFOperator, LLMQueryAsyncBatchOperator):
        summary = _run(cls, source_path=path, id_col="id", output_path=out)
        assert summary["rows"] == 0 and summary["requests_sent"] == 0
        frame = spark.read.parquet(out)
        assert frame.count() == 0 and frame.columns == ["id", "prompt", *output_columns("response")]
    assert llm.stats()["chat_requests"] == 0


def test_empty_source_warns_or_fails_when_asked_to(
    llm: Any, spark: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "empty")
    spark.createDataFrame([], "id long, prompt string").write.parquet(path)
    out = str(tmp_path / "out")
    assert _run(source_path=path, id_col="id", output_path=out)["rows"] == 0
    captured = capfd.readouterr()  # the task logger writes through structlog, or to logging
    assert "the input has no rows" in captured.out + captured.err + caplog.text
    with pytest.raises(LLMQueryFailedRowsError, match="no rows and fail_on_empty=True"):
        _run(source_path=path, id_col="id", output_path=out, fail_on_empty=True, checkpoint_key="e")


@pytest.fixture
def down_port(llm: Any, monkeypatch: pytest.MonkeyPatch) -> int:
    """The connection points at a port nothing listens on: a server that is down."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    for name, value in llmq_connection_env(llm).items():
        monkeypatch.setenv(name, value.replace(llm.base_url, f"https://127.0.0.1:{port}"))
    return port


def test_a_server_that_is_down_fails_the_task_not_green(spark: Any, tmp_path: Path, down_port: int) -> None:
    """Nothing answered is no success: every row ``connection_error``, the output written, the task
    failed (so Airflow emits no Asset event) with the error kinds in its message."""
    path = str(tmp_path / "src")
    spark.createDataFrame([(i, f"down {i}") for i in range(12)], "id int, prompt string").write.parquet(path)
    out = str(tmp_path / "out")
    with pytest.raises(
        LLMQueryFailedRowsError, match=r"none of the 12 rows asked was answered.*connection_error"
    ):
        _run(source_path=path, id_col="id", output_path=out, max_retries=1)
    assert spark.read.parquet(out).count() == 12  # written before failing: errors are data


def test_a_server_that_is_down_fails_the_task_in_seconds_not_after_every_row(
    spark: Any, tmp_path: Path, down_port: int
) -> None:
    """Default retries (about 24 s per row), 2,000 rows, 32 in flight: the run ends once requests
    have failed to connect for 5 s with none answered, with one message that names the endpoint,
    and writes no output (nothing downstream runs on it)."""
    import time

    port = down_port
    path = str(tmp_path / "src")
    spark.createDataFrame([(i, f"down {i}") for i in range(2000)], "id int, prompt string").write.parquet(
        path
    )
    out = tmp_path / "out"
    started = time.monotonic()
    with pytest.raises(
        LLMQueryUnreachableError,
        match=rf"127.0.0.1:{port}.*could not be reached: .* failed to connect and none was answered",
    ):
        _run(source_path=path, id_col="id", output_path=str(out), retry_backoff=0.5)
    # 2,000 rows x 24 s / 32 in flight would be 25 min; the verdict needs 5 s of refusals
    assert time.monotonic() - started < 120
    assert not out.exists()


def test_answers_paid_for_but_not_written_are_kept_and_never_paid_again(
    llm: Any, spark: Any, tmp_path: Path, source: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """The output cannot be written (a file where the output folder goes): the log says where the
    answers are, and the next try writes them without one more request."""
    out = tmp_path / "out"
    out.write_text("in the way")
    with pytest.raises(NotADirectoryError):
        _run(source_path=source, id_col="id", output_path=str(out), mode="append")
    logged = "".join(capfd.readouterr())  # the task logger writes to the console here
    assert "the output could not be written" in logged and ".llmq_checkpoints" in logged
    asked = llm.stats()["chat_requests"]
    assert asked == 120
    out.unlink()
    summary = _run(source_path=source, id_col="id", output_path=str(out), mode="append")
    assert summary["answered"] == 120 and summary["requests_sent"] == 0
    assert llm.stats()["chat_requests"] == asked


def test_the_counts_add_up_to_the_rows(llm: Any, spark: Any, tmp_path: Path) -> None:
    """Answered + failed + skipped + not sent = rows; requests_answered counts answers only (null
    prompts are results, not answers)."""
    rows = [(i, f"q{i}" + (" [[content_filter]]" if i < 3 else "")) for i in range(40)]
    rows += [(100 + i, None) for i in range(4)] + [(200, "  ")]
    path = str(tmp_path / "src")
    spark.createDataFrame(rows, "id int, prompt string").write.parquet(path)
    summary = _run(source_path=path, id_col="id", output_path=str(tmp_path / "out"), max_total_tokens=500)
    counts = {k: summary[k] for k in ("answered", "failed", "skipped", "not_sent")}
    assert sum(counts.values()) == summary["rows"] == 45, summary
    codes = summary["errors_by_code"]
    assert counts["skipped"] == codes["empty_prompt"] == 5
    assert counts["not_sent"] == codes["budget_exceeded"] > 0
    assert counts["failed"] == codes.get("content_filter", 0)
    assert summary["requests_answered"] == counts["answered"] == summary["ok"]
    assert summary["requests_sent"] == llm.stats()["chat_requests"] == counts["answered"] + counts["failed"]


def test_the_error_ratio_counts_only_rows_asked(llm: Any, spark: Any, tmp_path: Path) -> None:
    """Null prompts are not asked: 10 asked, 2 failed, 20 null is 20 % of the rows asked, not 73 %."""
    rows = [(i, f"q{i}" + (" [[content_filter]]" if i < 2 else "")) for i in range(10)]
    rows += [(100 + i, None) for i in range(20)]
    path = str(tmp_path / "src")
    spark.createDataFrame(rows, "id int, prompt string").write.parquet(path)
    out = str(tmp_path / "out")
    summary = _run(source_path=path, id_col="id", output_path=out)  # the default max_error_ratio 0.5
    assert summary["ok"] == 8 and summary["errors_by_code"]["empty_prompt"] == 20
    with pytest.raises(LLMQueryFailedRowsError, match="2 of 10 rows asked"):
        _run(source_path=path, id_col="id", output_path=out, max_error_ratio=0.1, checkpoint_key="r")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt_col": "question"}, "missing column"),
        ({"id_col": "nope"}, "id_col 'nope' is not a column"),
        ({"prompt_template": "{missing} {prompt}"}, "missing column"),
        ({"prompt_template": "{prompt!r}"}, "plain column name"),
        ({"source_table": "t"}, "exactly one source"),
        ({"source_path": None}, "exactly one source"),
        ({"mode": "upsert"}, "mode must be one of"),
        ({"on_error": "ignore"}, "on_error must be one of"),
        ({"output_table": "t"}, "exactly one sink"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"response_col": "cat"}, None),
    ],
)
def test_bad_arguments_fail_before_any_request(
    llm: Any, source: str, tmp_path: Path, kwargs: dict[str, Any], message: str | None
) -> None:
    arguments = {"source_path": source, "id_col": "id", "output_path": str(tmp_path / "out"), **kwargs}
    if message is None:  # a response_col that clashes with a source column
        with pytest.raises(LLMQueryConfigError, match="already has result column"):
            _run(**arguments)
    else:
        with pytest.raises(LLMQueryConfigError, match=message):
            _run(**arguments)
    assert llm.stats()["chat_requests"] == 0


@pytest.mark.parametrize("dedupe", [True, False])
@pytest.mark.parametrize("ids", [[1, 1, 2], [1, None, 2]], ids=["duplicate", "null"])
def test_duplicate_or_null_ids_are_refused(
    llm: Any, spark: Any, tmp_path: Path, dedupe: bool, ids: list[int | None]
) -> None:
    """Each way of counting (one distinct count without dedupe, two with it) finds the bad id."""
    path = str(tmp_path / "dups")
    rows = list(zip(ids, ["a", "b", "c"], strict=True))
    spark.createDataFrame(rows, "id int, prompt string").write.parquet(path)
    with pytest.raises(LLMQueryConfigError, match="unique"):
        _run(source_path=path, id_col="id", output_path=str(tmp_path / "out"), dedupe=dedupe)
    assert llm.stats()["chat_requests"] == 0


def test_unknown_connection_is_a_clear_error(llm: Any, source: str, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no_such_conn"):
        _run(source_path=source, id_col="id", output_path=str(tmp_path / "o"), llm_conn_id="no_such_conn")
    assert llm.stats()["chat_requests"] == 0


def test_dedupe_asks_each_distinct_prompt_once(llm: Any, spark: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "dupes")
    spark.createDataFrame(
        [(i, f"prompt {i % 10}") for i in range(200)], "id int, prompt string"
    ).write.parquet(path)
    out = str(tmp_path / "out")
    summary = _run(LLMQueryAsyncBatchOperator, source_path=path, id_col="id", output_path=out)
    assert llm.stats()["chat_requests"] == 10 and summary["requests_sent"] == 10
    rows = spark.read.parquet(out).collect()
    assert len(rows) == 200
    assert all(r["response"] == expected_answer(DEPLOYMENT, SYSTEM, r["prompt"], None) for r in rows)
    single = _run(source_path=path, id_col="id", output_path=out, dedupe=False, checkpoint_key="nodedupe")
    assert single["requests_sent"] == 200


def test_on_error_fail_and_max_error_ratio_fail_after_writing(llm: Any, spark: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "src")
    rows = [(i, f"q{i}" + (" [[content_filter]]" if i < 3 else "")) for i in range(20)]
    spark.createDataFrame(rows, "id int, prompt string").write.parquet(path)
    out = str(tmp_path / "out")
    with pytest.raises(LLMQueryFailedRowsError, match="3 of 20 rows"):
        _run(source_path=path, id_col="id", output_path=out, on_error="fail")
    assert spark.read.parquet(out).count() == 20  # written before failing
    with pytest.raises(LLMQueryFailedRowsError, match="max_error_ratio"):
        _run(source_path=path, id_col="id", output_path=out, max_error_ratio=0.1, checkpoint_key="ratio")
    assert (
        _run(source_path=path, id_col="id", output_path=out, max_error_ratio=0.2, checkpoint_key="ok")[
            "errors"
        ]
        == 3
    )


@pytest.mark.parametrize("cls", [LLMQueryRateLimitedOperator, LLMQueryUDFOperator])
def test_auth_failure_keeps_the_checkpoint_and_a_rerun_resumes(
    cls: type, llm: Any, spark: Any, source: str, tmp_path: Path
) -> None:
    llm.configure(auth_fail={"after": 50, "count": 1000})
    chunk_size = 10 if cls is LLMQueryRateLimitedOperator else 30  # the UDF runs one Spark job per chunk
    args = {
        "source_path": source,
        "id_col": "id",
        "output_path": str(tmp_path / "out"),
        "chunk_size": chunk_size,
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "checkpoint_key": "run/1",
    }
    if cls is LLMQueryRateLimitedOperator:
        args["max_concurrency"] = 4
    with pytest.raises(LLMQueryAuthError, match="401"):
        _run(cls, **args)
    answered_before = llm.stats()["requests_by_status"].get("200", 0)
    assert 0 < answered_before <= 60
    llm.configure(auth_fail=None)
    llm.reset()
    summary = _run(cls, **args)
    assert summary["rows"] == 120 and summary["ok"] == 120
    # answered rows are not asked again, but for those of a chunk not yet checkpointed
    assert summary["resumed_requests"] >= answered_before - chunk_size
    assert llm.stats()["chat_requests"] <= 120 - answered_before + chunk_size
    assert not (tmp_path / "ckpt" / "run" / "1").exists()  # removed after a successful write


def test_a_checkpoint_of_another_prompt_is_refused(llm: Any, source: str, tmp_path: Path) -> None:
    args = {
        "source_path": source,
        "id_col": "id",
        "output_path": str(tmp_path / "o"),
        "keep_checkpoint": True,
    }
    _run(**args)
    with pytest.raises(LLMQueryConfigError, match="system_prompt"):
        _run(system_prompt="Answer in French.", **args)


def test_mode_error_with_an_existing_output_fails_before_asking(
    llm: Any, spark: Any, source: str, tmp_path: Path
) -> None:
    """mode="error" and an output already there: the task fails before a single request is paid."""
    out = str(tmp_path / "out")
    spark.createDataFrame([(1, "x")], "id long, prompt string").write.parquet(out)
    llm.reset()
    with pytest.raises(LLMQueryConfigFailure, match=r"already exists and mode='error'.*nothing was asked"):
        _run(source_path=source, id_col="id", output_path=out, mode="error")
    assert llm.stats()["chat_requests"] == 0
    assert spark.read.parquet(out).count() == 1  # untouched
    # a new output path is written once in that mode
    fresh = str(tmp_path / "fresh")
    summary = _run(source_path=source, id_col="id", output_path=fresh, mode="error", checkpoint_key="f")
    assert summary["ok"] == 120


def test_an_unloadable_ca_cert_fails_before_spark_starts(
    llm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CA file that is not a certificate fails in the first moment, naming the problem, before
    Spark starts (the source path does not exist: reading it would fail otherwise) and before any
    request."""
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    _connection_extra(monkeypatch, ca_cert=str(bad))
    llm.reset()
    with pytest.raises(LLMQueryConfigFailure, match="CA certificate could not be loaded"):
        _run(source_path=str(tmp_path / "nowhere"), id_col="id", output_path=str(tmp_path / "out"))
    assert llm.stats()["chat_requests"] == 0


def test_the_connection_timeout_applies_unless_the_operator_sets_one(
    llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _connection_extra(monkeypatch, timeout=13)
    op = LLMQueryRateLimitedOperator(task_id="t", source_path="/x", output_path="/y")
    assert op._query_options().bind(op.hook.endpoint).timeout == 13.0
    op = LLMQueryRateLimitedOperator(task_id="t", source_path="/x", output_path="/y", request_timeout=7)
    assert op._query_options().bind(op.hook.endpoint).timeout == 7.0


def _connection_extra(monkeypatch: pytest.MonkeyPatch, **extra: Any) -> None:
    """The test connection with ``extra`` fields changed."""
    conn = json.loads(os.environ["AIRFLOW_CONN_LLMQ_DEFAULT"])
    conn["extra"].update(extra)
    monkeypatch.setenv("AIRFLOW_CONN_LLMQ_DEFAULT", json.dumps(conn))
