"""Fixtures shared by the integration tests (the server, Spark and Airflow ones are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_batch_api_mock import BatchMock


@pytest.fixture
def batches(server: Any) -> Iterator[BatchMock]:
    """Files, batches, counters and batch config cleared; batches take about 0.3 + 0.3 + 0.1 s."""
    mock = BatchMock(server)
    mock.reset()
    mock.configure(validating_s=0.3, in_progress_s=0.3, finalizing_s=0.1)
    yield mock
    mock.reset()
