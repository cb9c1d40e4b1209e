"""Driver against executors: the rate-limited operator over the same rows, at the same global
concurrency, on a real Spark standalone cluster (a master and two 1-core workers on 127.0.0.1),
against the mock server in its own process with a fixed latency. The limit is
``max_concurrency / latency`` rows/s.

    python benchmarks/placements.py [--rows 20000] [--latency-ms 200] [--concurrency 64]

Writes ``benchmarks/PLACEMENTS.md`` (command, git SHA, machine, table, raw JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from airflow_provider_llmq.testing.mock_server import MockConfig, MockServerProcess  # noqa: E402
from airflow_provider_llmq.testing.spark_cluster import standalone_cluster  # noqa: E402

RUNNER = ROOT / "tests" / "slow" / "run_operator.py"
KEY = "sk-bench-placements"
DEPLOYMENT = "gpt-bench"


def run(placement: str, args: argparse.Namespace, master: str, server: MockServerProcess, work: Path) -> dict:
    source = work / "src"
    if not source.exists():
        source.mkdir()
        rows = {
            "id": list(range(args.rows)),
            "prompt": [f"placement benchmark row {i}" for i in range(args.rows)],
        }
        pq.write_table(pa.table(rows), source / "part-0.parquet")
    llm = {
        "conn_type": "llmq",
        "host": server.base_url,
        "password": KEY,
        "extra": {"api_type": "azure", "deployment": DEPLOYMENT, "ca_cert": server.ca_path},
    }
    env = {
        **os.environ,
        "AIRFLOW_CONN_LLMQ_DEFAULT": json.dumps(llm),
        "AIRFLOW_CONN_SPARK_CLUSTER": json.dumps({"conn_type": "spark", "host": master}),
        "PYSPARK_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
    }
    kwargs = {
        "spark_conn_id": "spark_cluster",
        "spark_conf": {
            "spark.ui.enabled": "false",
            "spark.driver.host": "127.0.0.1",
            "spark.executor.memory": "768m",
        },
        "source_path": f"file://{source}",
        "id_col": "id",
        "output_path": f"file://{work}/out-{placement}",
        "checkpoint_dir": f"file://{work}/ckpt",
        "checkpoint_key": placement,
        "run_on": placement,
        "max_concurrency": args.concurrency,
        "progress_interval": 10,
    }
    server.reset()
    started = time.monotonic()
    spec = json.dumps({"operator": "LLMQueryRateLimitedOperator", "kwargs": kwargs})
    proc = subprocess.run([sys.executable, str(RUNNER), spec], env=env, capture_output=True, timeout=3600)
    wall = time.monotonic() - started
    lines = [line for line in proc.stdout.decode().splitlines() if line.startswith("SUMMARY ")]
    if proc.returncode or not lines:
        raise RuntimeError(proc.stdout.decode()[-3000:] + proc.stderr.decode()[-3000:])
    summary = json.loads(lines[-1][len("SUMMARY ") :])
    stats = server.stats()
    return {
        "placement": placement,
        "rows": summary["rows"],
        "ok": summary["ok"],
        "wall_seconds": round(wall, 1),
        "query_seconds": summary["query_seconds"],
        "rows_per_second_query": summary["query_requests_per_second"],
        "rows_per_second_wall": round(summary["rows"] / wall, 1),
        "server_max_in_flight": stats["max_in_flight"],
        "server_requests": stats["chat_requests"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--latency-ms", type=float, default=200)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    limit = args.concurrency / (args.latency_ms / 1000)
    results = []
    with tempfile.TemporaryDirectory(prefix="llmq-placements-") as tmp, standalone_cluster(2, 1) as cluster:
        work = Path(tmp)
        config = MockConfig(api_key=KEY, deployments=[DEPLOYMENT], latency_ms=args.latency_ms)
        with MockServerProcess(config, tls=True, cert_dir=str(work / "ca")) as server:
            for placement in ("driver", "executors"):
                results.append(run(placement, args, cluster.master, server, work))
                print(json.dumps(results[-1]), flush=True)
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout
    lines = [
        "# Driver against executors",
        "",
        f"Command: `python benchmarks/placements.py --rows {args.rows} --latency-ms {args.latency_ms:g} "
        f"--concurrency {args.concurrency}`  ",
        f"Git SHA: {sha.strip()}; machine: {platform.node()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; load average at the end {os.getloadavg()[0]:.1f}.  ",
        "Cluster: standalone master + 2 workers x 1 core on 127.0.0.1; mock server in its own process, "
        f"TLS, {args.latency_ms:g} ms latency; "
        f"`LLMQueryRateLimitedOperator(max_concurrency={args.concurrency})`. "
        f"Limit = {args.concurrency} / {args.latency_ms / 1000:g} s = {limit:.0f} rows/s.",
        "",
        "| placement | rows | ok | wall s | query s | rows/s (query phase) | of limit | rows/s (wall) "
        "| max in flight |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rate = r["rows_per_second_query"] or 0
        lines.append(
            f"| {r['placement']} | {r['rows']} | {r['ok']} | {r['wall_seconds']} | {r['query_seconds']} | "
            f"{rate:.0f} | {rate / limit:.2f} | {r['rows_per_second_wall']} | {r['server_max_in_flight']} |"
        )
    lines += ["", "Raw:", "", "```json", json.dumps(results, indent=2), "```", ""]
    out = Path(__file__).with_name("PLACEMENTS.md")
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
