"""Routes of the views: tokens, activations, attribution and clusters of a session's conversation; a neuron's page;
a concept's neurons."""
from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Query, Request

from . import schemas as S
from .deps import monitor_of, session_of
from .http_errors import ERRORS
from .limits import DEFAULT as L

router = APIRouter()


@router.get("/api/sessions/{sid}/tokens", response_model=S.TokensOut, responses=ERRORS, tags=["views"])
def tokens(sid: str, request: Request) -> S.TokensOut:
    """Every token of the conversation with its probability and the top-5 predicted at its own position."""
    return monitor_of(request).tokens(session_of(request, sid))


@router.get("/api/sessions/{sid}/activations", response_model=S.ActivationsOut, responses=ERRORS, tags=["views"])
def activations(sid: str, request: Request, start: Optional[int] = Query(None, ge=0),
                end: Optional[int] = Query(None, ge=0),
                sort: str = Query("activation", pattern="^(activation|layer|neuron|count)$"),
                order: str = Query("desc", pattern="^(asc|desc)$"), page: int = Query(0, ge=0, le=10 ** 6),
                page_size: int = Query(50, ge=1, le=L.max_page_size),
                filter: str = Query("", max_length=L.max_filter_chars),
                polarity: Optional[str] = Query(None, pattern="^(pos|neg)$"),
                content_only: bool = Query(False, description="Only the messages' own tokens (no template, "
                                                              "system prompt or separators)."),
                interpretable: bool = Query(False, description="Only neurons with an interpretable description.")
                ) -> S.ActivationsOut:
    """Neurons beyond their extreme quantiles in the token range [start, end), one row per neuron/polarity."""
    return monitor_of(request).activations(session_of(request, sid), start=start, end=end, sort=sort, order=order,
                                           page=page, page_size=page_size, filter=filter, polarity=polarity,
                                           content_only=content_only, interpretable=interpretable)


@router.get("/api/sessions/{sid}/attribution", response_model=S.AttributionOut, responses=ERRORS, tags=["views"])
def attribution(sid: str, request: Request, position: int = Query(..., ge=0),
                token_id: Optional[int] = Query(None, ge=0), page: int = Query(0, ge=0, le=10 ** 6),
                page_size: int = Query(50, ge=1, le=L.max_page_size)) -> S.AttributionOut:
    """Neurons that caused the token at `position`: top 1000 by |activation x d p(token) / d activation|."""
    return monitor_of(request).attribution(session_of(request, sid), position, token_id, page=page,
                                           page_size=page_size)


@router.get("/api/sessions/{sid}/clusters", response_model=S.ClustersOut, responses=ERRORS, tags=["views"])
def clusters(sid: str, request: Request, start: Optional[int] = Query(None, ge=0),
             end: Optional[int] = Query(None, ge=0), content_only: bool = Query(False),
             interpretable: bool = Query(False),
             sort: str = Query("activation", pattern="^(activation|attribution|size)$"),
             position: Optional[int] = Query(None, ge=0, description="Token to rank clusters by attribution to.")
             ) -> S.ClustersOut:
    """The active concepts: firing neurons grouped into named clusters, with size, summed activation and
    (with `position`) attribution to that token."""
    return monitor_of(request).clusters(session_of(request, sid), start, end, content_only=content_only,
                                        interpretable=interpretable, sort=sort, position=position)


@router.get("/api/neurons/{layer}/{neuron}", response_model=S.NeuronOut, responses=ERRORS, tags=["neurons"])
def neuron(layer: int, neuron: int, request: Request, n_exemplars: int = Query(10, ge=0, le=L.max_exemplars),
           marks: bool = Query(True, description="Mark each exemplar token's activation (a forward of the "
                                                 "exemplar windows); false answers without a model call.")
           ) -> S.NeuronOut:
    """A neuron's decodes (atlas), description and top exemplars with the firing tokens marked."""
    return monitor_of(request).neuron(layer, neuron, n_exemplars, marks)


@router.get("/api/neurons/{layer}/{neuron}/outputs", response_model=S.NeuronOutputsOut, responses=ERRORS,
            tags=["neurons"])
def neuron_outputs(layer: int, neuron: int, request: Request) -> S.NeuronOutputsOut:
    """What the neuron makes the model say, measured now: its causal effect on the next token when raised (pos) or
    lowered (neg) to its firing level on neutral prompts, scored on held-out prompts."""
    return monitor_of(request).neuron_outputs(layer, neuron)


@router.get("/api/concepts", response_model=S.ConceptsOut, responses=ERRORS, tags=["neurons"])
def concepts(request: Request, q: str = Query(..., min_length=1, max_length=L.max_concept_chars),
             k: int = Query(50, ge=1, le=L.max_steer_neurons)) -> S.ConceptsOut:
    """Neurons for a concept: atlas decode search plus description text search."""
    return monitor_of(request).concepts(q, k)
