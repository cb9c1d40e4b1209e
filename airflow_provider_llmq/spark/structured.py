"""Structured output on the Spark side: ``output_schema`` (a DDL string, a ``StructType`` or a JSON
schema) as the JSON schemas the core sends and checks, and the typed columns the sink writes.

The core sees JSON schemas only. The schema sent follows OpenAI's strict rules; the one answers
are checked against adds the bounds of the Spark types (an ``int`` field given ``1e12``, a
``bigint`` given ``2**70``), so every valid answer fits its column. The checkpoint keeps the raw
text: parsing it into columns happens when the output is written (:func:`typed_columns`), so a
change of parsing (flattening, say) never asks again.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow_provider_llmq.core.accounting.result import STATUS_OK
from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.request.structured import DEFAULT_SCHEMA_NAME, strict_schema
from airflow_provider_llmq.spark.schema import STATUS_COL

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import DataType, StructType

__all__ = ["OutputSpec", "output_spec", "raw_col", "resolve_output_schema", "typed_columns"]

# JSON numbers that fit each Spark numeric type; a float's bound is its largest finite value
_INTEGER_BOUNDS = {
    "ByteType": (-(2**7), 2**7 - 1),
    "ShortType": (-(2**15), 2**15 - 1),
    "IntegerType": (-(2**31), 2**31 - 1),
    "LongType": (-(2**63), 2**63 - 1),
}
_FLOAT_MAX = {"FloatType": 3.4028234663852886e38, "DoubleType": 1.7976931348623157e308}


@dataclass(frozen=True)
class OutputSpec:
    """One ``output_schema``, resolved.

    :param spark_type: the struct the answers are parsed into (``from_json``).
    :param schema: the JSON schema sent (strict form).
    :param check_schema: ``schema`` plus the bounds of the Spark types: what answers are checked against.
    :param name: ``json_schema.name`` in the request.
    """

    spark_type: StructType
    schema: dict[str, Any]
    check_schema: dict[str, Any]
    name: str = DEFAULT_SCHEMA_NAME


def resolve_output_schema(value: Any, session: Callable[[], SparkSession] | None = None) -> OutputSpec:
    """``output_schema`` as an :class:`OutputSpec`, or a config error naming the problem.

    :param value: a Spark DDL string (``"label string NOT NULL, score int"``), a ``StructType``, or
        a JSON schema (a dict with an object at the root, or the API's ``{"name", "schema"}`` form).
    :param session: makes (or returns) the Spark session; Spark's own parser reads a DDL string.
    """
    from pyspark.sql.types import StructType

    name = DEFAULT_SCHEMA_NAME
    if isinstance(value, str):
        spark_type = _parse_ddl(value, session)
        schema = strict_schema(_json_schema(spark_type, nullable=False, path="$"))
    elif isinstance(value, StructType):
        spark_type = value
        schema = strict_schema(_json_schema(spark_type, nullable=False, path="$"))
    elif isinstance(value, Mapping):
        if "schema" in value and "type" not in value:  # the API's json_schema wrapper
            name = str(value.get("name") or DEFAULT_SCHEMA_NAME)
            value = value["schema"]
        schema = strict_schema(value)
        parsed = _spark_type(schema, "$")
        assert isinstance(parsed[0], StructType)  # strict_schema made sure the root is an object
        spark_type = parsed[0]
    else:
        raise LLMQueryConfigError(
            "output_schema must be a Spark DDL string, a StructType or a JSON schema (dict), "
            f"got {type(value).__name__}"
        )
    return OutputSpec(spark_type, schema, strict_schema(_with_bounds(schema, spark_type)), name)


def output_spec(
    value: Any, flatten_output: bool | str, session: Callable[[], SparkSession] | None = None
) -> OutputSpec | None:
    """An operator's ``output_schema`` and ``flatten_output`` checked together; None for free text."""
    if not isinstance(flatten_output, bool | str):
        raise LLMQueryConfigError(
            f"flatten_output must be True, False or a column prefix, got {type(flatten_output).__name__}"
        )
    if value is None:
        if flatten_output is not False:
            raise LLMQueryConfigError("flatten_output needs an output_schema (it flattens the parsed answer)")
        return None
    return resolve_output_schema(value, session)


def _parse_ddl(ddl: str, session: Callable[[], SparkSession] | None) -> StructType:
    from pyspark.sql.types import StructType, _parse_datatype_string

    if session is not None:
        session()  # Spark's DDL parser needs a running session
    try:
        parsed = _parse_datatype_string(ddl)
    except Exception as exc:  # ParseException, or no session at all
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LLMQueryConfigError(f"output_schema {ddl!r} is not a Spark DDL schema: {first}") from None
    if not isinstance(parsed, StructType):
        raise LLMQueryConfigError(
            f"output_schema {ddl!r} is a single {parsed.simpleString()}, not fields: name the field(s), "
            "e.g. 'label string'"
        )
    return parsed


def _nullable(node: dict[str, Any], nullable: bool) -> dict[str, Any]:
    if nullable:
        node["type"] = [node["type"], "null"]
    return node


def _json_schema(dtype: DataType, *, nullable: bool, path: str) -> dict[str, Any]:
    """A Spark type as a strict JSON schema node."""
    from pyspark.sql import types as T

    kind = type(dtype).__name__
    if isinstance(dtype, T.StructType):
        if not dtype.fields:
            raise LLMQueryConfigError(f"output_schema at {path}: a struct needs at least one field")
        node: dict[str, Any] = {
            "type": "object",
            "properties": {
                f.name: _json_schema(f.dataType, nullable=f.nullable, path=f"{path}.{f.name}")
                for f in dtype.fields
            },
            "required": [f.name for f in dtype.fields],
            "additionalProperties": False,
        }
    elif isinstance(dtype, T.ArrayType):
        items = _json_schema(dtype.elementType, nullable=dtype.containsNull, path=f"{path}[]")
        node = {"type": "array", "items": items}
    elif isinstance(dtype, T.StringType | T.CharType | T.VarcharType):
        node = {"type": "string"}
    elif kind in _INTEGER_BOUNDS:
        node = {"type": "integer"}
    elif isinstance(dtype, T.FloatType | T.DoubleType | T.DecimalType):
        node = {"type": "number"}
    elif isinstance(dtype, T.BooleanType):
        node = {"type": "boolean"}
    elif isinstance(dtype, T.DateType):
        node = {"type": "string", "format": "date"}
    else:
        raise LLMQueryConfigError(
            f"output_schema at {path}: {dtype.simpleString()} has no strict JSON schema form "
            "(use string, integer types, float, double, decimal, boolean, date, array or struct)"
        )
    return _nullable(node, nullable)


def _spark_type(node: Any, path: str) -> tuple[DataType, bool]:
    """A JSON schema node as (Spark type, nullable)."""
    from pyspark.sql import types as T

    if not isinstance(node, Mapping):
        raise LLMQueryConfigError(f"output_schema at {path}: a schema must be an object")
    if "$ref" in node:
        raise LLMQueryConfigError(f"output_schema at {path}: $ref is not supported for typed columns")
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if not (isinstance(b, Mapping) and b.get("type") == "null")]
        if len(branches) != 1:
            raise LLMQueryConfigError(
                f"output_schema at {path}: anyOf is supported only as one schema or null "
                "(a column has one type)"
            )
        return _spark_type(branches[0], path)[0], len(branches) < len(node["anyOf"])
    declared = node.get("type")
    kinds = [declared] if isinstance(declared, str) else list(declared or [])
    nullable = "null" in kinds
    kinds = [k for k in kinds if k != "null"]
    if not kinds and "enum" in node:  # an enum without a type: its values say it
        values = [v for v in node["enum"] if v is not None]
        nullable = nullable or None in node["enum"]
        kinds = ["string"] if values and all(isinstance(v, str) for v in values) else []
    if len(kinds) != 1:
        raise LLMQueryConfigError(
            f"output_schema at {path}: give one type (optionally with null) per field, got {declared!r}"
        )
    kind = kinds[0]
    simple: dict[str, DataType] = {
        "string": T.StringType(),
        "integer": T.LongType(),
        "number": T.DoubleType(),
        "boolean": T.BooleanType(),
    }
    if kind in simple:
        return simple[kind], nullable
    if kind == "array":
        item, item_nullable = _spark_type(node.get("items"), f"{path}[]")
        return T.ArrayType(item, item_nullable), nullable
    if kind == "object":
        fields = [
            T.StructField(name, *_spark_type(child, f"{path}.{name}"))
            for name, child in (node.get("properties") or {}).items()
        ]
        return T.StructType(fields), nullable
    raise LLMQueryConfigError(f"output_schema at {path}: unsupported type {kind!r}")


