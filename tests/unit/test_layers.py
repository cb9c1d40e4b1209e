"""The layers of ARCHITECTURE.md hold: core imports neither Airflow nor Spark, the Spark layer no
Airflow; the deprecated spark_io names still work, with a warning."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "airflow_provider_llmq"


def _imported_modules(folder: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(PACKAGE))] = names
    return found


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [("core", ("airflow", "pyspark")), ("spark", ("airflow",))],
)
def test_a_layer_imports_nothing_above_it(layer: str, forbidden: tuple[str, ...]) -> None:
    offending = {
        path: sorted(name for name in names if name.split(".")[0] in forbidden)
        for path, names in _imported_modules(PACKAGE / layer).items()
    }
    assert {path: names for path, names in offending.items() if names} == {}
    assert len(offending) >= 8, "the scan found the layer's modules"


def test_core_does_not_import_the_spark_layer_or_hooks() -> None:
    for path, names in _imported_modules(PACKAGE / "core").items():
        above = [
            n for n in names if n.startswith(("airflow_provider_llmq.spark", "airflow_provider_llmq.hooks"))
        ]
        assert above == [], path


@pytest.mark.parametrize(
    ("name", "home"),
    [
        ("join_results", "airflow_provider_llmq.spark.sink"),
        ("get_spark_session", "airflow_provider_llmq.hooks.spark_session"),
    ],
)
def test_old_spark_io_names_still_work_with_a_deprecation_warning(name: str, home: str) -> None:
    import importlib

    from airflow_provider_llmq import spark_io

    with pytest.warns(DeprecationWarning, match=home):
        old = getattr(spark_io, name)
    assert old is getattr(importlib.import_module(home), name)
    with pytest.raises(AttributeError):
        spark_io.no_such_name  # noqa: B018
