"""The description records that leave the library: a neuron polarity's stored description (`Description`), every
kind it was chosen from with that kind's scores (`DescriptionKind`), and a text-search hit (`DescriptionMatch`).

One definition: `Descriptions.get / all / search` return these, `atlas show` and `describe --list --json` print them,
and the Monitor's JSON (server/schemas.py) serves the same classes, so the field descriptions below are also its
OpenAPI documentation.

    d = Descriptions.open("atlas-smollm").get(20, 1234, "pos", candidates=True)
    d.text, d.score, d.detection, [k.source for k in d.candidates or []]
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Annotated, Any, Mapping, Optional

from pydantic import Field


@dataclass
class DescriptionKind:
    """One kind of description of a neuron polarity with its scores (a row of the stored candidates)."""
    source: Annotated[str, Field(description="label, context, output, decode or explainer.")]
    text: str
    score: Annotated[Optional[float], Field(description="Pearson r on held-out windows (input-side kinds).")] = None
    detection: Annotated[Optional[float], Field(
        description="Balanced accuracy on held-out windows (chance 0.5).")] = None
    output_score: Annotated[Optional[float], Field(
        description="Output kind: share held on held-out prompts.")] = None
    effect: Annotated[Optional[float], Field(description="Output kind: mean held-out raise, nats.")] = None
    value: Annotated[Optional[float], Field(
        description="Output kind: the activation the neuron was set to (its firing level).")] = None
    decode_output_score: Annotated[Optional[float], Field(
        description="Output kind: the write vector's decode scored on the same prompts.")] = None
    decode_effect: Annotated[Optional[float], Field(
        description="Output kind: the decode's mean held-out raise, nats.")] = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DescriptionKind:
        """From a stored candidate (JSON); keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Description:
    """The kept description of one neuron polarity, with its scores and (when asked for) every kind."""
    layer: int
    neuron: int
    polarity: Annotated[str, Field(description="pos or neg.")]
    text: str
    score: Annotated[Optional[float], Field(description="Pearson r of the kept input-side description.")]
    source: Annotated[str, Field(description="label, context or explainer: the kind kept.")]
    detection: Annotated[Optional[float], Field(
        description="Balanced accuracy; None for folders described before it existed.")]
    output_score: Annotated[Optional[float], Field(
        description="Of the measured output description; None when not measured.")]
    effect: Optional[float]
    interpretable: Annotated[bool, Field(description="Both input scores reach the folder's thresholds.")]
    output_interpretable: Annotated[bool, Field(description="The output description held on held-out prompts.")]
    candidates: Annotated[Optional[list[DescriptionKind]], Field(
        description="Every kind with its scores (only when asked for).")] = None

    def to_json(self) -> dict[str, Any]:
        """A JSON object (candidates left out when they were not asked for)."""
        out = asdict(self)
        if self.candidates is None:
            out.pop("candidates")
        return out


@dataclass
class DescriptionMatch:
    """A description found by text search: `match` is the share of the query's words it holds (whole words 1,
    prefixes 0.5, ties broken by the simulator score)."""
    description: Description
    match: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.description.to_json(), match=self.match)


__all__ = ["Description", "DescriptionKind", "DescriptionMatch"]
