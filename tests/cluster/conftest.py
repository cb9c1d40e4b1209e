"""A real Spark standalone cluster on 127.0.0.1 (a master and two workers) for the session, and a
Spark Connect server against it for one test at a time (it holds the cluster's cores while it
lives). Operators run against them in their own processes: a process may hold one SparkContext."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from airflow_provider_llmq.testing.spark_cluster import Cluster, connect_server, standalone_cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with standalone_cluster(
        workers=2, cores=1, work_dir=str(tmp_path_factory.mktemp("spark-standalone"))
    ) as c:
        yield c


@pytest.fixture
def spark_connect(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("spark-connect") / "server.log"
    with connect_server(cluster.master, log_path=str(log)) as url:
        yield url
