"""A local Entra ID token authority over TLS, and a managed-identity endpoint, for offline tests.

``azure-identity`` is pointed at it (``authority=https://127.0.0.1:PORT``,
``disable_instance_discovery=True``, its CA as ``connection_verify``) and gets real answers over
real sockets:

- ``GET /{tenant}/v2.0/.well-known/openid-configuration`` (what MSAL asks first);
- ``POST /{tenant}/oauth2/v2.0/token`` (client credentials: a secret, or a certificate's signed
  assertion), answered ``{"token_type": "Bearer", "expires_in": N, "access_token": ...}``; a wrong
  secret gets ``401 invalid_client`` with ``AADSTS7000215``, as Entra answers;
- on a second, plain-HTTP port, the App Service managed-identity form: ``GET /msi/token`` with the
  ``X-IDENTITY-HEADER`` header (set ``IDENTITY_ENDPOINT`` and ``IDENTITY_HEADER`` to
  :attr:`TokenAuthority.identity_endpoint` and :attr:`TokenAuthority.identity_header`).

Tokens are ``llmq-test-token.<expiry ms>.<nonce>.<hmac>``, signed with a key the resource server
shares: the mock server signs with its API key, so it accepts exactly the tokens issued for it and
refuses expired ones (:func:`check_token`). Nothing here decodes a token on the client side: as for
Entra's, a client must treat it as opaque.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import ssl
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

TOKEN_PREFIX = "llmq-test-token"
_JSON = "application/json"


def issue_token(key: str, lifetime: float) -> str:
    """A token valid for ``lifetime`` seconds from now, signed with ``key``."""
    payload = f"{int((time.time() + lifetime) * 1000)}.{secrets.token_hex(8)}"
    return f"{TOKEN_PREFIX}.{payload}.{_sign(key, payload)}"


def check_token(token: str, key: str) -> str | None:
    """Why ``token`` is refused (``"malformed"``, ``"bad signature"``, ``"expired"``), or None."""
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != TOKEN_PREFIX or not parts[1].isdigit():
        return "malformed"
    payload = f"{parts[1]}.{parts[2]}"
    if not hmac.compare_digest(parts[3], _sign(key, payload)):
        return "bad signature"
    if int(parts[1]) <= time.time() * 1000:
        return "expired"
    return None


def _sign(key: str, payload: str) -> str:
    return hmac.new(key.encode(), payload.encode(), hashlib.sha256).hexdigest()[:32]


def _aad_error(status: int, error: str, code: int, description: str) -> web.Response:
    body = {
        "error": error,
        "error_description": f"AADSTS{code}: {description}\r\nTrace ID: {secrets.token_hex(8)}",
        "error_codes": [code],
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
    }
    return web.Response(status=status, body=json.dumps(body), content_type=_JSON)


class TokenAuthority:
    """The authority in a background thread with its own event loop (like the mock server's runner).

    :param signing_key: what tokens are signed with: the resource server's shared key (the mock
        server's API key).
    :param clients: client id -> its secret, or ``None`` for a client that authenticates with a
        certificate (its assertion must name the client).
    :param lifetime: seconds a token lives (``expires_in``); change it with :meth:`configure`.
    :param identity_header: what the managed-identity endpoint expects in ``X-IDENTITY-HEADER``.
    """

    def __init__(
        self,
        signing_key: str,
        clients: Mapping[str, str | None] | None = None,
        *,
        lifetime: int = 3600,
        identity_header: str = "llmq-identity-header-5b2e",
        cert_dir: str | None = None,
    ) -> None:
        self.signing_key = signing_key
        self.clients = dict(clients or {})
        self.lifetime = lifetime
        # what the answer claims, when it differs: a token revoked early, or refused by a resource
        # whose clock runs ahead (the client then meets a 401 before it thinks the token expired)
        self.reported_lifetime: int | None = None
        self.identity_header = identity_header
        self._cert_dir = cert_dir
        self.counts: Counter[str] = Counter()  # touched on the loop thread only
        self.issued: list[str] = []  # every token handed out, for leak checks
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.authority_url = self.identity_endpoint = ""
        self.ca_path = ""

    # -- routes -----------------------------------------------------------------------------------
    async def _openid(self, request: web.Request) -> web.Response:
        self.counts["discovery"] += 1
        tenant = request.match_info["tenant"]
        base = f"{self.authority_url}/{tenant}"
        return web.json_response(
            {
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "issuer": f"{base}/v2.0",
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
            }
        )

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        client_id = str(form.get("client_id") or "")
        if form.get("grant_type") != "client_credentials" or client_id not in self.clients:
            self.counts["refused"] += 1
            return _aad_error(400, "unauthorized_client", 700016, f"Application '{client_id}' not found.")
        expected = self.clients[client_id]
        if expected is None:
            ok = _assertion_names(str(form.get("client_assertion") or ""), client_id)
        else:
            ok = hmac.compare_digest(str(form.get("client_secret") or "").encode(), expected.encode())
        if not ok:
            self.counts["refused"] += 1
            return _aad_error(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the client "
                f"secret value, not the client secret ID, for a secret added to app '{client_id}'.",
            )
        claimed = self.reported_lifetime or self.lifetime
        return self._grant("token_requests", {"expires_in": claimed, "ext_expires_in": claimed})

    async def _managed_identity(self, request: web.Request) -> web.Response:
        if request.headers.get("X-IDENTITY-HEADER") != self.identity_header:
            self.counts["refused"] += 1
            return web.json_response({"statusCode": 401, "message": "missing identity header"}, status=401)
        resource = request.query.get("resource", "")
        # App Service reports the expiry in whole seconds: floored, the client thinks it earlier
        expires_on = int(time.time() + (self.reported_lifetime or self.lifetime))
        return self._grant("identity_requests", {"expires_on": str(expires_on), "resource": resource})

    def _grant(self, counter: str, fields: dict[str, Any]) -> web.Response:
        self.counts[counter] += 1
        token = issue_token(self.signing_key, self.lifetime)
        self.issued.append(token)
        return web.json_response({"token_type": "Bearer", "access_token": token, **fields})

    # -- running ----------------------------------------------------------------------------------
    def start(self) -> TokenAuthority:
        import trustme

        cert_dir = Path(self._cert_dir or tempfile.mkdtemp(prefix="llmq-authority-"))
        ca = trustme.CA()
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
        self.ca_path = str(cert_dir / "authority-ca.pem")
        ca.cert_pem.write_to_path(self.ca_path)
        app = web.Application()
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self._openid)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        app.router.add_get("/msi/token", self._managed_identity)
        loop = self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def serve() -> None:
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
            await self._runner.setup()
            tls = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=server_ctx)
            await tls.start()
            plain = web.TCPSite(self._runner, "127.0.0.1", 0)
            await plain.start()
            (_, tls_port), (_, plain_port) = (a[:2] for a in self._runner.addresses)
            self.authority_url = f"https://127.0.0.1:{tls_port}"
            self.identity_endpoint = f"http://127.0.0.1:{plain_port}/msi/token"

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(serve())
            ready.set()
            loop.run_forever()
            if self._runner is not None:
                loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="llmq-token-authority", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the token authority did not start")
        return self

    def stop(self) -> None:
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._thread = None

    def _on_loop(self, fn: Any) -> Any:
        assert self._loop is not None

        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=10)

    def stats(self) -> dict[str, int]:
        """``token_requests`` (tokens granted to a client), ``identity_requests`` (to the managed
        identity), ``refused``, ``discovery``."""
        return dict(self._on_loop(lambda: dict(self.counts)))

    def reset(self) -> None:
        self._on_loop(self.counts.clear)

    def configure(
        self,
        *,
        lifetime: int | None = None,
        reported_lifetime: int | None = None,
        signing_key: str | None = None,
    ) -> None:
        """``lifetime``: seconds a token lives; ``reported_lifetime``: what the answers claim (0: the
        truth); ``signing_key``: sign with another key (a resource then refuses every token)."""

        def apply() -> None:
            if lifetime is not None:
                self.lifetime = lifetime
            if reported_lifetime is not None:
                self.reported_lifetime = reported_lifetime or None
            if signing_key is not None:
                self.signing_key = signing_key

        self._on_loop(apply)

    def __enter__(self) -> TokenAuthority:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _assertion_names(assertion: str, client_id: str) -> bool:
    """Whether a client assertion (a JWT) is issued by and for ``client_id``. Its signature is not
    checked: the test is of llmq handing the certificate to azure-identity, not of MSAL's JWT."""
    try:
        payload = assertion.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return False
    return bool(claims.get("iss") == client_id and claims.get("sub") == client_id)


__all__ = ["TOKEN_PREFIX", "TokenAuthority", "check_token", "issue_token"]
