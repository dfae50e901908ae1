"""The atlas's result rows: a neuron's decoded token at one site (`DecodedToken`) and a neuron found by a token or
concept lookup (`NeuronHit`). Dataclasses, like every result of the library; `to_json` gives the rows of
`atlas show --json` and `atlas search --json`, and the Monitor's neuron page serves `DecodedToken` as it is (pydantic
reads a dataclass into its schema)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class DecodedToken:
    """One of a neuron's top decoded tokens at one site: its text, vocabulary id, logit and probability."""
    token: str
    id: int
    logit: float
    prob: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class NeuronHit:
    """A neuron found by a token or concept lookup: the site that matched, its score there, its top tokens."""
    layer: int
    neuron: int
    site: str
    score: float
    tokens: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["DecodedToken", "NeuronHit"]
