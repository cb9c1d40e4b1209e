"""The summary block of the task's log: one subject per line, every count the XCom holds."""

from __future__ import annotations

from airflow_provider_llmq.spark.summary_text import summary_block

SUMMARY = {
    "schema_version": 5,
    "rows": 600,
    "answered": 599,
    "failed": 1,
    "skipped": 0,
    "not_sent": 0,
    "errors_by_code": {"content_filter": 1},
    "requests_sent": 621,
    "retries": 16,
    "throttled": 6,
    "prompt_tokens": 53883,
    "completion_tokens": 5980,
    "cost": None,
    "cache_hits": 0,
    "resumed_requests": 0,
    "admitted_requests_per_second": 200.0,
    "output": "/data/out",
    "checkpoint": "file:///data/ckpt",
    "phases": {"spark_start": 0.5, "ask": 6.2, "write": 2.5},
    "seconds": 9.2,
    "query_seconds": 6.2,
    "query_requests_per_second": 96.7,
}


def test_the_block_has_one_line_per_subject_and_every_count() -> None:
    lines = summary_block(SUMMARY).splitlines()
    assert lines[0] == "llmq summary: 600 rows in 9.2 s"
    assert (
        lines[1] == "  rows: answered 599, failed 1, skipped 0, not sent 0; errors by code: content_filter 1"
    )
    assert lines[2].startswith("  requests: 621 sent (16 retries, 6 refused with 429); 0 resumed")
    assert lines[3] == "  tokens: prompt 53,883, completion 5,980"
    assert lines[4] == "  asking: 6.2 s, 96.7 requests/s (the limiter admitted 200.0/s at the end)"
    assert lines[5].startswith("  time: spark_start 0.5 s") and "ask 6.2 s" in lines[5]
    assert lines[6:] == ["  output: /data/out", "  checkpoint: file:///data/ckpt"]


def test_cost_and_packs_appear_when_the_run_had_them() -> None:
    text = summary_block(
        {
            **SUMMARY,
            "cost": 0.01234,
            "packing": {
                "packs_answered": 30,
                "packed_rows": 600,
                "rows_per_pack": 20.0,
                "prompt_tokens_saved": 9000,
            },
        }
    )
    assert "; cost 0.01234" in text
    assert "  packs: 30 answered, 20.0 rows each on average, 9,000 prompt tokens saved" in text
    assert "checkpoint:" not in summary_block({**SUMMARY, "checkpoint": None})
