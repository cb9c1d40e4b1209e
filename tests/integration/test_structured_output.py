"""Structured output over real sockets (the mock server over TLS): the core checks each answer as it
arrives, the operators write typed columns, and a checkpoint made for one schema is not resumed
with another. One small ``dag.test()`` covers the DDL and JSON schema inputs, flattening and the UDF
placement; the rest call the core or ``execute`` directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.methods import query_async_limited, query_thread_pool
from airflow_provider_llmq.core.request.error_codes import INVALID_OUTPUT
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.core.request.payload import DEFAULT_SYSTEM_PROMPT
from airflow_provider_llmq.operators.llmq import LLMQueryConfigFailure, LLMQueryRateLimitedOperator
from airflow_provider_llmq.spark.structured import resolve_output_schema
from airflow_provider_llmq.testing.mock_server.structured import expected_structured_answer
from tests.conftest import DEPLOYMENT, llmq_connection_env, run_dag_file

SENTIMENT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "confidence": {"type": ["number", "null"]},
        "aspects": {"type": "array", "items": {"type": "string"}},
        "detail": {
            "type": "object",
            "properties": {"stars": {"type": "integer"}, "verified": {"type": ["boolean", "null"]}},
            "required": ["stars", "verified"],
        },
    },
    "required": ["label", "confidence", "aspects", "detail"],
}
MARKERS = {5: "invalid_json", 6: "schema_mismatch", 7: "overflow", 8: "bad_enum"}
DDL = (
    "name string NOT NULL, count int, views bigint, ratio double, flag boolean, "
    "tags array<string>, inner struct<x: int NOT NULL, note: string>"
)


def _prompt(i: int, tag: str = "") -> str:
    marker = f" [[{MARKERS[i]}]]" if i in MARKERS else ""
    return f"{tag}review {i}{marker}"


def _expected(schema: Any, prompt: str) -> tuple[str, str | None]:
    """What the mock answers a prompt under this output schema, and what is wrong with it (None: valid)."""
    spec = resolve_output_schema(schema)
    output = QueryOptions(
        output_schema=spec.schema, output_check_schema=spec.check_schema
    ).structured_output()
    assert output is not None
    params = {"response_format": output.response_format()}  # besides messages and model, all it sees
    raw = expected_structured_answer(DEPLOYMENT, DEFAULT_SYSTEM_PROMPT, prompt, params)
    assert raw is not None
    return raw, output.problem(raw)


@pytest.fixture
def llm(server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in llmq_connection_env(server).items():
        monkeypatch.setenv(name, value)
    return server


def test_answers_are_checked_as_they_arrive_and_invalid_ones_keep_their_text(
    endpoint: EndpointConfig, server: Any
) -> None:
    spec = resolve_output_schema(SENTIMENT)
    rows = [(i, _prompt(i)) for i in range(12)]
    results = {
        r.row_id: r
        for r in query_async_limited(
            endpoint,
            rows,
            max_concurrency=4,
            output_schema=spec.schema,
            output_check_schema=spec.check_schema,
            retry_backoff=0.001,
        )
    }
    assert sorted(results) == list(range(12))
    for i, prompt in rows:
        result = results[i]
        raw, problem = _expected(SENTIMENT, prompt)
        assert result.response == raw  # the raw text, for an answer and an invalid one alike
        if i in MARKERS:
            assert problem is not None  # the marker broke the answer
            assert (result.status, result.error_code, result.error_message) == (
                "error",
                INVALID_OUTPUT,
                problem,
            )
            assert result.prompt_tokens and result.completion_tokens  # billed all the same
        else:
            assert result.status == "ok", (i, result.error_message)
        assert result.attempts == 1  # an invalid answer is the model's answer: never asked again
        assert server.attempts_for(prompt) == 1


def test_repair_asks_once_more_with_the_reason_and_checks_the_new_answer(server: Any) -> None:
    from tests.conftest import make_endpoint

    rows = [(i, _prompt(i)) for i in range(4, 10)]
    spec = resolve_output_schema(SENTIMENT)  # with the bounds: 2**70 overflows a bigint
    results = {
        r.row_id: r
        for r in query_thread_pool(
            make_endpoint(server, "openai"),
            rows,
            max_workers=3,
            output_schema=spec.schema,
            output_check_schema=spec.check_schema,
            repair_invalid_output=True,
        )
    }
    for i, _ in rows:
        assert results[i].status == "ok", (i, results[i].error_message)
        assert results[i].attempts == (2 if i in MARKERS else 1)
        assert json.loads(results[i].response or "")["label"] in ("positive", "neutral", "negative")
    stats = server.stats()
    assert stats["chat_requests"] == len(rows) + len(MARKERS)
    # the invalid answer before a repair was billed too: each row counts every attempt's usage
    assert sum(r.prompt_tokens or 0 for r in results.values()) == stats["prompt_tokens_total"]
    assert sum(r.completion_tokens or 0 for r in results.values()) == stats["completion_tokens_total"]


DAG = """
from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_provider_llmq.operators.llmq import LLMQueryThreadPoolOperator, LLMQueryUDFOperator

