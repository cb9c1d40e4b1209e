"""The checkpoint's driver-side writes and its lease, on a local folder and on an S3-compatible
server (moto), with no Spark: result files are committed without renaming a folder, and two live
runs never hold one checkpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.spark.checkpoint import Checkpoint
from airflow_provider_llmq.spark.lease import LEASE, Lease, LeaseHeldError, Owner


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on localhost, with a bucket; skipped where moto is not installed."""
    pytest.importorskip("moto")
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError("moto server did not start")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(params=["local", "s3"])
def checkpoint(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Checkpoint:
    if request.param == "local":
        return Checkpoint(str(tmp_path / "ckpt" / "run-1"))
    endpoint = request.getfixturevalue("s3_endpoint")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    import pyarrow.fs as pafs

    bucket = f"llmq-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    fs = pafs.S3FileSystem(
        endpoint_override=endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True
    )
    fs.create_dir(bucket)
    return Checkpoint(f"s3://{bucket}/ckpt/run-1?endpoint_override={endpoint}&scheme=http&region=us-east-1")


def _results(n: int, start: int = 0) -> list[QueryResult]:
    return [QueryResult(f"key-{i}", f"answer {i}", "ok", attempts=1) for i in range(start, start + n)]


def test_flushes_are_whole_files_listed_in_write_order(checkpoint: Checkpoint) -> None:
    first = checkpoint.flush(_results(3))
    second = checkpoint.flush(_results(2, start=3))
    assert checkpoint.result_names() == [first, second]
    table = pq.read_table(f"{checkpoint.root}/results/{second}", filesystem=checkpoint.fs)
    assert table.column("__llmq_key").to_pylist() == ["key-3", "key-4"]
    assert table.column("llmq_response").to_pylist() == ["answer 3", "answer 4"]


def test_what_a_killed_try_left_half_written_is_never_read_and_is_cleaned(checkpoint: Checkpoint) -> None:
    kept = checkpoint.flush(_results(1))
    root = f"{checkpoint.root}/results"
    with checkpoint.fs.open_output_stream(f"{root}/_tmp-abc-flush-x.parquet") as stream:
        stream.write(b"PAR1 half a file")
    # a Spark folder whose job never committed (no .done marker)
    checkpoint.fs.create_dir(f"{root}/spark-00000000000000000001-deadbeef")
    with checkpoint.fs.open_output_stream(f"{root}/spark-00000000000000000001-deadbeef/part-0.parquet") as s:
        s.write(b"partial")
    assert checkpoint.result_names() == [kept]
    checkpoint.clean_temporaries()
    left = sorted(info.base_name for info in checkpoint.fs.get_file_info(_selector(root)))
    assert left == [kept]


def _selector(root: str) -> object:
    import pyarrow.fs as pafs

    return pafs.FileSelector(root)


def test_json_records_round_trip_and_reset_keeps_the_lease(checkpoint: Checkpoint) -> None:
    checkpoint.write_json(LEASE, {"token": "t"})
    checkpoint.write_json("output.json", {"files": ["a"]})
    checkpoint.flush(_results(1))
    assert checkpoint.read_json("output.json") == {"files": ["a"]}
    checkpoint.reset()
    assert checkpoint.read_json("output.json") is None and checkpoint.result_names() == []
    assert checkpoint.read_json(LEASE) == {"token": "t"}
    checkpoint.delete()
    assert checkpoint.read_json(LEASE) is None


def test_a_record_rewritten_while_it_is_read_is_read_whole(checkpoint: Checkpoint) -> None:
    """On S3 a read takes the size from a HEAD, then GETs: a record rewritten in between tore a
    lease read (CI, stop 29). Records of changing length, rewritten as fast as they can be."""
    import threading

    stop = threading.Event()
    written = [0]

    def rewrite() -> None:
        while not stop.is_set() and written[0] < 40:
            n = written[0] + 1
            checkpoint.write_json("record.json", {"n": n, "pad": "x" * (n % 7)})
            written[0] = n
            time.sleep(0.005)  # a heartbeat far faster than a real one (seconds), not a busy loop

    checkpoint.write_json("record.json", {"n": 0, "pad": ""})
    writer = threading.Thread(target=rewrite)
    writer.start()
    seen = []
    try:
        while writer.is_alive():  # every read while the writer runs parses, whatever it meets
            seen.append(checkpoint.read_json("record.json")["n"])
    finally:
        stop.set()
        writer.join()
    assert written[0] == 40 and seen == sorted(seen)


