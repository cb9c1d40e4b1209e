"""Benchmark: llmq's four query methods vs the theoretical limit, the article's code and the openai SDK.

One run, side by side, against the mock server in a child process over TLS (Azure URL form):

* scenario ``latency``: fixed server latency (default 50 ms), concurrency C (default 64), N prompts
  (default 5,000), no server-side limit. Limit = C / latency.
* scenario ``rate-limited``: the same, but the server admits at most R requests per second (default
  100; more get 429 with ``retry-after-ms``), on fewer prompts (default 1,200). llmq's methods run with
  ``requests_per_minute = R * 60``; the article's and the SDK run at concurrency C as they are.
  Limit = min(C / latency, R).

* the quota scenarios of issue 11 (``quota_cases.py``): 2,000 prompts, the server enforcing a quota
  nobody told the client (a 100/s bucket, OpenAI headers at 150/s, Azure 10 s windows at 3,000 RPM, a
  cap dropping from 200/s to 80/s, two processes sharing 100/s, the cap told exactly, a tokens/min
  cap with prompts of mixed length), against each quota's targets (``--no-quotas`` skips them).

Methods, each in a fresh Python process (so memory and leftover threads of one cannot touch the
next, and a hang is cut by a timeout):

* llmq: ``query_sync`` (run as C threads, each calling ``query_sync`` over its own slice of the
  rows: a Spark stage with C partitions emulated in one process; Spark would use C Python workers),
  ``query_async_batches(batch_size=C)``, ``query_async_limited(max_concurrency=C)``,
  ``query_thread_pool(max_workers=C)``;
* the article's four functions, copied faithfully in ``tests/article/article_methods.py`` (its UDF
  body run by C threads the same way);
* the official ``openai`` SDK: ``AsyncAzureOpenAI`` over ``DefaultAsyncHttpxClient(verify=<CA
  context>)`` (the SDK's own connection limits), default ``max_retries``, C workers each calling
  ``chat.completions.create`` under an ``asyncio.Semaphore(C)``, one failed row recorded, not raised.

Measured per method: wall time, right rows per second, its ratio to the limit, to the article's
corresponding method and to the SDK; rows out, right answers (checked against
``mock_server.expected_answer``), misplaced (another row's answer), missing, errors; requests
the server saw and how many it answered 429; client and server CPU seconds; peak RSS growth.

Output: a markdown table (stdout and ``benchmarks/results/results-<timestamp>.md``), a PNG chart
and the raw JSON beside it; a full (non ``--quick``) run also refreshes the committed copies
``benchmarks/RESULTS.md`` and ``benchmarks/results.png``.

Run: ``.venv/bin/python benchmarks/run.py [--rows 5000] [--latency-ms 50] [--concurrency 64] [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import math
import os
import platform
import re
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (ROOT, HERE):  # tests.article lives beside the package; quota_cases beside this file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from quota_cases import (  # noqa: E402
    CASES,
    QUOTA_METHODS,
    QuotaCase,
    Target,
    cap_rows_per_s,
    mean_request_tokens,
    padding,
)

KEY_ENV = "LLMQ_BENCH_API_KEY"
KEY = "sk-llmq-benchmark-key"
DEPLOYMENT = "gpt-bench"
API_VERSION = "2023-05-15"  # the article's
SYSTEM_PROMPT = "You are a helpful assistant."  # the article's, and llmq's default

# method key -> (family, label template, article counterpart)
METHODS: dict[str, tuple[str, str, str | None]] = {
    "llmq.sync": ("llmq", "query_sync x {c} threads (Spark stage, {c} partitions, emulated)", "article.udf"),
    "llmq.async_batches": ("llmq", "query_async_batches(batch_size={c})", "article.async_batches"),
    "llmq.async_limited": ("llmq", "query_async_limited(max_concurrency={c})", "article.async_limited"),
    "llmq.async_limited.no_rpm": (
        "llmq",
        "query_async_limited(max_concurrency={c}), no requests_per_minute",
        "article.async_limited",
    ),
    "llmq.thread_pool": ("llmq", "query_thread_pool(max_workers={c})", "article.thread_pool"),
    "llmq.async_limited.fixed": (
        "llmq",
        "query_async_limited(max_concurrency={c}, adaptive=False)",
        "article.async_limited",
    ),
    "llmq.thread_pool.fixed": (
        "llmq",
        "query_thread_pool(max_workers={c}, adaptive=False)",
        "article.thread_pool",
    ),
    "bare_aiohttp": ("bare", "bare aiohttp: one keep-alive session + Semaphore({c}), no retries", None),
    "article.udf": ("article", "article UDF query_gpt4 x {c} threads (emulated)", None),
    "article.async_batches": ("article", "article async_batch_method(api_call_batch_size={c})", None),
    "article.async_limited": ("article", "article async_semaphore_method(max_concurrent_requests={c})", None),
    "article.thread_pool": ("article", "article thread_method(num_workers={c})", None),
    "openai_sdk": ("openai", "openai SDK AsyncAzureOpenAI + Semaphore({c})", None),
}
LLMQ_METHODS = ["llmq.sync", "llmq.async_batches", "llmq.async_limited", "llmq.thread_pool"]
ARTICLE_METHODS = ["article.udf", "article.async_batches", "article.async_limited", "article.thread_pool"]
NOISE_METHODS = [
    "llmq.async_limited",
    "llmq.thread_pool",
    "llmq.async_limited.fixed",
    "llmq.thread_pool.fixed",
    "openai_sdk",
    "bare_aiohttp",
]
#: issue 21: refusals and faults that are not a quota, on a server with no quota at all
NOISE_CASES: dict[str, dict[str, float]] = {
    "noise-clean": {},
    "noise-429-hint-2pct": {"429": 0.02},
    "noise-429-nohint-5pct": {"429_no_hint": 0.05},
    "noise-500-2pct": {"500": 0.02},
    "noise-reset-1pct": {"reset": 0.01},
}


# --------------------------------------------------------------------------------------------------
# Scenarios and measurements
# --------------------------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    rows: int
    latency_ms: float
    concurrency: int
    server_rps: float | None = None  # the server's limit; None: none
    jitter_ms: float = 0.0  # per-prompt extra latency, uniform in [0, jitter_ms)
    methods: list[str] = field(default_factory=list)
    # issue 11's quota scenarios: the server's quota (mock_server.quotas), what it allows in rows/s,
    # how many client processes share it, what llmq is told (nothing, mostly), prompt lengths
    quota: dict[str, Any] | None = None
    cap: float | None = None
    processes: int = 1
    llmq_options: dict[str, Any] = field(default_factory=dict)
    mixed_lengths: bool = False
    noise: dict[str, float] | None = None  # the mock's noise on top of the quota (noise.py)
    target: Target | None = None
    blurb: str = ""

    @property
    def client_rpm(self) -> float | None:
        """The quota llmq's methods are given: exactly what the server admits."""
        return self.server_rps * 60 if self.server_rps else None

    @property
    def limit_rows_per_s(self) -> float:
        """``min(concurrency / latency, RPM / 60)``."""
        mean_latency = self.latency_ms + self.jitter_ms / 2
        by_concurrency = self.concurrency / (mean_latency / 1000) if mean_latency > 0 else float("inf")
        return min(by_concurrency * self.processes, self.server_rps or self.cap or float("inf"))

    def describe(self) -> str:
        if self.quota is not None:
            told = ", ".join(f"{k}={v:g}" for k, v in self.llmq_options.items()) or "nothing"
            each = f" each ({self.processes} processes)" if self.processes > 1 else ""
            return (
                f"{self.rows:,} prompts{each}, server latency {self.latency_ms:g} ms, concurrency "
                f"{self.concurrency}; server quota: {self.blurb} (`{json.dumps(self.quota)}`); llmq told "
                f"{told}; the cap: {self.limit_rows_per_s:,.1f} rows/s"
            )
        limit = f"server limit {self.server_rps:g} req/s (429 beyond), " if self.server_rps else ""
        if self.noise is not None:
            limit = f"{self.blurb}, "
        jitter = f" + 0-{self.jitter_ms:g} ms per prompt (mean used below)" if self.jitter_ms else ""
        rpm = f", llmq methods given requests_per_minute={self.client_rpm:g}" if self.client_rpm else ""
        return (
            f"{self.rows:,} prompts, server latency {self.latency_ms:g} ms{jitter}, {limit}concurrency "
            f"{self.concurrency}{rpm}; theoretical limit min(C / latency, RPM / 60) = "
            f"{self.limit_rows_per_s:,.0f} rows/s"
        )


