"""The atlas's result rows: a neuron's decoded token at one site (`DecodedToken`) and a neuron found by a token or
concept lookup (`NeuronHit`). TypedDicts (they are JSON rows: `atlas show --json`, `atlas search --json`, the
Monitor's decodes), from typing_extensions so pydantic reads them into the Monitor's schema on Python < 3.12."""
from __future__ import annotations

from typing_extensions import TypedDict


class DecodedToken(TypedDict):
    """One of a neuron's top decoded tokens at one site."""
    token: str
    id: int
    logit: float
    prob: float


class NeuronHit(TypedDict):
    """A neuron found by a token or concept lookup."""
    layer: int
    neuron: int
    site: str
    score: float
    tokens: list[str]


__all__ = ["DecodedToken", "NeuronHit"]
