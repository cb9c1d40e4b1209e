"""openaivec's automatic packing, the anchor of benchmarks/packing.py, run in its own virtualenv.

openaivec is not a dependency of llmq, so it runs in a child process under another Python: the
one given by ``--openaivec-python`` (default ``/work/venv-oaivec/bin/python``, made with
``python -m venv /work/venv-oaivec && /work/venv-oaivec/bin/pip install openaivec``). The child
calls ``Series.aio.responses(system, batch_size=None, max_concurrency=N)`` (``batch_size=None`` is
openaivec's automatic pack size) through ``AsyncOpenAI`` against the mock's Responses API on
Azure's v1 path, with the SDK's default retries, as a user of the accessor would.

openaivec counts tokens with tiktoken, which downloads its encoding on first use; these machines
are offline, so the child points ``TIKTOKEN_CACHE_DIR`` at a folder holding ``o200k_base`` from
the ``bpe-openai`` package (installed beside openaivec), filled on the first run.

The parent side (:func:`run_openaivec`) imports nothing of openaivec: it sends the rows and gets
each row's answer back, or the exception that ended the run (openaivec answers all rows or none).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_PYTHON = "/work/venv-oaivec/bin/python"


def available(python: str) -> str | None:
    """openaivec's version under ``python``, or None when it cannot be imported there."""
    if not Path(python).exists():
        return None
    probe = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('openaivec'))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return probe.stdout.strip() or None if probe.returncode == 0 else None


def run_openaivec(python: str, spec: dict[str, Any], timeout: float = 900.0) -> dict[str, Any]:
    """Run the child on ``spec`` (base_url, key, ca, model, system, prompts, concurrency): its
    ``seconds``, ``answers`` (one per prompt, or None when the run failed) and ``error``."""
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder, "spec.json"), Path(folder, "result.json")
        source.write_text(json.dumps(spec))
        cache = Path(python).absolute().parent.parent / "tiktoken-cache"  # beside the venv's bin/
        env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache)}
        command = [python, __file__, str(source), str(target)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        if not target.exists():
            why = f"child exited {done.returncode}: {done.stderr[-500:]}"
            return {"seconds": 0.0, "answers": None, "error": why}
        result: dict[str, Any] = json.loads(target.read_text())
        return result


def _tiktoken_cache() -> None:
    """Put bpe-openai's o200k_base where tiktoken looks for its download (see the module doc)."""
    import gzip
    import hashlib
    from importlib.resources import files

    folder = Path(os.environ["TIKTOKEN_CACHE_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("o200k_base", "cl100k_base"):
        url = f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
        path = folder / hashlib.sha1(url.encode()).hexdigest()
        if not path.exists():
            path.write_bytes(gzip.decompress((files("bpe_openai.data") / f"{name}.tiktoken.gz").read_bytes()))


def _child(source: str, target: str) -> None:
    import asyncio
    import ssl
    import time

    import httpx
    import openaivec
    import openaivec.pandas_ext  # registers the .aio accessor
    import pandas as pd
    from openai import AsyncOpenAI

    _tiktoken_cache()
    spec = json.loads(Path(source).read_text())
    http = httpx.AsyncClient(verify=ssl.create_default_context(cafile=spec["ca"]), timeout=60.0)
    openaivec.set_async_client(AsyncOpenAI(base_url=spec["base_url"], api_key=spec["key"], http_client=http))
    openaivec.set_responses_model(spec["model"])
    rows = pd.Series(spec["prompts"])

    async def run() -> list[Any]:
        answers = await rows.aio.responses(
            spec["system"], batch_size=None, max_concurrency=spec["concurrency"], show_progress=False
        )
        return list(answers)

    started = time.perf_counter()
    answers: list[Any] | None = None
    failure = None
    try:
        answers = asyncio.run(run())
    except Exception as exc:  # the run's end is the measurement: openaivec answers all rows or none
        failure = f"{type(exc).__name__}: {str(exc)[:300]}"
    seconds = time.perf_counter() - started
    Path(target).write_text(json.dumps({"seconds": round(seconds, 3), "answers": answers, "error": failure}))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
