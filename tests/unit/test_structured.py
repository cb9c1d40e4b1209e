"""Structured output without a network or a Spark session: the strict schema, the check of an
answer, the request body, the classification of a 200, Spark types as JSON schemas (and back), and
the mock server's answers built from a schema."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pyspark.sql import types as T

from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.request.error_codes import INVALID_OUTPUT
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.core.request.payload import Answer, Failure, classify_response
from airflow_provider_llmq.core.request.structured import StructuredOutput, strict_schema
from airflow_provider_llmq.spark.structured import output_spec, resolve_output_schema
from airflow_provider_llmq.testing.mock_server.structured import expected_structured_answer

SENTIMENT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "confidence": {"type": ["number", "null"]},
        "aspects": {"type": "array", "items": {"type": "string"}},
        "detail": {
            "type": "object",
            "properties": {"stars": {"type": "integer"}, "verified": {"type": "boolean"}},
            "required": ["stars", "verified"],
        },
    },
    "required": ["label", "confidence", "aspects", "detail"],
}


def _chat_200(content: str, finish_reason: str = "stop") -> bytes:
    return json.dumps(
        {
            "choices": [
                {"message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}
            ],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7},
        }
    ).encode()


# --- the strict schema ---------------------------------------------------------------------------


def test_strict_schema_fills_additional_properties_false_at_every_object() -> None:
    strict = strict_schema(SENTIMENT)
    assert strict["additionalProperties"] is False
    assert strict["properties"]["detail"]["additionalProperties"] is False
    assert "additionalProperties" not in SENTIMENT  # the caller's dict is untouched


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "array", "items": {"type": "string"}}, ["root", "object"]),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
                "required": ["a"],
            },
            ["required", "['b']", "null"],
        ),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "required": ["a"],
                "additionalProperties": True,
            },
            ["additionalProperties"],
        ),
        (
            {"type": "object", "properties": {"a": {"type": "strnig"}}, "required": ["a"]},
            ["not a valid", "a"],
        ),
        ({"type": "object", "properties": {}}, ["properties"]),
    ],
)
def test_a_schema_strict_mode_cannot_take_is_a_config_error_naming_the_rule(
    schema: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(LLMQueryConfigError) as raised:
        strict_schema(schema)
    for word in words:
        assert word in str(raised.value)


# --- the check of an answer ---------------------------------------------------------------------


def test_an_answer_that_follows_the_schema_has_no_problem() -> None:
    output = StructuredOutput(SENTIMENT)
    answer = {
        "label": "neutral",
        "confidence": None,
        "aspects": ["price"],
        "detail": {"stars": 3, "verified": True},
    }
    assert output.problem(json.dumps(answer)) is None


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('{"label": "neutral"', ["not valid JSON"]),
        ("NaN", ["not valid JSON", "NaN"]),
        (
            '{"label": "great", "confidence": 1, "aspects": [], "detail": {"stars": 1, "verified": true}}',
            ["$.label", "'great' is not one of"],
        ),
        ('{"label": "neutral", "confidence": 1, "aspects": []}', ["'detail' is a required property"]),
        (
            '{"label": "neutral", "confidence": 1, "aspects": [], '
            '"detail": {"stars": 5.0, "verified": true}}',
            ["$.detail.stars", "is not of type 'integer'"],
        ),
        (
            '{"label": "neutral", "confidence": 1, "aspects": [3], "detail": {"stars": 5, "verified": true}}',
            ["$.aspects[0]"],
        ),
        (
            '{"label": "neutral", "confidence": 1, "aspects": [], '
            '"detail": {"stars": 5, "verified": true}, "x": 1}',
            ["Additional properties"],
        ),
    ],
)
def test_an_answer_that_does_not_follow_the_schema_says_where_and_why(content: str, words: list[str]) -> None:
    problem = StructuredOutput(SENTIMENT).problem(content)
    assert problem is not None
    for word in words:
        assert word in problem


def test_the_reason_is_cut_so_a_long_answer_is_not_quoted_whole() -> None:
    long_label = "x" * 5000
    content = json.dumps(
        {"label": long_label, "confidence": 1, "aspects": [], "detail": {"stars": 1, "verified": True}}
    )
    problem = StructuredOutput(SENTIMENT).problem(content)
    assert problem is not None and len(problem) <= 500


# --- the request and the classification ---------------------------------------------------------


def test_the_schema_is_sent_as_a_strict_json_schema_response_format() -> None:
    options = QueryOptions(output_schema=SENTIMENT, request_params={"temperature": 0})
    body = options.chat_request(_openai_endpoint()).body("hello")
    assert body["temperature"] == 0
    assert body["response_format"]["type"] == "json_schema"
    spec = body["response_format"]["json_schema"]
    assert spec["strict"] is True and spec["name"] == "llmq_output"
    assert spec["schema"] == strict_schema(SENTIMENT)


def test_output_schema_with_a_response_format_in_request_params_is_a_config_error_naming_both() -> None:
    with pytest.raises(LLMQueryConfigError) as raised:
        QueryOptions(output_schema=SENTIMENT, request_params={"response_format": {"type": "json_object"}})
    assert "output_schema" in str(raised.value) and "response_format" in str(raised.value)


def test_an_invalid_answer_is_a_permanent_invalid_output_that_keeps_its_text_and_usage() -> None:
    output = StructuredOutput(SENTIMENT)
    # a server saying "retry" does not make the model's answer any more valid
    outcome = classify_response(200, {"x-should-retry": "true"}, _chat_200("not json"), output)
    assert isinstance(outcome, Failure)
    assert outcome.code == INVALID_OUTPUT and not outcome.retryable
    assert outcome.content == "not json" and "not valid JSON" in outcome.message
    assert (outcome.prompt_tokens, outcome.completion_tokens, outcome.http_status) == (11, 7, 200)


def test_an_answer_cut_by_max_tokens_says_so() -> None:
    outcome = classify_response(200, {}, _chat_200('{"label": "pos', "length"), StructuredOutput(SENTIMENT))
    assert isinstance(outcome, Failure) and outcome.code == INVALID_OUTPUT
    assert "max_tokens" in outcome.message


def test_without_an_output_schema_any_text_is_an_answer() -> None:
    assert isinstance(classify_response(200, {}, _chat_200("not json")), Answer)


def test_the_repair_request_shows_the_invalid_answer_and_the_reason() -> None:
    request = QueryOptions(output_schema=SENTIMENT, repair_invalid_output=True).chat_request(
        _openai_endpoint()
    )
    failure = Failure(INVALID_OUTPUT, "the answer is not valid JSON", False, 200, content="oops")
    body = request.repair_body("hello", failure)
    assert body is not None
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    assert body["messages"][2]["content"] == "oops"
    assert "not valid JSON" in body["messages"][3]["content"]
    assert body["response_format"]["json_schema"]["strict"] is True
    # off by default, and never for another error
    assert (
        QueryOptions(output_schema=SENTIMENT).chat_request(_openai_endpoint()).repair_body("x", failure)
        is None
    )
    other = Failure("server_error", "HTTP 500", True, 500)
    assert request.repair_body("x", other) is None


def _openai_endpoint() -> Any:
    from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig

    return EndpointConfig(api_base="https://api.example.com/v1", api_key="k", api_type="openai", model="m")


# --- Spark types as JSON schemas, and back ------------------------------------------------------

EVERY_TYPE = T.StructType(
    [
        T.StructField("name", T.StringType(), False),
        T.StructField("count", T.IntegerType(), False),
        T.StructField("views", T.LongType(), True),
        T.StructField("small", T.ShortType(), False),
        T.StructField("tiny", T.ByteType(), False),
        T.StructField("ratio", T.DoubleType(), False),
        T.StructField("weight", T.FloatType(), False),
        T.StructField("price", T.DecimalType(5, 2), False),
        T.StructField("flag", T.BooleanType(), False),
        T.StructField("day", T.DateType(), False),
        T.StructField("tags", T.ArrayType(T.StringType(), False), False),
        T.StructField("inner", T.StructType([T.StructField("x", T.IntegerType(), True)]), True),
    ]
)


def test_a_struct_type_becomes_a_strict_schema_with_nullable_as_a_type_union() -> None:
    spec = resolve_output_schema(EVERY_TYPE)
    props = spec.schema["properties"]
    assert spec.schema["required"] == [f.name for f in EVERY_TYPE.fields]
    assert props["name"] == {"type": "string"}
    assert props["count"] == {"type": "integer"}
    assert props["views"] == {"type": ["integer", "null"]}
    assert props["ratio"] == {"type": "number"} and props["price"] == {"type": "number"}
    assert props["flag"] == {"type": "boolean"}
    assert props["day"] == {"type": "string", "format": "date"}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["inner"]["type"] == ["object", "null"]
    assert props["inner"]["properties"]["x"] == {"type": ["integer", "null"]}
    assert props["inner"]["additionalProperties"] is False
    assert "maximum" not in json.dumps(spec.schema)  # bounds are checked, not sent


def _every_type_answer(**changes: Any) -> str:
    value = {
        "name": "a",
        "count": 1,
        "views": None,
        "small": 1,
        "tiny": 1,
        "ratio": 0.5,
        "weight": 0.5,
        "price": 12.5,
        "flag": True,
        "day": "2024-02-29",
        "tags": ["x"],
        "inner": {"x": None},
    }
    value.update(changes)
    return json.dumps(value).replace('"__inf__"', "1e999")


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"count": 10**12}, "$.count"),  # an int given a number only a bigint holds
        ({"count": 2**31}, "$.count"),
        ({"views": 2**70}, "$.views"),  # a bigint given more than 64 bits
        ({"small": 40_000}, "$.small"),
        ({"tiny": -129}, "$.tiny"),
        ({"weight": 1e39}, "$.weight"),  # over a float's largest value
        ({"ratio": "__inf__"}, "$.ratio"),  # 1e999 reads as infinity
        ({"price": 1000.0}, "$.price"),  # decimal(5,2) holds up to 999.99
        ({"inner": {"x": 2**31}}, "$.inner.x"),
        ({"day": "2024-02-30"}, "$.day"),
        ({"tags": ["x", None]}, "$.tags[1]"),  # the array's elements are NOT NULL
        ({"name": None}, "$.name"),
    ],
)
def test_numbers_that_overflow_their_spark_type_are_invalid(changes: dict[str, Any], where: str) -> None:
    spec = resolve_output_schema(EVERY_TYPE)
    output = StructuredOutput(spec.schema, spec.check_schema)
    assert output.problem(_every_type_answer()) is None
    problem = output.problem(_every_type_answer(**changes))
    assert problem is not None and where in problem, problem


def test_a_json_schema_becomes_spark_columns_with_enums_as_strings_and_integers_as_bigint() -> None:
    spec = resolve_output_schema({"name": "review", "schema": SENTIMENT, "strict": True})
    assert spec.name == "review"
    fields = {f.name: f for f in spec.spark_type.fields}
    assert fields["label"].dataType == T.StringType() and not fields["label"].nullable
    assert fields["confidence"].dataType == T.DoubleType() and fields["confidence"].nullable
    assert fields["aspects"].dataType == T.ArrayType(T.StringType(), False)
    detail = fields["detail"].dataType
    assert isinstance(detail, T.StructType)
    assert detail["stars"].dataType == T.LongType() and detail["verified"].dataType == T.BooleanType()
    # the user's enum is kept, and a bigint's bounds are added for the check only
    assert spec.check_schema["properties"]["detail"]["properties"]["stars"]["maximum"] == 2**63 - 1
    assert "maximum" not in json.dumps(spec.schema)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (
            T.StructType([T.StructField("m", T.MapType(T.StringType(), T.IntegerType()))]),
            ["$.m", "map<string,int>"],
        ),
        (T.StructType([T.StructField("b", T.BinaryType())]), ["$.b", "binary"]),
        (["label string"], ["DDL string, a StructType or a JSON schema", "list"]),
        (
            {"type": "object", "properties": {"a": {"type": ["string", "integer"]}}, "required": ["a"]},
            ["$.a", "one type"],
        ),
        (
            {"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}, "required": ["a"]},
            ["$.a", "$ref"],
        ),
    ],
)
def test_a_schema_without_a_column_form_is_a_config_error_naming_where(value: Any, words: list[str]) -> None:
    with pytest.raises(LLMQueryConfigError) as raised:
        resolve_output_schema(value)
    for word in words:
        assert word in str(raised.value)


def test_flatten_output_needs_an_output_schema_and_a_bool_or_prefix() -> None:
    assert output_spec(None, False) is None
    with pytest.raises(LLMQueryConfigError, match="needs an output_schema"):
        output_spec(None, True)
    with pytest.raises(LLMQueryConfigError, match="flatten_output must be"):
        output_spec(SENTIMENT, 3)


# --- the mock server's answers ------------------------------------------------------------------


def _params(schema: dict[str, Any]) -> dict[str, Any]:
    return {"response_format": StructuredOutput(schema).response_format()}


VERDICTS = ("I love it, works great", "It's okay, average", "It broke, a waste of money")


def test_the_mock_answers_valid_json_built_from_the_schema_deterministically() -> None:
    output = StructuredOutput(SENTIMENT)
    prompts = [f"review {i}: {VERDICTS[i % 3]}" for i in range(60)]
    answers = [expected_structured_answer("m", None, prompt, _params(SENTIMENT)) for prompt in prompts]
    assert answers == [
        expected_structured_answer("m", None, prompt, _params(SENTIMENT)) for prompt in prompts
    ]
    assert len(set(answers)) == 60
    values = [json.loads(a) for a in answers if a is not None]
    assert all(output.problem(a) is None for a in answers if a is not None)
    # a sentiment scale is read from the words, not drawn
    assert [v["label"] for v in values] == ["positive", "neutral", "negative"] * 20
    assert any(v["confidence"] is None for v in values) and any(v["confidence"] is not None for v in values)
    assert any(v["aspects"] for v in values) and any(not v["aspects"] for v in values)
    assert expected_structured_answer("m", None, "review", {"temperature": 0}) is None  # free text


@pytest.mark.parametrize(
    ("marker", "words"),
    [
        ("invalid_json", ["not valid JSON"]),
        ("schema_mismatch", ["'label' is a required property"]),
        ("bad_enum", ["$.label", "__not_in_enum__"]),
        ("overflow", ["$.detail.stars", "maximum"]),
    ],
)
def test_a_marker_makes_the_mock_answer_wrongly(marker: str, words: list[str]) -> None:
    spec = resolve_output_schema(SENTIMENT)
    output = StructuredOutput(spec.schema, spec.check_schema)
    for i in range(10):  # whatever the draws, the marked answer is wrong
        answer = expected_structured_answer("m", None, f"review {i} [[{marker}]]", _params(SENTIMENT))
        assert answer is not None
        problem = output.problem(answer)
        assert problem is not None
        for word in words:
            assert word in problem, problem


def test_a_wide_decimal_bound_is_exact() -> None:
    # float(10**18) - 0.01 == 1e18: a float bound would let 10**18 into a decimal(20,2)
    from pyspark.sql import types as T

    spec = resolve_output_schema(T.StructType([T.StructField("amount", T.DecimalType(20, 2))]))
    output = StructuredOutput(spec.schema, spec.check_schema)
    assert output.problem(json.dumps({"amount": 10**18 - 1})) is None
    problem = output.problem(json.dumps({"amount": 10**18}))
    assert problem is not None and "$.amount" in problem, problem
