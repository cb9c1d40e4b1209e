"""pyspark and pyspark-client share one folder: a mismatch is refused when a session starts, with
the fix in the message, and the versions installed here agree."""

from __future__ import annotations

import pytest

from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.spark.session import check_spark_install, installed_spark_versions


def test_the_versions_installed_here_agree() -> None:
    versions = installed_spark_versions()
    assert versions["pyspark"] and versions["Spark jars"]
    check_spark_install()


def test_the_trap_of_stack_md_is_refused_with_the_fix() -> None:
    # pip install pyspark==4.3.0 next to pyspark-client 4.2.0: Python of one, jars of the other
    with pytest.raises(LLMQueryConfigError, match=r"pip install 'pyspark==4.2.0' 'pyspark-client==4.2.0'"):
        check_spark_install({"pyspark": "4.3.0", "pyspark-client": "4.2.0", "Spark jars": "4.3.0"})


def test_a_spark_install_without_pyspark_client_or_jars_is_fine() -> None:
    check_spark_install({"pyspark": None, "pyspark-client": "4.1.0", "Spark jars": None})
    check_spark_install({"pyspark": "4.0.1", "pyspark-client": None, "Spark jars": "4.0.1"})
