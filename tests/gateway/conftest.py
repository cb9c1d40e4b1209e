"""LiteLLM's proxy, the real package, started offline on 127.0.0.1 in front of a plain-HTTP mock server.

The proxy runs from its own venv (``make test-gateway``; ``LLMQ_LITELLM`` names its ``litellm``
command): its pins conflict with Airflow's. Without it these tests are skipped, visibly.
Three model groups: ``gpt-test`` forwards to the mock server (each row's own answer, its faults),
``mock-answer`` answers with litellm's ``mock_response`` (no upstream at all), ``always-429``
raises litellm's own ``RateLimitError``. No database: the master key is the only key it knows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from airflow_provider_llmq.testing.mock_server import MockConfig, MockServer
from tests.conftest import DEPLOYMENT, TEST_KEY

MASTER_KEY = "sk-litellm-master-7d2e4b91"  # the proxy's own key, what llmq's connection holds
MOCK_ANSWER = "a mock answer from litellm"
_REPO = Path(__file__).resolve().parents[2]
_STARTUP_S = 90.0  # about 7 s here; generous for a loaded 2-core machine


def litellm_command() -> str | None:
    named = os.environ.get("LLMQ_LITELLM") or str(_REPO / ".venv-gateway" / "bin" / "litellm")
    return named if Path(named).is_file() else None


@dataclass
class Gateway:
    base_url: str  # http://127.0.0.1:PORT, no path: the OpenAI form's bare-host rule adds /v1
    upstream: MockServer
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(upstream: MockServer) -> dict[str, object]:
    def model(name: str, **params: object) -> dict[str, object]:
        return {"model_name": name, "litellm_params": {"model": f"openai/{name}", **params}}

    return {
        "model_list": [
            model(DEPLOYMENT, api_base=f"{upstream.base_url}/v1", api_key=TEST_KEY),
            model("mock-answer", api_key="sk-no-upstream", mock_response=MOCK_ANSWER),
            model("always-429", api_key="sk-no-upstream", mock_response="litellm.RateLimitError"),
        ],
        # the gateway passes upstream refusals on instead of retrying them itself: llmq's policy decides
        "litellm_settings": {"num_retries": 0, "request_timeout": 30},
        "router_settings": {"num_retries": 0},
        "general_settings": {"master_key": MASTER_KEY},
    }


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    command = litellm_command()
    if command is None:
        pytest.skip("LiteLLM's proxy is not installed: make test-gateway installs it into .venv-gateway")
    folder = tmp_path_factory.mktemp("litellm")
    with MockServer(MockConfig(api_key=TEST_KEY), tls=False) as upstream:
        config = folder / "config.yaml"
        config.write_text(json.dumps(_config(upstream)))  # YAML is a superset of JSON
        port = _free_port()
        log = folder / "proxy.log"
        env = {**os.environ, "LITELLM_LOG": "ERROR", "NO_PROXY": "*", "DISABLE_SCHEMA_UPDATE": "true"}
        env.pop("DATABASE_URL", None)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [command, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_until_live(base, proc, log)
            yield Gateway(base, upstream, log)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_until_live(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + _STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the LiteLLM proxy exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{base}/health/liveliness", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the LiteLLM proxy was not live after {_STARTUP_S:g} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def upstream(gateway: Gateway) -> MockServer:
    """The gateway's upstream with counters zeroed and default behaviour."""
    gateway.upstream.configure(**dataclasses.asdict(MockConfig(api_key=TEST_KEY)))
    gateway.upstream.reset()
    return gateway.upstream
