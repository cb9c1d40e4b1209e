"""What a run tells others about its data: the task's Asset outlet and the event it records, and the
OpenLineage datasets and facets of the source and the sink.

The OpenLineage provider is optional: it and the ``openlineage`` client are imported only by the
functions that build OpenLineage objects, reached from
:meth:`LineageMixin.get_openlineage_facets_on_complete`, which only the provider's listener calls.
Without them an operator imports, runs and records its Asset event as usual.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

from airflow.sdk import Asset

from airflow_provider_llmq import __version__
from airflow_provider_llmq.operators.arguments import SourceAndSink

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage
    from airflow.sdk import Context
    from openlineage.client.event_v2 import InputDataset, OutputDataset
    from openlineage.client.facet_v2 import DatasetFacet, InputDatasetFacet, OutputDatasetFacet, RunFacet
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

# Airflow leaves an ``x-`` scheme as written: no provider has to register or normalize it
ASSET_SCHEME = "x-llmq"
# custom OpenLineage facets are keyed by a prefix naming their producer
FACET_NAME = "llmq"
PRODUCER = f"https://pypi.org/project/airflow-provider-llmq/{__version__}/"
FACET_SCHEMA_URL = f"{PRODUCER}LLMQueryRunFacet.json#/$defs/LLMQueryRunFacet"
COUNTS = ("rows", "ok", "errors", "errors_by_code", "requests_sent")


@dataclass(frozen=True)
class DatasetId:
    """An OpenLineage dataset identifier; ``table`` is the (namespace, name) of a table's symlink."""

    namespace: str
    name: str
    table: tuple[str, str] | None = None


@dataclass(frozen=True)
class RunLineage:
    """What one finished run read, wrote and counted, kept on the operator for the lineage listener."""

    inputs: tuple[DatasetId, ...]
    output: DatasetId | None
    model: str | None
    counts: dict[str, Any]


def path_dataset(location: str) -> DatasetId:
    """A file or object store location, named as OpenLineage names it.

    :param location: a local path (absolute or relative) or a URI (``s3a://bucket/key``, ...).
    """
    parsed = urllib.parse.urlsplit(location)
    # naming as openlineage.client.naming.dataset (LocalFileSystem, RemoteFileSystem, S3, GCS) and the
    # provider's ExtractorManager.convert_to_ol_dataset_from_object_storage_uri (s3a -> s3, gcs -> gs)
    if not parsed.scheme or (parsed.scheme == "file" and not parsed.netloc):
        return DatasetId("file", os.path.abspath(parsed.path if parsed.scheme else location))
    if parsed.scheme == "file":
        return DatasetId(f"file://{parsed.netloc}", parsed.path)
    scheme = "s3" if parsed.scheme.startswith("s3") else "gs" if parsed.scheme == "gcs" else parsed.scheme
    return DatasetId(f"{scheme}://{parsed.netloc}", parsed.path.strip("/") or "/")


def table_dataset(spark: SparkSession, table: str) -> DatasetId | None:
    """A catalog table, named by its location with a ``database.table`` symlink, as openlineage-spark
    names it (``PathUtils.fromCatalogTable``); None for a view or a table without a location.

    :param spark: the session whose catalog knows the table.
    :param table: the table's name as the operator was given it.
    """
    details: dict[str, str] = {}
    detailed = False
    for row in spark.sql(f"DESCRIBE TABLE EXTENDED {table}").collect():
        # the column list comes first: a column could be named "Location"
        detailed = detailed or row[0] == "# Detailed Table Information"
        if detailed:
            details[row[0]] = row[1]
    location = details.get("Location")
    if not location:
        return None
    found = path_dataset(location)
    database, name = details.get("Database"), details.get("Table") or table
    symlink = f"{database}.{name}" if database else name
    return DatasetId(found.namespace, found.name, (found.name.rpartition("/")[0], symlink))


def sql_tables(sql: str) -> list[str]:
    """The tables a query reads, by the OpenLineage SQL parser; none without the provider.

    :param sql: the source query.
    """
    try:
        from openlineage_sql import parse
    except ImportError:
        return []
    meta = parse([sql], dialect="spark")
    return [] if meta is None else [table.qualified_name for table in meta.in_tables]


