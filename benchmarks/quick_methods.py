"""Quick measurement of the four query methods and the two clients against the mock server.

The mock server runs in a child process (``MockServerProcess``) over HTTPS, so it does not share the
client's GIL. Two measurements:

1. Each method over N prompts (default 10,000) at a fixed mock latency (default 50 ms) with
   concurrency C (default 64: ``batch_size``, ``max_concurrency``, ``max_workers``), beside the
   limit C / latency rows/s. ``query_sync`` is sequential (one request at a time, as a UDF on one
   partition): it runs ``--sync-rows`` prompts (default 500) and its time is extrapolated to N; it
   is also run as C threads, each a sequential ``query_sync`` over its own slice of the N rows (C
   partitions processed at once in one process; a Spark executor would use C Python worker
   processes instead, each with its own client).
2. Single-client requests/s at concurrency C and 0 ms latency: ``SyncClient`` shared by C threads,
   ``AsyncClient`` with C workers.

Run: ``.venv/bin/python benchmarks/quick_methods.py [--rows 10000] [--latency-ms 50] [--concurrency 64]``;
``--article`` adds the article's four methods (tests/article) on the same rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # tests.article lives beside the package
    sys.path.insert(0, ROOT)

from airflow_provider_llmq.core.accounting.result import QueryResult  # noqa: E402
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig  # noqa: E402
from airflow_provider_llmq.core.methods import (  # noqa: E402
    query_async_batches,
    query_async_limited,
    query_sync,
    query_thread_pool,
)
from airflow_provider_llmq.core.request.options import QueryOptions  # noqa: E402
from airflow_provider_llmq.core.transport.async_client import AsyncClient  # noqa: E402
from airflow_provider_llmq.core.transport.sync_client import SyncClient  # noqa: E402
from airflow_provider_llmq.testing.mock_server import MockConfig, MockServerProcess  # noqa: E402

KEY = "sk-bench-quick-methods"
DEPLOYMENT = "gpt-bench"


@dataclass
class Row:
    what: str
    rows: int
    seconds: float
    rows_per_s: float
    limit_rows_per_s: float | None
    note: str = ""


def prompts(n: int, tag: str) -> list[tuple[int, str]]:
    """Distinct prompts per measurement (the mock counts attempts per prompt)."""
    return [(i, f"{tag} prompt {i}: summarise row {i}") for i in range(n)]


def drain(results: Iterator[QueryResult], expected: int) -> None:
    count = ok = 0
    for result in results:
        count += 1
        ok += result.ok
    if count != expected or ok != expected:
        raise SystemExit(f"expected {expected} ok results, got {count} results, {ok} ok")


def timed(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench_methods(endpoint: EndpointConfig, n: int, latency_ms: float, c: int, sync_rows: int) -> list[Row]:
    limit = c / (latency_ms / 1000) if latency_ms else None
    out: list[Row] = []
    fast = {"retry_backoff": 0.001}

    rows = prompts(sync_rows, "sync")
    seconds = timed(lambda: drain(query_sync(endpoint, rows, **fast), sync_rows))
    out.append(
        Row(
            "query_sync (sequential)",
            n,
            seconds * n / sync_rows,
            sync_rows / seconds,
            1000 / latency_ms if latency_ms else None,
            f"{sync_rows} rows measured, time extrapolated to {n}",
        )
    )

    rows = prompts(n, "sync-threads")
    slices = [rows[i::c] for i in range(c)]

    def partitions() -> None:
        with ThreadPoolExecutor(c) as pool:
            for part, done in zip(
                slices,
                pool.map(lambda s: sum(1 for _ in query_sync(endpoint, s, **fast)), slices),
                strict=True,
            ):
                if done != len(part):
                    raise SystemExit("query_sync lost rows")

    seconds = timed(partitions)
    out.append(
        Row(f"query_sync x {c} threads", n, seconds, n / seconds, limit, f"{c} slices, one thread each")
    )

    for label, run in (
        (
            f"query_async_batches(batch_size={c})",
            lambda r: query_async_batches(endpoint, r, batch_size=c, **fast),
        ),
        (
            f"query_async_limited(max_concurrency={c})",
            lambda r: query_async_limited(endpoint, r, max_concurrency=c, **fast),
        ),
        (
            f"query_thread_pool(max_workers={c})",
            lambda r: query_thread_pool(endpoint, r, max_workers=c, **fast),
        ),
    ):
        rows = prompts(n, label)
        seconds = timed(lambda run=run, rows=rows: drain(run(rows), n))  # type: ignore[misc]
        out.append(Row(label, n, seconds, n / seconds, limit))
    return out


def bench_article(server: MockServerProcess, n: int, latency_ms: float, c: int) -> list[Row]:
    from tests.article import article_methods as article

    assert server.ca_path is not None
    ep = article.article_endpoint(server.base_url, KEY, server.ca_path, api_model=DEPLOYMENT)
    limit = c / (latency_ms / 1000) if latency_ms else None
    out: list[Row] = []
    sync_rows = max(1, min(n, 200))
    rows = prompts(sync_rows, "article-udf")
    seconds = timed(lambda: article.udf_method(rows, ep))
    out.append(
        Row(
            "article udf (sequential)",
            n,
            seconds * n / sync_rows,
            sync_rows / seconds,
            None,
            f"{sync_rows} rows measured, extrapolated",
        )
    )
    for label, run in (
        (f"article gather batches ({c})", lambda r: article.async_batch_method(r, ep, api_call_batch_size=c)),
        (
            f"article semaphore ({c})",
            lambda r: article.async_semaphore_method(r, ep, max_concurrent_requests=c),
        ),
        (f"article threads ({c})", lambda r: article.thread_method(r, ep, num_workers=c)),
    ):
        rows = prompts(n, label)
        seconds = timed(lambda run=run, rows=rows: run(rows))  # type: ignore[misc]
        out.append(Row(label, n, seconds, n / seconds, limit))
    return out


def bench_clients(endpoint: EndpointConfig, n: int, c: int) -> list[Row]:
    """Requests/s of one client at concurrency ``c``, 0 ms latency (the server's latency set to 0)."""
    options = QueryOptions(retry_backoff=0.001)
    out: list[Row] = []

    rows = prompts(n, "client-sync")
    it = iter(rows)
    lock = threading.Lock()

    def sync_worker(client: SyncClient) -> None:
        while True:
            with lock:
                item = next(it, None)
            if item is None:
                return
            if not client.query(*item).ok:
                raise SystemExit("sync client: a request failed")

    def sync_run() -> None:
        with SyncClient(endpoint, options, pool_size=c) as client:
            threads = [threading.Thread(target=sync_worker, args=(client,)) for _ in range(c)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    seconds = timed(sync_run)
    out.append(Row(f"SyncClient, {c} threads, 0 ms", n, seconds, n / seconds, None))

    rows = prompts(n, "client-async")

    async def async_run() -> None:
        async with AsyncClient(endpoint, options, concurrency=c) as client:
            source = iter(rows)

            async def worker() -> None:
                for item in source:
                    if not (await client.query(*item)).ok:
                        raise SystemExit("async client: a request failed")

            await asyncio.gather(*(worker() for _ in range(c)))

    seconds = timed(lambda: asyncio.run(async_run()))
    out.append(Row(f"AsyncClient, {c} tasks, 0 ms", n, seconds, n / seconds, None))
    return out


def table(rows: list[Row]) -> str:
    lines = ["| what | rows | seconds | rows/s | limit rows/s | note |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        limit = f"{r.limit_rows_per_s:,.0f}" if r.limit_rows_per_s else "-"
        lines.append(
            f"| {r.what} | {r.rows:,} | {r.seconds:.1f} | {r.rows_per_s:,.0f} | {limit} | {r.note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--sync-rows", type=int, default=500, help="rows for the sequential query_sync run")
    p.add_argument("--client-rows", type=int, default=10_000, help="rows per client at 0 ms latency")
    p.add_argument("--article", action="store_true", help="also run the article's four methods")
    p.add_argument("--skip-methods", action="store_true")
    p.add_argument("--skip-clients", action="store_true")
    p.add_argument("--json", help="also write the rows as JSON to this path")
    args = p.parse_args(argv)

    results: list[Row] = []
    with (
        tempfile.TemporaryDirectory(prefix="llmq-bench-") as cert_dir,
        MockServerProcess(
            MockConfig(api_key=KEY, latency_ms=args.latency_ms), tls=True, cert_dir=cert_dir
        ) as server,
    ):
        endpoint = EndpointConfig(
            api_base=server.base_url,
            api_key=KEY,
            api_type="azure",
            model=DEPLOYMENT,
            ca_cert=server.ca_path,
            timeout=60.0,
        )
        if not args.skip_methods:
            results += bench_methods(endpoint, args.rows, args.latency_ms, args.concurrency, args.sync_rows)
            if args.article:
                results += bench_article(server, args.rows, args.latency_ms, args.concurrency)
            print(table(results), flush=True)
        if not args.skip_clients:
            server.configure(latency_ms=0.0)
            clients = bench_clients(endpoint, args.client_rows, args.concurrency)
            print(table(clients), flush=True)
            results += clients
        stats = server.stats()
    load = os.getloadavg()
    print(
        f"\nserver: {stats['chat_requests']:,} chat requests, max in flight {stats['max_in_flight']}; "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
