"""Routes of steering: list a session's steerings, add one (by concept or explicit neurons), switch one off or on,
remove one. A change takes effect on the next (re)generation and on the views."""
from __future__ import annotations

from fastapi import APIRouter, Request

from . import schemas as S
from .deps import monitor_of, session_of
from .http_errors import ERRORS, NotFound

router = APIRouter()


@router.get("/api/sessions/{sid}/steerings", response_model=list[S.SteeringOut], responses=ERRORS,
            tags=["steering"])
def list_steerings(sid: str, request: Request) -> list[S.SteeringOut]:
    return monitor_of(request).state(session_of(request, sid)).steerings


@router.post("/api/sessions/{sid}/steerings", response_model=S.SteeringOut, status_code=201, responses=ERRORS,
             tags=["steering"])
def add_steering(sid: str, body: S.SteeringIn, request: Request) -> S.SteeringOut:
    """Steer by a concept (or explicit neurons, e.g. a cluster's): strengthen, suppress or clamp, on prompt
    ranges and/or generated tokens. Takes effect on the next (re)generation."""
    return monitor_of(request).add_steering(session_of(request, sid), mode=body.mode, concept=body.concept,
                                            neurons=body.neurons, strength=body.strength, value=body.value,
                                            n_neurons=body.n_neurons, ranges=body.ranges, generated=body.generated,
                                            label=body.label, enabled=body.enabled)


@router.patch("/api/sessions/{sid}/steerings/{steering_id}", response_model=S.SteeringOut, responses=ERRORS,
              tags=["steering"])
def patch_steering(sid: str, steering_id: str, body: S.SteeringPatchIn, request: Request) -> S.SteeringOut:
    """Switch a steering off or on again without retyping it."""
    st = monitor_of(request).set_steering(session_of(request, sid), steering_id, body.enabled)
    if st is None:
        raise NotFound(f"No steering '{steering_id[:40]}' in this session.")
    return st


@router.delete("/api/sessions/{sid}/steerings/{steering_id}", response_model=S.OkOut, responses=ERRORS,
               tags=["steering"])
def remove_steering(sid: str, steering_id: str, request: Request) -> S.OkOut:
    if not monitor_of(request).remove_steering(session_of(request, sid), steering_id):
        raise NotFound(f"No steering '{steering_id[:40]}' in this session.")
    return S.OkOut(ok=True)
