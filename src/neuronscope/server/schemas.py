"""Request and response bodies of the Monitor's JSON API (they make up its OpenAPI schema)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field


class ErrorOut(BaseModel):
    error: str = Field(description="One sentence saying what was wrong.")
    detail: Optional[list] = None


class GenerateIn(BaseModel):
    max_new_tokens: int = Field(64, ge=1, le=256, description="New tokens to generate at most.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 means greedy decoding (honoured).")
    seed: Optional[int] = Field(None, ge=0, le=2 ** 32 - 1, description="Sampling seed (temperature > 0).")
    stream: bool = Field(True, description="Stream server-sent events (text/event-stream); false: one JSON reply.")


class ChatIn(GenerateIn):
    message: str = Field(..., min_length=1, max_length=4000, description="The user's message.")


class ChatOut(BaseModel):
    text: str
    n_tokens: int
    finish_reason: str
    version: int
    steered: bool


class ModelOut(BaseModel):
    name: str
    family: str
    n_layers: int
    n_neurons: int
    hidden_size: int
    vocab_size: int
    fingerprint: str


class InfoOut(BaseModel):
    model: ModelOut
    chat_template: bool
    chat_mode: str
    capabilities: dict[str, bool]
    notes: list[str]
    limits: dict[str, float]


class SteerNeuronOut(BaseModel):
    layer: int
    neuron: int
    polarity: str
    value: float


class SteeringOut(BaseModel):
    id: str
    mode: str
    concept: Optional[str]
    strength: Optional[float]
    n_neurons: int
    ranges: list[list[int]]
    generated: bool
    neurons: list[SteerNeuronOut]


class MessageOut(BaseModel):
    role: str
    content: str
    steered: bool
    start: int
    end: int


class StateOut(BaseModel):
    session_id: str
    version: int
    n_tokens: int
    messages: list[MessageOut]
    steerings: list[SteeringOut]


class AltOut(BaseModel):
    token: str
    id: int
    prob: float


class TokenOut(BaseModel):
    position: int
    id: int
    text: str
    role: str
    message: int
    steered: bool
    prob: Optional[float] = Field(None, description="Probability this token had when it was predicted.")
    top5: list[AltOut] = Field(description="Top-5 next-token probabilities after this token.")


class TokensOut(BaseModel):
    version: int
    chat_mode: str
    tokens: list[TokenOut]


class FireOut(BaseModel):
    position: int
    value: float


class ActivationRowOut(BaseModel):
    layer: int
    neuron: int
    polarity: str
    activation: float = Field(description="Normalised activation (raw when there are no statistics), at `position`.")
    position: int
    count: int
    description: Optional[str]
    top_tokens: list[str]
    fires: list[FireOut]


class ActivationsOut(BaseModel):
    version: int
    mode: str = Field(description="normalised | raw (no corpus statistics) | empty")
    start: int
    end: int
    total: int
    page: int
    page_size: int
    rows: list[ActivationRowOut]
    token_sums: list[float]
    notes: list[str]


class AttributionRowOut(BaseModel):
    layer: int
    position: int
    neuron: int
    token: str
    activation: float
    normalised: Optional[float]
    gradient: float
    score: float
    polarity: str
    description: Optional[str]
    top_tokens: list[str]


class AttributionOut(BaseModel):
    version: int
    target_position: int
    target_token: int
    target_text: str
    probability: float
    total: int
    page: int
    page_size: int
    rows: list[AttributionRowOut]
    position_scores: list[float]
    notes: list[str]


class DecodeOut(BaseModel):
    token: str
    id: int
    logit: Optional[float] = None
    prob: Optional[float] = None


class ExemplarOut(BaseModel):
    activation: float
    normalised: Optional[float]
    position: int
    tokens: list[str]
    text: str
    marks: Optional[list[Optional[float]]]


class NeuronOut(BaseModel):
    layer: int
    neuron: int
    decodes: dict[str, list[DecodeOut]]
    decodes_source: str
    descriptions: dict[str, Optional[str]]
    exemplars: dict[str, list[ExemplarOut]]
    quantiles: Optional[dict[str, float]]
    notes: list[str]


class ConceptRowOut(BaseModel):
    layer: int
    neuron: int
    polarity: str
    score: float
    tokens: list[str]
    source: str
    description: Optional[str]


class ConceptsOut(BaseModel):
    query: str
    results: list[ConceptRowOut]
    notes: list[str]


class ClusterOut(BaseModel):
    name: str
    members: list[list]
    tokens: list[str]


class ClustersOut(BaseModel):
    version: int
    method: str
    n_neurons: int
    clusters: list[ClusterOut]
    notes: list[str]


class SteeringIn(BaseModel):
    mode: Literal["strengthen", "suppress", "clamp"] = Field(
        description="strengthen: clamp to q(1-1e-7) x strength; suppress: clamp to 0; clamp: to `value`.")
    concept: Optional[str] = Field(None, max_length=200, description="Concept to search neurons for.")
    neurons: Optional[list[list[int]]] = Field(None, max_length=1000,
                                               description="Explicit neurons [[layer, neuron], ...].")
    strength: float = Field(0.75, ge=0.0, le=2.0)
    value: Optional[float] = Field(None, ge=-1e4, le=1e4, description="The clamp value (mode clamp).")
    n_neurons: Optional[int] = Field(None, ge=1, le=1000, description="Default 50 (strengthen), 500 (suppress).")
    ranges: list[list[int]] = Field(default_factory=list, max_length=64,
                                    description="Prompt token ranges [start, end) to steer.")
    generated: bool = Field(True, description="Also steer every generated token.")


class OkOut(BaseModel):
    ok: bool
