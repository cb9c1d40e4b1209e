"""Two processes share one quota without a coordinator, each reacting to the server's own signals.

The mock server runs in its own process (as a deployment is its own service) and enforces a 100/s
token bucket; two client processes (two tasks) start together, each unaware of the other and of the
cap. Before the adaptive limiter, each answered about a fifth of its rows and 96 % of the requests
were 429s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmq.testing.mock_server import MockConfig, MockServerProcess
from tests.conftest import DEPLOYMENT, TEST_KEY

pytestmark = pytest.mark.timeout(180)
ROWS = 250

# one task: its own client, method and rows; prints what it got as one JSON line
CHILD = """
import json, os, sys
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.methods import query_async_limited, query_thread_pool

name, method, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
endpoint = EndpointConfig(
    api_base=os.environ["MOCK_BASE_URL"], api_key=os.environ["MOCK_KEY"], api_type="azure",
    model=os.environ["MOCK_DEPLOYMENT"], api_version="2024-06-01", ca_cert=os.environ["MOCK_CA"],
)
items = [(i, f"{name} row {i}") for i in range(rows)]
if method == "async_limited":
    stream = query_async_limited(endpoint, items, max_concurrency=64)
else:
    stream = query_thread_pool(endpoint, items, max_workers=64)
results = list(stream)
stats = stream.stats()
print(json.dumps({
    "ok": sum(r.ok for r in results),
    "errors": sorted({r.error_code for r in results if not r.ok}),
    "attempts": sum(r.attempts for r in results),
    "throttled": stats.throttled,
}))
"""


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    config = MockConfig(api_key=TEST_KEY, latency_ms=15, quota={"kind": "token_bucket", "rate": 100})
    with MockServerProcess(config, cert_dir=tmp_path_factory.mktemp("shared-ca")) as server:
        yield server


def start_task(server: MockServerProcess, name: str, method: str) -> subprocess.Popen[str]:
    env = dict(
        os.environ,
        MOCK_BASE_URL=server.base_url,
        MOCK_KEY=TEST_KEY,
        MOCK_DEPLOYMENT=DEPLOYMENT,
        MOCK_CA=str(server.ca_path),
    )
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, name, method, str(ROWS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(Path(__file__).resolve().parents[2]),
    )


@pytest.mark.parametrize("methods", [("async_limited", "async_limited"), ("async_limited", "thread_pool")])
def test_two_processes_share_one_quota(shared_server: MockServerProcess, methods: tuple[str, str]) -> None:
    shared_server.reset()
    shared_server.configure(quota={"kind": "token_bucket", "rate": 100})  # a fresh bucket
    tasks = [start_task(shared_server, f"task-{i}-{m}", m) for i, m in enumerate(methods)]
    outputs = []
    for task in tasks:
        out, err = task.communicate(timeout=150)
        assert task.returncode == 0, err[-2000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    for got in outputs:
        assert got["ok"] == ROWS and got["errors"] == [], got
    stats = shared_server.stats()
    refused = stats["requests_by_status"].get("429", 0)
    assert refused == sum(got["throttled"] for got in outputs)  # each saw its own 429s, and only those
    assert stats["chat_requests"] == sum(got["attempts"] for got in outputs)
    # 250 rows each: the first round trips (both start at once, each at up to its concurrency per
    # second) are a large part of so short a run, 4-10 % measured; a storm was 96 %. The share of a
    # long run lives in the benchmark
    assert refused / stats["chat_requests"] <= 0.25, (refused, stats["chat_requests"])
