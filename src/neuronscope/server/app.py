"""The FastAPI app: every Monitor view as a JSON endpoint (in the OpenAPI schema) plus the static page at /.

`create_app(monitor)` builds it; `neuronscope serve MODEL --atlas DIR` runs it with uvicorn on 127.0.0.1.
Bad input never gives a 500: NeuronscopeError -> 400, an unknown session -> 404, a malformed request -> 422, each as
JSON {"error": "<one sentence>"}.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import NeuronscopeError
from . import schemas as S
from .monitor import Monitor
from .sessions import Session

STATIC = Path(__file__).parent / "static"
ERRORS = {400: {"model": S.ErrorOut, "description": "Bad input"},
          404: {"model": S.ErrorOut, "description": "Unknown session or steering"},
          422: {"model": S.ErrorOut, "description": "Malformed request"}}
SSE = {200: {"description": "Server-sent events (stream=true) or one JSON reply (stream=false)",
             "content": {"text/event-stream": {"schema": {"type": "string"}},
                         "application/json": {"schema": S.ChatOut.model_json_schema()}}}}


class NotFound(Exception):
    pass


def create_app(monitor: Monitor) -> FastAPI:
    app = FastAPI(title="neuronscope Monitor", version="0.1.0",
                  description="Watch neurons fire, attribute tokens to neurons, and steer by concept.")
    app.state.monitor = monitor

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
        msg = f"Invalid request: {where}: {first.get('msg', 'malformed')}." if where else "Invalid request."
        detail = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in errs]
        return JSONResponse({"error": msg, "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # a bug, not bad input: still JSON with a sentence
        return JSONResponse({"error": f"Internal error ({type(exc).__name__}); please report it."}, status_code=500)

    def session(sid: str) -> Session:
        s = monitor.sessions.get(sid)
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

    @app.post("/api/sessions", response_model=S.StateOut, status_code=201, tags=["sessions"])
    def new_session():
        """Start a session (its own conversation, steerings and caches; expires when idle)."""
        return monitor.state(monitor.sessions.create())

    @app.get("/api/sessions/{sid}", response_model=S.StateOut, responses=ERRORS, tags=["sessions"])
    def get_session(sid: str):
        return monitor.state(session(sid))

    @app.delete("/api/sessions/{sid}", response_model=S.OkOut, responses=ERRORS, tags=["sessions"])
    def delete_session(sid: str):
        if not monitor.sessions.delete(sid):
            raise NotFound(f"No session '{sid[:40]}'.")
        return {"ok": True}

    @app.post("/api/sessions/{sid}/reset", response_model=S.StateOut, responses=ERRORS, tags=["chat"])
    def new_chat(sid: str):
        """New chat: clear the conversation (steerings of generated tokens stay)."""
        s = session(sid)
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
    def chat(sid: str, body: S.ChatIn):
        """Send a message and stream the answer token by token (events: token..., done; or error)."""
        events = monitor.send(session(sid), body.message, max_new_tokens=body.max_new_tokens,
                              temperature=body.temperature, seed=body.seed)
        return _reply(events, body.stream)

    @app.post("/api/sessions/{sid}/regenerate", responses={**ERRORS, **SSE}, response_class=StreamingResponse,
              tags=["chat"])
    def regenerate(sid: str, body: S.GenerateIn):
        """Answer the last message again (with the current steerings)."""
        events = monitor.regenerate(session(sid), max_new_tokens=body.max_new_tokens,
                                    temperature=body.temperature, seed=body.seed)
        return _reply(events, body.stream)

    # ---- views ----------------------------------------------------------------------------------------------
    @app.get("/api/sessions/{sid}/tokens", response_model=S.TokensOut, responses=ERRORS, tags=["views"])
    def tokens(sid: str):
        """Every token of the conversation with its top-5 next-token probabilities."""
        return monitor.tokens(session(sid))

    @app.get("/api/sessions/{sid}/activations", response_model=S.ActivationsOut, responses=ERRORS, tags=["views"])
    def activations(sid: str, start: Optional[int] = Query(None, ge=0), end: Optional[int] = Query(None, ge=0),
                    sort: str = Query("activation", pattern="^(activation|layer|neuron|count)$"),
                    order: str = Query("desc", pattern="^(asc|desc)$"), page: int = Query(0, ge=0, le=10 ** 6),
                    page_size: int = Query(50, ge=1, le=1000), filter: str = Query("", max_length=200),
                    polarity: Optional[str] = Query(None, pattern="^(pos|neg)$")):
        """Neurons beyond their extreme quantiles in the token range [start, end), one row per neuron/polarity."""
        return monitor.activations(session(sid), start=start, end=end, sort=sort, order=order, page=page,
                                   page_size=page_size, filter=filter, polarity=polarity)

    @app.get("/api/sessions/{sid}/attribution", response_model=S.AttributionOut, responses=ERRORS, tags=["views"])
    def attribution(sid: str, position: int = Query(..., ge=0), token_id: Optional[int] = Query(None, ge=0),
                    page: int = Query(0, ge=0, le=10 ** 6), page_size: int = Query(50, ge=1, le=1000)):
        """Neurons that caused the token at `position`: top 1000 by |activation x d p(token) / d activation|."""
        return monitor.attribution(session(sid), position, token_id, page=page, page_size=page_size)

    @app.get("/api/sessions/{sid}/clusters", response_model=S.ClustersOut, responses=ERRORS, tags=["views"])
    def clusters(sid: str, start: Optional[int] = Query(None, ge=0), end: Optional[int] = Query(None, ge=0)):
        """The active neurons grouped into named clusters of related neurons."""
        return monitor.clusters(session(sid), start, end)

    @app.get("/api/neurons/{layer}/{neuron}", response_model=S.NeuronOut, responses=ERRORS, tags=["neurons"])
    def neuron(layer: int, neuron: int, n_exemplars: int = Query(10, ge=0, le=50)):
        """A neuron's decodes (atlas), description and top exemplars with the firing tokens marked."""
        return monitor.neuron(layer, neuron, n_exemplars)

    @app.get("/api/concepts", response_model=S.ConceptsOut, responses=ERRORS, tags=["neurons"])
    def concepts(q: str = Query(..., min_length=1, max_length=200), k: int = Query(50, ge=1, le=1000)):
        """Neurons for a concept: atlas decode search plus description text search."""
        return monitor.concepts(q, k)

    # ---- steering -----------------------------------------------------------------------------------------
    @app.get("/api/sessions/{sid}/steerings", response_model=list[S.SteeringOut], responses=ERRORS,
             tags=["steering"])
    def list_steerings(sid: str):
        return monitor.state(session(sid))["steerings"]

    @app.post("/api/sessions/{sid}/steerings", response_model=S.SteeringOut, status_code=201, responses=ERRORS,
              tags=["steering"])
    def add_steering(sid: str, body: S.SteeringIn):
        """Steer by a concept (or explicit neurons): strengthen, suppress or clamp, on prompt ranges and/or
        generated tokens. Takes effect on the next (re)generation."""
        return monitor.add_steering(session(sid), mode=body.mode, concept=body.concept, neurons=body.neurons,
                                    strength=body.strength, value=body.value, n_neurons=body.n_neurons,
                                    ranges=body.ranges, generated=body.generated)

    @app.delete("/api/sessions/{sid}/steerings/{steering_id}", response_model=S.OkOut, responses=ERRORS,
                tags=["steering"])
    def remove_steering(sid: str, steering_id: str):
        if not monitor.remove_steering(session(sid), steering_id):
            raise NotFound(f"No steering '{steering_id[:40]}' in this session.")
        return {"ok": True}

    return app
