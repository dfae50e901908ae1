"""Simulators: predict a neuron's per-token activations from a description, and score that by Pearson correlation.

- `token_match_predict`: the token simulator. For a label (or any description that quotes tokens), the quoted items
  of its firing part (before " | promotes"): 1.0 on a token whose key (label.token_key: markers stripped, lower
  case) is an item, and for an item with a context ("'ma' after 'grand'") 1.0 after that context, 0.5 elsewhere.
  For free text without quotes: 1.0 on tokens that are one of its content words. "nothing specific" predicts 0
  everywhere (so it scores 0). Needs no model, so it scores all neurons of a model in minutes.
- `LLMSimulator(explainer)`: asks the explainer LLM which numbered tokens of a text the described neuron fires on;
  1 for those, 0 elsewhere.
The score of a description is the Pearson correlation between predicted and real activations over the tokens of
held-out windows: the neuron's top exemplar windows among the held-out windows plus random held-out windows of the
corpus (score.py picks them; for the negative polarity the real activations are negated, so firing is positive).
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .forms import parse_label_items
from .label import token_key

if TYPE_CHECKING:
    from .explainer import Explainer, Message

_MARKERS = re.compile(r"[\u2581\u0120\u010a\s]+")
_WORD = re.compile(r"[\w']+", re.UNICODE)
_QUOTED = re.compile(r"'([^']+)'|\"([^\"]+)\"|\u201c([^\u201d]+)\u201d|<<(.+?)>>")
STOP = {"the", "a", "an", "of", "and", "or", "to", "in", "on", "for", "with", "is", "it", "this", "that", "fires",
        "promotes", "neuron", "tokens", "token", "words", "word", "responds", "about", "like", "as", "at", "by",
        "activates", "after", "before", "when", "which", "its", "are", "be", "text", "mentions", "related",
        "specific", "nothing", "e", "g", "i", "such", "including", "used", "using", "mainly", "mostly", "often"}

Predictor = Callable[[str, Sequence[str]], list[float]]


def norm_token(tok: str) -> str:
    """A token as compared with description words: space markers stripped, lower case."""
    return _MARKERS.sub("", tok).lower()


def description_terms(description: str) -> set[str]:
    """Content words and quoted items of a description, normalised (stop words left out)."""
    terms = {norm_token(w) for w in _WORD.findall(description)} - STOP
    for m in _QUOTED.finditer(description):
        q = next(g for g in m.groups() if g is not None)
        terms.add(token_key(q))
    terms.discard("")
    return terms


def token_match_predict(description: str, tokens: Sequence[str]) -> list[float]:
    """Predicted activation per token from a description (see the module docstring)."""
    items = parse_label_items(description)
    keys = [token_key(t) for t in tokens]
    if items is None:
        terms = description_terms(description)
        return [1.0 if k in terms else 0.0 for k in keys]
    plain = {k for k, c in items if c is None}
    ctx: dict[str, set[str]] = {}
    for k, c in items:
        if c is not None:
            ctx.setdefault(k, set()).add(c)
    out = []
    for i, k in enumerate(keys):
        if k in plain:
            out.append(1.0)
        elif k in ctx:
            out.append(1.0 if i > 0 and keys[i - 1] in ctx[k] else 0.5)
        else:
            out.append(0.0)
    return out


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation; 0.0 when either side is constant."""
    n = len(a)
    if n != len(b) or n < 2:
        return 0.0
    ma, mb = sum(a) / n, sum(b) / n
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    if va <= 0 or vb <= 0:
        return 0.0
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / math.sqrt(va * vb)


def score_description(description: str, exemplars: Sequence[dict[str, Any]], polarity: str = "pos",
                      predict: Predictor | None = None) -> float | None:
    """Pearson correlation of predicted vs real activations over held-out exemplars (None without real acts)."""
    predict = predict or token_match_predict
    pred: list[float] = []
    real: list[float] = []
    sign = -1.0 if polarity == "neg" else 1.0
    for e in exemplars:
        acts = e.get("acts")
        if acts is None:
            continue
        p = predict(description, e["tokens"])
        if len(p) != len(acts):
            raise ValueError("the simulator returned a prediction of the wrong length")
        pred.extend(p)
        real.extend(sign * a for a in acts)
    if not real:
        return None
    return pearson(pred, real)


class LLMSimulator:
    """Simulate with an explainer LLM: it names the numbered tokens the described neuron fires on."""

    def __init__(self, explainer: Explainer, max_tokens: int = 64):
        self.explainer = explainer
        self.max_tokens = max_tokens

    def prompt(self, description: str, tokens: Sequence[str]) -> list[Message]:
        listing = " ".join(f"{i}:{tok!r}" for i, tok in enumerate(tokens))
        return [
            {"role": "system", "content": "You predict where a language-model neuron fires."},
            {"role": "user", "content": f"Neuron description: {description}\nNumbered tokens: {listing}\n"
                                        "Reply only with the numbers of the tokens where this neuron fires, "
                                        "separated by commas (or 'none')."},
        ]

    def __call__(self, description: str, tokens: Sequence[str]) -> list[float]:
        reply = self.explainer.complete(self.prompt(description, tokens), temperature=0.0, seed=0,
                                        max_tokens=self.max_tokens)
        hits = {int(x) for x in re.findall(r"\d+", reply or "")}
        return [1.0 if i in hits else 0.0 for i in range(len(tokens))]
