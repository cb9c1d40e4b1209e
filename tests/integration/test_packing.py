"""rows_per_request over real sockets: every row of a pack ends with its own answer or error.

The mock server answers each item of a pack as if it were asked alone, so a row's answer is checked
against ``expected_answer`` of its own prompt: an answer that landed on another row is caught.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.methods import METHODS
from airflow_provider_llmq.core.request.payload import DEFAULT_SYSTEM_PROMPT
from airflow_provider_llmq.testing.mock_server import expected_answer
from airflow_provider_llmq.testing.mock_server.faults import prompt_hash
from airflow_provider_llmq.testing.mock_server.structured import expected_structured_answer
from tests.conftest import DEPLOYMENT, make_endpoint

pytestmark = pytest.mark.timeout(120)
FAST = {"retry_backoff": 0.001, "max_retry_wait": 1.0}
SCALING = {"sync": {}, "async_batches": {"batch_size": 8}, "async_limited": {"max_concurrency": 8}}
SCALING["thread_pool"] = {"max_workers": 8}


def _prompts(n: int, marks: dict[int, str] | None = None) -> list[tuple[int, str]]:
    marks = marks or {}
    return [(i, f"Summarise item {i} in one line. {marks.get(i, '')}".strip()) for i in range(n)]


def _run(
    server: Any, rows: list[tuple[int, str]], method: str = "sync", **options: Any
) -> dict[int, QueryResult]:
    endpoint = make_endpoint(server, "azure")
    options = {**FAST, "rows_per_request": 8, **SCALING[method], **options}
    results = list(METHODS[method](endpoint, rows, **options))
    assert len(results) == len(rows) and {r.row_id for r in results} == {i for i, _ in rows}
    return {r.row_id: r for r in results}


def _right(result: QueryResult, prompt: str) -> bool:
    return result.ok and result.response == expected_answer(DEPLOYMENT, DEFAULT_SYSTEM_PROMPT, prompt, {})


def _asked(server: Any, prompt: str) -> int:
    """How many requests carried this prompt, alone or as an item of a pack."""
    return int(server.stats()["requests_per_prompt"].get(prompt_hash(prompt), 0))


def _misplaced(results: dict[int, QueryResult], rows: list[tuple[int, str]]) -> int:
    prompts = dict(rows)
    answers = {expected_answer(DEPLOYMENT, DEFAULT_SYSTEM_PROMPT, p, {}): i for i, p in rows}
    return sum(1 for r in results.values() if r.ok and answers.get(r.response, r.row_id) != r.row_id) + sum(
        1 for r in results.values() if r.ok and not _right(r, prompts[r.row_id])
    )


@pytest.mark.parametrize("marker", ["[[pack_drop]]", "[[pack_dup]]", "[[pack_unknown]]"])
def test_a_row_the_answer_lost_is_asked_again_and_gets_its_own_answer(server: Any, marker: str) -> None:
    """Missing from the answer, answered twice (the second time with another row's text), or under an
    id that was not asked: the row is asked again alone, and its answer is its own."""
    rows = _prompts(8, {3: marker})
    results = _run(server, rows)
    assert all(_right(results[i], p) for i, p in rows), [results[i] for i, _ in rows if not results[i].ok]
    assert _misplaced(results, rows) == 0
    assert server.stats()["chat_requests"] == 2  # the pack, then the row alone
    assert _asked(server, rows[3][1]) == 2 and _asked(server, rows[0][1]) == 1
    assert results[3].attempts == 2 and results[0].attempts == 1
    if marker == "[[pack_dup]]":
        assert "duplicate" not in (results[3].response or "")


def test_a_pack_that_fails_whole_is_split_down_to_the_one_bad_row(server: Any) -> None:
    """A context-length error fails the pack; halves are asked, down to the row: 8 -> 4 -> 2 -> 1."""
    rows = _prompts(8, {5: "[[context_length]]"})
    results = _run(server, rows)
    bad = results[5]
    assert bad.error_code == "context_length_exceeded" and bad.status == "error"
    assert all(_right(results[i], p) for i, p in rows if i != 5)
    assert _misplaced(results, rows) == 0
    assert _asked(server, rows[5][1]) == 4  # in the pack of 8, then of 4, then of 2, then alone
    assert _asked(server, rows[0][1]) == 2  # in the pack of 8, then in the good half of 4
    assert server.stats()["chat_requests"] == 1 + 2 + 2 + 2


def test_a_content_filtered_row_ends_as_its_own_error_and_every_other_row_is_answered(server: Any) -> None:
    rows = _prompts(40, {7: "[[content_filter]]", 26: "[[content_filter]]"})
    for method in METHODS:
        server.reset()
        results = _run(server, rows, method)
        assert {i for i, r in results.items() if not r.ok} == {7, 26}, method
        assert all(results[i].error_code == "content_filter" for i in (7, 26))
        assert all(_right(results[i], p) for i, p in rows if i not in (7, 26)), method
        assert _misplaced(results, rows) == 0


def test_a_transient_fault_of_one_item_retries_the_pack(server: Any) -> None:
    """A 500 for one item fails its pack once (as a real API fails the request); the retry answers all."""
    rows = _prompts(8, {2: "[[500]]"})
    results = _run(server, rows)
    assert all(_right(results[i], p) for i, p in rows)
    assert server.stats()["chat_requests"] == 2 and all(r.attempts == 2 for r in results.values())


@pytest.mark.parametrize("max_retries", [0, 2, 6])
def test_a_pack_whose_5xx_persists_is_split_and_only_the_row_that_fails_alone_ends_with_it(
    server: Any, max_retries: int
) -> None:
    """An item whose 500 outlives every retry fails its pack each time: the pack is split in halves
    (one attempt each), down to the row, whose error is its own; each row is part of at most twice
    the attempts the pack made."""
    rows = _prompts(8, {5: "[[500x99]]"})
    results = _run(server, rows, max_retries=max_retries)
    bad = results[5]
    assert (
        bad.error_code == "server_error"
        and bad.http_status == 500
        and "pack" not in (bad.error_message or "")
    )
    assert all(_right(results[i], p) for i, p in rows if i != 5), [r for r in results.values() if not r.ok]
    assert _misplaced(results, rows) == 0
    pack_attempts = max_retries + 1
    for i, prompt in rows:
        assert _asked(server, prompt) == results[i].attempts <= 2 * pack_attempts
    assert bad.attempts == 2 * pack_attempts  # the pack's attempts, then the same again on its way down
    if max_retries:  # with one attempt left, the pack goes to single rows at once
        assert results[0].attempts < bad.attempts  # a row of the good half stops once answered


def test_rate_faults_in_packs_with_every_method(server: Any) -> None:
    """3 % transient faults (each fails its pack once) and 0.5 % content-filtered prompts."""
    server.configure(
        fault_rate=0.03, fault_kinds=["500", "429", "reset", "malformed"], content_filter_rate=0.005
    )
    server.configure(seed=5, retry_after_ms=5)
    rows = _prompts(400)
    from airflow_provider_llmq.testing.mock_server import MockConfig, planned_fault

    config = MockConfig(fault_rate=0.03, content_filter_rate=0.005, seed=5)
    filtered = {i for i, p in rows if planned_fault(p, config) == "content_filter"}
    assert filtered  # the seed puts some filtered rows in the run
    for method in ("sync", "async_limited", "thread_pool"):
        server.reset()
        results = _run(server, rows, method, rows_per_request="auto")
        assert {i for i, r in results.items() if not r.ok} == filtered, method
        assert all(results[i].error_code == "content_filter" for i in filtered)
        assert _misplaced(results, rows) == 0
        assert server.stats()["chat_requests"] < len(rows) / 3  # packed: far fewer requests than rows


def test_usage_is_split_over_the_rows_and_adds_up_to_what_was_billed(server: Any) -> None:
    rows = _prompts(30, {4: "[[content_filter]]", 11: "[[pack_drop]]"})
    prices = {DEPLOYMENT: {"input": 1.0, "output": 2.0}}
    long_system = "Follow the house style guide closely. " * 20  # what packing saves is repeated once a pack
    results = _run(server, rows, rows_per_request=10, prices=prices, system_prompt=long_system)
    stats = server.stats()
    assert sum(r.prompt_tokens or 0 for r in results.values()) == stats["prompt_tokens_total"]
    assert sum(r.completion_tokens or 0 for r in results.values()) == stats["completion_tokens_total"]
    for r in results.values():
        assert r.cost == pytest.approx(
            ((r.prompt_tokens or 0) * 1.0 + (r.completion_tokens or 0) * 2.0) / 1e6
        )
    # a row of a whole pack (rows 20-29) costs fewer prompt tokens than the same row asked alone
    alone = _run(server, rows[20:23], rows_per_request=1, system_prompt=long_system)
    assert all(0 < (results[i].prompt_tokens or 0) < (alone[i].prompt_tokens or 0) / 3 for i in (20, 21, 22))


def test_the_budget_counts_a_pack_by_its_real_tokens(server: Any) -> None:
    rows = _prompts(200)
    budget = 3_000
    results = _run(
        server, rows, rows_per_request="auto", max_total_tokens=budget, request_params={"max_tokens": 20}
    )
    stats = server.stats()
    assert stats["prompt_tokens_total"] + stats["completion_tokens_total"] <= budget
    refused = [r for r in results.values() if r.error_code == "budget_exceeded"]
    answered = [r for r in results.values() if r.ok]
    assert refused and answered and len(refused) + len(answered) == 200
    assert all(r.attempts == 0 for r in refused)


def test_a_pack_is_one_request_to_the_rate_limiter(server: Any) -> None:
    """At 60 requests/min (one a second) 40 rows in packs of 20 take two requests, not forty."""
    rows = _prompts(40)
    results = _run(server, rows, rows_per_request=20, requests_per_minute=60, adaptive=False)
    assert all(r.ok for r in results.values()) and server.stats()["chat_requests"] == 2


SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["a", "b"]}, "score": {"type": "integer"}},
    "required": ["label", "score"],
    "additionalProperties": False,
}


def _alone_format() -> dict[str, Any]:
    return {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "llmq_output", "schema": SCHEMA, "strict": True},
        }
    }


@pytest.mark.parametrize("marker", ["[[schema_mismatch]]", "[[invalid_json]]"])
def test_structured_items_are_checked_one_by_one(server: Any, marker: str) -> None:
    """An item that does not follow the schema (or breaks the pack's JSON) ends as its own
    invalid_output, asked alone; every other row gets its own structured answer."""
    rows = _prompts(8, {6: marker})
    results = _run(server, rows, output_schema=SCHEMA)
    assert results[6].error_code == "invalid_output"
    for i, prompt in rows:
        if i == 6:
            continue
        expected = expected_structured_answer(DEPLOYMENT, DEFAULT_SYSTEM_PROMPT, prompt, _alone_format())
        assert results[i].ok and json.loads(results[i].response or "") == json.loads(expected or ""), i


def test_empty_prompts_are_not_sent_in_a_pack(server: Any) -> None:
    rows: list[tuple[int, Any]] = [*_prompts(5), (5, ""), (6, None), (7, "  ")]
    results = _run(server, rows)
    assert all(results[i].error_code == "empty_prompt" and results[i].attempts == 0 for i in (5, 6, 7))
    assert all(results[i].ok for i in range(5)) and server.stats()["chat_requests"] == 1


def test_the_stream_reports_packs_and_tokens_saved(server: Any) -> None:
    endpoint = make_endpoint(server, "azure")
    system = "Follow the house style guide closely. " * 20
    stream = METHODS["async_limited"](
        endpoint, _prompts(64), rows_per_request=16, max_concurrency=4, system_prompt=system, **FAST
    )
    assert all(r.ok for r in list(stream))
    assert stream.packing is not None
    assert stream.packing.packs == 4 and stream.packing.packed_rows == 64
    assert stream.packing.prompt_tokens_saved > 0


def _lazy(n: int, pulled: list[int]) -> Iterator[tuple[int, str]]:
    for i, row in enumerate(_prompts(n)):
        pulled.append(i)
        yield row


def test_packed_methods_read_rows_lazily(server: Any) -> None:
    """Rows are pulled as packs go out: a bounded window of packs, not the whole input."""
    endpoint = make_endpoint(server, "azure")
    pulled: list[int] = []
    stream = METHODS["async_limited"](
        endpoint, _lazy(10_000, pulled), rows_per_request=10, max_concurrency=2, **FAST
    )
    first = next(iter(stream))
    assert first.ok
    stream.close()
    assert len(pulled) <= 2 * 2 * 10 + 10 + 1


def test_packs_without_a_system_prompt_on_the_openai_form(server: Any) -> None:
    """The pack's instruction is then the only system message; each item is still answered as the
    same prompt asked alone (no system prompt, the model in the body)."""
    endpoint = make_endpoint(server, "openai")
    rows = _prompts(12)
    results = {
        r.row_id: r
        for r in METHODS["thread_pool"](
            endpoint, rows, system_prompt=None, rows_per_request=6, max_workers=2, **FAST
        )
    }
    assert all(results[i].response == expected_answer(DEPLOYMENT, None, p, {}) for i, p in rows)
    assert server.stats()["chat_requests"] == 2


def test_a_tight_max_tokens_leaves_room_for_each_items_id_and_punctuation(server: Any) -> None:
    """Rows whose answers take exactly their ``max_tokens`` alone: packed, no pack is cut at its
    ``max_tokens`` (which would split it), so 24 rows take 3 requests, each row its own answer."""
    from airflow_provider_llmq.testing.mock_server.tokens import count_text

    tight = 14
    params = {"max_tokens": tight}

    def answer(prompt: str) -> str:
        return expected_answer(DEPLOYMENT, DEFAULT_SYSTEM_PROMPT, prompt, params)

    rows = [(i, p) for i, p in _prompts(400) if count_text(answer(p)) == tight][:24]
    assert len(rows) == 24
    alone = _run(server, rows[:4], rows_per_request=1, request_params=params)
    assert all(alone[i].response == answer(p) for i, p in rows[:4])  # asked alone, no row is cut
    server.reset()
    results = _run(server, rows, rows_per_request=8, request_params=params)
    assert [i for i, p in rows if results[i].response != answer(p)] == []
    assert server.stats()["chat_requests"] == 3
