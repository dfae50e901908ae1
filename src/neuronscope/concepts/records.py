"""The rows every concept search returns, whatever ranked them: `NeuronMatch` (a neuron polarity found for a
concept, with the words behind the match) and `SemanticHit` (the ranking by description meaning, with its parts).

One definition: `ConceptHit.match()`, `SemanticHit.match()` and the Monitor's decode search all give a
`NeuronMatch`, the concept list of the Monitor's JSON serves it (server/schemas.py `ConceptsOut`) and steering by
concept reads it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Optional

from pydantic import Field


@dataclass
class NeuronMatch:
    """A neuron polarity found for a concept."""
    layer: int
    neuron: int
    polarity: Annotated[str, Field(description="pos or neg.")]
    score: Annotated[float, Field(description="The ranking's score (higher is better; comparable within a search).")]
    tokens: Annotated[list[str], Field(description="The words behind the match: the concept words it reads or "
                                                   "writes, else its top decoded tokens.")] = field(
        default_factory=list)
    source: Annotated[str, Field(description="What ranked it: reads, writes (activation evidence), semantic "
                                             "(description meaning), description (its text), atlas:SITE "
                                             "(decoded tokens).")] = ""
    description: Optional[str] = None

    @property
    def key(self) -> tuple[int, int, str]:
        return (self.layer, self.neuron, self.polarity)


@dataclass
class SemanticHit:
    """A neuron polarity ranked by the meaning of its description (concepts.semantic): score = similarity +
    token_weight / words x token_score."""
    layer: int
    neuron: int
    polarity: str
    score: float
    similarity: float           # cosine of the query and the neuron's description vector
    token_score: float          # the decoded-token match of the site the polarity promotes (0..1)
    description: str | None
    desc_score: float | None    # the description's Pearson r
    interpretable: bool
    tokens: list[str] = field(default_factory=list)     # top decoded tokens of the site it promotes

    def match(self) -> NeuronMatch:
        return NeuronMatch(self.layer, self.neuron, self.polarity, self.score, list(self.tokens), "semantic",
                           self.description)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["NeuronMatch", "SemanticHit"]
