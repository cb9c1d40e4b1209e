"""Scale: the rate-limited operator through ``dag.test()`` against the mock server (its own process,
TLS) at 10k, 100k and 1M rows, on the driver and on the executors of a local standalone cluster
(a master and two 1-core workers on 127.0.0.1); then a kill at 60 % and its resume, a day two
with 1 % new rows and the cross-run cache, and the Batch API operator at the largest size (its
request files against the API's limits, the time to submit and to collect). Each run's phases come
from the task's own summary.

    python benchmarks/scale.py [--max-rows 100000] [--latency-ms 50] [--concurrency 64]

Writes ``benchmarks/SCALE.md`` (git SHA, machine, command, each figure against its target),
``scale.png`` (rows against wall time, one line per placement) and ``scale.json`` beside it;
``--report`` renders them again from a ``scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from airflow_provider_llmq.testing.mock_server import MockConfig, MockServerProcess  # noqa: E402
from airflow_provider_llmq.testing.mock_server.batch_state import FLAVOURS  # noqa: E402
from airflow_provider_llmq.testing.spark_cluster import standalone_cluster  # noqa: E402

KEY = "sk-bench-scale"
DEPLOYMENT = "gpt-bench"
SIZES = (10_000, 100_000, 1_000_000)
CHUNK = 5000  # requests per bucket and per driver flush
HERE = Path(__file__).resolve().parent

DAG_FILE = """
import json
from datetime import datetime, timedelta

from airflow.sdk import DAG, task

from airflow_provider_llmq.operators.batch_api import LLMQueryBatchAPIOperator
from airflow_provider_llmq.operators.llmq import LLMQueryRateLimitedOperator

with open({spec!r}) as handle:
    SPEC = json.load(handle)
OPERATOR = {{"batch_api": LLMQueryBatchAPIOperator}}.get(SPEC.get("operator"), LLMQueryRateLimitedOperator)

with DAG(
    SPEC["dag_id"],
    schedule=None,
    start_date=datetime(2026, 1, 1),
    default_args={{"owner": "bench", "retries": 0, "retry_delay": timedelta(0)}},
) as dag:
    ask = OPERATOR(task_id="ask", **SPEC["kwargs"])

    @task(task_id="save")
    def save(summary):
        with open(SPEC["summary_path"], "w") as handle:
            json.dump(summary, handle)

    save(ask.output)

if __name__ == "__main__":
    dag.test()
