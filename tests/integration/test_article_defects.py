"""The article's four methods (tests/article) against the mock server, beside ours on the same rows.

Each test shows one defect of the article's code with the mock, and that the matching method of
``airflow_provider_llmq.core.methods`` does not have it.
"""

from __future__ import annotations

import pytest

from airflow_provider_llmq.core.methods import (
    query_async_batches,
    query_async_limited,
    query_sync,
    query_thread_pool,
)
from airflow_provider_llmq.core.request.payload import DEFAULT_SYSTEM_PROMPT
from airflow_provider_llmq.testing.mock_server import MockServer, expected_answer
from tests.article import article_methods as article
from tests.conftest import DEPLOYMENT, TEST_KEY, make_endpoint

pytestmark = pytest.mark.timeout(120)  # a method that hangs fails instead of stalling CI
FAST = {"retry_backoff": 0.001, "max_retry_wait": 1.0}


@pytest.fixture
def article_endpoint(server: MockServer) -> article.ArticleEndpoint:
    assert server.ca_path is not None
    return article.article_endpoint(server.base_url, TEST_KEY, server.ca_path, api_model=DEPLOYMENT)


def answer_for(prompt: str) -> str:
    # the article's system prompt is our default one, and it sends no extra params
    assert article.SYSTEM_PROMPT == DEFAULT_SYSTEM_PROMPT
    return expected_answer(DEPLOYMENT, DEFAULT_SYSTEM_PROMPT, prompt, {})


def misplaced(pairs: list[tuple[int, str | None]], prompts: dict[int, str]) -> int:
    return sum(1 for row_id, response in pairs if response != answer_for(prompts[row_id]))


def test_article_copies_agree_with_the_mock_when_nothing_goes_wrong(
    server: MockServer, article_endpoint: article.ArticleEndpoint
) -> None:
    """The copies are wired right: on a healthy server each gets every prompt's mock answer.

    Only the semaphore copy may put them on the wrong rows: its answers arrive in completion order,
    which differs from input order whenever requests overlap, even without slow answers.
    """
    rows = [(i, f"healthy {i}") for i in range(24)]
    prompts = dict(rows)
    for name, method in article.ARTICLE_METHODS.items():
        pairs = method(rows, article_endpoint)
        assert sorted(row_id for row_id, _ in pairs) == list(range(24)), name
        assert sorted(str(answer) for _, answer in pairs) == sorted(answer_for(p) for p in prompts.values())
        if name != "async_limited":
            assert misplaced(pairs, prompts) == 0, name
    assert server.stats()["chat_requests"] == 4 * 24 and server.stats()["keys_in_url"] == 0


def test_semaphore_method_gives_rows_other_rows_answers_ours_does_not(
    server: MockServer, article_endpoint: article.ArticleEndpoint
) -> None:
    server.configure(slow_rate=0.05, slow_ms=60, seed=5)  # no fault at all: only some answers are slower
    rows = [(i, f"Which answer is mine? {i}") for i in range(600)]
    prompts = dict(rows)

    pairs = article.async_semaphore_method(rows, article_endpoint, max_concurrent_requests=32)
    wrong = misplaced(pairs, prompts)
    assert len(pairs) == len(rows)
    # every answer arrived, but zipped by position most of them sit on another row
    assert sorted(response for _, response in pairs) == sorted(answer_for(p) for p in prompts.values())
    assert wrong > len(rows) // 2, wrong

    results = list(query_async_limited(make_endpoint(server, "azure"), rows, max_concurrency=32, **FAST))
    assert len(results) == len(rows)
    assert misplaced([(r.row_id, r.response) for r in results], prompts) == 0


def test_gather_method_dies_on_one_500_ours_retries_it(
    server: MockServer, article_endpoint: article.ArticleEndpoint
) -> None:
    rows = [(i, f"batch row {i}" + (" [[500]]" if i == 150 else "")) for i in range(300)]
    prompts = dict(rows)

    with pytest.raises(KeyError, match="choices"):
        article.async_batch_method(rows, article_endpoint, api_call_batch_size=64)
    # the whole run is lost, including the rows that the server answered
    assert server.stats()["requests_by_status"]["200"] >= 128

    server.reset()
    results = list(query_async_batches(make_endpoint(server, "azure"), rows, batch_size=64, **FAST))
    assert sorted(r.row_id for r in results) == list(range(300))
    assert all(r.ok and r.response == answer_for(prompts[r.row_id]) for r in results)
    assert {r.row_id: r.attempts for r in results if r.attempts != 1} == {150: 2}


def test_thread_method_drops_failed_rows_ours_keeps_every_row(
    server: MockServer, article_endpoint: article.ArticleEndpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    markers = {10: "[[reset]]", 20: "[[malformed]]", 30: "[[500]]", 40: "[[content_filter]]"}
    rows = [(i, f"pool row {i} {markers.get(i, '')}".strip()) for i in range(100)]
    prompts = dict(rows)

    pairs = dict(article.thread_method(rows, article_endpoint, num_workers=16))
    # rows whose request raised were printed and dropped by the inner join: gone from the output
    assert set(prompts) - set(pairs) == {10, 20}
    assert capsys.readouterr().out.count("Error processing row") == 2
    # HTTP errors became "answers" that look like any other string
    assert pairs[30].startswith("Error: 500") and pairs[40].startswith("Error: 400")

    server.reset()  # attempt numbers start again at 1: the same faults meet our method
    results = {
        r.row_id: r for r in query_thread_pool(make_endpoint(server, "azure"), rows, max_workers=16, **FAST)
    }
    assert set(results) == set(prompts)
    for row_id in (10, 20, 30):
        assert results[row_id].ok and results[row_id].attempts == 2
        assert results[row_id].response == answer_for(prompts[row_id])
    assert results[40].status == "error" and results[40].error_code == "content_filter"
    assert all(r.ok for i, r in results.items() if i != 40)


def test_udf_method_stores_errors_as_answers_and_fails_on_a_reset_ours_does_neither(
    server: MockServer, article_endpoint: article.ArticleEndpoint
) -> None:
    rows = [(0, "fine"), (1, "flaky [[503]]"), (2, "throttled [[429:ms=5]]")]
    pairs = dict(article.udf_method(rows, article_endpoint))
    assert pairs[0] == answer_for("fine")
    assert pairs[1].startswith("Error: 503") and pairs[2].startswith("Error: 429")  # no retry
    with pytest.raises(Exception, match=r"(?i)connection|aborted|reset"):
        article.udf_method([(3, "dropped [[reset]]")], article_endpoint)  # the Spark task fails

    rows.append((3, "dropped [[reset]]"))
    server.reset()  # attempt numbers start again at 1: the same faults meet our method
    results = list(query_sync(make_endpoint(server, "azure"), rows, **FAST))
    assert [r.row_id for r in results] == [0, 1, 2, 3]
    assert all(
        r.ok and r.response == answer_for(prompt) for r, (_, prompt) in zip(results, rows, strict=True)
    )
    assert [r.attempts for r in results] == [1, 2, 2, 2]
