"""The FastAPI app: every Monitor view as a JSON endpoint (in the OpenAPI schema) plus the static page at /.

`create_app(monitor)` builds it; `neuronscope serve MODEL --atlas DIR` runs it with uvicorn on 127.0.0.1.
The routes live by area (routes_sessions, routes_chat, routes_views, routes_steering) and find the Monitor on the
app (`deps.py`). Bad input never gives a 500: NeuronscopeError -> 400 (an over-long field too: the sentence says the
limit), an unknown session -> 404, a malformed request -> 422, a body over the limit -> 413, a foreign Host -> 400, a
full server -> 503, each as JSON {"error": "<one sentence>"} (`http_errors.py`). Sessions belong to the client token
that made them (`guard.py`): another client asking for one gets the same 404 as for a session that does not exist.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from . import routes_chat, routes_sessions, routes_steering, routes_views
from .guard import LOOPBACK, Guard
from .http_errors import NotFound, add_error_handlers
from .monitor import Monitor

STATIC = Path(__file__).parent / "static"

__all__ = ["create_app", "NotFound", "STATIC"]


def index() -> FileResponse:
    return FileResponse(STATIC / "index.html")


def create_app(monitor: Monitor, *, allowed_hosts: Iterable[str] | None = LOOPBACK) -> FastAPI:
    """The app; `allowed_hosts` are the Host names it answers to (None: any; default: this machine's names)."""
    app = FastAPI(title="neuronscope Monitor", version="0.2.0",
                  description="Watch neurons fire, attribute tokens to neurons, and steer by concept.")
    app.state.monitor = monitor
    app.add_middleware(Guard, max_body_bytes=monitor.limits.max_body_bytes,
                       allowed_hosts=None if allowed_hosts is None else set(allowed_hosts))
    add_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    for area in (routes_sessions, routes_chat, routes_views, routes_steering):
        app.include_router(area.router)
    return app