"""


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, master: str, server: MockServerProcess) -> None:
        self.args, self.work, self.master, self.server = args, work, master, server
        self.home = work / "airflow"
        self.dags = self.home / "dags"
        self.dags.mkdir(parents=True)
        llm = {
            "conn_type": "llmq",
            "host": server.base_url,
            "password": KEY,
            "extra": {"api_type": "azure", "deployment": DEPLOYMENT, "ca_cert": server.ca_path},
        }
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW_CONN_LLMQ_DEFAULT": json.dumps(llm),
            "AIRFLOW_CONN_SPARK_CLUSTER": json.dumps({"conn_type": "spark", "host": master}),
            "PYSPARK_PYTHON": sys.executable,
            "PYSPARK_DRIVER_PYTHON": sys.executable,
            "SPARK_LOCAL_IP": "127.0.0.1",
        }
        subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"], env=self.env, check=True, capture_output=True
        )
        self.runs = 0

    def source(self, rows: int, new_share: float = 0.0) -> str:
        """``rows`` prompts (ids 0..rows-1), plus ``new_share`` of them new (day two)."""
        extra = int(rows * new_share)
        path = self.work / f"src-{rows}-{extra}"
        if not path.exists():
            path.mkdir()
            per_file = 100_000
            for start in range(0, rows + extra, per_file):
                ids = list(range(start, min(rows + extra, start + per_file)))
                prompts = [f"scale row {i}" if i < rows else f"day two row {i}" for i in ids]
                pq.write_table(pa.table({"id": ids, "prompt": prompts}), path / f"part-{start:08d}.parquet")
        return f"file://{path}"

    def kwargs(self, placement: str, source: str, key: str, **extra: Any) -> dict[str, Any]:
        return {
            "spark_conn_id": "spark_cluster",
            "spark_conf": {
                "spark.ui.enabled": "false",
                "spark.driver.host": "127.0.0.1",
                "spark.executor.memory": "768m",
                "spark.driver.memory": "1g",
            },
            "source_path": source,
            "id_col": "id",
            "output_path": f"file://{self.work}/out-{key}",
            "checkpoint_dir": f"file://{self.work}/ckpt",
            "checkpoint_key": key,
            "run_on": placement,
            "max_concurrency": self.args.concurrency,
            "chunk_size": CHUNK,
            "progress_interval": 30,
            **extra,
        }

    def start(self, kwargs: dict[str, Any], operator: str) -> tuple[subprocess.Popen[bytes], Path]:
        self.runs += 1
        name = f"scale_{self.runs}"
        spec, summary = self.work / f"{name}.json", self.work / f"{name}.summary.json"
        found = {"dag_id": name, "kwargs": kwargs, "summary_path": str(summary), "operator": operator}
        spec.write_text(json.dumps(found))
        dag = self.dags / f"{name}.py"
        dag.write_text(DAG_FILE.format(spec=str(spec)))
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - the child writes it
        proc = subprocess.Popen(
            [sys.executable, str(dag)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return proc, summary

    def run(
        self, kwargs: dict[str, Any], kill_at: int | None = None, operator: str = "rate_limited"
    ) -> dict[str, Any]:
        """One task run; with ``kill_at``, SIGKILLed once the server has that many requests."""
        before = self.server.counters()["chat_requests"]
        load_start = round(os.getloadavg()[0], 1)  # the machine is shared: say how loaded it was
        started = time.monotonic()
        proc, summary_path = self.start(kwargs, operator)
        memory = _Peak(proc.pid)
        first_request: list[float] = []
        watcher = threading.Thread(
            target=_first_request, args=(self.server, before, proc, first_request), daemon=True
        )
        watcher.start()
        killed = False
        while proc.poll() is None:
            if kill_at is not None and self.server.counters()["chat_requests"] - before >= kill_at:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                proc.wait()
                break
            time.sleep(0.2)
        wall = time.monotonic() - started
        memory.stop()
        load_end = round(os.getloadavg()[0], 1)
        asked = self.server.counters()["chat_requests"] - before
        found: dict[str, Any] = {
            "wall_seconds": round(wall, 1),
            "server_requests": asked,
            "first_request_seconds": round(first_request[0] - started, 1) if first_request else None,
            "driver_rss_mb": round(memory.driver / 2**20),
            "tree_rss_mb": round(memory.tree / 2**20),
            "killed": killed,
            "load": [load_start, load_end],
        }
        if killed:
            time.sleep(1)  # the server answers what was in flight to a closed socket
            found["server_requests"] = self.server.counters()["chat_requests"] - before
            return found
        if proc.returncode or not summary_path.exists():
            raise RuntimeError(f"run failed ({proc.returncode}): see {self.work}")
        summary = json.loads(summary_path.read_text())
        found.update(
            rows=summary["rows"],
            ok=summary["ok"],
            task_seconds=summary["seconds"],
            query_seconds=summary.get("query_seconds"),
            query_rps=summary.get("query_requests_per_second"),
            phases=summary["phases"],
            cache_hits=summary.get("cache_hits", 0),
            requests_sent=summary["requests_sent"],
            resumed_requests=summary["resumed_requests"],
            batch_api=summary.get("batch_api"),
        )
        return found


class _Peak:
    """Peak RSS of the task's process (the Python driver) and of its whole tree (with the JVM)."""

    def __init__(self, pid: int) -> None:
        self.driver = self.tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(pid,), daemon=True)
        self._thread.start()

    def _watch(self, pid: int) -> None:
        try:
            proc = psutil.Process(pid)
            while not self._stop.is_set():
                own = proc.memory_info().rss
                tree = own + sum(_rss(child) for child in proc.children(recursive=True))
                self.driver, self.tree = max(self.driver, own), max(self.tree, tree)
                time.sleep(0.5)
        except psutil.Error:
            return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return 0


