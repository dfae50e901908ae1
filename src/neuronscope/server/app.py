"""The FastAPI app: every Monitor view as a JSON endpoint (in the OpenAPI schema) plus the static page at /.

`create_app(monitor)` builds it; `neuronscope serve MODEL --atlas DIR` runs it with uvicorn on 127.0.0.1.
Bad input never gives a 500: NeuronscopeError -> 400 (an over-long field too: the sentence says the limit), an unknown
session -> 404, a malformed request -> 422, a body over the limit -> 413, a foreign Host -> 400, a full server -> 503,
each as JSON {"error": "<one sentence>"}. Sessions belong to the client token that made them (`guard.py`): another
client asking for one gets the same 404 as for a session that does not exist.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, Optional

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import NeuronscopeError
from . import schemas as S
from .guard import LOOPBACK, Guard
from .limits import DEFAULT as L
from .monitor import Monitor
from .sessions import Session, StoreFull

STATIC = Path(__file__).parent / "static"
ERRORS = {400: {"model": S.ErrorOut, "description": "Bad input"},
          404: {"model": S.ErrorOut, "description": "Unknown session or steering"},
          413: {"model": S.ErrorOut, "description": "Request body too large"},
          422: {"model": S.ErrorOut, "description": "Malformed request"}}
CREATE = {**ERRORS, 503: {"model": S.ErrorOut, "description": "Every session slot is taken by other clients"}}
TOO_LONG = ("string_too_long", "too_long")
SSE = {200: {"description": "Server-sent events (stream=true) or one JSON reply (stream=false)",
             "content": {"text/event-stream": {"schema": {  # one server-sent event: data is a JSON event
                 "type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}},
                         "application/json": {"schema": S.ChatOut.model_json_schema()}}}}


class NotFound(Exception):
    pass


def create_app(monitor: Monitor, *, allowed_hosts: Iterable[str] | None = LOOPBACK) -> FastAPI:
    """The app; `allowed_hosts` are the Host names it answers to (None: any; default: this machine's names)."""
    app = FastAPI(title="neuronscope Monitor", version="0.2.0",
                  description="Watch neurons fire, attribute tokens to neurons, and steer by concept.")
    app.state.monitor = monitor
    app.add_middleware(Guard, max_body_bytes=monitor.limits.max_body_bytes,
                       allowed_hosts=None if allowed_hosts is None else set(allowed_hosts))

    @app.exception_handler(StoreFull)
    async def _full(request: Request, exc: StoreFull):
        return JSONResponse({"error": str(exc)}, status_code=503)

    @app.exception_handler(NeuronscopeError)
    async def _bad(request: Request, exc: NeuronscopeError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(NotFound)
    async def _nf(request: Request, exc: NotFound):
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        long = next((e for e in errs if e.get("type") in TOO_LONG), None)
        if long is not None:  # over-long input is bad input (400), and the sentence says the limit
            what = ".".join(str(x) for x in long.get("loc", ()) if x not in ("body", "query")) or "a field"
            limit = (long.get("ctx") or {}).get("max_length")
            got = long.get("input")
            unit = "characters" if long.get("type") == "string_too_long" else "items"
            n = f" has {len(got)} {unit}" if isinstance(got, (str, list)) else " is too long"
            return JSONResponse({"error": f"The {what}{n}; the limit is {limit} {unit}."}, status_code=400)
        msg = f"Invalid request: {where}: {first.get('msg', 'malformed')}." if where else "Invalid request."
        detail = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in errs]
        return JSONResponse({"error": msg, "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # a bug, not bad input: still JSON with a sentence
        return JSONResponse({"error": f"Internal error ({type(exc).__name__}); please report it."}, status_code=500)

    def client(request: Request) -> str | None:
        return getattr(request.state, "client", None)

    def session(sid: str, request: Request) -> Session:
        s = monitor.sessions.get(sid, client(request))
        if s is None:
            raise NotFound(f"No session '{sid[:40]}': it expired or never existed; start a new one.")
        return s

    # ---- page -----------------------------------------------------------------------------------------------
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    # ---- model and sessions -----------------------------------------------------------------------------
    @app.get("/api/info", response_model=S.InfoOut, tags=["model"])
    def info():
        """The model, what the atlas provides (atlas, stats, descriptions), notes on what is missing, limits."""
        return monitor.info()

    @app.post("/api/sessions", response_model=S.StateOut, status_code=201, responses=CREATE, tags=["sessions"])
    def new_session(request: Request):
        """Start a session of this client (its own conversation, steerings and caches; expires when idle)."""
        return monitor.state(monitor.sessions.create(client(request)))

    @app.post("/api/sessions/import", response_model=S.StateOut, status_code=201, responses=CREATE,
              tags=["sessions"])
    def import_session(body: S.ImportIn, request: Request):
        """A new session from an export (same model fingerprint): its conversation and steerings."""
        s = monitor.sessions.create(client(request))
        try:
            return monitor.import_session(s, body.model_dump())
        except NeuronscopeError:
            monitor.sessions.delete(s.id, client(request))
            raise

    @app.get("/api/sessions/{sid}", response_model=S.StateOut, responses=ERRORS, tags=["sessions"])
    def get_session(sid: str, request: Request):
        """The conversation, steerings and the answer being generated (if any): what a reloaded page restores."""
        return monitor.state(session(sid, request))

    @app.get("/api/sessions/{sid}/export", response_model=S.ExportOut, responses=ERRORS, tags=["sessions"])
    def export_session(sid: str, request: Request):
        """The session as JSON (conversation with exact answer ids, steerings, model fingerprint) to import later."""
        return monitor.export(session(sid, request))

    @app.delete("/api/sessions/{sid}", response_model=S.OkOut, responses=ERRORS, tags=["sessions"])
    def delete_session(sid: str, request: Request):
        if not monitor.sessions.delete(sid, client(request)):
            raise NotFound(f"No session '{sid[:40]}'.")
        return {"ok": True}

    @app.post("/api/sessions/{sid}/reset", response_model=S.StateOut, responses=ERRORS, tags=["chat"])
    def new_chat(sid: str, request: Request):
        """New chat: clear the conversation (steerings of generated tokens stay)."""
        s = session(sid, request)
        monitor.new_chat(s)
        return monitor.state(s)

    # ---- chat ---------------------------------------------------------------------------------------------
    def _reply(events: Iterator[dict], stream: bool):
        if stream:
            def sse():
                for ev in events:
                    yield f"data: {json.dumps(ev)}\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        done = None
        for ev in events:
            if ev["type"] == "error":
                raise NeuronscopeError(ev["error"])
            if ev["type"] == "done":
                done = ev
        return JSONResponse({k: done[k] for k in ("text", "n_tokens", "finish_reason", "version", "steered")})

    @app.post("/api/sessions/{sid}/chat", responses={**ERRORS, **SSE}, response_class=StreamingResponse,
              tags=["chat"])
    def chat(sid: str, body: S.ChatIn, request: Request):
        """Send a message and stream the answer token by token (events: token..., done; or error). The answer is
        finished and kept on the server even if the client goes away."""
        events = monitor.send(session(sid, request), body.message, max_new_tokens=body.max_new_tokens,
                              temperature=body.temperature, seed=body.seed)
        return _reply(events, body.stream)

    @app.post("/api/sessions/{sid}/regenerate", responses={**ERRORS, **SSE}, response_class=StreamingResponse,
              tags=["chat"])
    def regenerate(sid: str, body: S.GenerateIn, request: Request):
        """Answer the last message again with the current steerings; the old answer is kept beside it."""
        events = monitor.regenerate(session(sid, request), max_new_tokens=body.max_new_tokens,
                                    temperature=body.temperature, seed=body.seed)
        return _reply(events, body.stream)

    # ---- views ----------------------------------------------------------------------------------------------
    @app.get("/api/sessions/{sid}/tokens", response_model=S.TokensOut, responses=ERRORS, tags=["views"])
    def tokens(sid: str, request: Request):
        """Every token of the conversation with its probability and the top-5 predicted at its own position."""
        return monitor.tokens(session(sid, request))

    @app.get("/api/sessions/{sid}/activations", response_model=S.ActivationsOut, responses=ERRORS, tags=["views"])
    def activations(sid: str, request: Request, start: Optional[int] = Query(None, ge=0),
                    end: Optional[int] = Query(None, ge=0),
                    sort: str = Query("activation", pattern="^(activation|layer|neuron|count)$"),
                    order: str = Query("desc", pattern="^(asc|desc)$"), page: int = Query(0, ge=0, le=10 ** 6),
                    page_size: int = Query(50, ge=1, le=L.max_page_size),
                    filter: str = Query("", max_length=L.max_filter_chars),
                    polarity: Optional[str] = Query(None, pattern="^(pos|neg)$"),
                    content_only: bool = Query(False, description="Only the messages' own tokens (no template, "
                                                                  "system prompt or separators)."),
                    interpretable: bool = Query(False, description="Only neurons with an interpretable description.")):
        """Neurons beyond their extreme quantiles in the token range [start, end), one row per neuron/polarity."""
        return monitor.activations(session(sid, request), start=start, end=end, sort=sort, order=order, page=page,
                                   page_size=page_size, filter=filter, polarity=polarity, content_only=content_only,
                                   interpretable=interpretable)

    @app.get("/api/sessions/{sid}/attribution", response_model=S.AttributionOut, responses=ERRORS, tags=["views"])
    def attribution(sid: str, request: Request, position: int = Query(..., ge=0),
                    token_id: Optional[int] = Query(None, ge=0), page: int = Query(0, ge=0, le=10 ** 6),
                    page_size: int = Query(50, ge=1, le=L.max_page_size)):
        """Neurons that caused the token at `position`: top 1000 by |activation x d p(token) / d activation|."""
        return monitor.attribution(session(sid, request), position, token_id, page=page, page_size=page_size)

    @app.get("/api/sessions/{sid}/clusters", response_model=S.ClustersOut, responses=ERRORS, tags=["views"])
    def clusters(sid: str, request: Request, start: Optional[int] = Query(None, ge=0),
                 end: Optional[int] = Query(None, ge=0), content_only: bool = Query(False),
                 interpretable: bool = Query(False),
                 sort: str = Query("activation", pattern="^(activation|attribution|size)$"),
                 position: Optional[int] = Query(None, ge=0, description="Token to rank clusters by attribution to.")):
        """The active concepts: firing neurons grouped into named clusters, with size, summed activation and
        (with `position`) attribution to that token."""
        return monitor.clusters(session(sid, request), start, end, content_only=content_only,
                                interpretable=interpretable, sort=sort, position=position)

    @app.get("/api/neurons/{layer}/{neuron}", response_model=S.NeuronOut, responses=ERRORS, tags=["neurons"])
    def neuron(layer: int, neuron: int, n_exemplars: int = Query(10, ge=0, le=L.max_exemplars),
               marks: bool = Query(True, description="Mark each exemplar token's activation (a forward of the "
                                                     "exemplar windows); false answers without a model call.")):
        """A neuron's decodes (atlas), description and top exemplars with the firing tokens marked."""
        return monitor.neuron(layer, neuron, n_exemplars, marks)

    @app.get("/api/concepts", response_model=S.ConceptsOut, responses=ERRORS, tags=["neurons"])
    def concepts(q: str = Query(..., min_length=1, max_length=L.max_concept_chars),
                 k: int = Query(50, ge=1, le=L.max_steer_neurons)):
        """Neurons for a concept: atlas decode search plus description text search."""
        return monitor.concepts(q, k)

    # ---- steering -----------------------------------------------------------------------------------------
    @app.get("/api/sessions/{sid}/steerings", response_model=list[S.SteeringOut], responses=ERRORS,
             tags=["steering"])
    def list_steerings(sid: str, request: Request):
        return monitor.state(session(sid, request))["steerings"]

    @app.post("/api/sessions/{sid}/steerings", response_model=S.SteeringOut, status_code=201, responses=ERRORS,
              tags=["steering"])
    def add_steering(sid: str, body: S.SteeringIn, request: Request):
        """Steer by a concept (or explicit neurons, e.g. a cluster's): strengthen, suppress or clamp, on prompt
        ranges and/or generated tokens. Takes effect on the next (re)generation."""
        return monitor.add_steering(session(sid, request), mode=body.mode, concept=body.concept,
                                    neurons=body.neurons, strength=body.strength, value=body.value,
                                    n_neurons=body.n_neurons, ranges=body.ranges, generated=body.generated,
                                    label=body.label, enabled=body.enabled)

    @app.patch("/api/sessions/{sid}/steerings/{steering_id}", response_model=S.SteeringOut, responses=ERRORS,
               tags=["steering"])
    def patch_steering(sid: str, steering_id: str, body: S.SteeringPatchIn, request: Request):
        """Switch a steering off or on again without retyping it."""
        st = monitor.set_steering(session(sid, request), steering_id, body.enabled)
        if st is None:
            raise NotFound(f"No steering '{steering_id[:40]}' in this session.")
        return st

    @app.delete("/api/sessions/{sid}/steerings/{steering_id}", response_model=S.OkOut, responses=ERRORS,
                tags=["steering"])
    def remove_steering(sid: str, steering_id: str, request: Request):
        if not monitor.remove_steering(session(sid, request), steering_id):
            raise NotFound(f"No steering '{steering_id[:40]}' in this session.")
        return {"ok": True}

    return app
