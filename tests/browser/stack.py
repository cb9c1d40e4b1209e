"""``airflow standalone`` in a process group of its own, its REST API, and a memory sampler.

Facts this relies on (docs STACK.md, measured on Airflow 3.3.2): ``airflow standalone`` has no
``--port`` (``AIRFLOW__API__PORT``, and then ``AIRFLOW__CORE__EXECUTION_API_SERVER_URL`` too, or the
tasks cannot reach the API server); it is healthy about 20 s after start; with
``simple_auth_manager_all_admins`` ``GET /auth/token`` hands out a token without credentials.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerExited(RuntimeError):
    """The server process is gone: waiting longer cannot help."""


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 1.0) -> T:
    """``probe()`` until it returns something truthy; fails with ``what`` after ``timeout`` seconds.
    Other exceptions count as "not yet" (a server still starting refuses connections), except an
    ``AssertionError`` or :class:`ServerExited`, which end the wait at once."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except (AssertionError, ServerExited):
            raise
        except Exception as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last_error!r})")
        time.sleep(interval)


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process on the machine."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stream:
                stat = stream.read()
        except OSError:
            continue  # a process that ended while we looked
        # the command name may hold spaces: the fields after it start past the last ")"
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[2]))  # ppid, pgrp
    return table


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as stream:
            return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _pss(pid: int) -> int:
    """Proportional set size: shared pages (forked workers, chromium's zygote) counted once overall."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as stream:
            for line in stream:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _mem_available() -> int:
    with open("/proc/meminfo") as stream:
        for line in stream:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def process_group_rss(pgid: int) -> int:
    """Sum of the resident memory (bytes) of every process in process group ``pgid``."""
    return sum(_rss(pid) for pid, (_, group) in _processes().items() if group == pgid)


def process_tree(root: int) -> set[int]:
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo.extend(children.get(pid, []))
    return tree


class MemorySampler:
    """Samples memory every ``interval`` seconds in a thread and keeps the peaks of: the RSS summed
    over some process groups (``airflow standalone``'s), the RSS and the PSS summed over the process
    tree under ``root_pid`` (pytest, the mock server, chromium, airflow and its forks), and the drop
    of /proc/meminfo's MemAvailable since the start (the whole machine: others' work counts too)."""

    def __init__(self, root_pid: int, interval: float = 1.0) -> None:
        self.root_pid, self.interval = root_pid, interval
        self.groups: set[int] = set()
        self.peak_group_rss = self.peak_tree_rss = self.peak_tree_pss = self.peak_meminfo_drop = 0
        self.samples = 0
        self._available_at_start = _mem_available()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def add_group(self, pgid: int) -> None:
        self.groups.add(pgid)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        table = _processes()
        group_pids = [pid for pid, (_, group) in table.items() if group in self.groups]
        tree = process_tree(self.root_pid)
        self.peak_group_rss = max(self.peak_group_rss, sum(_rss(pid) for pid in group_pids))
        self.peak_tree_rss = max(self.peak_tree_rss, sum(_rss(pid) for pid in tree))
        self.peak_tree_pss = max(self.peak_tree_pss, sum(_pss(pid) for pid in tree))
        self.peak_meminfo_drop = max(self.peak_meminfo_drop, self._available_at_start - _mem_available())
        self.samples += 1

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class AirflowStandalone:
    """``airflow standalone`` on ``port`` with ``home`` as AIRFLOW_HOME, in its own session
    (``setsid``) so that it and everything it forks stop with one ``kill -TERM -- -PGID``."""

    def __init__(self, home: Path, port: int, extra_env: Mapping[str, str]) -> None:
        self.home, self.port = home, port
        self.extra_env = dict(extra_env)
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = home / "standalone.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._token: str | None = None

    def start(self) -> AirflowStandalone:
        venv_bin = str(Path(sys.executable).parent)
        # nothing of the test process's own Airflow setup (tests/conftest.py sets some) leaks in
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_")) and key != "AIRFLOW_HOME"
        }
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "PATH": venv_bin + os.pathsep + env.get("PATH", ""),
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
                **self.extra_env,
            }
        )
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child writes to it until it stops
        self.proc = subprocess.Popen(
            [str(Path(venv_bin) / "airflow"), "standalone"],
            cwd=self.home,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # setsid: its own session and process group
        )
        log.close()
        return self

    @property
    def pgid(self) -> int:
        assert self.proc is not None
        return self.proc.pid  # a session leader's pid is its process group id

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerExited(
                f"airflow standalone exited with {self.proc.returncode}; log tail:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the whole process group, then SIGKILL to whatever is left after ``timeout``;
        then the same to any process it started outside its group (Spark's Python worker daemon
        makes a group of its own) that is still alive."""
        if self.proc is None:
            return
        pgid = self.pgid
        started_by_it = process_tree(self.proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process_group_rss(pgid):
            time.sleep(0.5)
        if process_group_rss(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.proc = None
        for pid in started_by_it:
            if _rss(pid):  # still alive (a zombie has no memory)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    # --- REST API -----------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise RuntimeError(f"{method} {path}: HTTP {exc.code}: {detail}") from exc
        return json.loads(raw) if raw else None

    def token(self) -> str:
        if self._token is None:
            self._token = str(self._request("GET", "/auth/token", auth=False)["access_token"])
        return self._token

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self._request("POST", path, body)

    def patch(self, path: str, body: Any) -> Any:
        return self._request("PATCH", path, body)

    def healthy(self) -> bool:
        self.check_alive()
        health = self._request("GET", "/api/v2/monitor/health", auth=False)
        parts = ("metadatabase", "scheduler", "dag_processor")
        return all(health.get(part, {}).get("status") == "healthy" for part in parts)
