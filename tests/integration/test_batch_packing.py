"""rows_per_request on the Batch API, against the mock server's batch routes over TLS: packs of rows
in fewer lines with fewer prompt tokens, each row its own answer (checked against what its prompt
asked alone gets), rows a pack's answer lost asked again, a line that fails whole split down to the
bad row, usage split per row and adding up to what the batches billed, the budget, and a re-run that
pays nothing twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmq.testing.mock_server import expected_answer
from tests.conftest import DEPLOYMENT
from tests.integration.test_batch_api_budget import _batch_operator, _ti
from tests.integration.test_batch_api_mock import BatchMock
from tests.integration.test_batch_api_operator import _connect, _rows, _write

pytestmark = pytest.mark.timeout(180)
# a system prompt of about 300 tokens, as in benchmarks/packing.py: sent once per line
SYSTEM = "You label product reviews by their sentiment and answer in one short line. " * 20


@pytest.fixture
def batch_mock(server: Any) -> Any:
    mock = BatchMock(server)
    mock.reset()
    mock.configure(validating_s=0.05, in_progress_s=0.1, finalizing_s=0.05)
    yield mock
    mock.reset()


def _prompts(n: int, marks: dict[int, str] | None = None) -> list[tuple[int, str]]:
    marks = marks or {}
    return [(i, f"Summarise review {i} in one line. {marks.get(i, '')}".strip()) for i in range(n)]


def _right(row: dict[str, Any], prompt: str, params: dict[str, Any] | None = None) -> bool:
    """The row's answer is what its own prompt asked alone gets (with the same params)."""
    answer = expected_answer(DEPLOYMENT, SYSTEM, prompt, params or {})
    return bool(row["llmq_status"] == "ok" and row["response"] == answer)


def _billed(stats: dict[str, Any]) -> int:
    return int(stats["prompt_tokens_billed"] + stats["completion_tokens_billed"])


@pytest.mark.slow  # over 10 s (two operator runs side by side): CI's slow step runs it
def test_packed_lines_answer_every_row_in_fewer_lines_and_fewer_prompt_tokens(
    spark: Any, server: Any, batch_mock: BatchMock, monkeypatch: Any, tmp_path: Path
) -> None:
    _connect(server, monkeypatch, "azure")
    prompts = _prompts(40)
    source = _write(spark, tmp_path / "src", prompts)
    packed = _batch_operator(tmp_path / "packed", source, system_prompt=SYSTEM, rows_per_request=8).execute(
        {}
    )
    packed_stats = batch_mock.stats()
    batch_mock.reset()
    batch_mock.configure(validating_s=0.05, in_progress_s=0.1, finalizing_s=0.05)
    alone = _batch_operator(tmp_path / "alone", source, system_prompt=SYSTEM).execute({})
    alone_stats = batch_mock.stats()
    print(f"\npacked {packed_stats} {packed}\nalone {alone_stats}")
    rows = _rows(spark, tmp_path / "packed" / "out")
    assert [r["id"] for r in rows] == list(range(40))
    assert all(_right(row, prompt) for row, (_, prompt) in zip(rows, prompts, strict=True))
    assert packed_stats["lines_created"] == 5 and alone_stats["lines_created"] == 40
    assert all(r["llmq_pack_rows"] == 8 and r["llmq_attempts"] == 1 for r in rows)
    assert packed_stats["prompt_tokens_billed"] * 4 < alone_stats["prompt_tokens_billed"]
    # each row's share of its line's usage: they add up to what the batches billed
    assert sum(r["llmq_prompt_tokens"] for r in rows) == packed_stats["prompt_tokens_billed"]
    assert sum(r["llmq_completion_tokens"] for r in rows) == packed_stats["completion_tokens_billed"]
    assert packed["prompt_tokens"] + packed["completion_tokens"] == _billed(packed_stats)
    assert packed["batch_api"]["billed_tokens"] == _billed(packed_stats)
    assert packed["packing"]["packed_rows"] == 40 and packed["packing"]["prompt_tokens_saved"] > 0
    assert packed["ok"] == alone["ok"] == 40