def _first_request(
    server: MockServerProcess, before: int, proc: subprocess.Popen[bytes], out: list[float]
) -> None:
    while proc.poll() is None:
        if server.counters()["chat_requests"] > before:
            out.append(time.monotonic())
            return
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-rows", type=int, default=SIZES[-1])
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--placements", default="driver,executors")
    parser.add_argument("--recovery-rows", type=int, default=None, help="rows of the kill run (0: none)")
    parser.add_argument(
        "--day-two-rows",
        type=int,
        default=None,
        help="rows of day two (0: none); at a size the driver runs, that run is day one",
    )
    parser.add_argument(
        "--stop-by",
        default=None,
        help="HH:MM UTC: a run that would not end by then (judged from the driver's run of its size) "
        "is not started",
    )
    parser.add_argument(
        "--merge",
        default=None,
        help="a scale.json (or scale.partial.json) of an earlier run: its size runs, day two, kill and "
        "Batch API run are kept and not run again (a run cut short, continued with the rest)",
    )
    parser.add_argument(
        "--batch-rows",
        type=int,
        default=None,
        help="rows of the Batch API run (0: none; default: the largest)",
    )
    parser.add_argument("--out", default=str(HERE / "SCALE.md"))
    parser.add_argument("--report", default=None, help="only render SCALE.md from this scale.json")
    args = parser.parse_args()
    if args.report:
        write_report(json.loads(Path(args.report).read_text()), Path(args.out))
        return
    sizes = [n for n in SIZES if n <= args.max_rows] or [args.max_rows]
    placements = args.placements.split(",")
    largest = sizes[-1]
    recovery_rows = largest if args.recovery_rows is None else args.recovery_rows
    day_two_rows = largest if args.day_two_rows is None else args.day_two_rows
    batch_rows = largest if args.batch_rows is None else args.batch_rows
    results: dict[str, Any] = {
        "sizes": [], "recovery": None, "day_two": None, "batch_api": None, "skipped": []
    }  # fmt: skip
    results["settings"] = {
        "latency_ms": args.latency_ms,
        "concurrency": args.concurrency,
        "chunk_size": CHUNK,
    }
    results["command"] = "python benchmarks/scale.py " + " ".join(sys.argv[1:])
    partial = Path(args.out).with_name("scale.partial.json")
    if args.merge:
        earlier = json.loads(Path(args.merge).read_text())
        results["sizes"], results["skipped"] = earlier["sizes"], earlier.get("skipped", [])
        for stage in ("day_two", "recovery", "batch_api"):  # kept, and not run again
            results[stage] = earlier.get(stage)
        results["command"] = f"{earlier['command']}, then {results['command']}"
    done = {(run["rows"], run["placement"]) for run in results["sizes"]}
    # the largest size's other placements last: day two (whose day one is the driver's run of its
    # size) and the kill need the time more
    steps: list[tuple[str, Any]] = [("size", (rows, p)) for rows in sizes[:-1] for p in placements]
    steps += [("size", (largest, "driver"))] if "driver" in placements else []
    steps += [("day_two", day_two_rows), ("recovery", recovery_rows), ("batch_api", batch_rows)]
    steps += [("size", (largest, p)) for p in placements if p != "driver"]
    with tempfile.TemporaryDirectory(prefix="llmq-scale-") as tmp, standalone_cluster(2, 1) as cluster:
        work = Path(tmp)
        config = MockConfig(api_key=KEY, deployments=[DEPLOYMENT], latency_ms=args.latency_ms)
        with MockServerProcess(config, tls=True, cert_dir=str(work / "ca")) as server:
            bench = Bench(args, work, cluster.master, server)
            day_one: dict[str, Any] | None = None
            for kind, step in steps:
                if kind != "size" and results.get(kind) is not None:
                    continue  # merged from the earlier run
                if kind == "size":
                    rows, placement = step
                    if step in done:
                        continue
                    if not _in_time(args.stop_by, results, rows, placement):
                        results["skipped"].append(f"{placement} {rows}: would not end by {args.stop_by} UTC")
                        continue
                    cache = rows == day_two_rows and placement == "driver"
                    extra = {"cache_path": f"file://{work}/cache"} if cache else {}
                    key = f"{placement}-{rows}"
                    try:
                        found = bench.run(bench.kwargs(placement, bench.source(rows), key, **extra))
                    except RuntimeError as exc:  # the other runs' figures still count
                        results["skipped"].append(f"{placement} {rows}: {exc}")
                        continue
                    results["sizes"].append({"placement": placement, "cache_path": cache, **found})
                    day_one = results["sizes"][-1] if cache else day_one
                    print(json.dumps(results["sizes"][-1]), flush=True)
                elif kind == "day_two" and step:
                    if day_one is None:  # its size was not run: day two at the largest that was
                        ran = [run["rows"] for run in results["sizes"] if run["placement"] == "driver"]
                        step = min(step, max(ran, default=step))
                    results["day_two"] = day_two(bench, step, day_one)
                    print(json.dumps(results["day_two"]), flush=True)
                elif kind == "recovery" and step:
                    results["recovery"] = recovery(bench, step)
                    print(json.dumps(results["recovery"]), flush=True)
                elif kind == "batch_api" and step:
                    try:
                        results["batch_api"] = batch_api(bench, step)
                    except RuntimeError as exc:
                        results["skipped"].append(f"Batch API {step}: {exc}")
                    print(json.dumps(results["batch_api"]), flush=True)
                partial.write_text(json.dumps(results, indent=2))  # --report renders a cut-short run
    write_report(results, Path(args.out))
    partial.unlink(missing_ok=True)


