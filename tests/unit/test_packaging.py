"""What a user installs is what the tree holds: the sdist and the wheel built from it carry every
module and data file of the package, and no test or benchmark; the declared ranges cannot pair
pyspark with a pyspark-client of another version; spark_connect connections read as the
apache-spark provider reads them, without depending on it."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "airflow_provider_llmq"
DATA_FILES = {"airflow_provider_llmq/py.typed", "airflow_provider_llmq/spark/log4j2-quiet.properties"}


def _tree_files() -> set[str]:
    found = {
        str(path.relative_to(ROOT))
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The sdist, and the wheel built from that sdist (as pip does for an sdist on an index)."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


def test_the_wheel_holds_every_module_and_data_file_of_the_tree(built: tuple[Path, Path]) -> None:
    _, wheel = built
    names = set(zipfile.ZipFile(wheel).namelist())
    in_package = {name for name in names if name.startswith("airflow_provider_llmq/")}
    assert _tree_files() - in_package == set(), "files of the tree missing from the wheel"
    assert in_package >= DATA_FILES
    assert "airflow_provider_llmq/core/transport/engine.py" in in_package
    top_level = {name.split("/")[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"airflow_provider_llmq"}
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)


def test_the_sdist_holds_the_package_and_no_cache(built: tuple[Path, Path]) -> None:
    sdist, _ = built
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert _tree_files() - names == set()
    assert not any("__pycache__" in name for name in names)


def test_the_wheel_requires_pyspark_alone(built: tuple[Path, Path]) -> None:
    """pyspark-client (which the apache-spark provider requires) writes into pyspark's folder and pip
    picks its newest release whatever pyspark is there: it must only come with an extra."""
    _, wheel = built
    archive = zipfile.ZipFile(wheel)
    (metadata,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
    requires = [
        line.split(":", 1)[1].strip()
        for line in archive.read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    unconditional = [req for req in requires if "extra ==" not in req]
    assert any(req.startswith("pyspark[connect]") for req in unconditional)
    assert not any(
        req.startswith(("pyspark-client", "apache-airflow-providers-apache-spark")) for req in unconditional
    )
    assert any(req.startswith("azure-identity") and 'extra == "azure"' in req for req in requires)


def test_spark_connect_urls_read_as_the_provider_reads_them() -> None:
    pytest.importorskip("airflow.providers.apache.spark")
    from unittest import mock

    from airflow.providers.apache.spark.hooks.spark_connect import SparkConnectHook
    from airflow.sdk import Connection

    from airflow_provider_llmq.hooks.spark_session import spark_connect_url

    cases = [
        {"host": "127.0.0.1", "port": 15002},
        {
            "host": "sc://spark.corp",
            "port": 443,
            "login": "ana maria",
            "password": "t/k=",
            "extra": '{"use_ssl": true}',
        },
        {"host": "spark.corp"},
    ]
    for fields in cases:
        conn = Connection(conn_id="sc", conn_type="spark_connect", **fields)  # type: ignore[arg-type]
        with mock.patch.object(SparkConnectHook, "get_connection", return_value=conn):
            expected = SparkConnectHook(conn_id="sc").get_connection_url()
        assert spark_connect_url(conn) == expected
