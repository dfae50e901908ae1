"""Concepts: finding a concept's neurons from their activation evidence (which read it, which write it), grouping
active neurons into concepts named by meaning, and steering by concept, above `atlas/` and `describe/`.

    concept_search("atlas-smollm", "family relatives", side="both")     # ConceptResult: hits with side + evidence
    concept_clusters("atlas-smollm", active_neurons)                    # [ConceptCluster]: named by topic or form
    steer_generate(subject, "atlas-smollm", prompt, "dogs", [1, 2, 4])  # the concept's writers, a dose sweep
    semantic_search("atlas-smollm", "animals")                          # the older ranking by description meaning
"""
from __future__ import annotations

from .by_description import cluster_neurons
from .clusters import ConceptCluster, concept_clusters, steer_form
from .evidence import ConceptEvidence
from .records import NeuronMatch, SemanticHit
from .search import ConceptHit, ConceptResult, NoConceptText, concept_search
from .semantic import semantic_search
from .steer import (concept_neurons, parse_strengths, random_control, steer_generate, steer_interventions,
                    steer_sweep)

__all__ = ["cluster_neurons", "steer_form", "ConceptCluster", "ConceptEvidence", "ConceptHit", "ConceptResult",
           "NeuronMatch", "SemanticHit", "NoConceptText", "concept_clusters", "concept_search", "semantic_search",
           "concept_neurons", "parse_strengths", "random_control", "steer_generate", "steer_interventions",
           "steer_sweep"]
