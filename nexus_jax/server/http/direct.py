"""POST /v1/completions and /v1/chat/completions served as plain ASGI, in front of the FastAPI app.

Every generation comes through these two routes, and FastAPI's routing, middleware and dependency injection cost
~0.8 ms per request on a 2-core CPU (a typed endpoint that streams one fixed event answers in 1.8 ms, the same body
parse and event as plain ASGI in 1.0 ms), most of issue 18's 1 ms budget for the whole HTTP path. So they skip
it: the body is validated by the same pydantic models, errors take the same OpenAI schema (401 before 400, as the
bearer dependency ran before the body), and every other path (models, tokenize, health, metrics, unknown routes)
is FastAPI's.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Awaitable, Callable

from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from nexus_jax.server.http.errors import APIError, validation_error
from nexus_jax.server.http.generation import ClientWatch

log = logging.getLogger(__name__)

# A route's handler: (validated body, its client's watch, x-program-id, x-thread-id) -> the response.
Handler = Callable[[Any, ClientWatch, "str | None", "str | None"], Awaitable[Response]]


class _ClientGone(Exception):
    """The client disconnected before its body arrived."""


def authorized(header: str | None, token: str) -> bool:
    """Whether an Authorization header value carries `Bearer <token>` (compared in constant time)."""
    return header is not None and hmac.compare_digest(header.encode(), f"Bearer {token}".encode())


def unauthorized() -> APIError:
    return APIError(401, "missing or wrong bearer token (send Authorization: Bearer <token>)", code="invalid_api_key")


class GenerationRoutes:
    """The ASGI app the server runs: `routes` (path -> body model, handler) here, anything else to `fallback`."""

    def __init__(self, fallback: ASGIApp, routes: dict[str, tuple[type[BaseModel], Handler]],
                 auth_token: str | None):
        self.fallback, self.routes, self.auth_token = fallback, routes, auth_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            await self.fallback(scope, receive, send)
            return
        watch: ClientWatch | None = None
        try:
            body, program, thread = await self._parse(scope, receive, route[0])
            watch = ClientWatch(receive)
            response = await route[1](body, watch, program, thread)
        except APIError as e:
            response = e.response()
        except _ClientGone:
            return
        except Exception:  # a bug: answered in the API's schema, and logged with its trace
            log.exception("%s failed", scope["path"])
            response = APIError(500, "internal server error", type="internal_server_error").response()
        try:
            await response(scope, receive, send)
        finally:
            if watch is not None:
                watch.close()

    async def _parse(self, scope: Scope, receive: Receive, model: type[BaseModel]) -> tuple[Any, str | None,
                                                                                         str | None]:
        """The validated body and the program and thread headers; APIError 405/401/400."""
        if scope["method"] != "POST":
            raise APIError(405, f"{scope['path']} takes POST", headers={"Allow": "POST"})
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if self.auth_token is not None and not authorized(headers.get("authorization"), self.auth_token):
            raise unauthorized()
        try:
            body = model.model_validate_json(await _read_body(receive))
        except ValidationError as e:
            raise validation_error(e.errors(include_url=False)) from None
        return body, headers.get("x-program-id"), headers.get("x-thread-id")


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)