COMMON = dict(
    source_path="{source}", id_col="id", prompt_col="prompt", retry_backoff=0.001, progress_interval=1
)

with DAG(
    "llmq_structured",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    default_args={{"owner": "tests", "retries": 0, "retry_delay": timedelta(0)}},
) as dag:
    # the UDF operator: the output schema travels to the executors with the UDF
    ddl = LLMQueryUDFOperator(
        task_id="ddl", output_schema={ddl!r}, output_path="{out}/ddl", num_partitions=2, **COMMON
    )
    flat = LLMQueryThreadPoolOperator(
        task_id="flat",
        output_schema={sentiment!r},
        flatten_output=True,
        response_col="sentiment",
        output_path="{out}/flat",
        max_workers=4,
        **COMMON,
    )
    ddl >> flat
"""


def test_operators_write_typed_columns_from_ddl_and_json_schema(
    airflow_db: Path, spark: Any, llm: Any, tmp_path: Path
) -> None:
    from pyspark.sql import types as T

    n = 20
    source = tmp_path / "src"
    spark.createDataFrame([(i, _prompt(i)) for i in range(n)], "id long, prompt string").write.parquet(
        str(source)
    )
    out = tmp_path / "out"
    run = run_dag_file(DAG.format(source=source, out=out, ddl=DDL, sentiment=SENTIMENT), "llmq_structured")
    assert run.state == "success"

    # DDL: one struct column named response_col, the raw text beside it, every Spark type kept
    ddl_frame = spark.read.parquet(str(out / "ddl"))
    schema = ddl_frame.schema
    assert isinstance(schema["response"].dataType, T.StructType)
    assert schema["response"].dataType.simpleString() == (
        "struct<name:string,count:int,views:bigint,ratio:double,flag:boolean,tags:array<string>,"
        "inner:struct<x:int,note:string>>"
    )
    assert schema["response_raw"].dataType == T.StringType()
    rows = {r["id"]: r for r in ddl_frame.collect()}
    assert sorted(rows) == list(range(n))
    nulls = 0
    for i, row in rows.items():
        raw, problem = _expected(DDL, _prompt(i))
        assert row["response_raw"] == raw
        if problem is not None:
            assert (row["llmq_status"], row["llmq_error_code"], row["llmq_error"]) == (
                "error",
                INVALID_OUTPUT,
                problem,
            )
            assert row["response"] is None  # rows in error keep a null struct
            continue
        assert row["llmq_status"] == "ok", (i, row["llmq_error"])
        assert row["response"].asDict(recursive=True) == json.loads(raw)
        nulls += sum(v is None for v in row["response"].asDict().values())
    assert nulls  # nullable fields did get nulls, and they came through as nulls
    assert "not valid JSON" in rows[5]["llmq_error"]
    assert "maximum of 2147483647" in rows[7]["llmq_error"]  # an int given more than 32 bits
    assert rows[8]["llmq_status"] == "ok"  # the DDL has no enum: the bad_enum marker breaks nothing

    # a JSON schema, flattened: the fields are columns under the prefix, enums are strings
    flat = spark.read.parquet(str(out / "flat"))
    assert [c for c in flat.columns if c.startswith("sentiment")] == [
        "sentiment_label",
        "sentiment_confidence",
        "sentiment_aspects",
        "sentiment_detail",
        "sentiment_raw",
    ]
    assert flat.schema["sentiment_detail"].dataType.simpleString() == "struct<stars:bigint,verified:boolean>"
    labels = {r["id"]: r for r in flat.collect()}
    assert sorted(labels) == list(range(n))
    for i, row in labels.items():
        if i in MARKERS:
            assert row["llmq_error_code"] == INVALID_OUTPUT and row["sentiment_label"] is None
            assert row["sentiment_raw"] == _expected(SENTIMENT, _prompt(i))[0]  # kept
        else:
            value = json.loads(row["sentiment_raw"])
            assert row["sentiment_label"] == value["label"] in ("positive", "neutral", "negative")
            assert row["sentiment_detail"]["stars"] == value["detail"]["stars"]
    assert labels[8]["llmq_error"] and "not one of" in labels[8]["llmq_error"]


def test_a_struct_type_schema_resumes_only_with_that_schema_and_a_new_parsing_asks_nothing(
    spark: Any, llm: Any, tmp_path: Path
) -> None:
    from pyspark.sql import types as T

    struct = T.StructType(
        [T.StructField("label", T.StringType(), False), T.StructField("scores", T.ArrayType(T.LongType()))]
    )
    source = str(tmp_path / "src")
    spark.createDataFrame([(i, _prompt(i)) for i in range(6)], "id long, prompt string").write.parquet(source)
    args: dict[str, Any] = {
        "task_id": "ask",
        "source_path": source,
        "id_col": "id",
        "output_path": str(tmp_path / "out"),
        "checkpoint_key": "structured",
        "keep_checkpoint": True,
        "retry_backoff": 0.001,
    }
    first = LLMQueryRateLimitedOperator(output_schema=struct, **args).execute({})
    assert first["rows"] == 6 and first["errors_by_code"] == {INVALID_OUTPUT: 1}  # row 5: invalid JSON
    sent = llm.stats()["chat_requests"]
    assert sent == 6
    out = spark.read.parquet(str(tmp_path / "out"))
    assert out.schema["response"].dataType.simpleString() == "struct<label:string,scores:array<bigint>>"
    for row in out.collect():
        raw, problem = _expected(struct, _prompt(row["id"]))
        assert row["response_raw"] == raw
        if problem is None:
            assert row["llmq_status"] == "ok"
            assert row["response"].asDict(recursive=True) == json.loads(raw)
        else:
            assert (row["llmq_error_code"], row["response"]) == (INVALID_OUTPUT, None)

    with pytest.raises(LLMQueryConfigFailure) as refused:
        LLMQueryRateLimitedOperator(output_schema="label string", **args).execute({})
    assert "output_schema" in str(refused.value)

    # the same schema, parsed another way (flattened): the raw answers in the checkpoint suffice
    again = LLMQueryRateLimitedOperator(output_schema=struct, flatten_output="s_", **args).execute({})
    assert again["resumed_requests"] == 6 and llm.stats()["chat_requests"] == sent
    flat = spark.read.parquet(str(tmp_path / "out"))
    assert flat.columns[:5] == ["id", "prompt", "s_label", "s_scores", "response_raw"]
    assert "response" not in flat.columns
    labels = {r["id"]: r["s_label"] for r in flat.collect()}
    assert labels[0] == json.loads(_expected(struct, _prompt(0))[0])["label"]


def test_a_bad_ddl_is_a_config_error_naming_it_before_any_request(
    spark: Any, llm: Any, tmp_path: Path
) -> None:
    source = str(tmp_path / "src")
    spark.createDataFrame([(1, "hello")], "id long, prompt string").write.parquet(source)
    for bad, words in (
        ("label strang", ["label strang", "not a Spark DDL schema"]),
        ("tags map<string, int>", ["$.tags", "map<string,int>"]),
        ("int", ["single int", "name the field"]),
    ):
        with pytest.raises(LLMQueryConfigFailure) as raised:
            LLMQueryRateLimitedOperator(
                task_id="ask",
                source_path=source,
                id_col="id",
                output_path=str(tmp_path / "out"),
                checkpoint_key="bad",
                output_schema=bad,
            ).execute({})
        for word in words:
            assert word in str(raised.value), (bad, str(raised.value))
    assert llm.stats()["chat_requests"] == 0
