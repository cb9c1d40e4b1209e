"""The Files and Batches APIs of the mock server, in three flavours: OpenAI (``/v1/files``,
``/v1/batches``, lines to ``/v1/chat/completions``), Azure (``/openai/files``, ``/openai/batches``
with ``?api-version=``, lines to ``/chat/completions``, the deployment as each line's model) and
Azure's v1 API (the same under ``/openai/v1``, without ``api-version``).

Requests are authenticated as on the chat routes (and Azure's need an ``api-version``); the state
and the batches' timeline live in :mod:`batch_state`. Admin routes: ``GET /_mock/batches/stats``
(counters), ``POST /_mock/batches/reset`` (clears files, batches, counters and config),
``POST /_mock/batches/config`` (changes :class:`BatchConfig` at runtime).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, TypeVar

from aiohttp import web

from . import access, batch_lines, responses, state
from .admin import add_admin_routes
from .batch_state import FLAVOURS, BatchConfig, BatchState, MockBatch, MockFile

BATCHES: web.AppKey[BatchState] = web.AppKey("llmq_mock_batches")
_Handler = Callable[[web.Request, BatchState, str], Awaitable[web.Response]]


_T = TypeVar("_T")


def _invalid(message: str, code: str = "invalid_request") -> web.Response:
    return responses.error(400, code, message, type="invalid_request_error")


def _api(handler: _Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Authentication (and Azure's api-version) as on the chat routes, and the counters."""

    async def wrapped(request: web.Request) -> web.Response:
        st, batches = request.app[state.STATE], request.app[BATCHES]
        st.enter_api(request)
        azure = request.path.startswith("/openai/")
        v1 = request.path.startswith(state.AZURE_V1_PREFIX + "/")
        flavour = "azure_v1" if v1 else "azure" if azure else "openai"
        batches.counters["http_requests"] += 1
        resource = request.match_info.route.resource
        batches.routes[f"{request.method} {resource.canonical if resource else request.path}"] += 1
        if azure and not v1:
            batches.routes[f"api-version={request.query.get('api-version')}"] += 1
        denied = access.check_access(request, st, azure)
        response = denied if denied is not None else await handler(request, batches, flavour)
        st.finish(response)
        return response

    return wrapped


async def upload(request: web.Request, st: BatchState, flavour: str) -> web.Response:
    form = await request.post()
    sent = form.get("file")
    if form.get("purpose") != "batch" or not isinstance(sent, web.FileField):
        return _invalid("upload a 'file' with purpose 'batch' (multipart/form-data)")
    data = sent.file.read()
    if len(data) > st.config.max_file_bytes:
        return _invalid(
            f"the file is {len(data)} bytes; at most {st.config.max_file_bytes}", "file_too_large"
        )
    pending = st.config.file_processing_s if flavour != "openai" else 0.0
    created = st.add_file(sent.filename, "batch", data, time.time(), pending)
    st.counters["files_created"] += 1
    return web.json_response(created.json(time.time()))


def _found(table: dict[str, _T], key: str, what: str) -> _T | web.Response:
    """The object the path names, or OpenAI's 404 for it."""
    found = table.get(key)
    if found is None:
        return responses.error(404, "not_found", f"No such {what} object", type="invalid_request_error")
    return found


def _file(request: web.Request, st: BatchState) -> MockFile | web.Response:
    return _found(st.files, request.match_info["file_id"], "File")


async def file_info(request: web.Request, st: BatchState, flavour: str) -> web.Response:
    found = _file(request, st)
    return found if isinstance(found, web.Response) else web.json_response(found.json(time.time()))


async def file_content(request: web.Request, st: BatchState, flavour: str) -> web.Response:
    found = _file(request, st)
    return (
        found
        if isinstance(found, web.Response)
        else web.Response(body=found.data, content_type="application/jsonl")
    )


async def file_delete(request: web.Request, st: BatchState, flavour: str) -> web.Response:
    found = _file(request, st)
    if isinstance(found, web.Response):
        return found
    del st.files[found.id]
    st.counters["files_deleted"] += 1
    return web.json_response({"id": found.id, "object": "file", "deleted": True})


