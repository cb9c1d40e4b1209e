"""A real Spark standalone cluster on 127.0.0.1 (a master and workers, started with pip pyspark's
``spark-class``), and a Spark Connect server against it: for llmq's cluster tests and placement
benchmark, and for users who want to try a DAG against a cluster on one machine."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spark_env() -> dict[str, str]:
    """The environment Spark's processes need: loopback only, this interpreter for Python workers."""
    return {
        **os.environ,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "SPARK_NO_DAEMONIZE": "1",
    }


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(_BIN)) or shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: pip pyspark installs it next to the interpreter")
    return found


def _wait(check: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")


def _listening(port: int) -> bool:
    socket.create_connection(("127.0.0.1", port), 1).close()
    return True


def _stop(procs: list[subprocess.Popen[bytes]], grace: float = 20) -> None:
    for proc in reversed(procs):
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass(frozen=True)
class Cluster:
    master: str
    workers: int
    cores_per_worker: int

    @property
    def slots(self) -> int:
        return self.workers * self.cores_per_worker


@contextlib.contextmanager
def standalone_cluster(
    workers: int = 2, cores: int = 1, memory: str = "1g", work_dir: str | None = None, timeout: float = 90
) -> Iterator[Cluster]:
    """A master and ``workers`` workers of ``cores`` cores each, stopped on exit."""
    spark_class = _tool("spark-class")
    work = Path(work_dir or tempfile.mkdtemp(prefix="llmq-spark-"))
    port, ui = free_port(), free_port()
    env = spark_env()

    def start(main: str, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [spark_class, main, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    procs = [
        start(
            "org.apache.spark.deploy.master.Master",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--webui-port",
            str(ui),
        )
    ]
    master = f"spark://127.0.0.1:{port}"
    try:
        _wait(lambda: _listening(port), "the Spark master", timeout)
        for i in range(workers):
            args = ["--host", "127.0.0.1", "--cores", str(cores), "--memory", memory]
            args += ["--webui-port", str(free_port()), "--work-dir", str(work / f"worker-{i}"), master]
            procs.append(start("org.apache.spark.deploy.worker.Worker", *args))

        def all_alive() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2) as answer:
                state = json.load(answer)
            return sum(1 for w in state.get("workers", []) if w.get("state") == "ALIVE") == workers

        _wait(all_alive, f"{workers} Spark workers", timeout)
        yield Cluster(master=master, workers=workers, cores_per_worker=cores)
    finally:
        _stop(procs)


@contextlib.contextmanager
def connect_server(master: str, log_path: str | None = None, timeout: float = 120) -> Iterator[str]:
    """A Spark Connect server whose sessions run on ``master``; yields its ``sc://`` URL. A standalone
    application takes every free core while it lives, so keep one only as long as it is used."""
    port = free_port()
    conf = {
        "spark.connect.grpc.binding.port": str(port),
        "spark.ui.enabled": "false",
        "spark.driver.host": "127.0.0.1",
        "spark.executor.memory": "768m",
    }
    args = [_tool("spark-submit"), "--class", "org.apache.spark.sql.connect.service.SparkConnectServer"]
    args += [
        "--master",
        master,
        *[item for key, value in conf.items() for item in ("--conf", f"{key}={value}")],
    ]
    with open(log_path or os.devnull, "wb") as out:
        proc = subprocess.Popen(args, env=spark_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: _listening(port), "Spark Connect", timeout)
        yield f"sc://127.0.0.1:{port}"
    finally:
        _stop([proc], grace=30)
