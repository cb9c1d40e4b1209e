"""Structured output: the JSON schema an answer must follow, sent in OpenAI's strict form, and the
check of each answer against it. Pure functions and JSON schemas only: no Spark, no I/O.

The Spark layer (:mod:`airflow_provider_llmq.spark.structured`) turns a DDL string or a
``StructType`` into a JSON schema; this module receives only JSON schemas. The schema that is
*sent* follows OpenAI's strict-mode rules (every property required, ``additionalProperties:
false``, nullable as ``"type": [T, "null"]``); the schema an answer is *checked* against may be
stricter (the bounds of the Spark column types, which the API may not accept in a schema).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from airflow_provider_llmq.core.errors import LLMQueryConfigError

__all__ = ["DEFAULT_SCHEMA_NAME", "StructuredOutput", "strict_schema"]

DEFAULT_SCHEMA_NAME = "llmq_output"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what the API accepts as json_schema.name
_MAX_REASON = 500  # the reason lands in llmq_error: a whole answer quoted back is noise


def strict_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a user's JSON schema in OpenAI's strict form, or a config error naming the rule.

    ``additionalProperties: false`` is filled in where an object leaves it out (strict mode requires
    it, and it changes no valid answer); a property missing from ``required`` is an error rather
    than a silent rewrite, since making it nullable changes what the model may answer.
    """
    if not isinstance(schema, Mapping):
        raise LLMQueryConfigError(
            f"output_schema must be a JSON schema (a dict), got {type(schema).__name__}"
        )
    result = copy.deepcopy(dict(schema))
    if _types(result) != {"object"}:
        raise LLMQueryConfigError(
            'output_schema: the root must be {"type": "object", ...} (strict structured output '
            "answers with an object)"
        )
    _make_strict(result, "$")
    try:
        import jsonschema

        jsonschema.Draft202012Validator.check_schema(result)
    except jsonschema.SchemaError as exc:
        path = "$" + "".join(f"[{p!r}]" for p in exc.path)
        raise LLMQueryConfigError(
            f"output_schema is not a valid JSON schema at {path}: {exc.message}"
        ) from None
    return result


def _types(node: Mapping[str, Any]) -> set[str]:
    declared = node.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return {t for t in declared if isinstance(t, str)} - {"null"}
    return set()


def _make_strict(node: Any, path: str) -> None:
    if not isinstance(node, dict):
        return
    if "object" in _types(node) or "properties" in node:
        properties = node.get("properties")
        if not isinstance(properties, dict) or not properties:
            raise LLMQueryConfigError(f"output_schema at {path}: an object needs a non-empty 'properties'")
        missing = [name for name in properties if name not in (node.get("required") or [])]
        if missing:
            raise LLMQueryConfigError(
                f"output_schema at {path}: strict structured output needs every property in 'required'; "
                f'missing {missing} (make an optional field nullable instead: "type": [T, "null"])'
            )
        if node.get("additionalProperties", False) is not False:
            raise LLMQueryConfigError(
                f"output_schema at {path}: strict structured output needs 'additionalProperties': false"
            )
        node["additionalProperties"] = False
        for name, child in properties.items():
            _make_strict(child, f"{path}.{name}")
    if "items" in node:
        _make_strict(node["items"], f"{path}[]")
    for keyword in ("anyOf", "$defs", "definitions"):
        children = node.get(keyword)
        values = children.values() if isinstance(children, dict) else children or []
        for index, child in enumerate(values):
            _make_strict(child, f"{path}.{keyword}[{index}]")


@dataclass(frozen=True)
class StructuredOutput:
    """What a run's answers must be: JSON following ``schema``.

    :param schema: the JSON schema sent in ``response_format`` (strict form: :func:`strict_schema`).
    :param check_schema: the schema an answer is validated against; None: ``schema``. It may be
        stricter than the one sent (the bounds of the typed columns the answers are written to).
    :param name: ``json_schema.name`` in the request.
    :param repair: after an invalid answer, ask once more with the invalid text and the reason.
    """

    schema: Mapping[str, Any]
    check_schema: Mapping[str, Any] | None = None
    name: str = DEFAULT_SCHEMA_NAME
    repair: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise LLMQueryConfigError(
                f"output schema name {self.name!r}: 1-64 letters, digits, '_' or '-' (the API's rule)"
            )
        object.__setattr__(self, "schema", strict_schema(self.schema))
        if self.check_schema is not None:
            object.__setattr__(self, "check_schema", strict_schema(self.check_schema))
        _validator(self._check_key())  # a schema the validator cannot compile fails now, not per row

    def response_format(self) -> dict[str, Any]:
        """The request body's ``response_format``."""
        return {
            "type": "json_schema",
            "json_schema": {"name": self.name, "schema": copy.deepcopy(dict(self.schema)), "strict": True},
        }

    def problem(self, content: str) -> str | None:
        """Why ``content`` is not a valid answer, or None when it is."""
        try:
            value = json.loads(content, parse_constant=_reject_constant)
        except ValueError as exc:
            return _cut(f"the answer is not valid JSON ({exc})")
        error = _best_error(_validator(self._check_key()), value)
        if error is None:
            return None
        where = "$" + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        return _cut(f"the answer does not match the output schema at {where}: {error.message}")

    def _check_key(self) -> str:
        # validators are cached by the schema's text: an instance stays small to pickle (it travels
        # to Spark workers) and a worker compiles each schema once
        return json.dumps(self.check_schema if self.check_schema is not None else self.schema, sort_keys=True)


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; Python's parser accepts them unless told otherwise
    raise ValueError(f"{name} is not a JSON number")


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


@lru_cache(maxsize=32)
def _validator(schema_text: str) -> Any:
    import jsonschema

    base = jsonschema.Draft202012Validator
    # JSON integers only: 1e12 or 5.0 would pass the default check, and Spark's JSON reader would
    # then write a null into an integer column
    checker = base.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
    )
    strict = jsonschema.validators.extend(base, type_checker=checker)
    return strict(json.loads(schema_text), format_checker=base.FORMAT_CHECKER)


def _best_error(validator: Any, value: Any) -> Any:
    import jsonschema

    return jsonschema.exceptions.best_match(validator.iter_errors(value))
