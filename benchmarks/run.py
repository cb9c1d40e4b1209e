"""Benchmark: llmq's four query methods vs the theoretical limit, the article's code and the openai SDK.

One run, side by side, against the mock server in a child process over TLS (Azure URL form):

* scenario ``latency``: fixed server latency (default 50 ms), concurrency C (default 64), N prompts
  (default 5,000), no server-side limit. Limit = C / latency.
* scenario ``rate-limited``: the same, but the server admits at most R requests per second (default
  100; more get 429 with ``retry-after-ms``), on fewer prompts (default 1,200). llmq's methods run with
  ``requests_per_minute = R * 60``; the article's and the SDK run at concurrency C as they are.
  Limit = min(C / latency, R).

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
if str(ROOT) not in sys.path:  # tests.article lives beside the package
    sys.path.insert(0, str(ROOT))

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
    "article.udf": ("article", "article UDF query_gpt4 x {c} threads (emulated)", None),
    "article.async_batches": ("article", "article async_batch_method(api_call_batch_size={c})", None),
    "article.async_limited": ("article", "article async_semaphore_method(max_concurrent_requests={c})", None),
    "article.thread_pool": ("article", "article thread_method(num_workers={c})", None),
    "openai_sdk": ("openai", "openai SDK AsyncAzureOpenAI + Semaphore({c})", None),
}
LLMQ_METHODS = ["llmq.sync", "llmq.async_batches", "llmq.async_limited", "llmq.thread_pool"]
ARTICLE_METHODS = ["article.udf", "article.async_batches", "article.async_limited", "article.thread_pool"]


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

    @property
    def client_rpm(self) -> float | None:
        """The quota llmq's methods are given: exactly what the server admits."""
        return self.server_rps * 60 if self.server_rps else None

    @property
    def limit_rows_per_s(self) -> float:
        """``min(concurrency / latency, RPM / 60)``."""
        mean_latency = self.latency_ms + self.jitter_ms / 2
        by_concurrency = self.concurrency / (mean_latency / 1000) if mean_latency > 0 else float("inf")
        return min(by_concurrency, self.server_rps or float("inf"))

    def describe(self) -> str:
        limit = f"server limit {self.server_rps:g} req/s (429 beyond), " if self.server_rps else ""
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

    @property
    def right_per_s(self) -> float:
        return self.right / self.seconds if self.seconds > 0 else 0.0


def prompts_for(scenario: str, method: str, n: int) -> list[tuple[int, str]]:
    """Distinct prompts per run (the mock counts attempts per prompt), like short review texts."""
    return [(i, f"[{scenario}/{method}] Summarise customer review #{i} in one sentence.") for i in range(n)]


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
    from airflow_provider_llmq.core.endpoint import EndpointConfig

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
    options: dict[str, Any] = {"system_prompt": SYSTEM_PROMPT}
    if spec["client_rpm"] and spec["method"] != "llmq.async_limited.no_rpm":
        options["requests_per_minute"] = spec["client_rpm"]
    method = spec["method"]
    if method == "llmq.sync":
        return _partitions(rows, c, lambda part: _llmq_output(query_sync(endpoint, part, **options)))
    if method == "llmq.async_batches":
        return _llmq_output(query_async_batches(endpoint, rows, batch_size=c, **options))
    if method in ("llmq.async_limited", "llmq.async_limited.no_rpm"):
        return _llmq_output(query_async_limited(endpoint, rows, max_concurrency=c, **options))
    if method == "llmq.thread_pool":
        return _llmq_output(query_thread_pool(endpoint, rows, max_workers=c, **options))
    raise ValueError(method)


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
    rows = prompts_for(spec["scenario"], spec["method"], spec["rows"])
    runner = run_openai_sdk if family == "openai" else run_article if family == "article" else run_llmq
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
    score(m, rows, out)
    Path(spec["out_path"]).write_text(json.dumps(asdict(m)))
    return 0


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def run_one(server: Any, scenario: Scenario, method: str, workdir: Path, timeout: float) -> Measurement:
    family, template, _ = METHODS[method]
    out_path = workdir / f"{scenario.name}-{method}.json"
    spec = {
        "scenario": scenario.name,
        "method": method,
        "rows": scenario.rows,
        "concurrency": scenario.concurrency,
        "client_rpm": scenario.client_rpm,
        "base_url": server.base_url,
        "ca_path": server.ca_path,
        "out_path": str(out_path),
    }
    spec_path = workdir / f"{scenario.name}-{method}.spec.json"
    spec_path.write_text(json.dumps(spec))
    server.reset()
    server_cpu = _process_cpu_seconds(server.proc.pid if getattr(server, "proc", None) else None)
    env = dict(os.environ, **{KEY_ENV: KEY})  # the key travels in the environment, never in argv
    log_path = workdir / f"{scenario.name}-{method}.log"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--_worker", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(ROOT),
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
    stats = server.stats()
    server_cpu_after = _process_cpu_seconds(server.proc.pid if getattr(server, "proc", None) else None)
    if out_path.exists():
        m = Measurement(**{**json.loads(out_path.read_text()), "notes": []})
    else:
        m = Measurement(scenario.name, method, template.format(c=scenario.concurrency), family, scenario.rows)
        m.seconds = time.perf_counter() - started
        m.missing = scenario.rows
        tail = log_path.read_text()[-300:].strip().splitlines()
        m.outcome = "timed out" if code is None else f"worker exited {code}: {tail[-1] if tail else ''}"
    by_status = stats.get("requests_by_status", {})
    m.requests = int(stats.get("chat_requests", 0))
    m.rate_limited = int(by_status.get("429", 0))
    m.max_in_flight = int(stats.get("max_in_flight", 0))
    if server_cpu is not None and server_cpu_after is not None:
        m.server_cpu_seconds = server_cpu_after - server_cpu
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


