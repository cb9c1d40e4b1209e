"""Fixtures for the browser tests: the mock LLM server over TLS, ``airflow standalone`` with the
repository's ``dags/``, and Debian's chromium driven by Playwright (no browser download).

Playwright is imported inside the fixtures only: ``make test`` deselects these tests (``-m "not
browser"``) and must still collect them where Playwright is not installed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.browser.stack import AirflowStandalone, MemorySampler, free_port, wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

    from airflow_provider_llmq.testing.mock_server import MockServerProcess

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("LLMQ_CHROMIUM", "/usr/bin/chromium")
# what the machine's closed network needs (no background connections to Google's hosts)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BROWSER_KEY = "sk-llmq-browser-5d8e1c0a7f3b"  # appears nowhere else: a leak is easy to spot
DEPLOYMENT = "gpt-browser-test"
SAMPLE_ROWS = 240
DAG_ID = "llmq_pipeline"


@dataclass
class RunStats:
    """What the browser test took: printed in the terminal summary."""

    started: float = field(default_factory=time.monotonic)
    phases: dict[str, float] = field(default_factory=dict)
    wall_seconds: float | None = None
    sampler: MemorySampler | None = None

    def mark(self, phase: str) -> None:
        self.phases[phase] = round(time.monotonic() - self.started, 1)


_STATS: RunStats | None = None


def pytest_terminal_summary(terminalreporter: Any) -> None:
    stats = _STATS
    if stats is None:
        return
    write = terminalreporter.write_line
    terminalreporter.section("llmq browser test: cost")
    if stats.wall_seconds is not None:
        write(f"wall time: {stats.wall_seconds:.1f} s (mock server + airflow standalone + chromium)")
    write("phases (s since start): " + ", ".join(f"{k} {v}" for k, v in stats.phases.items()))
    if stats.sampler is not None:
        s = stats.sampler
        gib = 1024**3
        write(
            f"peak memory: airflow standalone process group RSS {s.peak_group_rss / gib:.2f} GiB; "
            f"whole test process tree RSS {s.peak_tree_rss / gib:.2f} GiB, "
            f"PSS {s.peak_tree_pss / gib:.2f} GiB; "
            f"MemAvailable drop {s.peak_meminfo_drop / gib:.2f} GiB ({s.samples} samples)"
        )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)  # the page fixture screenshots a failed test
    return report


@pytest.fixture(scope="session")
def run_stats() -> Iterator[RunStats]:
    global _STATS
    _STATS = stats = RunStats()
    yield stats
    stats.wall_seconds = time.monotonic() - stats.started


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Screenshots of a run: ``$LLMQ_BROWSER_ARTIFACTS`` or tests/browser/artifacts/ (git-ignored)."""
    path = Path(os.environ.get("LLMQ_BROWSER_ARTIFACTS") or REPO / "tests" / "browser" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def browser_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="llmq-browser-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def memory(run_stats: RunStats) -> Iterator[MemorySampler]:
    with MemorySampler(root_pid=os.getpid(), interval=1.0) as sampler:
        run_stats.sampler = sampler
        yield sampler


@pytest.fixture(scope="session")
def mock_llm(browser_tmp: Path, memory: MemorySampler) -> Iterator[MockServerProcess]:
    """The mock Azure OpenAI server in a child process, over TLS with its own CA. It knows one
    deployment only, so a request to any other (a form value lost on the way) fails; a little
    latency makes the query phase long enough for progress lines."""
    from airflow_provider_llmq.testing.mock_server import MockConfig, MockServerProcess

    config = MockConfig(
        api_key=BROWSER_KEY, latency_ms=400, latency_jitter_ms=100, seed=3, deployments=[DEPLOYMENT]
    )
    with MockServerProcess(config, tls=True, cert_dir=browser_tmp / "mock-ca") as server:
        yield server


@pytest.fixture(scope="session")
def airflow_ui(
    browser_tmp: Path, memory: MemorySampler, run_stats: RunStats, mock_llm: MockServerProcess
) -> Iterator[AirflowStandalone]:
    """``airflow standalone`` on a free port, its own AIRFLOW_HOME, the repository's dags/ as the
    DAGs folder and the pipeline's data under a temporary folder; stopped (the whole process
    group) whatever the test does."""
    home = browser_tmp / "airflow-home"
    home.mkdir()
    env = {
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        # manual runs only: unpausing the @daily DAG must not add a scheduled run beside ours
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "LLMQ_DATA_DIR": str(browser_tmp / "llmq-data"),
        "LLMQ_SAMPLE_ROWS": str(SAMPLE_ROWS),
        "SPARK_LOCAL_IP": "127.0.0.1",
    }
    for name in ("LLMQ_SPARK_CONN_ID", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON"):
        os.environ.pop(name, None)  # the DAG runs local Spark with the venv's Python
    server = AirflowStandalone(home, free_port(), env)
    try:
        server.start()
        memory.add_group(server.pgid)
        wait_for("airflow standalone to be healthy", server.healthy, timeout=180, interval=1)
        run_stats.mark("standalone healthy")

        def dag_parsed() -> bool:
            server.check_alive()
            errors = server.get("/api/v2/importErrors")["import_errors"]
            assert not errors, f"DAG import errors: {errors}"
            return bool(server.get(f"/api/v2/dags/{DAG_ID}")["dag_id"])

        wait_for(f"{DAG_ID} to be parsed", dag_parsed, timeout=180, interval=2)
        run_stats.mark("dag parsed")
        yield server
    except BaseException:
        print(f"\nairflow standalone log tail:\n{server.log_tail()}")
        raise
    finally:
        server.stop()
        run_stats.mark("standalone stopped")


@pytest.fixture(scope="session")
def browser(memory: MemorySampler) -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium chromium-driver (make test-browser)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(
    browser: Browser, airflow_ui: AirflowStandalone, artifacts: Path, request: pytest.FixtureRequest
) -> Iterator[Page]:
    """A page whose relative URLs (``page.goto("/connections")``) go to the Airflow UI."""
    context = browser.new_context(
        base_url=airflow_ui.base_url, viewport={"width": 1400, "height": 1000}, reduced_motion="reduce"
    )
    context.set_default_timeout(30_000)
    context.set_default_navigation_timeout(60_000)
    page = context.new_page()
    try:
        yield page
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            try:
                page.screenshot(path=str(artifacts / "failure.png"), full_page=True)
                print(f"\nfailure screenshot: {artifacts / 'failure.png'} (at {page.url})")
            except Exception as exc:  # the page may be gone with the browser
                print(f"\nno failure screenshot: {exc}")
        context.close()
