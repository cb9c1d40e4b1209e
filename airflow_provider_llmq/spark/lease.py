"""A run's lease on its checkpoint: two live runs never write one checkpoint.

The lease is a small JSON record (``lease.json``) naming its owner (host, process, task instance
and try) with a heartbeat that a daemon thread renews. Another run takes it over at once when its
owner is provably gone (a dead process on this host, or an earlier try of the same task instance:
Airflow starts a retry only after the try ended), else only once the heartbeat has expired. Object
stores have no compare-and-swap, so a take-over is confirmed by reading the lease back after a
short settle time: of two runs racing, the one whose record is not there gives way.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow_provider_llmq.spark.checkpoint import Checkpoint

LEASE = "lease.json"


class LeaseHeldError(RuntimeError):
    """Another live run holds this checkpoint."""


@dataclass(frozen=True)
class Owner:
    """Who holds a lease.

    :param task: the task instance without its try (dag/task/run/map index), or any run label.
    :param attempt: the try number; an earlier try of the same ``task`` is over.
    """

    task: str
    attempt: int = 1
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class Lease:
    """Acquire with :meth:`acquire`, give back with :meth:`release` (also on failure).

    :param checkpoint: the checkpoint to hold.
    :param owner: this run.
    :param heartbeat: seconds between renewals.
    :param expiry: a lease not renewed for this long is taken over from anyone.
    :param settle: seconds to wait before reading a written lease back.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        owner: Owner,
        *,
        heartbeat: float = 15.0,
        expiry: float = 90.0,
        settle: float = 0.2,
    ) -> None:
        self.checkpoint, self.owner = checkpoint, owner
        self.heartbeat, self.expiry, self.settle = heartbeat, expiry, settle
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Takes the lease; returns why an earlier holder was replaced (None if there was none).
        Raises :class:`LeaseHeldError` naming the live holder."""
        current = self.checkpoint.read_json(LEASE)
        reason = None if current is None else self._why_replaceable(current)
        if current is not None and current.get("token") != self.owner.token and reason is None:
            raise LeaseHeldError(
                f"the checkpoint {self.checkpoint.uri} is in use by a live run ({_describe(current)}, "
                f"heartbeat {time.time() - float(current.get('heartbeat', 0)):.0f} s ago): wait for it "
                f"to end, or give this run another checkpoint_key. A lease not renewed for "
                f"{self.expiry:.0f} s is taken over"
            )
        self._write()
        time.sleep(self.settle)
        after = self.checkpoint.read_json(LEASE)
        if after is None or after.get("token") != self.owner.token:
            raise LeaseHeldError(
                f"another run took the checkpoint {self.checkpoint.uri} at the same time "
                f"({_describe(after or {})})"
            )
        self._thread = threading.Thread(target=self._renew, name="llmq-lease", daemon=True)
        self._thread.start()
        return reason

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = self.checkpoint.read_json(LEASE)
        if current is not None and current.get("token") == self.owner.token:
            self.checkpoint.delete_file(LEASE)

    def _why_replaceable(self, current: dict[str, Any]) -> str | None:
        if current.get("token") == self.owner.token:
            return None
        age = time.time() - float(current.get("heartbeat", 0))
        if current.get("task") == self.owner.task and int(current.get("attempt", 0)) < self.owner.attempt:
            return f"an earlier try ({current.get('attempt')}) of this task held it"
        if current.get("host") == self.owner.host and not _process_alive(int(current.get("pid", 0))):
            return f"its holder, process {current.get('pid')} on this host, is gone"
        if age > self.expiry:
            return f"its holder's heartbeat stopped {age:.0f} s ago"
        return None

    def _write(self) -> None:
        self.checkpoint.write_json(LEASE, {**asdict(self.owner), "heartbeat": time.time()})

    def _renew(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                self._write()
            except Exception:  # a storage hiccup: the next beat tries again, well before expiry
                continue


def _describe(record: dict[str, Any]) -> str:
    return (
        f"task {record.get('task')!r} try {record.get('attempt')}, "
        f"process {record.get('pid')} on {record.get('host')}"
    )
