"""A budget on a real standalone cluster (two workers of one core): executor processes draw it from
the ledger the operator's process serves on ``spark.driver.host``, the server's billed tokens never
pass it, and a skewed job uses most of it, which fixed shares could not (the light partition's rows
cost far less than its half). Run with ``make test-cluster`` (``pytest -m cluster``)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_provider_llmq.testing.spark_cluster import Cluster
from tests.cluster.test_cluster import RUNNER, SPARK_CONF, _env

pytestmark = pytest.mark.cluster

BUDGET = 4000


def _spark_hash(text: str) -> int:
    """Spark's ``hash()`` (Murmur3, seed 42) of a string whose UTF-8 length is a multiple of 4 (a
    SHA-256 hex digest): where ``repartition(n, key)`` puts the key."""
    data, h = text.encode(), 42
    for i in range(0, len(data), 4):
        k = (int.from_bytes(data[i : i + 4], "little") * 0xCC9E2D51) & 0xFFFFFFFF
        k = (((k << 15) | (k >> 17)) * 0x1B873593) & 0xFFFFFFFF
        h = ((((h ^ k) << 13) | ((h ^ k) >> 19)) * 5 + 0xE6546B64) & 0xFFFFFFFF
    h ^= len(data)
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h - (1 << 32) if h & 0x80000000 else h


def _skewed_source(tmp_path: Path) -> tuple[str, list[str]]:
    """150 prompts whose key (the prompt's SHA-256, dedupe on) lands in partition 0 of 2, and 10 in
    partition 1; the light ones returned too."""
    heavy, light = [], []
    for i in range(2000):
        prompt = f"cluster budget question {i}?"
        part = _spark_hash(hashlib.sha256(prompt.encode()).hexdigest()) % 2
        (heavy if part == 0 else light).append(prompt)
    prompts = heavy[:150] + light[:10]
    folder = tmp_path / "src"
    folder.mkdir()
    pq.write_table(pa.table({"id": list(range(160)), "prompt": prompts}), folder / "part-0.parquet")
    return "file://" + str(folder), light[:10]


def _run(operator: str, kwargs: dict[str, Any], env: dict[str, str]) -> tuple[dict[str, Any], str]:
    arguments = {"spark_conn_id": "spark_cluster", "spark_conf": SPARK_CONF, **kwargs}
    spec = {"operator": operator, "kwargs": arguments}
    proc = subprocess.run(
        [sys.executable, str(RUNNER), json.dumps(spec)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=600,
        check=False,
    )
    text = proc.stdout.decode(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("SUMMARY ")]
    assert proc.returncode == 0 and lines, text[-4000:]
    return dict(json.loads(lines[-1][len("SUMMARY ") :])), text


@pytest.mark.parametrize(
    ("operator", "arguments"),
    [
        ("LLMQueryRateLimitedOperator", {"run_on": "executors", "max_concurrency": 4}),
        ("LLMQueryUDFOperator", {}),
    ],
)
def test_a_skewed_job_on_a_cluster_draws_its_budget_from_the_ledger(
    cluster: Cluster, server: Any, tmp_path: Path, operator: str, arguments: dict[str, Any]
) -> None:
    server.configure(latency_ms=20)
    source, light = _skewed_source(tmp_path)
    kwargs = {
        "source_path": source,
        "id_col": "id",
        "output_path": f"file://{tmp_path}/out",
        "checkpoint_dir": f"file://{tmp_path}/ckpt",
        "max_total_tokens": BUDGET,
        "retry_backoff": 0.001,
        **arguments,
    }
    summary, text = _run(operator, kwargs, _env(server, {"conn_type": "spark", "host": cluster.master}))
    stats = server.stats()
    billed = int(stats["prompt_tokens_total"] + stats["completion_tokens_total"])
    print(f"{operator} on the cluster: billed {billed} of {BUDGET}; {summary['errors_by_code']}")
    assert billed <= BUDGET
    assert billed >= 0.8 * BUDGET
    assert "fixed shares" not in text  # the executors reached the ledger
    assert summary["answered"] + summary["not_sent"] + summary["failed"] == 160
    if operator != "LLMQueryUDFOperator":  # round-robin UDF partitions are even: no skew there
        # fixed halves: at most half the budget, plus what the 10 light rows could cost at most
        out = pq.read_table(str(tmp_path / "out")).to_pylist()
        used = [
            (r["llmq_prompt_tokens"] or 0) + (r["llmq_completion_tokens"] or 0)
            for r in out
            if r["prompt"] in light
        ]
        light_cost = sum(used)
        assert billed > BUDGET / 2 + light_cost
