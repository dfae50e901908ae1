"""Context descriptions: what the text around a neuron's activations is about, read from sentence embeddings.

For each neuron and polarity, from its training exemplars only (never a held-out window):
- **topic**: the topic term (windows.topic_terms) whose standardised relevance is highest on average over the
  neuron's exemplar windows; named when that average is at least `TOPIC_MIN` standard deviations above the corpus
  window average ("in text about cooking, fires on 'the'", or "fires throughout text about the sea" when the label
  names no token);
- **field**: the topic term most of whose firing tokens are words about it (their key's relevance at least
  `FIELD_Z` sd above the average corpus token); named when it covers at least `FIELD_COVER` of the exemplars with at
  least `FIELD_KEYS` distinct keys ("fires on words about animals": the simulator then predicts any word of the
  field, not only the tokens seen).
A neuron with neither keeps its token label (no context description is stored). Every context description is
scored like any other (score.py: Pearson and detection on held-out windows), its topic gating the windows through
`Tables.gate` and its field predicting tokens through `Tables.field`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .forms import context_text, split_parts
from .label import LabelVocab
from .score import EvalSplit, Sim, Tables, field_of, gate_of
from .windows import WindowMeaning

Key = tuple[int, int, str]
TOPIC_MIN = 1.0
FIELD_Z = 3.0
FIELD_COVER = 0.5
FIELD_KEYS = 3


@dataclass
class ContextModel:
    """The topic relevance of every stored window and token key, and the simulator tables built from them."""
    terms: list[str]
    window_z: torch.Tensor          # [W, K] rows in WindowMeaning.windows order
    key_z: torch.Tensor             # [C, K] rows in label-vocabulary code order
    row_of: dict[int, int]          # window id -> row
    tables: Tables

    @classmethod
    def build(cls, wm: WindowMeaning, vocab: LabelVocab) -> "ContextModel":
        if wm.keys != list(vocab.keys):
            raise ValueError("the window embeddings were built for another label vocabulary")
        zw = wm.window_z(wm.term_emb)
        zk = wm.key_z(wm.term_emb)
        wmax = max(wm.windows) if wm.windows else 0
        gate = torch.ones(wmax + 2, len(wm.terms))
        gate[torch.tensor(wm.windows, dtype=torch.long)] = gate_of(zw)
        field = torch.cat([field_of(zk), torch.zeros(1, len(wm.terms))])
        return cls(list(wm.terms), zw, zk, dict(wm.row_of), Tables(gate=gate, field=field))


def describe_contexts(split: EvalSplit, vocab: LabelVocab, cm: ContextModel, labels: dict[Key, dict[str, Any]],
                      *, n_exemplars: int = 40) -> dict[Key, tuple[str, Sim]]:
    """{key: (input part of the context description, its simulator)} for the neurons that get one."""
    out: dict[Key, tuple[str, Sim]] = {}
    code_of_id = torch.tensor(vocab.key_of + [-1], dtype=torch.long)
    code_of = {k: c for c, k in enumerate(vocab.keys)}
    for key, lab in labels.items():
        l, n, p = key
        ex = split.train_exemplars(l, n, p, n_exemplars)
        if not ex:
            continue
        rows = sorted({cm.row_of[w] for w, _ in ex if w in cm.row_of})
        topic = None
        if rows:
            d = cm.window_z[torch.tensor(rows)].mean(0)
            k = int(d.argmax())
            if float(d[k]) >= TOPIC_MIN:
                topic = k
        codes = code_of_id[torch.tensor([split.ids[w][pos] for w, pos in ex], dtype=torch.long).clamp_min(0)]
        codes = codes[codes >= 0]
        field = None
        if len(codes):
            hit = cm.key_z[codes] >= FIELD_Z                              # [E, K]
            cover = hit.float().mean(0)
            k = int(cover.argmax())
            if float(cover[k]) >= FIELD_COVER and len(set(codes[hit[:, k]].tolist())) >= FIELD_KEYS:
                field = k
        if topic is None and field is None:
            continue
        head, _ = split_parts(lab["text"])
        text = context_text(head.strip(), None if topic is None else cm.terms[topic],
                            None if field is None else cm.terms[field])
        items: tuple[tuple[str, str | None], ...] = ()
        if field is None and head.startswith("fires on "):
            items = tuple((f, c) for f, c in lab["fires"] if f in code_of)
        out[key] = (text, Sim(items=items, topic=-1 if topic is None or topic == field else topic,
                              field=-1 if field is None else field,
                              whole=field is None and not items))
    return out
