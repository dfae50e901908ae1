"""Clusters named by meaning: neuron polarities grouped by what they read and write (their activation evidence,
evidence.py), named from the topic vocabulary; neurons that track form are grouped by what they do.

    groups = concept_clusters("atlas-smollm", [(20, 1234, "pos"), (21, 77, "neg"), ...])
    groups[0].name, groups[0].kind         # "family and relatives", "concept"  /  "sentence ends", "form"

- **Form neurons**: a polarity whose strongest exemplar tokens are mostly (>= `FORM_SHARE`) punctuation, digits,
  whitespace or function words (evidence.form_share) tracks syntax or formatting. It joins the form group of its
  commonest kind of exemplar token (`FORM_GROUPS`: sentence ends, clause punctuation, numbers and list numbering,
  quotes and brackets, line breaks and spacing, function words); these groups have kind "form" (the Monitor hides
  them unless asked).
- **Concept neurons**: a token key is a word of a topic (describe/data/topics.txt, ~370 topics) when the topic is
  among its `KEY_TOPICS` nearest in the sentence embedding and stands out for it (z >= `TOPIC_Z` against the topic's
  cosines with all keys). Each neuron joins the topic with the largest share of the tokens it promotes / makes the
  model say (what it writes) when that share reaches `MIN_SHARE`, else the topic with the largest share of its 20
  strongest exemplar tokens (what it reads) when that share does. A cluster is named by its topic, or "X \u2192 Y"
  when its members on average read topic X and write topic Y; `reads` / `writes` name each side's topic (None where
  no topic reaches `MIN_SHARE`), and `tokens` the topic's words they read or write. A topic with fewer than
  `min_size` members, and neurons with no topic, go to one "no clear topic" group (kind "unclear", hidden by the
  Monitor with the form groups).
- **Context clusters** (with `context`, the tokens each neuron fires on in the conversation): a neuron with no topic
  in its corpus evidence whose firing tokens here are mostly words of one topic joins "X (here)", kind "context".
  On SmolLM2 the neurons that fire hardest on 'brothers' and 'sisters' in a conversation show no sibling words
  among their corpus exemplars; this says what they respond to here without claiming what they read in general.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import NeuronscopeError
from ..refs import check_neuron, check_polarity
from .evidence import ConceptEvidence

FORM_SHARE = 0.6
TOPIC_Z = 3.0
KEY_TOPICS = 2
MIN_SHARE = 0.2
CONTEXT_SHARE = 0.5
Neuron = tuple[int, int, str]

FORM_GROUPS: dict[str, str] = {".": "sentence ends", "!": "sentence ends", "?": "sentence ends",
                               ",": "clause punctuation", ";": "clause punctuation", ":": "clause punctuation",
                               "-": "clause punctuation", "\u23ce": "line breaks and spacing",
                               "\u2423": "line breaks and spacing"}


def form_group(key: str) -> str:
    """The form group of one token key (see FORM_GROUPS; digits: numbers and list numbering)."""
    if key in FORM_GROUPS:
        return FORM_GROUPS[key]
    if any(ch.isdigit() for ch in key):
        return "numbers and list numbering"
    if any(ch in "()[]{}\"'`\u201c\u201d\u2018\u2019<>" for ch in key):
        return "quotes and brackets"
    if not any(ch.isalpha() for ch in key):
        return "clause punctuation" if key.strip() else "line breaks and spacing"
    return "function words"


@dataclass
class ConceptCluster:
    """A group of neuron polarities with its name and what its members read and write: the one cluster record of
    every grouping (by meaning here, by description in concepts.by_description, by shared top token in the
    Monitor's fallback)."""
    name: str
    kind: str               # "concept", "context" (fires here on a topic), "form", "unclear"; "description": grouped
                            # by description (by_description); "token": by a shared top decoded token
    members: list[list[Any]]                    # [[layer, neuron, polarity], ...]
    size: int
    coherence: float                            # members' mean share of the topic's words (1 for form groups)
    tokens: list[str] = field(default_factory=list)
    reads: str | None = None                    # topic of what the members fire on
    writes: str | None = None                   # topic of what they promote
    steer: str = ""                             # the members as `--steer` reads them

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def neuron_items(neurons: Sequence[Sequence[Any]], n_layers: int | None, n_neurons: int | None) -> list[Neuron]:
    """(layer, neuron, polarity) triples, a polarity left out meaning pos, checked against the model's size when
    given, in order without repeats."""
    out: list[Neuron] = []
    seen: set[Neuron] = set()
    for it in neurons:
        t = tuple(it)
        if len(t) not in (2, 3):
            raise NeuronscopeError(f"A neuron is (layer, neuron[, polarity]), got {t!r}.")
        l, n = int(t[0]), int(t[1])
        p = check_polarity(t[2] if len(t) == 3 else "pos")
        if n_layers is not None:
            check_neuron(l, n, n_layers, n_neurons or 0, where="this atlas")
        if (l, n, p) not in seen:
            seen.add((l, n, p))
            out.append((l, n, p))
    return out


def steer_form(members: Sequence[Sequence[Any]]) -> str:
    """Members as the neuron list `--steer` and `--neurons` read: 20:1234+,21:77-."""
    return ",".join(f"{m[0]}:{m[1]}{'+' if m[2] == 'pos' else '-'}" for m in members)


def _rows_dense(m: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Selected rows of a CSR matrix as a dense [len(rows), n_cols] tensor."""
    crow, col, val = m.crow_indices(), m.col_indices(), m.values()
    out = torch.zeros(len(rows), m.shape[1])
    for i, r in enumerate(rows):
        a, b = int(crow[r]), int(crow[r + 1])
        out[i, col[a:b]] = val[a:b]
    return out


def concept_clusters(folder: str | Path, neurons: Sequence[Sequence[Any]], *, min_share: float = MIN_SHARE,
                     min_size: int = 2, embedder: Any = None,
                     context: Mapping[Neuron, Sequence[str]] | None = None) -> list[ConceptCluster]:
    """Clusters of `neurons` ([(layer, neuron, polarity)]; a polarity left out means pos): concept clusters first
    (biggest first), then the context clusters, the form groups, and one "unclear" group of the rest. Needs concept
    evidence (statistics and `neuronscope describe`).

    context: the tokens each neuron fires on in the text at hand (a conversation); a neuron with no topic in its
    corpus evidence whose firing tokens here are mostly (>= `CONTEXT_SHARE`) words of one topic joins a cluster of
    kind "context", named "X (here)": it fires here on X, though the corpus does not say it reads X."""
    from .search import open_evidence
    if not 0 < float(min_share) <= 1:
        raise NeuronscopeError(f"min_share must be in (0, 1], got {min_share}.")
    if min_size < 1:
        raise NeuronscopeError(f"min_size must be at least 1, got {min_size}.")
    ev, _ = open_evidence(folder, embedder)
    items = neuron_items(neurons, ev.n_layers, ev.n_neurons)
    if not items:
        return []
    rows = torch.tensor([ev.row(*it) for it in items], dtype=torch.long)
    form = ev.form_share[rows] >= FORM_SHARE
    out = _form_groups(ev, [it for it, f in zip(items, form.tolist()) if f],
                       rows[form], min_size)
    content = [j for j, f in enumerate(form.tolist()) if not f]
    concepts, unclear = _concept_groups(ev, [items[j] for j in content], rows[content], float(min_share), min_size)
    here: list[ConceptCluster] = []
    if context:
        here, unclear = _context_groups(ev, unclear, context, min_size)
    out = concepts + here + out
    if unclear:
        unclear.sort()
        out.append(ConceptCluster("no clear topic", "unclear", [list(m) for m in unclear], len(unclear), 0.0, [],
                                  None, None, steer_form(unclear)))
    return out


def _form_groups(ev: ConceptEvidence, items: list[Neuron], rows: torch.Tensor, min_size: int
                 ) -> list[ConceptCluster]:
    by: dict[str, list[Neuron]] = {}
    shown: dict[str, Counter[str]] = {}
    for it, m in zip(items, rows.tolist()):
        weight: Counter[str] = Counter()
        for c, w in zip(ev.read_codes[m].tolist(), ev.read_w[m].tolist()):
            if c >= 0:
                weight[form_group(ev.keys[c])] += w
        if not weight:
            continue
        g = weight.most_common(1)[0][0]
        by.setdefault(g, []).append(it)
        keys = shown.setdefault(g, Counter())
        for c, w in zip(ev.read_codes[m].tolist(), ev.read_w[m].tolist()):
            if c >= 0 and form_group(ev.keys[c]) == g:
                keys[ev.keys[c]] += w
    out = []
    for g, members in by.items():
        if len(members) < min_size:
            continue
        members.sort()
        toks = [k for k, _ in shown[g].most_common(4)]
        name = g if g != "function words" else "function words: " + ", ".join(toks[:2])
        out.append(ConceptCluster(name, "form", [list(m) for m in members], len(members), 1.0, toks, g, None,
                                  steer_form(members)))
    out.sort(key=lambda c: -c.size)
    return out


def topic_keys(ev: ConceptEvidence) -> torch.Tensor:
    """[C, K] sparse 0/1 matrix: key c is a word of topic t when t is among the key's `KEY_TOPICS` nearest topics
    and stands out for it (z >= `TOPIC_Z` against the topic's cosines with all keys). Built once per evidence."""
    hit = getattr(ev, "_topic_keys", None)
    if hit is None:
        mu, sd = _topic_norms(ev)
        cos, ids = ev.key_topics
        cos, ids = cos[:, :KEY_TOPICS], ids[:, :KEY_TOPICS]
        z = (cos - mu[ids]) / sd[ids]
        ok = (z >= TOPIC_Z) & (~ev.form_key).unsqueeze(1)
        rows = torch.arange(cos.shape[0]).unsqueeze(1).expand_as(ids)[ok]
        hit = torch.sparse_coo_tensor(torch.stack([rows, ids[ok]]), torch.ones(int(ok.sum())),
                                      (cos.shape[0], len(ev.terms)), check_invariants=True).coalesce()
        ev._topic_keys = hit  # type: ignore[attr-defined]
    return hit


def topic_shares(ev: ConceptEvidence, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, K] read shares, [n, K] write shares): the weighted share of each polarity's 20 strongest exemplar tokens
    (of the
    tokens it promotes or makes the model say) that are words of each topic."""
    mats = ev.matrices()
    tk = topic_keys(ev)
    idx = rows.tolist()
    reads = torch.sparse.mm(tk.t(), _rows_dense(mats.reads_top, idx).t()).t()
    wd = _rows_dense(mats.writes_decode, idx)
    wm = _rows_dense(mats.writes_measured, idx)
    has_m = (wm.sum(1, keepdim=True) > 0).float()
    writes = torch.sparse.mm(tk.t(), (has_m * wm + (1 - has_m) * wd).t()).t()
    return reads, writes


def _concept_groups(ev: ConceptEvidence, items: list[Neuron], rows: torch.Tensor, min_share: float,
                    min_size: int) -> tuple[list[ConceptCluster], list[Neuron]]:
    """(concept clusters, neurons with no clear topic). Each neuron joins the topic with the largest share of what
    it promotes (writes) when that share reaches `min_share`, else the topic with the largest share of its exemplar
    tokens (reads) when that share does; writers come first because what a neuron does is what steering uses."""
    if not items:
        return [], []
    reads, writes = topic_shares(ev, rows)
    best_r, tr = reads.max(1)
    best_w, tw = writes.max(1)
    by: dict[int, list[int]] = {}
    unclear: list[Neuron] = []
    for j, it in enumerate(items):
        r, w = float(best_r[j]), float(best_w[j])
        if max(r, w) < min_share:
            unclear.append(it)
            continue
        by.setdefault(int(tw[j]) if w >= min_share else int(tr[j]), []).append(j)   # what it writes comes first
    out = []
    for t, g in by.items():
        if len(g) < min_size:
            unclear.extend(items[j] for j in g)
            continue
        members = sorted(items[j] for j in g)
        share = float(torch.maximum(reads[g, t], writes[g, t]).mean())
        r_mean, w_mean = reads[g].mean(0), writes[g].mean(0)
        rt, wt = int(r_mean.argmax()), int(w_mean.argmax())
        read_topic = ev.terms[rt] if float(r_mean[rt]) >= min_share else None
        write_topic = ev.terms[wt] if float(w_mean[wt]) >= min_share else None
        name = ev.terms[t]
        if read_topic and write_topic and read_topic != write_topic:
            name = f"{read_topic} \u2192 {write_topic}"              # reads one thing, writes another
        out.append(ConceptCluster(name, "concept", [list(m) for m in members], len(members), round(share, 4),
                                  _topic_words(ev, rows[g], t), read_topic, write_topic, steer_form(members)))
    out.sort(key=lambda c: (-c.size, -c.coherence))
    return out, unclear


def _context_groups(ev: ConceptEvidence, items: list[Neuron], context: Mapping[Neuron, Sequence[str]],
                    min_size: int) -> tuple[list[ConceptCluster], list[Neuron]]:
    """(clusters of neurons whose firing tokens in the text at hand are mostly words of one topic, the rest)."""
    from ..describe.label import token_key
    tk = topic_keys(ev)
    code = ev.code_of
    topics_of: dict[int, set[int]] = {}
    for c, t in zip(tk.indices()[0].tolist(), tk.indices()[1].tolist()):
        topics_of.setdefault(c, set()).add(t)
    by: dict[int, list[Neuron]] = {}
    words: dict[int, Counter[str]] = {}
    rest: list[Neuron] = []
    for it in items:
        keys = [token_key(s) for s in context.get(it, [])]
        count: Counter[int] = Counter()
        for k in keys:
            for t in topics_of.get(code.get(k, -1), ()):
                count[t] += 1
        if not keys or not count:
            rest.append(it)
            continue
        t, n = count.most_common(1)[0]
        if n / len(keys) < CONTEXT_SHARE:
            rest.append(it)
            continue
        by.setdefault(t, []).append(it)
        words.setdefault(t, Counter()).update(k for k in keys if t in topics_of.get(code.get(k, -1), ()))
    out = []
    for t, members in by.items():
        if len(members) < min_size:
            rest.extend(members)
            continue
        members.sort()
        out.append(ConceptCluster(f"{ev.terms[t]} (here)", "context", [list(m) for m in members], len(members),
                                  0.0, [k for k, _ in words[t].most_common(5)], ev.terms[t], None,
                                  steer_form(members)))
    out.sort(key=lambda c: -c.size)
    return out, sorted(rest)


def _topic_words(ev: ConceptEvidence, rows: torch.Tensor, t: int, n: int = 5) -> list[str]:
    """The topic's words the members read or write, commonest first."""
    tk = topic_keys(ev)
    words = set(tk.indices()[0][tk.indices()[1] == t].tolist())
    count: Counter[str] = Counter()
    for m in rows.tolist():
        for c in set(ev.read_codes[m].tolist() + ev.write_codes[m].tolist()):
            if c in words:
                count[ev.keys[c]] += 1
    return [k for k, _ in count.most_common(n)]


def _topic_norms(ev: ConceptEvidence) -> tuple[torch.Tensor, torch.Tensor]:
    """Per topic: mean and sd of its cosine with all the vocabulary's token keys, computed once."""
    hit = getattr(ev, "_topic_norms", None)
    if hit is None:
        cos = ev.key_emb @ ev.term_emb.T                                  # [C, K]
        hit = (cos.mean(0), cos.std(0, unbiased=False).clamp_min(1e-6))
        ev._topic_norms = hit  # type: ignore[attr-defined]
    return hit
