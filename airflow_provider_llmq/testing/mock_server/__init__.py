"""A mock OpenAI / Azure OpenAI chat-completions server over real sockets (HTTP or TLS).

It serves the tests, the demo and the benchmarks: answers are deterministic
(:func:`expected_answer`), faults are deterministic by (prompt, attempt number, seed) — from markers
inside the prompt such as ``[[500x2]]`` or from rates in :class:`MockConfig` (:func:`planned_fault`) —
and it counts what clients do (attempts per prompt, concurrency, rate, keys leaked into URLs).

Run it in-process with :class:`MockServer`, in a child process with :class:`MockServerProcess`, or
from a shell with ``python -m airflow_provider_llmq.testing.mock_server``.
"""

from __future__ import annotations

from .faults import MockConfig, expected_answer, plan, planned_fault, prompt_hash
from .runner import MockServer, MockServerProcess

__all__ = [
    "MockConfig",
    "MockServer",
    "MockServerProcess",
    "expected_answer",
    "plan",
    "planned_fault",
    "prompt_hash",
]
