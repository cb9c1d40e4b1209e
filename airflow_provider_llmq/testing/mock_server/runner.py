"""Ways to run the mock server: in a background thread (tests) or in a child process (benchmarks, demo).

A child process does not share the GIL with the client under test, so a benchmark measures the client
rather than the server. Both runners expose the same ``base_url`` / ``ca_path`` / ``stats()`` /
``reset()`` / ``configure()`` surface.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from .app import apply_config, build_app
from .faults import MockConfig, prompt_hash
from .state import STATE

BACKLOG = 4096


@dataclass
class Started:
    """A running site: what a runner needs to report and to stop it."""

    runner: web.AppRunner
    app: web.Application
    base_url: str
    port: int
    ca_path: str | None
    ca_pem: str | None


def make_tls(cert_dir: str | os.PathLike[str]) -> tuple[ssl.SSLContext, str, str]:
    """A fresh trustme CA and a server cert for 127.0.0.1 / localhost; ``ca.pem`` lands in cert_dir.

    The CA is written to disk so another process (curl, requests, Spark executors) can verify it.
    """
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost", "::1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    Path(cert_dir).mkdir(parents=True, exist_ok=True)
    ca_path = str(Path(cert_dir) / "ca.pem")
    ca.cert_pem.write_to_path(ca_path)
    return ctx, ca_path, ca.cert_pem.bytes().decode("ascii")


async def start_site(
    config: MockConfig, *, tls: bool, host: str, port: int, cert_dir: str | os.PathLike[str] | None
) -> Started:
    """Start the app on a real socket; ``port=0`` picks a free one (reported back)."""
    ssl_ctx = ca_path = ca_pem = None
    if tls:
        if cert_dir is None:
            raise ValueError("TLS needs a cert_dir to write ca.pem into")
        ssl_ctx, ca_path, ca_pem = make_tls(cert_dir)
    app = build_app(config)
    # short shutdown: a [[slow:...]] handler whose client gave up must not hold the stop for 60 s
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_ctx, backlog=BACKLOG, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1]
    url_host = f"[{host}]" if ":" in host else host
    base_url = f"{'https' if tls else 'http'}://{url_host}:{bound}"
    return Started(runner, app, base_url, bound, ca_path, ca_pem)


class _ServerApi:
    """What both runners share (arguments, URLs, the context manager); subclasses provide
    ``start/stop/stats/reset/configure``."""

    def __init__(
        self,
        config: MockConfig | None = None,
        *,
        tls: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        cert_dir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.config = config or MockConfig()
        self.tls, self.host, self.port = tls, host, port
        self.startup_timeout = startup_timeout
        self._cert_dir = cert_dir
        self._tmpdir: str | None = None
        self.base_url = ""
        self.ca_path: str | None = None
        self.ca_pem: str | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _cert_dir_to_use(self) -> str | os.PathLike[str]:
        """The given folder, else a temporary one removed by :meth:`_remove_tmpdir`."""
        if self._cert_dir is None:
            self._tmpdir = tempfile.mkdtemp(prefix="llmq-mock-")
            return self._tmpdir
        return self._cert_dir

    def _remove_tmpdir(self) -> None:
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def openai_base_url(self) -> str:
        return self.base_url + "/v1"

    def azure_chat_url(self, deployment: str, api_version: str = "2023-05-15") -> str:
        return f"{self.base_url}/openai/deployments/{deployment}/chat/completions?api-version={api_version}"

    def stats(self) -> dict[str, Any]:
        raise NotImplementedError

    def attempts_for(self, prompt: str) -> int:
        """How many requests carrying this user prompt reached the server since the last reset."""
        return int(self.stats()["requests_per_prompt"].get(prompt_hash(prompt), 0))


class MockServer(_ServerApi):
    """The mock server in a background thread with its own event loop (for tests in one process)."""

    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _started: Started | None = None

    def start(self) -> MockServer:
        if self._thread is not None:
            return self
        cert_dir = self._cert_dir_to_use() if self.tls else self._cert_dir
        loop = self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._started = loop.run_until_complete(
                    start_site(self.config, tls=self.tls, host=self.host, port=self.port, cert_dir=cert_dir)
                )
            except BaseException as exc:
                error.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._started.runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="llmq-mock-server", daemon=True)
        self._thread.start()
        if not ready.wait(self.startup_timeout):
            raise RuntimeError(f"mock server did not start within {self.startup_timeout} s")
        if error:
            self._thread = None
            raise error[0]
        assert self._started is not None
        self.base_url, self.port = self._started.base_url, self._started.port
        self.ca_path, self.ca_pem = self._started.ca_path, self._started.ca_pem
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None
        self._remove_tmpdir()

    def _on_loop(self, fn: Any, *args: Any) -> Any:
        """Run ``fn`` on the server loop: server state is only ever touched from that thread."""
        if self._loop is None or self._started is None:
            raise RuntimeError("server is not running")

        async def call() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=10)

    def stats(self) -> dict[str, Any]:
        assert self._started is not None
        return self._on_loop(self._started.app[STATE].snapshot)

    def counters(self) -> dict[str, Any]:
        assert self._started is not None
        return self._on_loop(self._started.app[STATE].counters)

    def reset(self) -> None:
        assert self._started is not None
        self._on_loop(self._started.app[STATE].reset)

    def configure(self, **changes: Any) -> dict[str, Any]:
        assert self._started is not None
        state = self._started.app[STATE]
        self._on_loop(apply_config, state, changes)
        return self.config.public_dict()


class MockServerProcess(_ServerApi):
    """The mock server in a child process (``python -m airflow_provider_llmq.testing.mock_server``).

    The full config travels in the environment (``LLMQ_MOCK_CONFIG``), never on the command line,
    so the key does not show in ``ps``. Stats and config go through the admin HTTP routes.
    """

    proc: subprocess.Popen[str] | None = None
    _ssl: ssl.SSLContext | None = None

    def start(self) -> MockServerProcess:
        if self.proc is not None:
            return self
        cert_dir = self._cert_dir_to_use()
        env = dict(
            os.environ,
            LLMQ_MOCK_CONFIG=json.dumps(asdict(self.config)),
            LLMQ_MOCK_API_KEY=self.config.api_key,
        )
        cmd = [
            sys.executable,
            "-m",
            "airflow_provider_llmq.testing.mock_server",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--cert-dir",
            str(cert_dir),
        ]
        if not self.tls:
            cmd.append("--no-tls")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        info = self._read_ready_line()
        self.base_url, self.port, self.ca_path = info["base_url"], int(info["port"]), info["ca_path"]
        if self.ca_path:
            self.ca_pem = Path(self.ca_path).read_text()
            self._ssl = ssl.create_default_context(cafile=self.ca_path)
        return self

    def _read_ready_line(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if readable:
                line = self.proc.stdout.readline()
                if not line:
                    break
                if line.lstrip().startswith("{"):
                    return json.loads(line)
            elif self.proc.poll() is not None:
                break
        code = self.proc.poll()
        self.stop()
        raise RuntimeError(f"mock server process did not become ready (exit code {code})")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None
        self._remove_tmpdir()

    def _admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, context=self._ssl, timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        return self._admin("GET", "/_mock/stats")

    def reset(self) -> None:
        self._admin("POST", "/_mock/reset", {})

    def counters(self) -> dict[str, Any]:
        """The request counters only: cheap to poll while millions of requests run."""
        return self._admin("GET", "/_mock/counters")

    def batch_stats(self) -> dict[str, Any]:
        """The Files and Batches APIs' counters (files, batches, lines created and answered)."""
        return self._admin("GET", "/_mock/batches/stats")

    def configure(self, **changes: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._admin("POST", "/_mock/config", changes)
        self.config.update(**changes)
        return result
