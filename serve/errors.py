"""Errors as OpenAI's API sends them, `{"error": {"message", "type", "param", "code"}}` with its status codes,
so the `openai` client raises its own exception classes (BadRequestError, AuthenticationError, ...) with our
message in them."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# status → OpenAI's error type (4xx not listed: invalid_request_error)
TYPES = {429: "rate_limit_exceeded", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    error = {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status)


def install_handlers(app: FastAPI) -> None:
    """Our errors, FastAPI's validation errors (one message naming the field) and Starlette's (unknown route,
    wrong method) all leave in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(error.status, error.message, error.param, error.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        param = ".".join(location) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):  # nothing a request sends takes the process down
        return error_response(500, f"internal error: {type(error).__name__}: {error}")