def _in_time(stop_by: str | None, results: dict[str, Any], rows: int, placement: str) -> bool:
    """Whether a run is expected to end by ``stop_by``: the driver's wall at that size (times 1.2
    on the executors, a little slower), else the size below's scaled by the rows."""
    if stop_by is None:
        return True
    hour, minute = (int(part) for part in stop_by.split(":"))
    now = time.gmtime()
    left = (hour * 3600 + minute * 60) - (now.tm_hour * 3600 + now.tm_min * 60 + now.tm_sec)
    known = {run["rows"]: run["wall_seconds"] for run in results["sizes"] if run["placement"] == "driver"}
    if rows in known:
        expected = known[rows] * (1.0 if placement == "driver" else 1.2)
    elif known:
        below = max(known)
        expected = known[below] * rows / below
    else:
        return left > 0
    return expected <= left


def recovery(bench: Bench, rows: int) -> dict[str, Any]:
    """Killed at 60 % on the driver, then the same checkpoint_key again: what was asked twice."""
    kwargs = bench.kwargs("driver", bench.source(rows), f"kill-{rows}")
    killed = bench.run(kwargs, kill_at=int(rows * 0.6))
    resumed = bench.run(kwargs)
    asked_twice = killed["server_requests"] + resumed["server_requests"] - rows
    return {
        "rows": rows,
        "killed": killed,
        "resumed": resumed,
        "asked_twice": asked_twice,
        "bound": bench.args.concurrency + CHUNK,
        "every_row_once": resumed["rows"] == rows and resumed["ok"] == rows,
    }


def day_two(bench: Bench, rows: int, first: dict[str, Any] | None = None) -> dict[str, Any]:
    """A first run fills the cache (``first``: the driver's run of this size did, with the same
    cache); the same input with 1 % new rows asks only those."""
    cache = f"file://{bench.work}/cache"
    if first is None or first["rows"] != rows:
        first = bench.run(bench.kwargs("driver", bench.source(rows), f"day1-{rows}", cache_path=cache))
    second = bench.run(bench.kwargs("driver", bench.source(rows, 0.01), f"day2-{rows}", cache_path=cache))
    return {"rows": rows, "new_rows": int(rows * 0.01), "first": first, "second": second}


def batch_api(bench: Bench, rows: int) -> dict[str, Any]:
    """The Batch API operator over ``rows`` (polling in the task, the mock's batches quick): its
    request files against the API's limits, and the time to write and upload them, to wait, and to
    collect the answers, from the task's phases."""
    kwargs = bench.kwargs("driver", bench.source(rows), f"batch-{rows}")
    for live_only in ("run_on", "max_concurrency"):
        kwargs.pop(live_only)
    kwargs.update(deferrable=False, poll_interval=2.0, keep_checkpoint=True)  # its request files, measured
    before = bench.server.batch_stats()
    found = bench.run(kwargs, operator="batch_api")
    after = bench.server.batch_stats()
    files = sorted((bench.work / "ckpt").glob(f"batch-{rows}/**/*.jsonl"))
    lines = [_line_count(file) for file in files]
    config = after["config"]  # the limits the mock enforces, Azure's unless configured
    return {
        "rows": rows,
        "run": found,
        "request_files": len(files),
        "max_file_lines": max(lines, default=0),
        "max_file_bytes": max((file.stat().st_size for file in files), default=0),
        "limits": {
            "lines": config["max_requests_per_file"] or FLAVOURS["azure"][2],
            "bytes": config["max_file_bytes"],
        },
        "mock": {name: after[name] - before.get(name, 0) for name in after if isinstance(after[name], int)},
    }


def _line_count(path: Path) -> int:
    with path.open("rb") as stream:
        return sum(1 for _ in stream)


def write_report(results: dict[str, Any], out: Path) -> None:
    sys.path.insert(0, str(HERE))
    from scale_report import chart, render

    png = out.with_name("scale.png")
    out.with_name("scale.json").write_text(json.dumps(results, indent=2))
    chart(results, png)
    out.write_text(render(results, _machine(), png))
    print(f"wrote {out}")


def _machine() -> dict[str, Any]:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {
        "sha": sha.stdout.strip(),
        "node": platform.node(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30),
        "load": round(os.getloadavg()[0], 1),
    }


if __name__ == "__main__":
    main()