@dataclass
class Measurement:
    scenario: str
    method: str
    label: str
    family: str
    rows: int
    seconds: float = 0.0
    outcome: str = "ok"  # "ok", or what ended the run ("raised KeyError: 'choices'", "timed out", ...)
    rows_out: int = 0
    right: int = 0
    misplaced: int = 0  # an answer that belongs to another row (or an id that was never sent)
    duplicates: int = 0
    missing: int = 0
    errors: int = 0
    errors_as_text: int = 0  # HTTP errors written into the response column as if answers (the article)
    cpu_seconds: float = 0.0
    server_cpu_seconds: float | None = None
    peak_rss_growth_mb: float | None = None
    requests: int = 0
    rate_limited: int = 0
    max_in_flight: int = 0
    notes: list[str] = field(default_factory=list)
    # llmq's adaptive rate at the end (AdaptiveStats): requests/s admitted, cuts, seconds paused
    final_rate: float | None = None
    episodes: int | None = None
    paused_seconds: float | None = None
    per_process: list[dict[str, Any]] = field(default_factory=list)  # rows, right, seconds of each

    @property
    def right_per_s(self) -> float:
        return self.right / self.seconds if self.seconds > 0 else 0.0


def prompts_for(
    scenario: str, method: str, n: int, process: int = 0, mixed: bool = False
) -> list[tuple[int, str]]:
    """Distinct prompts per run (the mock counts attempts per prompt), like short review texts;
    ``mixed``: with review text of 0 to about 1,900 characters."""
    tag = f"{scenario}/{method}" + (f"/p{process}" if process else "")
    return [
        (i, f"[{tag}] Summarise customer review #{i} in one sentence." + (padding(i) if mixed else ""))
        for i in range(n)
    ]


def score(m: Measurement, rows: list[tuple[int, str]], out: Iterable[tuple[Any, str | None, bool]]) -> None:
    """Correctness columns from ``(row_id, response, is_error)`` as the method delivered them."""
    from airflow_provider_llmq.testing.mock_server import expected_answer

    expected = {row_id: expected_answer(DEPLOYMENT, SYSTEM_PROMPT, prompt, {}) for row_id, prompt in rows}
    owner = {answer: row_id for row_id, answer in expected.items()}
    seen: set[Any] = set()
    for row_id, response, is_error in out:
        m.rows_out += 1
        if row_id in seen:
            m.duplicates += 1
            continue
        seen.add(row_id)
        if row_id not in expected:
            m.misplaced += 1
        elif is_error:
            m.errors += 1
        elif response == expected[row_id]:
            m.right += 1
        elif response in owner:
            m.misplaced += 1
        elif isinstance(response, str) and response.startswith("Error: "):
            m.errors += 1
            m.errors_as_text += 1
        else:
            m.misplaced += 1  # some other text on this row: wrong either way
    m.missing = len(expected) - len(seen & expected.keys())


# --------------------------------------------------------------------------------------------------
# Worker: one method in a fresh process
# --------------------------------------------------------------------------------------------------

Output = list[tuple[Any, str | None, bool]]


