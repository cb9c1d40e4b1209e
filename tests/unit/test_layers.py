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


# data, not logic: the generated sample's catalogue of products and phrases
LONG_BY_NATURE = {"sample_data.py"}
MAX_MODULE_LINES = 400


def test_no_module_passes_400_lines() -> None:
    """Modules of one job: past 400 lines a module holds two (split it by job)."""
    long = {
        str(path.relative_to(PACKAGE)): n
        for path in PACKAGE.rglob("*.py")
        if path.name not in LONG_BY_NATURE and (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_core_imports_no_operator_hook_or_spark_module() -> None:
    above = (
        "airflow_provider_llmq.operators",
        "airflow_provider_llmq.hooks",
        "airflow_provider_llmq.decorators",
    )
    above += ("airflow_provider_llmq.spark", "airflow_provider_llmq.triggers")
    offending = {
        path: sorted(n for n in names if n.startswith(above))
        for path, names in _imported_modules(PACKAGE / "core").items()
    }
    assert {path: names for path, names in offending.items() if names} == {}