def markdown(
    scenarios: list[Scenario],
    results: dict[str, list[Measurement]],
    info: dict[str, str],
    load_end: tuple[float, float, float],
    total_seconds: float,
    chart_name: str,
    command: str,
) -> str:
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
    for scenario in scenarios:
        parts += [
            f"## {scenario.name}",
            "",
            scenario.describe() + ".",
            "",
            scenario_table(scenario, results[scenario.name]),
            "",
        ]
    parts += [f"![rows/s per method]({chart_name})", ""]
    return "\n".join(parts)


FAMILY_COLORS = {"llmq": "#1f77b4", "article": "#d62728", "openai": "#7f7f7f"}


def chart(scenarios: list[Scenario], results: dict[str, list[Measurement]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, len(scenarios), figsize=(6.2 * len(scenarios), 4.6), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios, strict=True):
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
            f"limit {limit:,.0f}/s ",
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
        ax.set_title(
            f"{scenario.name}: {scenario.rows:,} rows, {scenario.latency_ms:g}{jitter} ms, "
            f"C={scenario.concurrency}{rps}",
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
    if args.only:
        wanted = set(args.only.split(","))
        for s in scenarios:
            s.methods = [m for m in s.methods if m in wanted]
    return scenarios


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
    p.add_argument("--quick", action="store_true", help="1,000 + 400 prompts: a smoke run of a minute")
    p.add_argument("--only", help="comma-separated method keys to run, e.g. llmq.sync,article.udf")
    p.add_argument("--timeout", type=float, default=None, help="seconds per method before it is killed")
    p.add_argument(
        "--publish",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="refresh benchmarks/RESULTS.md and results.png (default: yes unless --quick)",
    )
    args = p.parse_args(argv)
    if args.rows is None:
        args.rows = 1000 if args.quick else 5000
    if args.rate_rows is None:
        args.rate_rows = 400 if args.quick else 1200
    publish = (not args.quick) if args.publish is None else args.publish
    if args.concurrency < 1 or args.rows < 1 or args.latency_ms < 0:
        p.error("--rows and --concurrency must be >= 1, --latency-ms >= 0")

    from airflow_provider_llmq.testing.mock_server import MockConfig, MockServerProcess

    info = machine_info()
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
                latency_ms=scenario.latency_ms, latency_jitter_ms=scenario.jitter_ms, rps=scenario.server_rps
            )
            print(f"\n== {scenario.name}: {scenario.describe()}", flush=True)
            ideal = scenario.rows / scenario.limit_rows_per_s
            timeout = args.timeout or max(120.0, 15 * ideal)
            results[scenario.name] = []
            for method in scenario.methods:
                m = run_one(server, scenario, method, workdir, timeout)
                results[scenario.name].append(m)
                print(
                    f"  {m.label:<72} {m.seconds:6.1f} s {m.right_per_s:7.0f} right rows/s "
                    f"right {m.right}/{m.rows} misplaced {m.misplaced} missing {m.missing} "
                    f"errors {m.errors} 429s {m.rate_limited} cpu {m.cpu_seconds:.1f}s "
                    f"server cpu {m.server_cpu_seconds or 0:.1f}s  {m.outcome}",
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
    md = markdown(scenarios, results, info, load_end, total, png.name, command)
    (out_dir / f"results-{stamp}.md").write_text(md)
    (out_dir / f"results-{stamp}.json").write_text(
        json.dumps(
            {
                "machine": info,
                "load_average_end": load_end,
                "total_seconds": total,
                "command": command,
                "scenarios": [asdict(s) for s in scenarios],
                "results": {k: [asdict(m) for m in v] for k, v in results.items()},
            },
            indent=1,
        )
    )
    if publish:
        shutil.copyfile(png, HERE / "results.png")
        (HERE / "RESULTS.md").write_text(
            markdown(scenarios, results, info, load_end, total, "results.png", command)
        )
        print(f"published: {HERE / 'RESULTS.md'}, {HERE / 'results.png'}")
    print("\n" + md)  # after the files: a closed pipe (| head) must not lose them
    print(f"written: {out_dir / f'results-{stamp}.md'}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