def test_lost_rows_are_asked_again_and_a_line_that_fails_whole_is_split_down_to_the_bad_row(
    spark: Any, server: Any, batch_mock: BatchMock, monkeypatch: Any, tmp_path: Path
) -> None:
    _connect(server, monkeypatch, "openai")
    marks = {3: "[[content_filter]]", 10: "[[pack_drop]]", 12: "[[pack_dup]]", 14: "[[pack_unknown]]"}
    marks |= {21: "[[malformed]]"}  # an unusable line (a 200 that is no answer): split like a filter
    prompts = _prompts(24, marks)
    source = _write(spark, tmp_path / "src", prompts)
    summary = _batch_operator(
        tmp_path, source, system_prompt=SYSTEM, rows_per_request=8, prices={DEPLOYMENT: (1.0, 4.0)}
    ).execute({})
    stats = batch_mock.stats()
    rows = _rows(spark, tmp_path / "out")
    print(f"\nstats {stats}\nsummary {summary}")
    assert [r["id"] for r in rows] == list(range(24))
    bad = {r["id"]: r for r in rows if r["llmq_status"] != "ok"}
    assert set(bad) == {3, 21}
    assert bad[3]["llmq_error_code"] == "content_filter" and bad[3]["llmq_pack_rows"] == 1
    assert bad[21]["llmq_error_code"] == "bad_response"
    assert all(_right(row, prompts[row["id"]][1]) for row in rows if row["id"] not in bad)
    # the bad rows' packs: 8 -> 4 -> 2 -> 1, one re-ask file (one batch) per level
    assert bad[3]["llmq_attempts"] == 4 and bad[21]["llmq_attempts"] == 4
    assert summary["batch_api"]["batches"] == 4 and summary["batch_api"]["rounds"] == 1
    # packs are formed in the order the rows stream (by hash bucket), not by id: a pack of 8 with
    # no bad row answered its rows at once, the lost ones were asked again (alone at the end)
    assert len([r for r in rows if r["llmq_attempts"] == 1 and r["llmq_pack_rows"] == 8]) >= 5
    assert all(r["llmq_attempts"] >= 2 for r in rows if r["id"] in (10, 12, 14))
    assert "duplicate" not in rows[12]["response"]
    # every line billed is on some row, split by prompt tokens, priced as billed
    assert sum(r["llmq_prompt_tokens"] or 0 for r in rows) == stats["prompt_tokens_billed"]
    assert sum(r["llmq_completion_tokens"] or 0 for r in rows) == stats["completion_tokens_billed"]
    assert summary["prompt_tokens"] + summary["completion_tokens"] == _billed(stats)
    expected_cost = (stats["prompt_tokens_billed"] * 1.0 + stats["completion_tokens_billed"] * 4.0) / 1e6
    assert abs(summary["cost"] - expected_cost) < 1e-9


@pytest.mark.slow  # over 10 s (three operator runs): CI's slow step runs it
def test_a_packed_budget_is_never_passed_and_a_rerun_pays_nothing_twice(
    spark: Any, server: Any, batch_mock: BatchMock, monkeypatch: Any, tmp_path: Path
) -> None:
    _connect(server, monkeypatch, "azure")
    prompts = _prompts(64)
    source = _write(spark, tmp_path / "src", prompts)
    arguments: dict[str, Any] = {
        "system_prompt": SYSTEM,
        "rows_per_request": 8,
        "request_params": {"max_tokens": 40},  # a row's; its item (id, JSON) fits in it
        "max_requests_per_file": 2,
        "checkpoint_key": "packed-budget",
    }
    # what one file of 2 pack lines is estimated at: the budget takes two such files and a bit
    estimate = _batch_operator(tmp_path, source, estimate_only=True, **arguments).execute({})
    assert estimate["requests"] == 8  # pack lines, not rows
    per_file = (estimate["prompt_tokens"] + estimate["completion_tokens"]) // 4
    budget = 2 * per_file + per_file // 4
    summary = _batch_operator(tmp_path, source, max_total_tokens=budget, **arguments).execute(
        {"ti": _ti("first")}
    )
    stats = batch_mock.stats()
    rows = _rows(spark, tmp_path / "out")
    print(f"\nbudget {budget}: stats {stats}\nsummary {summary}")
    assert _billed(stats) <= budget
    ok = [r for r in rows if r["llmq_status"] == "ok"]
    unsent = [r for r in rows if r["llmq_error_code"] == "budget_exceeded"]
    assert len(ok) + len(unsent) == 64 and len(ok) >= 32 and unsent
    assert stats["lines_created"] * 8 == len(ok)  # no row answered twice, no unsent row asked
    first_lines = stats["lines_created"]
    # the same key with room for everything: only the rows not answered are asked, packed again
    summary = _batch_operator(tmp_path, source, max_total_tokens=10 * budget, **arguments).execute(
        {"ti": _ti("second")}
    )
    stats = batch_mock.stats()
    rows = _rows(spark, tmp_path / "out")
    assert summary["ok"] == 64 and all(_right(r, prompts[r["id"]][1], {"max_tokens": 40}) for r in rows)
    assert (stats["lines_created"] - first_lines) * 8 == len(unsent)
    assert sum(r["llmq_prompt_tokens"] for r in rows) == stats["prompt_tokens_billed"]