def _llmq_endpoint(spec: dict[str, Any]) -> Any:
    from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig

    return EndpointConfig(
        api_base=spec["base_url"],
        api_key=os.environ[KEY_ENV],
        api_type="azure",
        model=DEPLOYMENT,
        api_version=API_VERSION,
        ca_cert=spec["ca_path"],
        timeout=60.0,
    )


def _llmq_output(results: Iterable[Any]) -> Output:
    return [(r.row_id, r.response, not r.ok) for r in results]


def _partitions(rows: list[tuple[int, str]], c: int, run_slice: Callable[[list[Any]], Output]) -> Output:
    """C threads, each running the per-row function sequentially over its slice: a Spark stage."""
    slices = [rows[i::c] for i in range(c)]
    out: Output = []
    with ThreadPoolExecutor(c, thread_name_prefix="partition") as pool:
        for part in pool.map(run_slice, slices):
            out.extend(part)
    return out


def run_llmq(spec: dict[str, Any], rows: list[tuple[int, str]]) -> Output:
    from airflow_provider_llmq.core.methods import (
        query_async_batches,
        query_async_limited,
        query_sync,
        query_thread_pool,
    )

    endpoint = _llmq_endpoint(spec)
    c = spec["concurrency"]
    options: dict[str, Any] = {"system_prompt": SYSTEM_PROMPT, **spec.get("llmq_options", {})}
    if spec["client_rpm"] and spec["method"] != "llmq.async_limited.no_rpm":
        options["requests_per_minute"] = spec["client_rpm"]
    method = spec["method"]
    if method.endswith(".fixed"):
        options["adaptive"] = False
        method = method.removesuffix(".fixed")
    if method == "llmq.sync":
        return _partitions(rows, c, lambda part: _llmq_output(query_sync(endpoint, part, **options)))
    if method == "llmq.async_batches":
        stream = query_async_batches(endpoint, rows, batch_size=c, **options)
    elif method in ("llmq.async_limited", "llmq.async_limited.no_rpm"):
        stream = query_async_limited(endpoint, rows, max_concurrency=c, **options)
    elif method == "llmq.thread_pool":
        stream = query_thread_pool(endpoint, rows, max_workers=c, **options)
    else:
        raise ValueError(method)
    out = _llmq_output(stream)
    _LLMQ_STATS.append(stream.stats())
    return out


_LLMQ_STATS: list[Any] = []  # the adaptive rate's AdaptiveStats at the end of the method


def run_article(spec: dict[str, Any], rows: list[tuple[int, str]]) -> Output:
    from tests.article import article_methods as article

    ep = article.article_endpoint(
        spec["base_url"], os.environ[KEY_ENV], spec["ca_path"], api_model=DEPLOYMENT, api_version=API_VERSION
    )
    c = spec["concurrency"]
    method = spec["method"]
    if method == "article.udf":
        pairs = _partitions(rows, c, lambda part: [(i, r, False) for i, r in article.udf_method(part, ep)])
        return pairs
    if method == "article.async_batches":
        pairs = article.async_batch_method(rows, ep, api_call_batch_size=c)
    elif method == "article.async_limited":
        pairs = article.async_semaphore_method(rows, ep, max_concurrent_requests=c)
    elif method == "article.thread_pool":
        pairs = article.thread_method(rows, ep, num_workers=c)
    else:
        raise ValueError(method)
    return [(row_id, response, False) for row_id, response in pairs]


def run_openai_sdk(spec: dict[str, Any], rows: list[tuple[int, str]]) -> Output:
    """What a careful SDK user writes: a semaphore, a bounded pool of workers, errors kept per row."""
    import openai

    c = spec["concurrency"]
    ssl_context = ssl.create_default_context(cafile=spec["ca_path"])

    async def main() -> Output:
        client = openai.AsyncAzureOpenAI(
            azure_endpoint=spec["base_url"],
            api_key=os.environ[KEY_ENV],
            api_version=API_VERSION,
            http_client=openai.DefaultAsyncHttpxClient(verify=ssl_context),
        )
        semaphore = asyncio.Semaphore(c)
        source = iter(rows)
        out: Output = []

        async def one(prompt: str) -> tuple[str | None, bool]:
            async with semaphore:
                try:
                    completion = await client.chat.completions.create(
                        model=DEPLOYMENT,
                        messages=[
                            {"role": "system", "content": SYSTEM_PROMPT},
                            {"role": "user", "content": prompt},
                        ],
                    )
                except openai.APIError as exc:
                    return type(exc).__name__, True
                return completion.choices[0].message.content, False

        async def worker() -> None:
            for row_id, prompt in source:
                response, failed = await one(prompt)
                out.append((row_id, response, failed))

        async with client:
            await asyncio.gather(*(worker() for _ in range(c)))
        return out

    return asyncio.run(main())


def run_bare_aiohttp(spec: dict[str, Any], rows: list[tuple[int, str]]) -> Output:
    """The floor of client cost: one keep-alive aiohttp session, a semaphore, the body built and the
    answer parsed, nothing else (no retries, no limits): what any client must at least spend."""
    import aiohttp

    c = spec["concurrency"]
    url = f"{spec['base_url']}/openai/deployments/{DEPLOYMENT}/chat/completions?api-version={API_VERSION}"
    headers = {"api-key": os.environ[KEY_ENV], "Content-Type": "application/json"}
    ssl_context = ssl.create_default_context(cafile=spec["ca_path"])

    async def main() -> Output:
        out: Output = []
        source = iter(rows)
        connector = aiohttp.TCPConnector(limit=c, ssl=ssl_context)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker() -> None:
                for row_id, prompt in source:
                    body = json.dumps(
                        {
                            "messages": [
                                {"role": "system", "content": SYSTEM_PROMPT},
                                {"role": "user", "content": prompt},
                            ]
                        }
                    )
                    try:
                        async with session.post(url, data=body, headers=headers) as response:
                            payload = await response.read()
                        if response.status != 200:
                            out.append((row_id, None, True))
                            continue
                        answer = json.loads(payload)["choices"][0]["message"]["content"]
                        out.append((row_id, answer, False))
                    except Exception:
                        out.append((row_id, None, True))

            await asyncio.gather(*(worker() for _ in range(c)))
        return out

    return asyncio.run(main())


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _peak_since_reset_kb() -> tuple[int, bool]:
    """Peak RSS; True when the kernel's high-water mark could be reset just before the method ran."""
    try:
        text = Path("/proc/self/status").read_text()
        match = re.search(r"VmHWM:\s+(\d+) kB", text)
        if match:
            return int(match.group(1)), True
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False


