"""The Batch API mode's pure parts: request lines and files, result lines classified as live answers,
the checkpoint's batch record, and the trigger's arguments and firing rule."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmq.core.batch.batch_api import BatchInfo
from airflow_provider_llmq.core.batch.batch_files import (
    BATCH_EXPIRED,
    FileSplitter,
    LineBuilder,
    custom_ids,
    parse_result_line,
)
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.endpoint.secrets import Scrubber
from airflow_provider_llmq.core.errors import LLMQueryAuthError, LLMQueryQuotaError
from airflow_provider_llmq.core.request.error_codes import TRANSIENT_ERROR_CODES
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.core.request.payload import classify_response
from airflow_provider_llmq.spark.batch_ledger import BatchRecord, FileRecord, Ledger, Round
from airflow_provider_llmq.spark.checkpoint import Checkpoint

KEY = "sk-unit-batch-5e1f0c"


def _endpoint(api_type: str) -> EndpointConfig:
    return EndpointConfig(
        api_base="https://example.test" + ("" if api_type == "azure" else "/v1"),
        api_key=KEY,
        api_type=api_type,  # type: ignore[arg-type]
        model="gpt-test",
        api_version="2024-10-21" if api_type == "azure" else None,
    )


@pytest.mark.parametrize(
    ("api_type", "url"), [("azure", "/chat/completions"), ("openai", "/v1/chat/completions")]
)
def test_a_line_carries_the_live_body_and_the_model(api_type: str, url: str) -> None:
    endpoint = _endpoint(api_type)
    options = QueryOptions(system_prompt="Be brief.", request_params={"temperature": 0, "max_tokens": 5})
    request = options.chat_request(endpoint)
    line = json.loads(LineBuilder(request, url, "gpt-test").line("key-1", "What is 2+2?"))
    assert line == {
        "custom_id": "key-1",
        "method": "POST",
        "url": url,
        "body": {**request.body("What is 2+2?"), "model": "gpt-test"},
    }
    assert line["body"]["messages"][-1] == {"role": "user", "content": "What is 2+2?"}
    assert line["body"]["temperature"] == 0 and line["body"]["max_tokens"] == 5


class _Sink(io.BytesIO):
    def close(self) -> None:
        """Kept open: the test reads what the splitter wrote after it closed the file."""


def _split(lines: list[bytes], max_requests: int, max_bytes: int) -> tuple[list[Any], list[_Sink]]:
    sinks: list[_Sink] = []

    def open_file(index: int) -> tuple[str, Any]:
        sinks.append(_Sink())
        return f"f{index}", sinks[-1]

    splitter = FileSplitter(max_requests, max_bytes, open_file)
    for line in lines:
        splitter.add(line)
    return splitter.finish(), sinks


def test_files_are_cut_at_the_request_limit_and_their_digest_is_their_content() -> None:
    lines = [json.dumps({"custom_id": f"k{i}"}).encode() + b"\n" for i in range(25)]
    files, sinks = _split(lines, max_requests=10, max_bytes=10**6)
    assert [f.requests for f in files] == [10, 10, 5]
    assert [f.name for f in files] == ["f0", "f1", "f2"]
    for written, sink in zip(files, sinks, strict=True):
        assert written.digest == hashlib.sha256(sink.getvalue()).hexdigest()
        assert written.bytes == len(sink.getvalue())
    assert [k for s in sinks for k in custom_ids(io.BytesIO(s.getvalue()))] == [f"k{i}" for i in range(25)]


def test_files_are_cut_at_the_byte_limit() -> None:
    lines = [b"x" * 99 + b"\n"] * 7  # 100 bytes each
    files, _ = _split(lines, max_requests=1000, max_bytes=250)
    assert [(f.requests, f.bytes) for f in files] == [(2, 200), (2, 200), (2, 200), (1, 100)]
    with pytest.raises(ValueError, match="over the 50 bytes"):
        _split(lines, max_requests=10, max_bytes=50)


def _line(custom_id: str, status: int | None, body: Any = None, error: Any = None) -> bytes:
    response = None if status is None else {"status_code": status, "request_id": "r", "body": body}
    return json.dumps({"id": "x", "custom_id": custom_id, "response": response, "error": error}).encode()


FILTER_400 = {
    "error": {
        "code": "content_filter",
        "message": "filtered",
        "innererror": {"code": "ResponsibleAIPolicyViolation"},
    }
}
ANSWER = {
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "4"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 1},
}
FILTERED_200 = {
    "choices": [{"message": {"role": "assistant", "content": ""}, "finish_reason": "content_filter"}]
}


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, ANSWER),
        (400, FILTER_400),
        (200, FILTERED_200),
        (500, {"error": {"code": "server_error", "message": "boom"}}),
        (400, {"error": {"code": "context_length_exceeded", "message": "too long"}}),
        (200, '{"choices": ['),
    ],
    ids=["answer", "content_filter_400", "content_filter_200", "server_error", "context_length", "malformed"],
)
def test_a_result_line_gets_what_a_live_answer_of_that_status_and_body_gets(status: int, body: Any) -> None:
    outcome = parse_result_line(_line("k", status, body), Scrubber([KEY]))
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    live = classify_response(status, {}, raw)
    result = outcome.result
    assert result is not None and outcome.custom_id == "k" and result.row_id == "k"
    assert result.attempts == 1 and result.http_status == status
    assert result.error_code == getattr(live, "code", None)
    assert result.response == getattr(live, "content", None)
    if result.ok:
        assert (result.prompt_tokens, result.completion_tokens, result.finish_reason) == (9, 1, "stop")


def test_never_ran_lines_are_told_apart_and_other_error_lines_are_errors() -> None:
    expired = parse_result_line(
        _line("a", None, error={"code": "batch_expired", "message": "window over"}), Scrubber()
    )
    assert (
        expired.result is None
        and expired.never_ran_code == BATCH_EXPIRED
        and expired.message == "window over"
    )
    invalid = parse_result_line(
        _line("b", None, error={"code": "invalid_body", "message": f"bad key {KEY}"}), Scrubber([KEY])
    )
    assert invalid.result is not None and invalid.result.error_code == "invalid_body"
    assert (
        KEY not in (invalid.result.error_message or "")
        and invalid.result.error_code not in TRANSIENT_ERROR_CODES
    )


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (401, {"error": {"code": "invalid_api_key", "message": "no"}}, LLMQueryAuthError),
        (429, {"error": {"code": "insufficient_quota", "type": "insufficient_quota"}}, LLMQueryQuotaError),
    ],
)
def test_a_line_raises_what_a_live_answer_raises(status: int, body: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_result_line(_line("k", status, body), Scrubber())


def test_the_ledger_reads_back_what_it_wrote_and_ignores_another_manifest(tmp_path: Path) -> None:
    checkpoint = Checkpoint(str(tmp_path / "ckpt"))
    batch = BatchRecord(1.0, "batch_1", "completed", ended_at=4.5, collected=True, results=["flush-1"])
    refused = BatchRecord(intent_at=2.0, id="batch_2", status="failed", error_code="token_limit_exceeded")
    live = BatchRecord(intent_at=3.0, id="batch_3", status="in_progress")
    ledger = Ledger(
        "m1", "dag/task/run", [Round(1, "try-1", [FileRecord("f1", "d1", 10, 100, "file-1", [batch])])]
    )
    ledger.rounds[0].files.append(FileRecord("f2", "d2", 5, 50, "file-2", [refused, live]))
    batch.collected_by, batch.answered, ledger.rounds[0].empty_prompts = "try-1", 10, 2
    ledger.save(checkpoint)

    again = Ledger.load(checkpoint, "m1", "ignored")
    assert again == ledger
    assert again.live_batch_ids() == ["batch_3"]
    assert again.results_of("try-1") == ["flush-1"] and again.results_of("try-2") == []
    assert (again.settled_by("try-1"), again.settled_by("try-2")) == (12, 0)
    assert again.rounds[0].files[0].done and not again.rounds[0].over
    assert again.summary() == {
        "rounds": 1,
        "files": 2,
        "file_requests": 15,
        "batches": 3,
        "batch_states": {"completed": 1, "failed": 1, "in_progress": 1},
        "quota_refusals": 1,
        "file_splits": 0,
        "budget_refused_requests": 0,
        "billed_tokens": 0,
        "batch_ids": ["batch_1", "batch_2", "batch_3"],
        "batch_seconds": 3.5,  # from the first intent to the last end seen
    }
    assert Ledger.load(checkpoint, "another-manifest", "k").rounds == []


def test_the_trigger_serializes_to_what_rebuilds_it() -> None:
    from airflow.sdk._shared.module_loading import import_string

    from airflow_provider_llmq.triggers.batch_api import LLMQueryBatchTrigger

    trigger = LLMQueryBatchTrigger(
        llm_conn_id="llmq_x",
        batch_ids=["b1", "b2"],
        poll_interval=5,
        wake_on_any=True,
        api_version="2024-10-21",
    )
    path, kwargs = trigger.serialize()
    rebuilt = import_string(path)(**json.loads(json.dumps(kwargs)))
    assert rebuilt.serialize() == (path, kwargs)
    assert KEY not in json.dumps(kwargs)
    assert "airflow_provider_llmq.triggers.batch_api" in {
        module
        for entry in __import__("airflow_provider_llmq").get_provider_info()["triggers"]
        for module in entry["python-modules"]
    }


@pytest.mark.parametrize(
    ("statuses", "wake_on_any", "due"),
    [
        (["in_progress", "completed"], False, False),
        (["in_progress", "completed"], True, True),
        (["completed", "expired"], False, True),
        (["validating", "finalizing"], True, False),
    ],
)
def test_the_trigger_fires_when_the_task_has_something_to_do(
    statuses: list[str], wake_on_any: bool, due: bool
) -> None:
    from airflow_provider_llmq.triggers.batch_api import LLMQueryBatchTrigger

    trigger = LLMQueryBatchTrigger(
        llm_conn_id="c", batch_ids=["a", "b"], poll_interval=1, wake_on_any=wake_on_any
    )
    infos = [BatchInfo(id=f"b{i}", status=s) for i, s in enumerate(statuses)]
    assert trigger._due(infos) is due
    assert LLMQueryBatchTrigger(llm_conn_id="c", batch_ids=[], poll_interval=1, wake_at=0.0)._due([])


def test_an_unreadable_ledger_is_an_error_not_an_empty_one(tmp_path: Path) -> None:
    from airflow_provider_llmq.core.errors import LLMQueryConfigError
    from airflow_provider_llmq.spark.batch_ledger import LEDGER

    checkpoint = Checkpoint(str(tmp_path / "ckpt"))
    checkpoint.write_json(LEDGER, {"manifest": "m1", "rounds": [{"number": 1}]})  # a round without files
    with pytest.raises(LLMQueryConfigError, match="may still be running"):
        Ledger.load(checkpoint, "m1", "k")


@pytest.mark.parametrize(("api_type", "limit"), [("openai", 50_000), ("azure", 100_000)])
def test_each_api_form_has_its_request_limit_per_file(api_type: str, limit: int) -> None:
    from airflow_provider_llmq.core.batch.batch_api import BatchApiClient

    with BatchApiClient(_endpoint(api_type)) as client:
        assert client.max_requests == limit


def test_a_structured_batch_answer_is_checked_like_a_live_one() -> None:
    from airflow_provider_llmq.testing.mock_server.batch_lines import result_line

    output = QueryOptions(
        output_schema={
            "type": "object",
            "properties": {"label": {"type": "string", "enum": ["a", "b"]}},
            "required": ["label"],
        }
    ).structured_output()
    assert output is not None

    def body(content: str) -> dict[str, Any]:
        message = {"role": "assistant", "content": content}
        usage = {"prompt_tokens": 3, "completion_tokens": 2}
        return {"choices": [{"message": message, "finish_reason": "stop"}], "usage": usage}

    good = parse_result_line(result_line("k1", 200, body('{"label": "a"}')), Scrubber(), output).result
    bad = parse_result_line(result_line("k2", 200, body('{"label": "c"}')), Scrubber(), output).result
    free = parse_result_line(result_line("k3", 200, body('{"label": "c"}')), Scrubber()).result
    assert good is not None and good.ok and good.response == '{"label": "a"}'
    assert bad is not None and (bad.status, bad.error_code) == ("error", "invalid_output")
    assert bad.response == '{"label": "c"}'  # the raw text is kept
    assert free is not None and free.ok  # without a schema any text is an answer