def _with_bounds(node: dict[str, Any], dtype: DataType) -> dict[str, Any]:
    """A copy of ``node`` whose numbers must fit ``dtype`` (the user's own bounds kept when tighter)."""
    from pyspark.sql import types as T

    node = copy.deepcopy(node)
    if "anyOf" in node:
        node["anyOf"] = [b if b.get("type") == "null" else _with_bounds(b, dtype) for b in node["anyOf"]]
        return node
    kind = type(dtype).__name__
    low: float | int | None = None
    high: float | int | None = None
    if kind in _INTEGER_BOUNDS:
        low, high = _INTEGER_BOUNDS[kind]
    elif kind in _FLOAT_MAX:
        low, high = -_FLOAT_MAX[kind], _FLOAT_MAX[kind]
    elif isinstance(dtype, T.DecimalType):
        # fewer than (precision - scale) integer digits; an exact int bound, as a float loses the
        # last unit at 10**18 and above
        limit = 10 ** (dtype.precision - dtype.scale)
        node["exclusiveMaximum"] = min(node.get("exclusiveMaximum", limit), limit)
        node["exclusiveMinimum"] = max(node.get("exclusiveMinimum", -limit), -limit)
    if low is not None and high is not None:
        node["minimum"] = max(node.get("minimum", low), low)
        node["maximum"] = min(node.get("maximum", high), high)
    elif isinstance(dtype, T.VarcharType | T.CharType):
        node["maxLength"] = min(node.get("maxLength", dtype.length), dtype.length)
    elif isinstance(dtype, T.ArrayType):
        node["items"] = _with_bounds(node["items"], dtype.elementType)
    elif isinstance(dtype, T.StructType):
        node["properties"] = {
            f.name: _with_bounds(node["properties"][f.name], f.dataType) for f in dtype.fields
        }
    return node


