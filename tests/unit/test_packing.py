"""The pack's envelope, its answer matched back by id, the automatic size and the option's checks."""

from __future__ import annotations

import json

import pytest

from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.packing import PACK_INSTRUCTION, PackedChatRequest, PackSizer, group_rows
from airflow_provider_llmq.core.packing.envelope import envelope_text, pack_schema
from airflow_provider_llmq.core.packing.runner import shares
from airflow_provider_llmq.core.packing.sizer import MAX_AUTO_ROWS, TARGET_PROMPT_TOKENS
from airflow_provider_llmq.core.packing.unpack import unpack
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.core.request.payload import ChatRequest
from airflow_provider_llmq.core.request.structured import StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "label": {"type": "string"}},
    "required": ["id", "label"],
    "additionalProperties": False,
}


def test_the_envelope_sends_the_system_prompt_once_and_the_instruction() -> None:
    request = PackedChatRequest.of(
        ChatRequest(system_prompt="Be brief.", params={"max_tokens": 10})
    ).for_rows(3)
    body = request.body(envelope_text(["a", "b", "c"]))
    roles = [(m["role"], m["content"]) for m in body["messages"]]
    assert roles[0] == ("system", "Be brief.") and roles[1] == ("system", PACK_INSTRUCTION)
    items = json.loads(roles[2][1])["items"]
    assert items == [{"id": "1", "prompt": "a"}, {"id": "2", "prompt": "b"}, {"id": "3", "prompt": "c"}]
    assert body["response_format"]["json_schema"]["name"] == "llmq_pack"
    assert body["max_tokens"] == 3 * (10 + 20) + 8  # a row's max_tokens, for each row and its id


def test_the_pack_schema_is_strict_and_keeps_a_user_field_named_id() -> None:
    free = pack_schema(None)["properties"]["items"]["items"]
    assert free["required"] == ["id", "answer"] and free["additionalProperties"] is False
    item = pack_schema(StructuredOutput(SCHEMA).schema)["properties"]["items"]["items"]
    assert list(item["properties"]) == ["llmq_item_id", "id", "label"]
    StructuredOutput(pack_schema(StructuredOutput(SCHEMA).schema))  # the API's strict rules hold


def test_unpack_matches_by_id_never_by_position() -> None:
    content = json.dumps(
        {
            "items": [
                {"id": "2", "answer": "two"},
                {"id": "1", "answer": "one"},
                {"id": "3", "answer": "three"},
                {"id": "3", "answer": "other three"},
                {"id": "9", "answer": "nine"},
            ]
        }
    )
    found = unpack(content, ["1", "2", "3", "4"], None)
    assert found.answers == {"1": "one", "2": "two"}
    assert found.duplicated == ["3"] and found.unknown == ["9"] and found.missing == ["3", "4"]


def test_unpack_checks_each_structured_item_on_its_own() -> None:
    output = StructuredOutput(SCHEMA)
    content = json.dumps(
        {
            "items": [
                {"llmq_item_id": "1", "id": 5, "label": "x"},
                {"llmq_item_id": "2", "id": "five", "label": "y"},
            ]
        }
    )
    found = unpack(content, ["1", "2"], output)
    assert json.loads(found.answers["1"]) == {"id": 5, "label": "x"}
    assert "2" in found.invalid and found.missing == ["2"]


@pytest.mark.parametrize("content", ["not json", '{"answers": []}', "[1, 2]"])
def test_an_unusable_answer_is_a_whole_pack_problem(content: str) -> None:
    found = unpack(content, ["1", "2"], None)
    assert found.problem is not None and found.missing == ["1", "2"] and not found.answers


def test_auto_packs_to_the_token_target_and_the_row_cap() -> None:
    sizer = PackSizer("auto")
    short = [(i, "short review") for i in range(200)]
    assert [len(p) for p in group_rows(short, sizer)][:3] == [MAX_AUTO_ROWS] * 3
    long = [(i, "word " * 300) for i in range(20)]
    sizes = [len(p) for p in group_rows(long, sizer)]
    assert sum(sizes) == 20 and max(sizes) < 10  # about TARGET_PROMPT_TOKENS a pack
    assert TARGET_PROMPT_TOKENS == 2_000


def test_auto_shrinks_on_failures_that_say_too_big_and_grows_back() -> None:
    sizer = PackSizer("auto")
    sizer.failed(64, 5000, size=False)  # a content filter: one row's doing
    assert sizer.row_cap() == 64
    sizer.failed(64, 5000, size=True)
    assert sizer.row_cap() == 32
    sizer.answered(32, complete=False, completion_tokens=None)
    assert sizer.row_cap() == 16
    sizer.answered(16, complete=True, completion_tokens=None)
    assert sizer.row_cap() == 20
    sizer.failed(20, 3000, size=True, context=True)
    assert sizer.token_cap() == 1500


def test_the_answer_length_caps_a_pack() -> None:
    assert PackSizer("auto", max_tokens=1000).row_cap() == (16_384 - 8) // 1020
    learned = PackSizer("auto")
    learned.answered(64, complete=True, completion_tokens=64 * 800)
    assert learned.row_cap() == (16_384 - 8) // 1020


def test_empty_prompts_go_alone() -> None:
    packs = list(group_rows([(0, "a"), (1, ""), (2, "b"), (3, None), (4, "c")], PackSizer(8)))
    assert [[r[0] for r in p] for p in packs] == [[1], [3], [0, 2, 4]]


def test_shares_add_up_to_the_total() -> None:
    split = shares(101, [10, 20, 30, 41])
    assert sum(split) == 101 and split == sorted(split)  # type: ignore[type-var]
    assert shares(None, [1, 2]) == [None, None]


@pytest.mark.parametrize("value", [0, -1, 2.5, "8", True, None])
def test_rows_per_request_is_refused_before_anything_starts(value: object) -> None:
    with pytest.raises(LLMQueryConfigError, match="rows_per_request"):
        QueryOptions(rows_per_request=value)  # type: ignore[arg-type]


def test_rows_per_request_values_accepted() -> None:
    assert not QueryOptions().packed
    assert QueryOptions(rows_per_request=20).packed and QueryOptions(rows_per_request="auto").packed


def test_the_operators_refuse_a_bad_value_at_parse_time() -> None:
    from airflow_provider_llmq.operators.batch_api import LLMQueryBatchAPIOperator
    from airflow_provider_llmq.operators.llmq import LLMQueryRateLimitedOperator

    common = {"source_table": "t", "output_table": "o"}
    with pytest.raises(LLMQueryConfigError, match="rows_per_request"):
        LLMQueryRateLimitedOperator(task_id="bad", rows_per_request=0, **common)
    assert (
        LLMQueryRateLimitedOperator(task_id="good", rows_per_request="auto", **common).rows_per_request
        == "auto"
    )
    with pytest.raises(LLMQueryConfigError, match="rows_per_request"):
        LLMQueryBatchAPIOperator(task_id="batch", rows_per_request="many", **common)
    assert LLMQueryBatchAPIOperator(task_id="batch", rows_per_request=10, **common).rows_per_request == 10
