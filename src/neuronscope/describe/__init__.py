"""Neuron descriptions and concept clusters (issue 5).

    describe_atlas("atlas-smollm")                          # labels from decodes + exemplars
    describe_atlas("atlas-smollm", explainer="http://localhost:8000/v1", subject=subject, neurons=[(20, 1234)])
    Descriptions.open("atlas-smollm").search("dogs")
    cluster_neurons("atlas-smollm", [(20, 1234, "pos"), (21, 77, "pos")])
"""
from __future__ import annotations

from .cluster import average_linkage, cluster_neurons
from .describe import Descriptions, describe_atlas, firing_tokens, make_label
from .explainer import LocalExplainer, OpenAIExplainer, explain_prompt, highlight, make_explainer
from .simulate import LLMSimulator, pearson, score_description, token_match_predict

__all__ = ["describe_atlas", "Descriptions", "cluster_neurons", "average_linkage", "LocalExplainer",
           "OpenAIExplainer", "make_explainer", "explain_prompt", "highlight", "LLMSimulator", "pearson",
           "score_description", "token_match_predict", "firing_tokens", "make_label"]
