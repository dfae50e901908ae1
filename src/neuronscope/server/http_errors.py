"""The HTTP layer's error contract: every failure is JSON {"error": "<one sentence>"} with its status.

NeuronscopeError -> 400 (an over-long field too: the sentence says the limit), an unknown session or steering
(`NotFound`) -> 404, a malformed request -> 422 (with `detail`), a full server (`StoreFull`) -> 503, any other HTTP
error with its own status, and a bug -> 500 with the exception's type. The middleware (`guard.py`) answers 413 and a
foreign Host's 400 before a route runs.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import NeuronscopeError
from . import schemas as S
from .sessions import StoreFull

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": S.ErrorOut, "description": "Bad input"},
    404: {"model": S.ErrorOut, "description": "Unknown session or steering"},
    413: {"model": S.ErrorOut, "description": "Request body too large"},
    422: {"model": S.ErrorOut, "description": "Malformed request"}}
CREATE: dict[int | str, dict[str, Any]] = {
    **ERRORS, 503: {"model": S.ErrorOut, "description": "Every session slot is taken by other clients"}}
TOO_LONG = ("string_too_long", "too_long")


class NotFound(Exception):
    """A session or steering that does not exist (or belongs to another client): a 404."""


def error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def too_long_sentence(e: dict[str, Any]) -> str:
    """The sentence for a field over its length limit (from pydantic's error), naming the limit."""
    what = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query")) or "a field"
    limit = (e.get("ctx") or {}).get("max_length")
    got = e.get("input")
    unit = "characters" if e.get("type") == "string_too_long" else "items"
    n = f" has {len(got)} {unit}" if isinstance(got, (str, list)) else " is too long"
    return f"The {what}{n}; the limit is {limit} {unit}."


def invalid_request(exc: RequestValidationError) -> JSONResponse:
    """Over-long input is bad input (400, the sentence says the limit); anything else malformed is a 422."""
    errs = list(exc.errors())
    long = next((e for e in errs if e.get("type") in TOO_LONG), None)
    if long is not None:
        return error(too_long_sentence(long), 400)
    first = errs[0] if errs else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    msg = f"Invalid request: {where}: {first.get('msg', 'malformed')}." if where else "Invalid request."
    detail = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in errs]
    return JSONResponse({"error": msg, "detail": detail}, status_code=422)


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error of the app's routes as JSON with one sentence."""
    @app.exception_handler(StoreFull)
    async def _full(request: Request, exc: StoreFull) -> JSONResponse:
        return error(str(exc), 503)

    @app.exception_handler(NeuronscopeError)
    async def _bad(request: Request, exc: NeuronscopeError) -> JSONResponse:
        return error(str(exc), 400)

    @app.exception_handler(NotFound)
    async def _nf(request: Request, exc: NotFound) -> JSONResponse:
        return error(str(exc), 404)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid_request(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(str(exc.detail), exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:  # a bug, not bad input: still a sentence
        return error(f"Internal error ({type(exc).__name__}); please report it.", 500)