def worker_main(spec_path: str) -> int:
    """Run one method once; write a Measurement (as JSON) next to the spec."""
    spec = json.loads(Path(spec_path).read_text())
    family, template, _ = METHODS[spec["method"]]
    m = Measurement(
        spec["scenario"],
        spec["method"],
        template.format(c=spec["concurrency"]),
        family,
        spec["rows"],
    )
    rows = prompts_for(
        spec["scenario"], spec["method"], spec["rows"], spec.get("process", 0), spec.get("mixed", False)
    )
    runners = {"openai": run_openai_sdk, "article": run_article, "bare": run_bare_aiohttp}
    runner = runners.get(family, run_llmq)
    out: Output = []
    try:
        # imports happen before the clock and the memory baseline, for every family alike;
        # import errors in the article copies are reported, not hidden
        if family == "llmq":
            import airflow_provider_llmq.core.methods  # noqa: F401
        if family == "article":
            import tests.article.article_methods  # noqa: F401
        if family == "openai":
            import openai  # noqa: F401
    except Exception as exc:
        m.outcome = f"import failed: {type(exc).__name__}: {exc}"
        Path(spec["out_path"]).write_text(json.dumps(asdict(m)))
        return 0
    gc.collect()
    rss_before = _rss_kb()
    hwm_reset = False
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
        hwm_reset = True
    except OSError:
        pass
    cpu_before = os.times()
    started = time.perf_counter()
    try:
        out = runner(spec, rows)
    except BaseException as exc:  # the article's methods die on one bad answer: record how
        m.outcome = f"raised {type(exc).__name__}: {str(exc)[:80]}"
    m.seconds = time.perf_counter() - started
    cpu_after = os.times()
    m.cpu_seconds = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    peak, exact = _peak_since_reset_kb()
    m.peak_rss_growth_mb = max(0, peak - rss_before) / 1024 if (hwm_reset and exact) else None
    if _LLMQ_STATS:
        stats = _LLMQ_STATS[-1]
        m.final_rate, m.episodes, m.paused_seconds = stats.rate, stats.episodes, stats.paused_seconds
    score(m, rows, out)
    Path(spec["out_path"]).write_text(json.dumps(asdict(m)))
    return 0


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def run_one(server: Any, scenario: Scenario, method: str, workdir: Path, timeout: float) -> Measurement:
    """The method in ``scenario.processes`` fresh processes started together (each with its own
    rows), against the server's counters zeroed (and its quota fresh) just before."""
    family, template, _ = METHODS[method]
    server.reset()
    server_cpu = _process_cpu_seconds(server.proc.pid if getattr(server, "proc", None) else None)
    env = dict(os.environ, **{KEY_ENV: KEY})  # the key travels in the environment, never in argv
    started = time.perf_counter()
    running = []
    for process in range(scenario.processes):
        name = f"{scenario.name}-{method}-{process}"
        out_path = workdir / f"{name}.json"
        spec = {
            "scenario": scenario.name,
            "method": method,
            "rows": scenario.rows,
            "concurrency": scenario.concurrency,
            "client_rpm": scenario.client_rpm,
            "llmq_options": scenario.llmq_options,
            "process": process,
            "mixed": scenario.mixed_lengths,
            "base_url": server.base_url,
            "ca_path": server.ca_path,
            "out_path": str(out_path),
        }
        spec_path = workdir / f"{name}.spec.json"
        spec_path.write_text(json.dumps(spec))
        log_path = workdir / f"{name}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--_worker", str(spec_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(ROOT),
            )
        running.append((proc, out_path, log_path))
    parts = []
    for proc, out_path, log_path in running:
        try:
            code = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        if out_path.exists():
            part = Measurement(**{**json.loads(out_path.read_text()), "notes": []})
        else:
            part = Measurement(
                scenario.name, method, template.format(c=scenario.concurrency), family, scenario.rows
            )
            part.seconds = time.perf_counter() - started
            part.missing = scenario.rows
            tail = log_path.read_text()[-300:].strip().splitlines()
            part.outcome = (
                "timed out" if code is None else f"worker exited {code}: {tail[-1] if tail else ''}"
            )
        parts.append(part)
    stats = server.stats()
    server_cpu_after = _process_cpu_seconds(server.proc.pid if getattr(server, "proc", None) else None)
    m = parts[0] if len(parts) == 1 else _combined(parts)
    by_status = stats.get("requests_by_status", {})
    m.requests = int(stats.get("chat_requests", 0))
    m.rate_limited = int(by_status.get("429", 0))
    m.max_in_flight = int(stats.get("max_in_flight", 0))
    if server_cpu is not None and server_cpu_after is not None:
        m.server_cpu_seconds = server_cpu_after - server_cpu
    return m


def _combined(parts: list[Measurement]) -> Measurement:
    """Processes that ran at once, as one measurement: their rows together over the longest wall
    time; each one's own figures kept in ``per_process``."""
    first = parts[0]
    m = Measurement(first.scenario, first.method, first.label, first.family, sum(p.rows for p in parts))
    m.seconds = max(p.seconds for p in parts)
    for name in ("rows_out", "right", "misplaced", "duplicates", "missing", "errors", "errors_as_text"):
        setattr(m, name, sum(getattr(p, name) for p in parts))
    m.cpu_seconds = sum(p.cpu_seconds for p in parts)
    m.outcome = next((p.outcome for p in parts if p.outcome != "ok"), "ok")
    if all(p.final_rate is not None for p in parts):
        m.final_rate = sum(p.final_rate or 0.0 for p in parts)
        m.episodes = sum(p.episodes or 0 for p in parts)
        m.paused_seconds = max(p.paused_seconds or 0.0 for p in parts)
    m.per_process = [
        {
            "rows": p.rows,
            "right": p.right,
            "seconds": round(p.seconds, 2),
            "right_per_s": round(p.right_per_s, 1),
            "final_rate": None if p.final_rate is None else round(p.final_rate, 1),
        }
        for p in parts
    ]
    return m


