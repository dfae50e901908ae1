"""Scored neuron descriptions and their embedding index (clusters and steering by concept live in
`neuronscope.concepts`).

    describe_atlas("atlas-smollm")                 # a scored label for every neuron and polarity (+ the index)
    describe_atlas("atlas-smollm", explainer="http://localhost:8080/v1", neurons=[(20, 1234)])
    Descriptions.open("atlas-smollm").get(20, 1234, "pos")   # Description: .text, .score, .source, .interpretable
"""
from __future__ import annotations

from .describe import Descriptions, describe_atlas
from .explainer import LocalExplainer, OpenAIExplainer, explain_prompt, highlight, make_explainer
from .forms import parse_label_items
from .index import build_index, load_index
from .label import LabelVocab, make_label, token_key
from .score import EvalSplit, score_token_labels
from .simulate import LLMSimulator, pearson, token_match_predict

__all__ = ["describe_atlas", "Descriptions", "LocalExplainer", "OpenAIExplainer",
           "make_explainer", "explain_prompt", "highlight", "LLMSimulator", "pearson", "token_match_predict",
           "make_label", "LabelVocab", "parse_label_items", "token_key", "EvalSplit", "score_token_labels",
           "build_index", "load_index"]