async def create_batch(request: web.Request, st: BatchState, flavour: str) -> web.Response:
    try:
        body = await request.json()
        metadata = body.get("metadata") or {}
    except (ValueError, AttributeError):
        return _invalid("the body must be a JSON object")
    _, url, default_limit = FLAVOURS[flavour]
    source = st.files.get(str(body.get("input_file_id")))
    if source is None or source.purpose != "batch":
        return responses.error(404, "not_found", "No such File object", type="invalid_request_error")
    if body.get("endpoint") != url or body.get("completion_window") != "24h":
        return _invalid(f"endpoint must be {url} and completion_window 24h")
    if (
        not isinstance(metadata, dict)
        or len(metadata) > 16
        or any(len(str(v)) > 512 for v in metadata.values())
    ):
        return _invalid("metadata: at most 16 pairs, values of at most 512 characters")
    lines, invalid = _read_lines(source.data, url, st.config.max_requests_per_file or default_limit)
    models = {str(line["body"]["model"]) for line in lines}
    if invalid is None and flavour == "openai" and len(models) > 1:
        invalid = ("invalid_request", "every line of a batch must use the same model")
    deployments = st.chat.config.deployments
    if invalid is None and flavour != "openai" and deployments and not models <= set(deployments):
        invalid = ("model_not_found", "a line names a deployment that does not exist")
    now = time.time()
    batch = MockBatch(
        id=f"batch_{uuid.uuid4().hex[:24]}",
        endpoint=url,
        input_file_id=source.id,
        metadata={str(k): str(v) for k, v in metadata.items()},
        created_at=now,
        timing=BatchConfig(**asdict(st.config)),
        lines=lines,
        model=min(models) if models else "",
        tokens=sum(batch_lines.tokens(line["body"]) for line in lines),
        invalid=invalid,
    )
    st.batches[batch.id] = batch
    st.counters["batches_created"] += 1
    st.counters["lines_created"] += len(lines)
    st.requests_per_batch.append(len(lines))
    return web.json_response(batch.json())


def _read_lines(data: bytes, url: str, limit: int) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
    lines: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            return lines, ("invalid_json_line", f"line {number} is not JSON")
        reason = batch_lines.check_line(line, url)
        if reason is None and line["custom_id"] in seen:
            reason = "custom_id values must be unique"
        if reason is not None:
            return lines, ("invalid_request", f"line {number}: {reason}")
        seen.add(line["custom_id"])
        lines.append(line)
    if len(lines) > limit:
        return lines, (
            "too_many_requests",
            f"the input file has {len(lines)} requests; at most {limit} a batch",
        )
    return lines, None


def _batch(request: web.Request, st: BatchState) -> MockBatch | web.Response:
    st.advance(time.time())
    return _found(st.batches, request.match_info["batch_id"], "Batch")


async def get_batch(request: web.Request, st: BatchState, flavour: str) -> web.Response:
    found = _batch(request, st)
    return found if isinstance(found, web.Response) else web.json_response(found.json())


async def cancel_batch(request: web.Request, st: BatchState, flavour: str) -> web.Response:
    found = _batch(request, st)
    if isinstance(found, web.Response):
        return found
    if found.status not in ("validating", "in_progress"):
        return _invalid(f"a batch that is {found.status} cannot be cancelled")
    st.counters["cancel_requests"] += 1
    found.cancel_at = time.time()
    st.advance(found.cancel_at)
    return web.json_response(found.json())


async def list_batches(request: web.Request, st: BatchState, flavour: str) -> web.Response:
    st.advance(time.time())
    newest_first = list(reversed(st.batches.values()))
    after = request.query.get("after")
    if after in st.batches:
        newest_first = newest_first[[b.id for b in newest_first].index(after) + 1 :]
    limit = max(1, min(100, int(request.query.get("limit", "20"))))
    page = newest_first[:limit]
    return web.json_response(
        {
            "object": "list",
            "data": [b.json() for b in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(newest_first) > limit,
        }
    )


def _apply_config(st: BatchState, changes: dict[str, Any]) -> dict[str, Any]:
    st.config.update(changes)
    return asdict(st.config)


def add_batch_routes(app: web.Application) -> None:
    """Registers the Files and Batches routes of every flavour and their admin routes."""
    app[BATCHES] = BatchState(app[state.STATE])
    routes = app.router
    for prefix, _, _ in FLAVOURS.values():
        routes.add_post(f"{prefix}/files", _api(upload))
        routes.add_get(f"{prefix}/files/{{file_id}}", _api(file_info))
        routes.add_get(f"{prefix}/files/{{file_id}}/content", _api(file_content))
        routes.add_delete(f"{prefix}/files/{{file_id}}", _api(file_delete))
        routes.add_post(f"{prefix}/batches", _api(create_batch))
        routes.add_get(f"{prefix}/batches", _api(list_batches))
        routes.add_get(f"{prefix}/batches/{{batch_id}}", _api(get_batch))
        routes.add_post(f"{prefix}/batches/{{batch_id}}/cancel", _api(cancel_batch))
    add_admin_routes(app, "/_mock/batches", BATCHES, _apply_config)