def _process_cpu_seconds(pid: int | None) -> float | None:
    """user + system CPU seconds of another process (the mock server), from /proc; None if unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def machine_info() -> dict[str, str]:
    load = os.getloadavg()
    cpu = platform.processor() or ""
    try:
        models = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = models[0].strip() if models else cpu
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    versions = []
    for name in ("openai", "httpx", "aiohttp", "requests"):
        try:
            module = __import__(name)
            versions.append(f"{name} {module.__version__}")
        except Exception:
            versions.append(f"{name} ?")
    return {
        "cores": f"{os.cpu_count()} ({affinity} usable){', ' + cpu if cpu else ''}",
        "load average at start": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1 / 5 / 15 min)",
        "python": f"{platform.python_implementation()} {platform.python_version()} on {platform.platform()}",
        "libraries": ", ".join(versions),
    }


def _fmt_ratio(num: float, den: float | None) -> str:
    if den is None:
        return "-"
    if den <= 0:
        return "∞" if num > 0 else "-"
    return f"{num / den:.2f}x"


def scenario_table(scenario: Scenario, ms: list[Measurement]) -> str:
    by_method = {m.method: m for m in ms}
    sdk = by_method.get("openai_sdk")
    head = (
        "| method | wall s | right rows/s | vs limit | vs article | vs openai SDK | rows out | right "
        "| misplaced | missing | errors | requests (429) | CPU s client / server | peak RSS +MB | outcome |"
    )
    lines = [head, "|" + "|".join(["---"] + ["---:"] * 13 + ["---"]) + "|"]
    for m in ms:
        _, _, counterpart = METHODS[m.method]
        art = by_method.get(counterpart) if counterpart else None
        vs_article = _fmt_ratio(m.right_per_s, art.right_per_s) if art else "-"
        if art and art.right < art.rows:  # its rows/s counts right rows only: say how few there were
            vs_article += f" (article: {art.right:,} of {art.rows:,} right)"
        vs_sdk = _fmt_ratio(m.right_per_s, sdk.right_per_s) if sdk and m is not sdk else "-"
        errors = f"{m.errors:,}"
        if m.errors_as_text:
            errors += f" ({m.errors_as_text:,} as answer text)"
        misplaced = f"{m.misplaced:,}" + (f" (+{m.duplicates:,} dup)" if m.duplicates else "")
        server_cpu = f"{m.server_cpu_seconds:.1f}" if m.server_cpu_seconds is not None else "?"
        cpu = f"{m.cpu_seconds:.1f} / {server_cpu}"
        rss = f"{m.peak_rss_growth_mb:,.0f}" if m.peak_rss_growth_mb is not None else "-"
        name = f"**{m.label}**" if m.family == "llmq" else m.label
        vs_limit = m.right_per_s / scenario.limit_rows_per_s
        lines.append(
            f"| {name} | {m.seconds:.1f} | {m.right_per_s:,.0f} | {vs_limit:.2f} "
            f"| {vs_article} | {vs_sdk} | {m.rows_out:,} | {m.right:,} | {misplaced} | {m.missing:,} "
            f"| {errors} | {m.requests:,} ({m.rate_limited:,}) | {cpu} | {rss} "
            f"| {m.outcome} |"
        )
    return "\n".join(lines)


def _share(m: Measurement) -> float:
    return m.rate_limited / m.requests if m.requests else 0.0


def _verdict(scenario: Scenario, m: Measurement) -> tuple[bool, list[str]]:
    """Whether the method met the scenario's targets, and what it missed (by how much)."""
    target = scenario.target
    missed = []
    if m.right < m.rows:
        missed.append(f"{m.rows - m.right:,} rows not answered")
    if target is not None:
        ratio = m.right_per_s / scenario.limit_rows_per_s
        if target.min_vs_cap is not None and ratio < target.min_vs_cap:
            missed.append(f"{ratio:.3f} of the cap < {target.min_vs_cap:g}")
        if _share(m) > target.max_429_share:
            missed.append(f"{100 * _share(m):.1f} % 429s > {100 * target.max_429_share:g} %")
    return not missed, missed


def quota_table(scenario: Scenario, ms: list[Measurement]) -> str:
    target = scenario.target
    assert target is not None
    head = (
        f"| method | wall s | answered rows/s | vs cap (target {target.min_vs_cap:g}) "
        f"| 429 share (target {100 * target.max_429_share:g} %) | rows answered | errors | requests (429) "
        "| llmq final rate / cuts / paused | CPU s client / server | met | outcome |"
    )
    lines = [head, "|" + "|".join(["---"] + ["---:"] * 9 + ["---", "---"]) + "|"]
    for m in ms:
        met, missed = _verdict(scenario, m)
        name = f"**{m.label}**" if m.family == "llmq" else m.label
        server_cpu = f"{m.server_cpu_seconds:.1f}" if m.server_cpu_seconds is not None else "?"
        adaptive = "-"
        if m.final_rate is not None:
            adaptive = f"{m.final_rate:,.0f}/s, {m.episodes}, {m.paused_seconds:.1f} s"
        answered = f"{m.right:,} of {m.rows:,}"
        if m.per_process:
            answered += (
                " (" + " + ".join(f"{p['right']:,} in {p['seconds']:.1f} s" for p in m.per_process) + ")"
            )
        vs_cap = m.right_per_s / scenario.limit_rows_per_s
        verdict = "yes" if met else "no: " + "; ".join(missed)
        lines.append(
            f"| {name} | {m.seconds:.1f} | {m.right_per_s:,.1f} | {vs_cap:.2f} "
            f"| {100 * _share(m):.1f} % | {answered} | {m.errors:,} | {m.requests:,} ({m.rate_limited:,}) "
            f"| {adaptive} | {m.cpu_seconds:.1f} / {server_cpu} | {verdict} | {m.outcome} |"
        )
    return "\n".join(lines)


