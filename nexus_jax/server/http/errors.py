"""Errors in OpenAI's schema: `{"error": {"message", "type", "param", "code"}}` with the HTTP status."""

from __future__ import annotations

from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class APIError(Exception):
    """An error answered with `status` and OpenAI's error body; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def field_of(message: str, fields: set[str]) -> str | None:
    """The request field a validation message starts with ("max_tokens must be >= 1, ..."), if it names one."""
    head = message.split(" ", 1)[0]
    return head if head in fields else None


def validation_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """Pydantic's first complaint, as a 400 naming the field (its dotted path in the body)."""
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return bad_request(f"unrecognized request argument: {param}", param)
    if first.get("type") == "json_invalid":
        return bad_request(f"the body is not valid JSON: {first.get('msg')}")
    where = f"{param}: " if param else ""
    return bad_request(f"{where}{first.get('msg')}", param)


def install_handlers(app: FastAPI) -> None:
    """Every error the app answers (bad bodies, unknown routes included) in OpenAI's schema."""
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors()).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers).response()