def static_asset(output_table: str | None, output_path: str | None) -> Asset | None:
    """A static output location as an Asset outlet; None when it is templated per run.

    :param output_table: the sink table, if any.
    :param output_path: the sink path, if any.
    """
    target = output_table or output_path
    if not isinstance(target, str) or not target or "{{" in target or "{%" in target:
        return None
    if output_table:
        return Asset(name=output_table, uri=f"table://{output_table}")
    uri = target if "://" in target else "file://" + os.path.abspath(target)
    return Asset(uri=uri)


def task_asset(dag_id: str, task_id: str, output_table: str | None, output_path: str | None) -> Asset:
    """The task's Asset outlet: its static output's, else one named after the task, the same in every
    run however the output is templated (the event's extra says where each run wrote).

    :param dag_id: the task's DAG.
    :param task_id: the task (with its group prefix).
    :param output_table: the sink table, if any.
    :param output_path: the sink path, if any.
    """
    static = static_asset(output_table, output_path)
    if static is not None:
        return static
    return Asset(uri=f"{ASSET_SCHEME}://{urllib.parse.quote(dag_id, safe='')}/{urllib.parse.quote(task_id)}")


def record_asset_event(context: Context, outlets: list[Any], extra: dict[str, Any]) -> None:
    """Adds ``extra`` to the event of every Asset outlet of this run.

    :param context: the task's context; without ``outlet_events`` (called outside Airflow) nothing.
    :param outlets: the task's outlets.
    :param extra: JSON values for the events.
    """
    events = context.get("outlet_events")
    if events is None:
        return
    for outlet in outlets:
        if isinstance(outlet, Asset):
            events[outlet].extra.update(extra)


@cache
def _run_facet_class() -> Any:
    """The ``llmq`` run facet's class, defined on first use: its base comes with the openlineage
    client, which may not be installed."""
    from attrs import define, field
    from openlineage.client.facet_v2 import RunFacet

    @define
    class LLMQueryRunFacet(RunFacet):
        """The model a run asked and its counts (the XCom summary's); camelCase as OpenLineage's own."""

        model: str | None
        rows: int
        ok: int
        errors: int
        errorsByCode: dict[str, int] = field(factory=dict)
        requestsSent: int = 0

        def __attrs_post_init__(self) -> None:
            if not self._producer:  # else the base names the openlineage client as the producer
                self._producer = PRODUCER
            super().__attrs_post_init__()

        @staticmethod
        def _get_schema() -> str:
            return FACET_SCHEMA_URL

    LLMQueryRunFacet.__qualname__ = LLMQueryRunFacet.__name__
    return LLMQueryRunFacet


def run_facet(model: str | None, counts: dict[str, Any]) -> RunFacet:
    """The ``llmq`` run facet of a run (needs the openlineage client).

    :param model: the deployment / model the run asked.
    :param counts: the summary's ``COUNTS``.
    """
    facet: RunFacet = _run_facet_class()(
        model=model,
        rows=int(counts.get("rows") or 0),
        ok=int(counts.get("ok") or 0),
        errors=int(counts.get("errors") or 0),
        errorsByCode=dict(counts.get("errors_by_code") or {}),
        requestsSent=int(counts.get("requests_sent") or 0),
    )
    return facet


def _symlinks(dataset: DatasetId) -> dict[str, DatasetFacet]:
    from openlineage.client.facet_v2 import symlinks_dataset

    if dataset.table is None:
        return {}
    namespace, name = dataset.table
    identifier = symlinks_dataset.Identifier(namespace=namespace, name=name, type="TABLE")
    return {"symlinks": symlinks_dataset.SymlinksDatasetFacet(identifiers=[identifier])}


def openlineage_datasets(run: RunLineage) -> tuple[list[InputDataset], list[OutputDataset]]:
    """The run's source and sink as OpenLineage datasets, the sink (and a single source) with its row
    count (needs the openlineage client).

    :param run: what the run recorded.
    """
    from openlineage.client.event_v2 import InputDataset, OutputDataset
    from openlineage.client.facet_v2 import input_statistics_input_dataset, output_statistics_output_dataset

    rows = run.counts.get("rows")
    read: dict[str, InputDatasetFacet] = {}
    if rows is not None and len(run.inputs) == 1:  # rows of a query over several tables are no table's
        read["inputStatistics"] = input_statistics_input_dataset.InputStatisticsInputDatasetFacet(
            rowCount=rows
        )
    inputs = [
        InputDataset(namespace=d.namespace, name=d.name, facets=_symlinks(d), inputFacets=read)
        for d in run.inputs
    ]
    if run.output is None:
        return inputs, []
    written: dict[str, OutputDatasetFacet] = {}
    if rows is not None:
        written["outputStatistics"] = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
            rowCount=rows
        )
    output = OutputDataset(
        namespace=run.output.namespace,
        name=run.output.name,
        facets=_symlinks(run.output),
        outputFacets=written,
    )
    return inputs, [output]