def targets_summary(scenarios: list[Scenario], results: dict[str, list[Measurement]]) -> str:
    """One line per quota scenario and llmq method: the figures the issue's targets are about."""
    lines = [
        "| scenario | method | vs cap | target | 429 share | target | rows answered | met |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for scenario in scenarios:
        if scenario.target is None:
            continue
        for m in results[scenario.name]:
            if m.family != "llmq":
                continue
            met, missed = _verdict(scenario, m)
            target = scenario.target
            lines.append(
                f"| {scenario.name} | {_short_label(m)} | {m.right_per_s / scenario.limit_rows_per_s:.3f} "
                f"| {target.min_vs_cap:g} | {100 * _share(m):.1f} % | {100 * target.max_429_share:g} % "
                f"| {m.right:,} / {m.rows:,} | {'yes' if met else 'no: ' + '; '.join(missed)} |"
            )
    return "\n".join(lines)


def markdown(
    scenarios: list[Scenario],
    results: dict[str, list[Measurement]],
    info: dict[str, str],
    load_end: tuple[float, float, float],
    total_seconds: float,
    chart_name: str,
    command: str,
    raw: dict[str, Any] | None = None,
) -> str:
    quota_scenarios = [s for s in scenarios if s.quota is not None]
    parts = [
        "# llmq benchmark",
        "",
        f"`{command}` — {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}, "
        f"{total_seconds:.0f} s in all.",
        "",
        "Mock Azure OpenAI server in a child process over TLS (Azure URL form, `api-key` header); "
        "every method in a fresh Python process on the same machine, one after another. "
        "**Shared, noisy machine**: client and server compete for the same cores, so read the ratios "
        "(measured side by side in this one run), not the absolute numbers.",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in info.items()),
        f"| load average at end | {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} |",
        "",
        "Columns: *right rows/s* counts only rows that came back with their own answer; *vs limit* "
        "divides it by `min(concurrency / latency, RPM / 60)`; *vs article* by the article's "
        "corresponding method (UDF, gather batches, semaphore, thread pool); *vs openai SDK* by the "
        "SDK row. *misplaced*: a row carrying another row's answer; *errors*: rows that ended as an "
        "error (the article writes HTTP errors into the answer column as `Error: 429, ...`); "
        "*requests (429)*: chat requests the server saw, and how many it refused as rate-limited; "
        "*CPU s*: user + system CPU seconds of the method's process and of the mock server's; "
        "*peak RSS +MB*: the worker process's peak RSS during the method minus its RSS before. "
        "`query_sync` and the article's UDF body are per-row sequential functions: a Spark stage with "
        "C partitions is emulated by C threads in one process, each running the function over its "
        "slice (Spark would run C Python worker processes).",
        "",
    ]
    if quota_scenarios:
        parts += [
            "## Quotas nobody told the client (issue 11): the targets",
            "",
            "llmq's rate-limited method (`query_async_limited`) and thread pool, **no configuration** "
            "(only `told-exactly-100` gets `requests_per_minute`): *vs cap* is answered rows/s (rows "
            "with their own answer, over the wall time of the method, start-up and tail included) "
            "divided by what the quota allows; *429 share*: 429s over all requests the server saw. "
            "Each scenario's full table, with the openai SDK and the article's semaphore method, "
            "follows below. How the caps are counted: `azure-3000rpm`'s run spans four 10 s windows, "
            "the first one partial (6.3 s) but with its whole budget, so more than 1.0 is possible; "
            "`drop-200-80`'s cap is the rows over the fastest possible schedule (200/s from the very "
            "first request, then 80/s), which no client that has to learn the 200/s can reach; "
            "`tokens-per-minute`'s is the tokens/min over the mean cost of a request.",
            "",
            targets_summary(quota_scenarios, results),
            "",
        ]
    for scenario in scenarios:
        table = quota_table if scenario.quota is not None else scenario_table
        parts += [
            f"## {scenario.name}",
            "",
            scenario.describe() + ".",
            "",
            table(scenario, results[scenario.name]),
            "",
        ]
    parts += [f"![rows/s per method]({chart_name})", ""]
    if raw is not None:
        parts += [
            "<details><summary>Raw JSON of this run</summary>",
            "",
            "```json",
            json.dumps(raw, indent=1),
            "```",
            "",
            "</details>",
            "",
        ]
    return "\n".join(parts)


FAMILY_COLORS = {"llmq": "#1f77b4", "article": "#d62728", "openai": "#7f7f7f", "bare": "#2ca02c"}