class _TearsFirstReads:
    """A filesystem whose first reads of a file come back cut, as a torn S3 read does."""

    def __init__(self, fs: object, tears: int) -> None:
        self._fs, self.tears = fs, tears

    def __getattr__(self, name: str) -> object:
        return getattr(self._fs, name)

    def open_input_stream(self, path: str) -> object:
        import io

        with self._fs.open_input_stream(path) as stream:  # type: ignore[attr-defined]
            payload = stream.read()
        if self.tears > 0:
            self.tears -= 1
            payload = payload[:-1]
        return io.BytesIO(payload)


def test_a_torn_read_is_read_again_and_a_broken_record_is_named(tmp_path: Path) -> None:
    from airflow_provider_llmq.core.errors import LLMQueryConfigError

    checkpoint = Checkpoint(str(tmp_path / "ckpt"))
    checkpoint.write_json("lease.json", {"token": "t", "heartbeat": 1.25})
    checkpoint.fs = _TearsFirstReads(checkpoint.fs, tears=2)  # type: ignore[assignment]
    assert checkpoint.read_json("lease.json") == {"token": "t", "heartbeat": 1.25}
    checkpoint.fs = _TearsFirstReads(checkpoint.fs, tears=99)  # type: ignore[assignment]
    with pytest.raises(LLMQueryConfigError, match=r"lease.json in the checkpoint .* is not valid JSON"):
        checkpoint.read_json("lease.json")


def _lease(checkpoint: Checkpoint, owner: Owner, **kwargs: float) -> Lease:
    return Lease(checkpoint, owner, settle=0.01, **kwargs)


def test_a_second_live_run_is_refused_and_gets_it_after_release(checkpoint: Checkpoint) -> None:
    first = _lease(checkpoint, Owner(task="dag/ask/run-1/-1"))
    assert first.acquire() is None
    second = _lease(checkpoint, Owner(task="dag/other/run-2/-1"))
    with pytest.raises(LeaseHeldError, match=r"in use by a live run .*dag/ask/run-1") as raised:
        second.acquire()
    assert "checkpoint_key" in str(raised.value)
    first.release()
    assert second.acquire() is None
    second.release()
    assert checkpoint.read_json(LEASE) is None


def test_an_earlier_try_of_the_same_task_is_taken_over_at_once(checkpoint: Checkpoint) -> None:
    _lease(checkpoint, Owner(task="dag/ask/run-1/-1", attempt=1)).acquire()  # never released: killed
    retry = _lease(checkpoint, Owner(task="dag/ask/run-1/-1", attempt=2))
    assert "earlier try" in (retry.acquire() or "")
    retry.release()


def test_a_dead_process_on_this_host_is_taken_over_at_once(checkpoint: Checkpoint) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    checkpoint.write_json(
        LEASE,
        {
            "task": "x",
            "attempt": 1,
            "host": socket.gethostname(),
            "pid": gone.pid,
            "token": "old",
            "heartbeat": time.time(),
        },
    )
    lease = _lease(checkpoint, Owner(task="y"))
    assert f"process {gone.pid} on this host, is gone" in (lease.acquire() or "")
    lease.release()


def test_a_live_holder_elsewhere_is_taken_over_only_after_its_heartbeat_expired(
    checkpoint: Checkpoint,
) -> None:
    record = {"task": "x", "attempt": 1, "host": "another-host", "pid": 1, "token": "old"}
    checkpoint.write_json(LEASE, {**record, "heartbeat": time.time() - 5})
    with pytest.raises(LeaseHeldError):
        _lease(checkpoint, Owner(task="y"), expiry=60).acquire()
    checkpoint.write_json(LEASE, {**record, "heartbeat": time.time() - 120})
    lease = _lease(checkpoint, Owner(task="y"), expiry=60)
    assert "heartbeat stopped" in (lease.acquire() or "")
    lease.release()


def test_the_heartbeat_renews_the_lease(checkpoint: Checkpoint) -> None:
    lease = _lease(checkpoint, Owner(task="y"), heartbeat=0.05)
    lease.acquire()
    first = checkpoint.read_json(LEASE)["heartbeat"]
    time.sleep(0.3)
    assert checkpoint.read_json(LEASE)["heartbeat"] > first
    lease.release()
