"""Benchmark: rows_per_request on the Batch API (issue 23), packed request lines beside one row per
line, in one run.

The mock server runs in a child process over TLS (Azure URL form), its batches a fraction of a
second each; ``LLMQueryBatchAPIOperator`` runs in this process (local Spark, polling in the task),
with the same system prompt of about 300 tokens and the same short rows as ``packing.py``.
Scenarios, each with the same rows:

* ``clean``: every line answered.
* ``faults``: 3 % of the rows' prompts fail (500, malformed body: a Batch API line is always a first
  attempt, so such a row fails in every batch) and 0.5 % are content-filtered. Inside a pack one
  such row fails the whole line, which is asked again as two halves, down to the row.

Measured per run: request lines and batches the server saw, the prompt and completion tokens it
billed per row, rows answered with their own answer (checked against the mock's
``expected_answer``), misplaced answers, errors by code, and wall time (Spark included).

Run: ``.venv/bin/python benchmarks/packing_batch.py [--rows 3000]``. Writes its section of
``benchmarks/PACKING.md`` (between the ``batch-api`` markers; ``packing.py`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (ROOT, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from run import API_VERSION, DEPLOYMENT, KEY, git_revision, machine_info  # noqa: E402

from airflow_provider_llmq.testing.mock_server import MockConfig, MockServerProcess, expected_answer  # noqa: E402
from airflow_provider_llmq.testing.mock_server.faults import planned_fault  # noqa: E402

BEGIN, END = "<!-- batch-api -->", "<!-- /batch-api -->"
SCENARIOS: dict[str, dict[str, Any]] = {
    "clean": {},
    "faults": {
        "fault_rate": 0.03,
        "fault_kinds": ["500", "malformed"],
        "content_filter_rate": 0.005,
        "seed": 23,
    },
}
PACKINGS: dict[str, int | str] = {
    "one row per line": 1,
    "rows_per_request=16": 16,
    'rows_per_request="auto"': "auto",
}
BATCH_TIMING = {"validating_s": 0.05, "in_progress_s": 0.2, "finalizing_s": 0.05}


@dataclass
class Measurement:
    scenario: str
    packing: str
    rows: int
    seconds: float = 0.0
    lines: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    right: int = 0
    misplaced: int = 0
    errors_by_code: dict[str, int] = field(default_factory=dict)
    bad_rows: int = 0  # planned to fail (faulty or filtered prompts)
    bad_rows_own_error: int = 0  # of those, ended with their own error

    @property
    def prompt_tokens_per_row(self) -> float:
        return self.prompt_tokens / self.rows

    @property
    def completion_tokens_per_row(self) -> float:
        return self.completion_tokens / self.rows


def _batch_admin(server: MockServerProcess, path: str, body: dict[str, Any] | None = None) -> Any:
    import requests

    response = requests.request(
        "GET" if body is None else "POST",
        server.base_url + path,
        json=body,
        verify=server.ca_path,
        timeout=30,
    )
    response.raise_for_status()
    return response.json()


def run_one(
    server: MockServerProcess, spark: Any, scenario: str, packing: str, args: argparse.Namespace
) -> Measurement:
    from packing import system_prompt

    from airflow_provider_llmq.operators.batch_api import LLMQueryBatchAPIOperator

    server.configure(**{**asdict(MockConfig(api_key=KEY)), **SCENARIOS[scenario]})
    server.reset()
    _batch_admin(server, "/_mock/batches/reset", {})
    _batch_admin(server, "/_mock/batches/config", BATCH_TIMING)
    system = system_prompt()
    tag = f"batch/{scenario}"  # the same rows for every packing of a scenario
    rows = [
        (i, f"[{tag}] Review #{i}: the kettle {'boils fast' if i % 3 else 'leaks'}.")
        for i in range(args.rows)
    ]
    config = MockConfig(**SCENARIOS[scenario])
    bad = {i: planned_fault(p, config) for i, p in rows if planned_fault(p, config) is not None}
    work = Path(tempfile.mkdtemp(prefix="llmq-bench-batch-"))
    spark.createDataFrame(rows, "id long, prompt string").write.parquet(str(work / "src"))
    started = time.perf_counter()
    LLMQueryBatchAPIOperator(
        task_id="ask",
        source_path=str(work / "src"),
        id_col="id",
        output_path=str(work / "out"),
        checkpoint_dir=str(work / "ckpt"),
        system_prompt=system,
        rows_per_request=PACKINGS[packing],
        poll_interval=0.1,
        deferrable=False,
    ).execute({})
    seconds = time.perf_counter() - started
    stats = _batch_admin(server, "/_mock/batches/stats")
    out = [r.asDict() for r in spark.read.parquet(str(work / "out")).collect()]
    m = Measurement(scenario, packing, len(rows), seconds=round(seconds, 3))
    prompts = dict(rows)
    answers = {expected_answer(DEPLOYMENT, system, p, {}): i for i, p in rows}
    codes: Counter[str] = Counter()
    for r in out:
        if r["llmq_status"] == "ok":
            if r["response"] == expected_answer(DEPLOYMENT, system, prompts[r["id"]], {}):
                m.right += 1
            elif answers.get(r["response"]) is not None:
                m.misplaced += 1
            else:
                codes["wrong_answer"] += 1
        else:
            codes[r["llmq_error_code"] or "?"] += 1
            m.bad_rows_own_error += 1 if r["id"] in bad else 0
    m.errors_by_code = dict(codes)
    m.bad_rows = len(bad)
    m.lines = int(stats["lines_created"])
    m.batches = int(stats["batches_created"])
    m.prompt_tokens = int(stats["prompt_tokens_billed"])
    m.completion_tokens = int(stats["completion_tokens_billed"])
    return m


def table(ms: list[Measurement]) -> str:
    head = (
        "| scenario | packing | lines | batches | prompt tokens/row | vs one per line "
        "| completion tokens/row | right | misplaced | errors | bad rows: own error |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    base = {m.scenario: m for m in ms if PACKINGS[m.packing] == 1}
    for m in ms:
        ratio = base[m.scenario].prompt_tokens_per_row / m.prompt_tokens_per_row if m.prompt_tokens else 0
        errors = ", ".join(f"{k} {v}" for k, v in sorted(m.errors_by_code.items())) or "0"
        lines.append(
            f"| {m.scenario} | {m.packing} | {m.lines} | {m.batches} | {m.prompt_tokens_per_row:.1f} "
            f"| {ratio:.1f}x fewer | {m.completion_tokens_per_row:.1f} | {m.right}/{m.rows} | {m.misplaced} "
            f"| {errors} | {m.bad_rows_own_error}/{m.bad_rows} |"
        )
    return "\n".join(lines)


def section(ms: list[Measurement], args: argparse.Namespace, argv: list[str]) -> str:
    info = machine_info()
    raw = {
        "args": vars(args),
        "git": git_revision(),
        "machine": info,
        "measurements": [asdict(m) for m in ms],
    }
    command = "python benchmarks/packing_batch.py " + " ".join(argv)
    return "\n".join(
        [
            BEGIN,
            "## The Batch API: packed request lines vs one row per line",
            "",
            f"Command: `{command.strip()}`  ",
            f"Git: `{raw['git']}`  ",
            f"Machine: {info['cores']}; load average at start {info['load average at start']}",
            "",
            f"{args.rows} rows per run, `LLMQueryBatchAPIOperator` (local Spark, polling in the task) "
            "against the mock server's batch routes in a child process over TLS, the system prompt "
            "of `packing.py` (300 tokens). Tokens are what the mock billed for the lines it ran, "
            "lines and batches what it was sent. The `faults` rows fail in every batch (a line is "
            "always a first attempt), so they end as their own error; rows sharing a line with one "
            "are answered after the line is split (one more batch per level).",
            "",
            table(ms),
            "",
            "<details><summary>Raw JSON</summary>",
            "",
            "```json",
            json.dumps(raw, indent=1),
            "```",
            "",
            "</details>",
            END,
        ]
    )


def with_section(text: str, new: str) -> str:
    """``text`` with its batch section replaced by ``new`` (appended when it has none)."""
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: new, text)
    return text.rstrip("\n") + "\n\n" + new + "\n"


def kept_section(path: Path) -> str | None:
    """The batch section of ``path``, for ``packing.py`` to keep when it rewrites the file."""
    found = (
        re.search(re.escape(BEGIN) + ".*?" + re.escape(END), path.read_text(), re.S)
        if path.exists()
        else None
    )
    return found.group(0) if found else None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--output", default=str(HERE / "PACKING.md"))
    args = parser.parse_args(argv)
    from airflow_provider_llmq.hooks.spark_session import get_spark_session

    home = Path(tempfile.mkdtemp(prefix="llmq-bench-airflow-"))
    os.environ.setdefault("AIRFLOW_HOME", str(home))
    spark = get_spark_session(
        None,
        {"spark.master": "local[2]", "spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4"},
    )
    ms: list[Measurement] = []
    with MockServerProcess(MockConfig(api_key=KEY)) as server:
        extra = {
            "api_type": "azure",
            "deployment": DEPLOYMENT,
            "ca_cert": server.ca_path,
            "api_version": API_VERSION,
        }
        connection = {"conn_type": "llmq", "host": server.base_url, "password": KEY, "extra": extra}
        os.environ["AIRFLOW_CONN_LLMQ_DEFAULT"] = json.dumps(connection)
        for scenario in SCENARIOS:
            for packing in PACKINGS:
                m = run_one(server, spark, scenario, packing, args)
                print(
                    f"{scenario:8} {packing:26} {m.lines:5} lines {m.batches:3} batches "
                    f"{m.prompt_tokens_per_row:6.1f} prompt tok/row, {m.right}/{m.rows} right, "
                    f"misplaced {m.misplaced}, errors {m.errors_by_code}, {m.seconds:.1f} s",
                    flush=True,
                )
                ms.append(m)
    output = Path(args.output)
    output.write_text(with_section(output.read_text() if output.exists() else "", section(ms, args, argv)))
    print(table(ms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