@pytest.mark.slow  # over 10 s (two tries, four batches): CI's slow step runs it
def test_a_packed_run_deferred_mid_split_is_resumed_by_a_new_try_without_a_second_batch(
    spark: Any, server: Any, batch_mock: BatchMock, monkeypatch: Any, tmp_path: Path
) -> None:
    """The first try defers once its batch runs; a new try with the same key re-attaches to it,
    collects, asks again what the filtered row's pack left (its halves), and ends: each batch once."""
    from airflow.sdk.exceptions import TaskDeferred

    from airflow_provider_llmq.operators.batch_api import LLMQueryBatchAPIOperator

    _connect(server, monkeypatch, "openai")
    batch_mock.configure(in_progress_s=0.5)
    prompts = _prompts(16, {5: "[[content_filter]]"})
    args: dict[str, Any] = {
        "task_id": "ask",
        "source_path": _write(spark, tmp_path / "src", prompts),
        "id_col": "id",
        "output_path": str(tmp_path / "out"),
        "checkpoint_key": "packed-resume",
        "poll_interval": 0.1,
        "system_prompt": SYSTEM,
        "rows_per_request": 8,
    }
    with pytest.raises(TaskDeferred):
        LLMQueryBatchAPIOperator(**args).execute({"ti": _ti("first")})
    assert batch_mock.stats()["batches_created"] == 1
    summary = LLMQueryBatchAPIOperator(**args, deferrable=False).execute({"ti": _ti("second")})
    stats = batch_mock.stats()
    rows = _rows(spark, tmp_path / "out")
    print(f"\ndeferred, then resumed: stats {stats}\nsummary {summary['batch_api']}")
    assert all(_right(r, prompts[r["id"]][1]) for r in rows if r["id"] != 5) and len(rows) == 16
    assert rows[5]["llmq_error_code"] == "content_filter" and rows[5]["llmq_attempts"] == 4
    # 2 packs of 8, then the bad one's halves (4), halves of its bad half (2), the row alone
    assert stats["batches_created"] == 4 and stats["lines_created"] == 2 + 2 + 2 + 2
    assert stats["lines_answered"] == stats["lines_created"]  # nothing asked twice
    assert sum(r["llmq_prompt_tokens"] or 0 for r in rows) == stats["prompt_tokens_billed"]


@pytest.mark.slow  # over 10 s (two runs, nine batches): CI's slow step runs it
def test_a_packed_file_over_the_enqueued_quota_is_split_and_rows_keep_their_answers(
    spark: Any, server: Any, batch_mock: BatchMock, monkeypatch: Any, tmp_path: Path
) -> None:
    _connect(server, monkeypatch, "azure")
    prompts = _prompts(48)
    source = _write(spark, tmp_path / "src", prompts)
    # a file of 6 pack lines is over the quota; 2 lines fit
    probe = _batch_operator(
        tmp_path / "probe", source, system_prompt=SYSTEM, rows_per_request=8, estimate_only=True
    ).execute({})
    assert probe["requests"] == 6
    line_tokens = probe["prompt_tokens"] // 6
    batch_mock.configure(enqueued_token_limit=int(2.5 * line_tokens))
    summary = _batch_operator(tmp_path, source, system_prompt=SYSTEM, rows_per_request=8).execute({})
    stats = batch_mock.stats()
    rows = _rows(spark, tmp_path / "out")
    print(f"\nquota {int(2.5 * line_tokens)}: stats {stats}\nsummary {summary['batch_api']}")
    assert all(_right(row, prompts[row["id"]][1]) for row in rows) and len(rows) == 48
    assert stats["token_limit_refusals"] >= 1 and summary["batch_api"]["file_splits"] >= 1
    assert stats["lines_answered"] == 6  # each pack line ran once, however the file was split
