"""Request and response bodies of the Monitor's JSON API (they make up its OpenAPI schema).

Requests (`...In`) are pydantic models: they validate what a client sends. Responses (`...Out`) and the events of a
streamed answer (`...Event`) are pydantic models too: the one definition of what the Monitor returns, both the return
types of `Monitor`'s methods (a notebook reads `view.rows[0].layer`) and the response models of the routes (FastAPI
validates, serialises and documents them). Where a view carries a library result it holds the library's own record
(`DescriptionKind`, `NeuronMatch`, `DecodedToken`), not a copy. Every bound comes from `limits.DEFAULT`, the one home
of the Monitor's limits.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, Field

from ..atlas.records import DecodedToken
from ..concepts.records import NeuronMatch
from ..describe.records import DescriptionKind
from .limits import DEFAULT as L


class ErrorOut(BaseModel):
    error: Annotated[str, Field(description="One sentence saying what was wrong.")]
    detail: Annotated[Optional[list[dict[str, Any]]],
                      Field(description="Each problem of a malformed request (422 only).")] = None


class GenerateIn(BaseModel):
    max_new_tokens: int = Field(64, ge=1, le=L.max_new_tokens, description="New tokens to generate at most.")
    temperature: float = Field(0.0, ge=0.0, le=L.max_temperature, description="0 means greedy decoding (honoured).")
    seed: Optional[int] = Field(None, ge=0, le=2 ** 32 - 1, description="Sampling seed (temperature > 0).")
    stream: bool = Field(True, description="Stream server-sent events (text/event-stream); false: one JSON reply.")


class ChatIn(GenerateIn):
    message: str = Field(..., min_length=1, max_length=L.max_message_chars,
                         description=f"The user's message (at most {L.max_message_chars} characters; longer is a 400).")


class ChatOut(BaseModel):
    """A finished answer: the reply of a chat with stream=false, and the last event of a streamed one."""
    text: str
    n_tokens: int
    finish_reason: Annotated[str, Field(description="eos | length")]
    version: Annotated[int, Field(description="The session's version once the answer is stored.")]
    steered: bool


class TokenEvent(BaseModel):
    """One generated token of a streamed answer."""
    type: Literal["token"] = "token"
    id: int
    text: Annotated[str, Field(description="What the token adds to the answer's text.")]
    token: Annotated[str, Field(description="The token as it reads (special tokens shown).")]


class DoneEvent(ChatOut):
    """The last event of a streamed answer: the whole answer."""
    type: Literal["done"] = "done"


class ErrorEvent(BaseModel):
    """A streamed answer that failed: one sentence."""
    type: Literal["error"] = "error"
    error: str


Event = Union[TokenEvent, DoneEvent, ErrorEvent]


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
    enabled: bool
    label: Optional[str]
    neurons: list[SteerNeuronOut]


class PreviousOut(BaseModel):
    content: str
    steered_by: list[SteeringOut]


class MessageOut(BaseModel):
    role: str
    content: str
    steered: bool
    start: int
    end: int
    steered_by: Annotated[list[SteeringOut], Field(description="Steerings this answer was made with.")]
    previous: Annotated[list[PreviousOut], Field(description="Earlier answers to the same message.")]


class GeneratingOut(BaseModel):
    text: str
    n_tokens: int


class StateOut(BaseModel):
    session_id: str
    version: int
    n_tokens: int
    messages: list[MessageOut]
    steerings: list[SteeringOut]
    generating: Annotated[Optional[GeneratingOut], Field(description="The answer being generated now, so far.")]
    fingerprint: str


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
    prob: Annotated[Optional[float], Field(description="Probability this token had when it was predicted.")]
    top5: Annotated[list[AltOut], Field(description="Top-5 tokens the model predicted at this position (this "
                                                    "token's rivals; empty for the first token).")]


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
    activation: Annotated[float, Field(description="Normalised activation (raw when there are no statistics), at "
                                                   "`position`.")]
    position: int
    count: int
    description: Optional[str]
    interpretable: bool
    top_tokens: list[str]
    fires: list[FireOut]


class ActivationsOut(BaseModel):
    version: int
    mode: Annotated[str, Field(description="normalised | raw (no corpus statistics) | empty")]
    start: int
    end: int
    total: int
    page: int
    page_size: int
    rows: list[ActivationRowOut]
    token_sums: list[float]
    notes: list[str]
    normalised_by: Annotated[Optional[str], Field(description="The quantile levels that normalise, and their marks "
                                                              "when the corpus does not resolve them.")]


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
    interpretable: bool
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
    decodes: dict[str, list[DecodedToken]]
    decodes_source: str
    descriptions: dict[str, Optional[str]]
    description_kinds: Annotated[dict[str, list[DescriptionKind]],
                                 Field(description="Every kind of description per polarity, with its scores.")]
    exemplars: dict[str, list[ExemplarOut]]
    quantiles: Optional[dict[str, float]]
    quantile_marks: Annotated[Optional[dict[str, str]], Field(description="Levels the corpus does not resolve: why.")]
    normalised_by: Optional[str]
    notes: list[str]


class TokenEffectOut(BaseModel):
    token: str
    delta: Annotated[float, Field(description="Mean change of its log-probability on the train prompts, nats.")]


class OutputEffectOut(BaseModel):
    value: Annotated[float, Field(description="The activation the neuron was set to (its firing level).")]
    says: list[TokenEffectOut]
    less: list[TokenEffectOut]
    output_score: Annotated[float, Field(description="Share of `says` among the most raised held-out tokens.")]
    effect: Annotated[float, Field(description="Mean held-out raise of `says`, nats.")]
    held: Annotated[bool, Field(description="Score and effect reach the describe thresholds.")]


class NeuronOutputsOut(BaseModel):
    layer: int
    neuron: int
    outputs: Annotated[dict[str, Optional[OutputEffectOut]],
                       Field(description="Per polarity; null when the neuron never fires with that sign.")]


class ConceptsOut(BaseModel):
    query: str
    results: list[NeuronMatch]
    notes: list[str]


class ClusterOut(BaseModel):
    name: str
    kind: Annotated[str, Field(description="'concept' (members read or write a topic), 'context' (they fire here on "
                                            "a topic's words), 'form' (syntax / formatting) or 'unclear'.")]
    topic: Annotated[Optional[str], Field(description="The topic a click steers (its writers), for concept and "
                                                      "context clusters.")]
    members: list[list[Any]]
    tokens: list[str]
    size: int
    activation: Annotated[float, Field(description="Sum of the members' |normalised activation| at their firing "
                                                   "tokens.")]
    attribution: Annotated[Optional[float], Field(description="Sum of the members' attribution scores to "
                                                              "`position`.")]


class ClustersOut(BaseModel):
    version: int
    method: str
    n_neurons: int
    sort: str
    position: Optional[int]
    clusters: list[ClusterOut]
    notes: list[str]


class SteeringIn(BaseModel):
    mode: Literal["strengthen", "suppress", "clamp"] = Field(
        description="strengthen: clamp to q(1-1e-7) x strength; suppress: clamp to 0; clamp: to `value`.")
    concept: Optional[str] = Field(None, max_length=L.max_concept_chars, description="Concept to search neurons for.")
    neurons: Optional[list[list[int]]] = Field(None, max_length=L.max_steer_neurons,
                                               description="Explicit neurons [[layer, neuron(, 0 pos | 1 neg)], ...].")
    strength: float = Field(0.75, ge=0.0, le=L.max_strength)
    value: Optional[float] = Field(None, ge=-L.max_clamp, le=L.max_clamp, description="The clamp value (mode clamp).")
    n_neurons: Optional[int] = Field(None, ge=1, le=L.max_steer_neurons,
                                     description="Default 50 (strengthen), 500 (suppress).")
    ranges: list[list[int]] = Field(default_factory=list, max_length=L.max_ranges,
                                    description="Prompt token ranges [start, end) to steer.")
    generated: bool = Field(True, description="Also steer every generated token.")
    label: Optional[str] = Field(None, max_length=L.max_concept_chars, description="A name, e.g. the cluster's.")
    enabled: bool = Field(True, description="False: keep the steering but do not apply it yet.")


class SteeringPatchIn(BaseModel):
    enabled: bool = Field(description="Switch the steering on or off (it is kept either way).")


class ExportMessageOut(BaseModel):
    role: str
    content: str
    ids: Annotated[Optional[list[int]], Field(description="The exact ids of a generated answer.")]
    steerings: Annotated[list[str], Field(description="Ids of the steerings this answer was made with.")]
    steered_by: list[SteeringOut]
    previous: list[PreviousOut]


class ExportOut(BaseModel):
    format: str
    model: dict[str, str]
    messages: list[ExportMessageOut]
    steerings: list[SteeringOut]
    n_steerings_made: int


class ImportIn(BaseModel):
    format: str = Field(description="neuronscope-monitor-session/1")
    model: dict[str, Any]
    messages: list[dict[str, Any]] = Field(default_factory=list, max_length=1024)
    steerings: list[dict[str, Any]] = Field(default_factory=list, max_length=L.max_steerings)
    n_steerings_made: int = Field(0, ge=0, le=10 ** 6)


class OkOut(BaseModel):
    ok: bool
