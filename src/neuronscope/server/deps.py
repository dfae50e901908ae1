"""What every route asks of its request: the app's Monitor, the client token (set by `guard.Guard`) and a session
of that client (another client's session is the same 404 as one that does not exist)."""
from __future__ import annotations

from fastapi import Request

from .http_errors import NotFound
from .monitor import Monitor
from .sessions import Session


def monitor_of(request: Request) -> Monitor:
    """The Monitor the app was made for (`create_app`)."""
    mon: Monitor = request.app.state.monitor
    return mon


def client_of(request: Request) -> str | None:
    """The request's client token (None outside the Guard middleware)."""
    token: str | None = getattr(request.state, "client", None)
    return token


def session_of(request: Request, sid: str) -> Session:
    """The client's session `sid`, else a 404."""
    s = monitor_of(request).sessions.get(sid, client_of(request))
    if s is None:
        raise NotFound(f"No session '{sid[:40]}': it expired or never existed; start a new one.")
    return s
