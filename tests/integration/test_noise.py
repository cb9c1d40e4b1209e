"""Refusals that are not a quota, over real sockets: the mock server's ``noise`` (issue 21).

Qualitative only (the ratios live in benchmarks/NOISE.md): every row answered with its own answer
and every request accounted for, whatever refuses; a 5xx or a reset never cuts the rate (they are
not congestion); random 429s with no quota cut it a few times at most (a single 429 is evidence, not
a verdict: each cut they cause is tested, and undone when the refusals go on below it).
"""

from __future__ import annotations

from typing import Any

import pytest

from airflow_provider_llmq.testing.mock_server import MockServer
from tests.conftest import make_endpoint
from tests.integration.test_adaptive_limits import (
    MAX_429_SHARE,
    METHODS,
    assert_every_row_answered,
    rows_for,
    run,
    share_429,
)

pytestmark = pytest.mark.timeout(120)
LATENCY_MS = 15
ROWS = 200
# refused or failed at random, 5 % of the requests, whatever the rate
KINDS = {"429": 0.05, "429_no_hint": 0.05, "500": 0.05, "reset": 0.05}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", list(METHODS))
def test_random_refusals_and_faults_leave_every_row_answered(
    name: str, kind: str, server: MockServer
) -> None:
    server.configure(latency_ms=LATENCY_MS, noise={kind: KINDS[kind]}, retry_after_ms=50)
    rows = rows_for(f"noise/{kind}/{name}", ROWS)
    results, stats = run(name, make_endpoint(server, "azure"), rows)
    assert_every_row_answered(results, rows)
    server_stats = server.stats()
    assert sum(r.attempts for r in results) == server_stats["chat_requests"]
    assert stats.throttled == server_stats["requests_by_status"].get("429", 0)
    if kind.startswith("429"):
        assert stats.throttled > 0  # the noise was met
        # a cut per random refusal was 15-30 of them here; each cut is now tested first
        assert stats.episodes <= 5, stats
    else:
        assert stats.failures > 0 and stats.throttled == 0
        assert stats.episodes == 0, stats  # 5xx and resets are not congestion: the rate is kept


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_noise_on_top_of_a_quota_still_finds_the_quota(name: str, server: MockServer) -> None:
    """A 150/s bucket and 3 % random 429s besides: the quota's refusals are still told from the
    noise (the rate is cut), and the 429s stay bounded."""
    quota: dict[str, Any] = {"kind": "token_bucket", "rate": 150}
    server.configure(latency_ms=LATENCY_MS, quota=quota, noise={"429": 0.03}, retry_after_ms=50)
    rows = rows_for(f"noisy-quota/{name}", ROWS)
    results, stats = run(name, make_endpoint(server, "azure"), rows)
    assert_every_row_answered(results, rows)
    share, server_stats = share_429(server)
    assert share <= MAX_429_SHARE, (share, stats)
    assert stats.episodes >= 1, stats  # the quota was found: 64 in flight at 15 ms is 4,000/s
    assert sum(r.attempts for r in results) == server_stats["chat_requests"]