class _Operator(SourceAndSink, Protocol):
    """What the mixin reads from the operator it is mixed into."""

    outlets: list[Any]
    _llmq_lineage: RunLineage | None


class LineageMixin:
    """An llmq operator's lineage: the Asset event's extra and the OpenLineage datasets and facets."""

    _llmq_lineage: RunLineage | None = None

    def _record_lineage(
        self: _Operator, context: Context, spark: SparkSession, summary: dict[str, Any], model: str | None
    ) -> None:
        """Called once the output is written: the concrete output and the counts go into the Asset
        event; the resolved source and sink are kept for the OpenLineage listener.

        :param context: the task's context.
        :param spark: the run's session (tables are named by their catalog location).
        :param summary: the run's summary.
        :param model: the deployment (Azure) / model (OpenAI) the run asked.
        """
        inputs, output = _resolve(self, spark)
        if summary.get("estimate_only"):  # nothing was sent or written: the sink is not this run's
            record_asset_event(context, self.outlets, {"estimate_only": True, "model": model})
            self._llmq_lineage = RunLineage(inputs=inputs, output=None, model=model, counts={})
            return
        counts = {key: summary.get(key) for key in COUNTS}
        extra = {
            "output": self.output_table or self.output_path,
            "output_format": None if self.output_table else self.output_format,
            "model": model,
            **counts,
        }
        record_asset_event(context, self.outlets, extra)
        self._llmq_lineage = RunLineage(inputs=inputs, output=output, model=model, counts=counts)

    def get_openlineage_facets_on_complete(self: _Operator, task_instance: Any) -> OperatorLineage:
        """The source and the sink as OpenLineage datasets, the model and the counts as facets.

        Called by the OpenLineage listener on success and, lacking an ``_on_failure`` method, on
        failure too: a run that failed before writing has only the paths its arguments name.

        :param task_instance: the finished task instance (unused: the run recorded what it needs).
        """
        from airflow.providers.openlineage.extractors import OperatorLineage

        run = self._llmq_lineage
        if run is None:
            inputs = tuple(path_dataset(p) for p in (self.source_path,) if p)
            output = path_dataset(self.output_path) if self.output_path else None
            run = RunLineage(inputs=inputs, output=output, model=None, counts={})
        read, written = openlineage_datasets(run)
        facets = {FACET_NAME: run_facet(run.model, run.counts)} if run.counts else {}
        return OperatorLineage(inputs=list(read), outputs=list(written), run_facets=facets)


def _resolve(operator: _Operator, spark: SparkSession) -> tuple[tuple[DatasetId, ...], DatasetId | None]:
    """The run's source and sink as datasets; a source given as a function (``@task.llmq``) has none."""
    try:
        tables = sql_tables(operator.sql) if operator.sql else [operator.source_table]
    except Exception as exc:
        log.warning("llmq lineage: could not parse the source query: %s", exc)
        tables = []
    found = [_named(table_dataset, spark, table) for table in tables if table]
    if operator.source_path:
        found.append(path_dataset(operator.source_path))
    if operator.output_table:
        output = _named(table_dataset, spark, operator.output_table)
    else:
        output = path_dataset(operator.output_path) if operator.output_path else None
    return tuple(d for d in found if d is not None), output


def _named(
    namer: Callable[[SparkSession, str], DatasetId | None], spark: SparkSession, table: str
) -> DatasetId | None:
    """A table's dataset, or None when the catalog cannot say: lineage never fails a written run."""
    try:
        return namer(spark, table)
    except Exception as exc:
        log.warning("llmq lineage: could not name table %s: %s", table, exc)
        return None


__all__ = [
    "ASSET_SCHEME",
    "DatasetId",
    "LineageMixin",
    "RunLineage",
    "openlineage_datasets",
    "path_dataset",
    "record_asset_event",
    "run_facet",
    "static_asset",
    "table_dataset",
    "task_asset",
]
