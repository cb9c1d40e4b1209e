"""``make demo``: the llmq_pipeline DAG end to end on this machine, against a local mock API.

1. an Airflow home in ``.demo/airflow`` (SQLite, ``airflow db migrate``), the repo's ``dags/``;
2. the sample reviews in ``.demo/data/source/reviews`` (generated, deterministic);
3. the bundled mock OpenAI / Azure OpenAI server over HTTPS with its own CA, in a child process,
   with some latency and a few faults (500 / 429 / reset / malformed, retried; content filter, not);
4. the ``llmq_default`` connection pointing at it, through ``AIRFLOW_CONN_LLMQ_DEFAULT`` (a fresh
   random key per demo run: it is in no file);
5. ``airflow dags test llmq_pipeline`` in a subprocess; its full log goes to ``.demo/logs/``;
6. the report and a sample of classified rows, then the mock server is stopped.

Each run gets a fresh run id and its own output folder, so the demo can run again and again.
Set ``LLMQ_SAMPLE_ROWS`` for a smaller or larger sample (default 3000).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / ".demo"
AIRFLOW_HOME = DEMO / "airflow"
DATA_DIR = DEMO / "data"
LOG_DIR = DEMO / "logs"
DEPLOYMENT = "gpt-4o-mini"
# lines of the `airflow dags test` log worth showing while it runs
SHOWN = (
    "extract_prompts:",
    "llmq:",
    "llmq progress",
    "llmq summary:",
    "join_answers:",
    "DagRun Finished:",
    "Task failed",
)

sys.path.insert(0, str(ROOT))  # run from a clone: the package resolves even before `pip install -e .`


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def airflow_env(connection: dict[str, Any] | None = None) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AIRFLOW_CONN_", "AIRFLOW__", "AIRFLOW_VAR_"))
    }
    env.update(
        {
            "AIRFLOW_HOME": str(AIRFLOW_HOME),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "LLMQ_DATA_DIR": str(DATA_DIR),
            "PYSPARK_PYTHON": sys.executable,
            "PYSPARK_DRIVER_PYTHON": sys.executable,
            "SPARK_LOCAL_IP": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if connection is not None:
        env["AIRFLOW_CONN_LLMQ_DEFAULT"] = json.dumps(connection)
    return env


def migrate() -> None:
    step(f"Airflow metadata DB (SQLite) in {AIRFLOW_HOME.relative_to(ROOT)}")
    AIRFLOW_HOME.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=airflow_env(),
        capture_output=True,
        text=True,
    )
    if done.returncode:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
        raise SystemExit(f"airflow db migrate failed (exit {done.returncode})")
    print(f"    airflow db migrate: ok ({time.monotonic() - started:.1f} s)")


def sample_data() -> Path:
    from airflow_provider_llmq.sample_data import sample_rows, write_reviews

    path = DATA_DIR / "source" / "reviews"
    rows = sample_rows()
    step(f"Sample data: {rows} product reviews -> {path.relative_to(ROOT)}")
    write_reviews(str(path), rows)
    return path


def run_pipeline(env: dict[str, str]) -> tuple[int, Path]:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"llmq_pipeline-{time.strftime('%Y%m%d-%H%M%S')}.log"
    step(f"airflow dags test llmq_pipeline (full log: {log_path.relative_to(ROOT)})")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "airflow", "dags", "test", "llmq_pipeline"],
            env=env,
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        in_summary = False  # the task's summary is a block: its indented lines follow its head
        for line in proc.stdout:
            log.write(line)
            if in_summary and line.startswith("  "):
                print("      " + _short(line.strip()), flush=True)
                continue
            in_summary = "llmq summary:" in line
            if any(marker in line for marker in SHOWN):
                print("    " + _short(line), flush=True)
        code = proc.wait()
    return code, log_path


# structlog's tail: " [logger.name] key=value ..." (Airflow's loggers, and the DAG file's own)
_LOG_TAIL = re.compile(r"\s\[[\w.]+\](?:\s+\w+=\S+)*\s*$")


def _short(line: str, width: int = 110) -> str:
    """A log line without the structlog prefix and tail, wrapped at word boundaries (never cut)."""
    text = line.strip()
    for marker in SHOWN:
        at = text.find(marker)
        if at > 0:
            text = text[at:]
            break
    text = _LOG_TAIL.sub("", text)
    if text.startswith("DagRun Finished:"):
        fields = dict(re.findall(r"(\w+)=([^,]+)", text))
        text = (
            f"DagRun finished: state={fields.get('state')}, run_id={fields.get('run_id')}, "
            f"{float(fields.get('run_duration', 0)):.1f} s"
        )
    # a number keeps its unit on its line: a no-break space while wrapping, a space again after
    text = re.sub(r"(\d) (s|ms|%)(?=[\s,;)]|$)", "\\1\u00a0\\2", text)
    wrapped = textwrap.fill(
        text, width, subsequent_indent="        ", break_long_words=False, break_on_hyphens=False
    )
    return wrapped.replace("\u00a0", " ")


def newest_report(since: float) -> Path | None:
    reports = [p for p in (DATA_DIR / "llmq_pipeline").glob("*/*/report.json") if p.stat().st_mtime >= since]
    return max(reports, key=lambda p: p.stat().st_mtime) if reports else None


def show_results(report_path: Path) -> None:
    import pyarrow.dataset as ds

    report = json.loads(report_path.read_text())
    query, final = report["query"], report["final"]
    step(f"Report (run folder {report_path.parent.relative_to(ROOT)})")
    by_status = ", ".join(f"{k}={v}" for k, v in sorted(final["by_status"].items()))
    by_error = ", ".join(f"{k}={v}" for k, v in sorted(final["by_error_code"].items())) or "none"
    print(f"    rows in the final dataset: {final['rows']}  ({by_status})")
    print(f"    errors by code: {by_error}")
    print(f"    requests sent: {query['requests_sent']}, of which retries: {query['retries']}")
    print(f"    tokens: prompt {query['prompt_tokens']}, completion {query['completion_tokens']}")
    print(
        f"    querying: {query['query_seconds']:.1f} s, {query['query_requests_per_second'] or 0:.0f} "
        f"requests/s (the whole query task: {query['seconds']:.1f} s, Spark's reading and writing "
        f"included); 429s: {query.get('throttled', 0)}"
    )

    table = ds.dataset(final["path"], format="parquet").to_table().to_pylist()
    table.sort(key=lambda row: row["review_id"])
    sample = [row for row in table if row["llmq_status"] == "ok"][:6]
    sample += [row for row in table if row["llmq_status"] != "ok"][:2]
    step("A sample of classified reviews")
    for row in sample:
        review = textwrap.shorten(row["review_text"], 90, placeholder="...")
        if row["llmq_status"] == "ok":
            answer = f"sentiment: {row['sentiment']} ({row['llmq_attempts']} attempt(s))"
        else:
            answer = f"ERROR {row['llmq_error_code']} (HTTP {row['llmq_http_status']}), row kept"
        print(f"    {row['review_id']}  {row['product']}, {row['rating']}*  [{row['expected_sentiment']}]")
        print(f"        {review}")
        print(f"        -> {answer}")
    answered = final["by_status"].get("ok", 0)
    agreeing = final.get("agreeing_with_stars", 0)
    share = f"{agreeing / answered:.0%}" if answered else "-"
    print(
        f"\n    Labels agreeing with the stars: {agreeing} of {answered} answered ({share})."
        "\n    These answers come from the mock server, not a model: it reads the review's words"
        "\n    with a small lexicon. Point llmq_default at a real Azure OpenAI / OpenAI deployment"
        "\n    (README) for real labels."
    )


def main() -> int:
    started = time.monotonic()
    wall_start = time.time()
    os.chdir(ROOT)
    from airflow_provider_llmq.testing.mock_server import MockConfig, MockServerProcess

    migrate()
    sample_data()
    key = "demo-" + secrets.token_urlsafe(16)
    config = MockConfig(
        api_key=key,
        latency_ms=40,
        latency_jitter_ms=30,
        seed=7,
        fault_rate=0.03,  # 500 / 429 / reset / malformed on the first attempt: retried, recovered
        content_filter_rate=0.004,  # a 400 content_filter every time: recorded on the row
        deployments=[DEPLOYMENT],
    )
    step("Mock Azure OpenAI server over HTTPS (own CA), 40 +- 30 ms latency, 3% transient faults")
    with MockServerProcess(config, tls=True, cert_dir=DEMO / "mock-ca") as server:
        print(f"    {server.base_url}  CA: {Path(server.ca_path or '').relative_to(ROOT)}")
        connection = {
            "conn_type": "llmq",
            "host": server.base_url,
            "password": key,
            "extra": {
                "api_type": "azure",
                "deployment": DEPLOYMENT,
                "api_version": "2024-06-01",
                "ca_cert": server.ca_path,
            },
        }
        masked = dict(connection, password="***")
        print(f"    llmq_default via AIRFLOW_CONN_LLMQ_DEFAULT = {json.dumps(masked)}")
        code, log_path = run_pipeline(airflow_env(connection))
        stats = server.stats()
    print(
        f"    mock server: {stats['chat_requests']} chat requests, "
        f"HTTP status counts {stats['requests_by_status']}, at most {stats['max_in_flight']} in flight"
    )
    report = newest_report(wall_start)
    if code != 0 or report is None:
        print(f"\nllmq_pipeline did not finish (exit {code}); see {log_path}")
        print(f"Wall time: {time.monotonic() - started:.1f} s")
        return 1
    show_results(report)
    print(f"\nDemo finished: mock server stopped. Wall time: {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