def raw_col(response_col: str) -> str:
    """The output column that keeps the raw answer text next to the parsed ``response_col``."""
    return f"{response_col}_raw"


def typed_columns(
    frame: DataFrame, response_col: str, spark_type: StructType, flatten: bool | str, taken: list[str]
) -> tuple[DataFrame, list[str]]:
    """``frame`` with its raw answers (in ``response_col``) parsed: the raw text moves to
    ``<response_col>_raw``, and ``response_col`` holds the parsed struct, or with ``flatten`` its
    fields become columns named ``prefix + field`` (``True``: prefix ``<response_col>_``). Rows in
    error get nulls: only answers that passed the check are parsed.

    Returns the frame and the names of the columns that replace ``response_col``, in order.

    :param taken: the other columns of the output: a typed column may not reuse their names.
    """
    from pyspark.sql import functions as F

    raw = raw_col(response_col)
    frame = frame.withColumnRenamed(response_col, raw)
    parsed = F.when(F.col(STATUS_COL) == STATUS_OK, F.from_json(F.col(f"`{raw}`"), spark_type))
    if flatten is False:
        names = [response_col]
        frame = frame.withColumn(response_col, parsed)
    else:
        prefix = f"{response_col}_" if flatten is True else str(flatten)
        names = [prefix + f.name for f in spark_type.fields]
        frame = frame.withColumn("__llmq_parsed", parsed).withColumns(
            {prefix + f.name: F.col("__llmq_parsed").getField(f.name) for f in spark_type.fields}
        )
    clash = sorted({*names, raw}.intersection(taken))
    if clash or len(set(names)) < len(names) or raw in names:
        raise LLMQueryConfigError(
            f"the typed output column(s) {clash or names} clash with other output columns: choose "
            "another response_col or flatten_output prefix"
        )
    return frame, [*names, raw]
