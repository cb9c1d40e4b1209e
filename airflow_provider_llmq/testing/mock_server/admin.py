"""The mock's admin routes (stats, reset, config) for a piece of server state, in one shape for the
chat state (``/_mock/...``) and the batch store (``/_mock/batches/...``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web

from .responses import error


class _Administered(Protocol):
    def snapshot(self) -> dict[str, Any]: ...

    def reset(self) -> None: ...


def add_admin_routes(
    app: web.Application,
    prefix: str,
    key: web.AppKey[Any],
    apply: Callable[[Any, dict[str, Any]], dict[str, Any]],
) -> None:
    """``GET {prefix}/stats``, ``POST {prefix}/reset`` and ``POST {prefix}/config`` for ``app[key]``;
    ``apply(state, changes)`` updates its config (raising ValueError / TypeError on a bad one) and
    returns the config to show."""

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(request.app[key].snapshot())

    async def reset(request: web.Request) -> web.Response:
        request.app[key].reset()
        return web.json_response({"ok": True})

    async def config(request: web.Request) -> web.Response:
        state: _Administered = request.app[key]
        try:
            changes = await request.json() if request.can_read_body else {}
            if not isinstance(changes, dict):
                raise TypeError("config body must be a JSON object")
            shown = apply(state, changes)
        except (ValueError, TypeError) as exc:
            return error(400, "invalid_config", str(exc), type="invalid_request_error")
        return web.json_response(shown)

    app.router.add_get(f"{prefix}/stats", stats)
    app.router.add_post(f"{prefix}/reset", reset)
    app.router.add_post(f"{prefix}/config", config)
