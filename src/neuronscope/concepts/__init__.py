"""Concepts: finding the neurons of a concept by meaning and steering by concept, above `atlas/` and `describe/`.

    semantic_search("atlas-smollm", "animals")                        # neuron polarities ranked by meaning
    steer_generate(subject, "atlas-smollm", prompt, "dogs", [0.25, 0.5, 1.0])   # a dose sweep side by side
"""
from __future__ import annotations

from .semantic import semantic_search
from .steer import concept_neurons, parse_strengths, steer_generate, steer_interventions, steer_sweep

__all__ = ["semantic_search", "concept_neurons", "parse_strengths", "steer_generate", "steer_interventions",
           "steer_sweep"]
