"""Routes of the chat: a new chat, send a message, answer again; answers stream as server-sent events or come as
one JSON reply."""
from __future__ import annotations

import json
from typing import Any, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import NeuronscopeError
from . import schemas as S
from .chat import Event
from .deps import monitor_of, session_of
from .http_errors import ERRORS

router = APIRouter()
SSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "Server-sent events (stream=true; each event's data is a JSON TokenEvent, then a DoneEvent, "
                         "or an ErrorEvent) or one JSON reply (stream=false)",
          "content": {"text/event-stream": {"schema": {  # one server-sent event: data is a JSON event
              "type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}},
                      "application/json": {"schema": S.ChatOut.model_json_schema()}}}}


def reply(events: Iterator[Event], stream: bool) -> Response:
    """The answer's events as a stream of server-sent events, or (stream=False) its done event as JSON."""
    if stream:
        def sse() -> Iterator[str]:
            for ev in events:
                yield f"data: {json.dumps(ev.model_dump())}\n\n"
        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    for ev in events:
        if isinstance(ev, S.ErrorEvent):
            raise NeuronscopeError(ev.error)
        if isinstance(ev, S.DoneEvent):
            return JSONResponse(ev.model_dump(exclude={"type"}))  # a ChatOut
    raise NeuronscopeError("The answer ended without a result.")


@router.post("/api/sessions/{sid}/reset", response_model=S.StateOut, responses=ERRORS, tags=["chat"])
def new_chat(sid: str, request: Request) -> S.StateOut:
    """New chat: clear the conversation (steerings of generated tokens stay)."""
    mon, s = monitor_of(request), session_of(request, sid)
    mon.new_chat(s)
    return mon.state(s)


@router.post("/api/sessions/{sid}/chat", responses={**ERRORS, **SSE}, response_class=StreamingResponse,
             tags=["chat"])
def chat(sid: str, body: S.ChatIn, request: Request) -> Response:
    """Send a message and stream the answer token by token (events: token..., done; or error). The answer is
    finished and kept on the server even if the client goes away."""
    events = monitor_of(request).send(session_of(request, sid), body.message, max_new_tokens=body.max_new_tokens,
                                      temperature=body.temperature, seed=body.seed)
    return reply(events, body.stream)


@router.post("/api/sessions/{sid}/regenerate", responses={**ERRORS, **SSE}, response_class=StreamingResponse,
             tags=["chat"])
def regenerate(sid: str, body: S.GenerateIn, request: Request) -> Response:
    """Answer the last message again with the current steerings; the old answer is kept beside it."""
    events = monitor_of(request).regenerate(session_of(request, sid), max_new_tokens=body.max_new_tokens,
                                            temperature=body.temperature, seed=body.seed)
    return reply(events, body.stream)
