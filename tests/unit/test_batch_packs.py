"""Batch API packs without a server: pack lines, a pack's result line settled per row (usage split,
lost rows asked again, a whole failure split in halves carrying what it spent), the line estimate."""

from __future__ import annotations

import json

from airflow_provider_llmq.core.accounting.result import STATUS_ERROR, STATUS_OK, QueryResult
from airflow_provider_llmq.core.batch.batch_estimate import LineEstimator
from airflow_provider_llmq.core.batch.batch_files import LineBuilder
from airflow_provider_llmq.core.batch.batch_packs import (
    PACK_ID_PREFIX,
    PackEntry,
    PackLineBuilder,
    Spent,
    settle_pack,
    with_spent,
)
from airflow_provider_llmq.core.packing import PackedChatRequest
from airflow_provider_llmq.core.packing.envelope import pack_items, pack_max_tokens
from airflow_provider_llmq.core.request.payload import ChatRequest

REQUEST = ChatRequest(system_prompt="Be brief.")
LINES = PackLineBuilder(LineBuilder(REQUEST, "/chat/completions", "gpt"))
PROMPTS = ["a short one", "a much longer prompt with many more words in it", "third"]
KEYS = ["k1", "k2", "k3"]


def _answer(items: list[dict[str, str]], prompt: int = 300, completion: int = 60) -> QueryResult:
    return QueryResult(
        "pack", json.dumps({"items": items}), STATUS_OK, http_status=200, attempts=1,
        prompt_tokens=prompt, completion_tokens=completion, finish_reason="stop",
    )  # fmt: skip


def test_one_row_is_a_plain_line_and_several_a_pack_line_with_the_live_body() -> None:
    custom_id, line = LINES.line(["k1"], ["hello"])
    assert custom_id == "k1" and json.loads(line)["body"]["messages"][-1]["content"] == "hello"
    custom_id, line = LINES.line(KEYS, PROMPTS)
    body = json.loads(line)["body"]
    assert custom_id.startswith(PACK_ID_PREFIX) and json.loads(line)["custom_id"] == custom_id
    assert pack_items(body) == PROMPTS and body["model"] == "gpt"
    assert body == {
        **PackedChatRequest.of(REQUEST).for_rows(3).body(body["messages"][-1]["content"]),
        "model": "gpt",
    }
    assert all(k not in line.decode() for k in KEYS)  # the rows' keys never reach the API
    assert LINES.line(KEYS, PROMPTS)[0] == custom_id  # the same rows, the same id (a killed try)


def test_a_pack_answer_settles_each_row_with_its_share_of_the_usage() -> None:
    line = _answer([{"id": "1", "answer": "A"}, {"id": "2", "answer": "B"}, {"id": "3", "answer": "C"}])
    settled = settle_pack(line, PackEntry(KEYS), PROMPTS, PackedChatRequest.of(REQUEST), None)
    assert not settled.reasks
    assert [(r.row_id, r.response) for r in settled.results] == [("k1", "A"), ("k2", "B"), ("k3", "C")]
    assert sum(r.prompt_tokens or 0 for r in settled.results) == 300
    assert sum(r.completion_tokens or 0 for r in settled.results) == 60
    longest = max(settled.results, key=lambda r: r.prompt_tokens or 0)
    assert longest.row_id == "k2"  # shared by prompt tokens
    assert all(
        r.attempts == 1 and r.pack_rows == 3 and r.requests == round(1 / 3, 6) for r in settled.results
    )


def test_lost_rows_are_asked_again_and_a_whole_failure_is_split_carrying_what_it_spent() -> None:
    line = _answer([{"id": "1", "answer": "A"}, {"id": "1", "answer": "again"}, {"id": "9", "answer": "?"}])
    settled = settle_pack(line, PackEntry(KEYS), PROMPTS, PackedChatRequest.of(REQUEST), None)
    assert not settled.results  # one answered twice, the others missing or unknown: none is used
    assert len(settled.reasks) == 2  # no usable answer at all: split like a whole failure
    line = _answer([{"id": "1", "answer": "A"}, {"id": "3", "answer": "C"}])
    settled = settle_pack(line, PackEntry(KEYS), PROMPTS, PackedChatRequest.of(REQUEST), None)
    assert [r.row_id for r in settled.results] == ["k1", "k3"]
    (again,) = settled.reasks
    assert again.keys == ["k2"] and again.prompts == [PROMPTS[1]] and again.spent[0].attempts == 1
    failed = QueryResult(
        "pack", None, STATUS_ERROR, "content_filter", "filtered", http_status=400, attempts=1
    )
    entry = PackEntry(KEYS, [Spent(10, 2, 0, 1, 0.5)] * 3)  # each row was in one earlier line
    halves = settle_pack(failed, entry, PROMPTS, PackedChatRequest.of(REQUEST), None).reasks
    assert [h.keys for h in halves] == [["k1"], ["k2", "k3"]]
    assert all(s.attempts == 2 and s.prompt_tokens == 10 for h in halves for s in h.spent)
    alone = QueryResult(
        "k1", "A", STATUS_OK, http_status=200, attempts=1, prompt_tokens=7, completion_tokens=1
    )
    merged = with_spent(alone, halves[0].spent[0])
    assert (merged.attempts, merged.prompt_tokens, merged.completion_tokens) == (3, 17, 3)
    assert merged.requests == round(0.5 + 1 / 3 + 1, 6)


def test_a_pack_line_is_estimated_by_its_real_messages_and_each_rows_completion() -> None:
    estimator = LineEstimator(completion=20)
    single = estimator(LINES.line(["k1"], [PROMPTS[0]])[1])
    packed = estimator(LINES.line(KEYS, PROMPTS)[1])
    assert single[1] == 20 and packed[1] == pack_max_tokens(20, 3)
    assert packed[0] < 3 * single[0] + 200  # the system prompt once, plus the instruction
    capped = PackLineBuilder(LineBuilder(ChatRequest(params={"max_tokens": 5}), "/chat/completions", "gpt"))
    assert estimator(capped.line(KEYS, PROMPTS)[1])[1] == pack_max_tokens(5, 3)
