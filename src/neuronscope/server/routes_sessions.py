"""Routes of the model and the sessions: info, start, import, read, export, delete."""
from __future__ import annotations

from fastapi import APIRouter, Request

from ..errors import NeuronscopeError
from . import schemas as S
from .deps import client_of, monitor_of, session_of
from .http_errors import CREATE, ERRORS, NotFound

router = APIRouter()


@router.get("/api/info", response_model=S.InfoOut, tags=["model"])
def info(request: Request) -> S.InfoOut:
    """The model, what the atlas provides (atlas, stats, descriptions), notes on what is missing, limits."""
    return monitor_of(request).info()


@router.post("/api/sessions", response_model=S.StateOut, status_code=201, responses=CREATE, tags=["sessions"])
def new_session(request: Request) -> S.StateOut:
    """Start a session of this client (its own conversation, steerings and caches; expires when idle)."""
    mon = monitor_of(request)
    return mon.state(mon.sessions.create(client_of(request)))


@router.post("/api/sessions/import", response_model=S.StateOut, status_code=201, responses=CREATE,
             tags=["sessions"])
def import_session(body: S.ImportIn, request: Request) -> S.StateOut:
    """A new session from an export (same model fingerprint): its conversation and steerings."""
    mon = monitor_of(request)
    s = mon.sessions.create(client_of(request))
    try:
        return mon.import_session(s, body.model_dump())
    except NeuronscopeError:
        mon.sessions.delete(s.id, client_of(request))
        raise


@router.get("/api/sessions/{sid}", response_model=S.StateOut, responses=ERRORS, tags=["sessions"])
def get_session(sid: str, request: Request) -> S.StateOut:
    """The conversation, steerings and the answer being generated (if any): what a reloaded page restores."""
    return monitor_of(request).state(session_of(request, sid))


@router.get("/api/sessions/{sid}/export", response_model=S.ExportOut, responses=ERRORS, tags=["sessions"])
def export_session(sid: str, request: Request) -> S.ExportOut:
    """The session as JSON (conversation with exact answer ids, steerings, model fingerprint) to import later."""
    return monitor_of(request).export(session_of(request, sid))


@router.delete("/api/sessions/{sid}", response_model=S.OkOut, responses=ERRORS, tags=["sessions"])
def delete_session(sid: str, request: Request) -> S.OkOut:
    if not monitor_of(request).sessions.delete(sid, client_of(request)):
        raise NotFound(f"No session '{sid[:40]}'.")
    return S.OkOut(ok=True)
