"""A budget on Spark executors is drawn from the driver's ledger: on local[2] Spark, against the mock
server, the server's billed tokens never pass the budget and skewed work still uses most of it,
where fixed per-worker shares (the ledger disabled) strand it.

Skew, per path: the executors placement hash-partitions the requests by key, so the input puts
almost every key in one partition; the UDF placement deals rows round-robin over 4 partitions
(Spark's default parallelism here) that 2 Python workers run, so 4 fixed shares are held by 2
workers and half the budget is never theirs.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmq.operators.llmq import LLMQueryRateLimitedOperator, LLMQueryUDFOperator
from airflow_provider_llmq.spark.placements import ledger_line
from tests.conftest import llmq_connection_env

BUDGET = 4000


@pytest.fixture
def llm(server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in llmq_connection_env(server).items():
        monkeypatch.setenv(name, value)
    server.configure(latency_ms=5)
    return server


def _skewed(spark: Any, tmp_path: Path) -> str:
    """160 prompts, 150 of whose keys (the prompt's hash, as the plan computes it) hash to
    partition 0 of 4, as the executors placement repartitions them."""
    from pyspark.sql import functions as F

    prompt = F.concat(F.lit("question number "), F.col("id").cast("string"), F.lit("?"))
    frame = spark.range(3000).select(F.col("id"), prompt.alias("prompt"))
    part = F.pmod(F.hash(F.sha2(F.col("prompt"), 256)), F.lit(4))
    frame = frame.withColumn("part", part)
    heavy = frame.where("part = 0").limit(150)
    light = frame.where("part != 0").limit(10)
    path = str(tmp_path / "skewed")
    heavy.union(light).drop("part").coalesce(1).write.parquet(path)
    return path


def _billed(server: Any) -> int:
    stats = server.stats()
    return int(stats["prompt_tokens_total"] + stats["completion_tokens_total"])


class _FixedUDF(LLMQueryUDFOperator):
    def _placement(self) -> Any:
        return dataclasses.replace(super()._placement(), budget_ledger=False)


class _FixedExecutors(LLMQueryRateLimitedOperator):
    def _placement(self) -> Any:
        return dataclasses.replace(super()._placement(), budget_ledger=False)


def _run(cls: type, source: str, tmp_path: Path, key: str, **kwargs: Any) -> dict[str, Any]:
    return cls(
        task_id="ask",
        source_path=source,
        id_col="id",
        output_path=str(tmp_path / f"out-{key}"),
        checkpoint_key=key,
        max_total_tokens=BUDGET,
        retry_backoff=0.001,
        **kwargs,
    ).execute({})


PATHS = {
    "udf": (LLMQueryUDFOperator, _FixedUDF, {}),
    "executors": (
        LLMQueryRateLimitedOperator,
        _FixedExecutors,
        {"run_on": "executors", "max_concurrency": 8},
    ),
}


@pytest.mark.slow  # four operator runs, about 20 s
@pytest.mark.parametrize("path", sorted(PATHS))
def test_skewed_work_uses_the_budget_from_the_ledger_and_never_passes_it(
    llm: Any, spark: Any, tmp_path: Path, path: str
) -> None:
    ledger_cls, fixed_cls, kwargs = PATHS[path]
    source = _skewed(spark, tmp_path)
    summary = _run(ledger_cls, source, tmp_path, f"{path}-ledger", **kwargs)
    billed = _billed(llm)
    print(f"{path} ledger: billed {billed} of {BUDGET}; {summary['errors_by_code']}")
    assert billed <= BUDGET
    assert billed >= 0.8 * BUDGET
    assert summary["not_sent"] > 0  # enough work: the budget, not the rows, ended the run
    assert summary["answered"] + summary["not_sent"] + summary["failed"] == 160

    llm.reset()
    fixed = _run(fixed_cls, source, tmp_path, f"{path}-fixed", **kwargs)
    fixed_billed = _billed(llm)
    print(f"{path} fixed shares: billed {fixed_billed} of {BUDGET}; {fixed['errors_by_code']}")
    assert fixed_billed <= BUDGET
    assert fixed_billed < 0.7 * BUDGET  # what the ledger is for: the shares strand the rest
    assert fixed["not_sent"] > summary["not_sent"]


def test_an_unreachable_ledger_falls_back_to_fixed_shares_and_says_so_once(
    llm: Any, spark: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on: what a firewalled driver looks like
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    real = ledger_line.LedgerTicket

    def unreachable(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        return real(host, dead, *args, **kwargs)

    monkeypatch.setattr(ledger_line, "LedgerTicket", unreachable)
    source = _skewed(spark, tmp_path)
    with caplog.at_level(logging.WARNING):
        summary = _run(
            LLMQueryRateLimitedOperator, source, tmp_path, "fallback", run_on="executors", max_concurrency=8
        )
    billed = _billed(llm)
    assert billed <= BUDGET
    assert billed < 0.7 * BUDGET  # fixed shares, as with the ledger disabled
    assert summary["answered"] > 0 and summary["not_sent"] > 0
    # one line in the task log (the driver's), with the executors' workers quiet about it
    lines = [r.getMessage() for r in caplog.records if "ledger" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("the budget is split in fixed shares"), lines
    assert "did not reach the ledger" in lines[0] and "spark.driver.host" in lines[0]