def chart(scenarios: list[Scenario], results: dict[str, list[Measurement]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cols = min(3, len(scenarios))
    rows = math.ceil(len(scenarios) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.6 * rows), squeeze=False)
    flat = [ax for line in axes for ax in line]
    for ax in flat[len(scenarios) :]:
        ax.set_visible(False)
    for ax, scenario in zip(flat, scenarios, strict=False):
        ms = results[scenario.name]
        labels = [_short_label(m) for m in ms]
        values = [m.right_per_s for m in ms]
        y = list(range(len(ms)))[::-1]
        ax.barh(y, values, color=[FAMILY_COLORS[m.family] for m in ms], height=0.7)
        limit = scenario.limit_rows_per_s
        ax.axvline(limit, color="black", linestyle="--", linewidth=1.2)
        ax.set_xlim(0, max([limit, *values]) * 1.4)
        ax.text(
            limit,
            len(ms) - 0.45,
            f"{'cap' if scenario.quota else 'limit'} {limit:,.0f}/s ",
            fontsize=8,
            va="bottom",
            ha="right",
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
        )
        for yi, m, v in zip(y, ms, values, strict=True):
            text = f" {v:,.0f}" if m.outcome == "ok" else f" {v:,.0f} ({_short_outcome(m)})"
            wrong = [
                f"{n:,} {what}"
                for n, what in ((m.misplaced, "misplaced"), (m.missing, "missing"), (m.errors, "errors"))
                if n and not (what == "missing" and m.rows_out == 0)
            ]
            if wrong:
                text += f" [{', '.join(wrong)}]"
            if scenario.quota is not None and m.requests:
                text += f" ({100 * _share(m):.1f} % 429)"
            ax.text(
                v,
                yi,
                text,
                va="center",
                fontsize=7,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5},
            )
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_ylim(-0.6, len(ms) - 0.1)
        ax.set_xlabel("rows with the right answer per second", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        rps = f", server {scenario.server_rps:g} req/s" if scenario.server_rps else ""
        jitter = f"+0-{scenario.jitter_ms:g}" if scenario.jitter_ms else ""
        each = f" x {scenario.processes} processes" if scenario.processes > 1 else ""
        told = " (llmq told the cap)" if scenario.llmq_options else ""
        ax.set_title(
            f"{scenario.name}: {scenario.rows:,} rows{each}, {scenario.latency_ms:g}{jitter} ms, "
            f"C={scenario.concurrency}{rps}{told}",
            fontsize=9,
        )
    fig.legend(
        handles=[Patch(color=c, label=f) for f, c in FAMILY_COLORS.items()],
        loc="lower center",
        ncol=3,
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _short_label(m: Measurement) -> str:
    short = {
        "llmq.sync": "llmq query_sync (threads)",
        "llmq.async_batches": "llmq async_batches",
        "llmq.async_limited": "llmq async_limited",
        "llmq.async_limited.no_rpm": "llmq async_limited, no rpm",
        "llmq.thread_pool": "llmq thread_pool",
        "article.udf": "article UDF (threads)",
        "article.async_batches": "article gather batches",
        "article.async_limited": "article semaphore",
        "article.thread_pool": "article thread pool",
        "openai_sdk": "openai SDK + semaphore",
    }
    return short.get(m.method, m.method)


def _short_outcome(m: Measurement) -> str:
    if m.outcome.startswith("raised "):
        return "died: " + m.outcome[len("raised ") :].split(":")[0]
    return m.outcome[:20]


def build_scenarios(args: argparse.Namespace) -> list[Scenario]:
    everything = [*LLMQ_METHODS, *ARTICLE_METHODS, "openai_sdk"]
    rate_methods = [
        *LLMQ_METHODS,
        "llmq.async_limited.no_rpm",
        *ARTICLE_METHODS,
        "openai_sdk",
    ]
    scenarios = [
        Scenario("latency", args.rows, args.latency_ms, args.concurrency, None, args.jitter_ms, everything),
    ]
    if args.rate_rps > 0 and args.rate_rows > 0:
        scenarios.append(
            Scenario(
                "rate-limited",
                args.rate_rows,
                args.latency_ms,
                args.concurrency,
                args.rate_rps,
                args.jitter_ms,
                rate_methods,
            )
        )
    if args.quotas and args.quota_rows > 0:
        scenarios += [quota_scenario(case, args) for case in CASES]
    if args.noise:
        scenarios += [
            Scenario(
                name,
                args.quota_rows,
                args.noise_latency_ms,
                args.concurrency,
                methods=list(NOISE_METHODS),
                noise=noise,
                blurb=f"no quota; noise {noise or 'none'}",
            )
            for name, noise in NOISE_CASES.items()
        ]
    if args.scenarios:
        names = set(args.scenarios.split(","))
        unknown = names - {s.name for s in scenarios}
        if unknown:
            raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
        scenarios = [s for s in scenarios if s.name in names]
    if args.only:
        wanted = set(args.only.split(","))
        for s in scenarios:
            s.methods = [m for m in s.methods if m in wanted]
    return scenarios


def quota_scenario(case: QuotaCase, args: argparse.Namespace) -> Scenario:
    scenario = Scenario(
        case.name,
        args.quota_rows,
        args.latency_ms,
        args.concurrency,
        methods=list(QUOTA_METHODS),
        quota=case.quota,
        processes=case.processes,
        llmq_options=dict(case.llmq_options),
        mixed_lengths=case.mixed_lengths,
        noise=dict(case.noise) or None,
        target=case.target,
        blurb=case.blurb,
    )
    mean_tokens = None
    if case.mixed_lengths:
        prompts = [p for _, p in prompts_for(case.name, "llmq.async_limited", args.quota_rows, mixed=True)]
        mean_tokens = mean_request_tokens(prompts, SYSTEM_PROMPT, DEPLOYMENT)
        scenario.blurb += f" (a request costs {mean_tokens:.0f} tokens on average)"
    scenario.cap = cap_rows_per_s(case, args.quota_rows, mean_tokens)
    return scenario


def git_revision() -> str:
    """The commit measured, and whether the working tree differed from it."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + (" + uncommitted changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_worker"]:
        return worker_main(argv[1])
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rows", type=int, default=None, help="prompts in the latency scenario (5000)")
    p.add_argument("--rate-rows", type=int, default=None, help="prompts in the rate-limited scenario (1200)")
    p.add_argument("--latency-ms", type=float, default=50.0, help="server latency per request (50)")
    p.add_argument(
        "--jitter-ms",
        type=float,
        default=0.0,
        help="extra latency per prompt, uniform in [0, J) ms (0); out-of-order answers show misplacement",
    )
    p.add_argument("--concurrency", type=int, default=64, help="C: batch size, workers, partitions (64)")
    p.add_argument("--rate-rps", type=float, default=100.0, help="server limit in the rate-limited scenario")
    p.add_argument("--quick", action="store_true", help="1,000 + 400 (+ 500 per quota) prompts: a smoke run")
    p.add_argument("--quota-rows", type=int, default=None, help="prompts per quota scenario (2000)")
    p.add_argument(
        "--quotas",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the quota scenarios of issue 11 (default: yes)",
    )
    p.add_argument(
        "--noise",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the noise scenarios of issue 21: random 429s, 5xx, resets, no quota (default: yes)",
    )
    p.add_argument("--noise-latency-ms", type=float, default=200.0, help="latency of the noise scenarios")
    p.add_argument("--scenarios", help="comma-separated scenario names to run, e.g. bucket-100,drop-200-80")
    p.add_argument("--only", help="comma-separated method keys to run, e.g. llmq.sync,article.udf")
    p.add_argument("--timeout", type=float, default=None, help="seconds per method before it is killed")
    p.add_argument(
        "--render",
        metavar="JSON",
        help="write the markdown (and chart) again from a run's raw JSON, without measuring anything",
    )
    p.add_argument(
        "--publish",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="refresh benchmarks/RESULTS.md and results.png (default: yes unless --quick)",
    )
    args = p.parse_args(argv)
    if args.render:
        return render(Path(args.render), publish=args.publish is not False)
    if args.rows is None:
        args.rows = 1000 if args.quick else 5000
    if args.rate_rows is None:
        args.rate_rows = 400 if args.quick else 1200
    if args.quota_rows is None:
        args.quota_rows = 500 if args.quick else 2000
    publish = (not args.quick) if args.publish is None else args.publish
    if args.concurrency < 1 or args.rows < 1 or args.latency_ms < 0:
        p.error("--rows and --concurrency must be >= 1, --latency-ms >= 0")

    from airflow_provider_llmq.testing.mock_server import MockConfig, MockServerProcess

    info = {"git": git_revision(), **machine_info()}
    scenarios = build_scenarios(args)
    results: dict[str, list[Measurement]] = {}
    started = time.perf_counter()
    print(f"machine: {info['cores']}; load average {info['load average at start']}", flush=True)
    with (
        tempfile.TemporaryDirectory(prefix="llmq-bench-") as tmp,
        MockServerProcess(
            MockConfig(api_key=KEY, latency_ms=args.latency_ms), tls=True, cert_dir=Path(tmp) / "tls"
        ) as server,
    ):
        workdir = Path(tmp)
        for scenario in scenarios:
            server.configure(
                latency_ms=scenario.latency_ms,
                latency_jitter_ms=scenario.jitter_ms,
                rps=scenario.server_rps,
                quota=scenario.quota,
                noise=scenario.noise,
            )
            print(f"\n== {scenario.name}: {scenario.describe()}", flush=True)
            ideal = scenario.rows * scenario.processes / scenario.limit_rows_per_s
            timeout = args.timeout or max(120.0, 15 * ideal)
            results[scenario.name] = []
            for method in scenario.methods:
                m = run_one(server, scenario, method, workdir, timeout)
                results[scenario.name].append(m)
                print(
                    f"  {m.label:<72} {m.seconds:6.1f} s {m.right_per_s:7.0f} right rows/s "
                    f"right {m.right}/{m.rows} misplaced {m.misplaced} missing {m.missing} "
                    f"errors {m.errors} 429s {m.rate_limited} cpu {m.cpu_seconds:.1f}s "
                    f"server cpu {m.server_cpu_seconds or 0:.1f}s  {m.outcome}"
                    + (f"  final rate {m.final_rate:.0f}/s" if m.final_rate is not None else ""),
                    flush=True,
                )
    total = time.perf_counter() - started
    load_end = os.getloadavg()

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    png = out_dir / f"results-{stamp}.png"
    chart(scenarios, results, png)
    command = "benchmarks/run.py " + " ".join(argv) if argv else "benchmarks/run.py"
    raw = {
        "machine": info,
        "load_average_end": load_end,
        "total_seconds": total,
        "command": command,
        "scenarios": [asdict(s) for s in scenarios],
        "results": {k: [asdict(m) for m in v] for k, v in results.items()},
    }
    md = markdown(scenarios, results, info, load_end, total, png.name, command, raw)
    (out_dir / f"results-{stamp}.md").write_text(md)
    (out_dir / f"results-{stamp}.json").write_text(json.dumps(raw, indent=1))
    if publish:
        shutil.copyfile(png, HERE / "results.png")
        (HERE / "RESULTS.md").write_text(
            markdown(scenarios, results, info, load_end, total, "results.png", command, raw)
        )
        print(f"published: {HERE / 'RESULTS.md'}, {HERE / 'results.png'}")
    print("\n" + md)  # after the files: a closed pipe (| head) must not lose them
    print(f"written: {out_dir / f'results-{stamp}.md'}, {png}")
    return 0


def render(raw_path: Path, publish: bool) -> int:
    """The markdown and chart of a finished run from its raw JSON (new formatting, same figures)."""
    raw = json.loads(raw_path.read_text())
    scenarios = []
    for data in raw["scenarios"]:
        target = data.pop("target", None)
        scenarios.append(Scenario(**data, target=Target(**target) if target else None))
    results = {k: [Measurement(**m) for m in v] for k, v in raw["results"].items()}
    args = (raw["machine"], tuple(raw["load_average_end"]), raw["total_seconds"])
    png = raw_path.with_suffix(".png")
    chart(scenarios, results, png)
    md = markdown(scenarios, results, *args, png.name, raw["command"], raw)
    raw_path.with_suffix(".md").write_text(md)
    if publish:
        shutil.copyfile(png, HERE / "results.png")
        (HERE / "RESULTS.md").write_text(
            markdown(scenarios, results, *args, "results.png", raw["command"], raw)
        )
        print(f"published: {HERE / 'RESULTS.md'}, {HERE / 'results.png'}")
    print(f"written: {raw_path.with_suffix('.md')}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
