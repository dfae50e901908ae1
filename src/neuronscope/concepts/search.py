"""Concept search grounded in activations: which neurons read a concept and which write it, with the evidence.

    res = concept_search("atlas-smollm", "family relatives", side="both", embedder=E)
    res.hits[0]      # ConceptHit(layer, neuron, polarity, side="reads", score, reads, writes, ...)
    res.support      # the concept's words in the corpus and the windows about it (what the scores rest on)

A query is embedded with the sentence embedder and compared with what the statistics saw (evidence.py):
- **Concept words**: a token key's membership is the product of two tests. (1) Its similarity to the query stands
  out: z over all the vocabulary's keys, rising from 0 at z = 2 to 1 at z >= 4. (2) The query beats every topic
  (describe/data/topics.txt) that is not a synonym of it (topic cosine with the query < `SYNONYM_COS`): cos(key,
  query) - the key's best cosine with such a topic, soft over +-`MARGIN`. MiniLM puts single words 0.5 from "food"
  whatever they are; "water" is nearer its own topic than "food", "meal" is not.
- **Concept text**: every stored corpus window by the same two tests on its embedding.
- **reads** = the activation-weighted share of the neuron's strongest exemplars that are concept words (`tokens`),
  or that lie in concept text (`windows`), whichever is higher: a neuron whose top activations happen on month
  names reads "months"; one whose top activations fill text about anger reads "anger" whatever the token.
  `separation` compares its exemplars in concept text with the base rate of concept text (an enrichment, with a
  one-sided binomial p-value).
- **writes** = the rank-weighted share of the tokens its write vector promotes (the decode) that are concept words,
  or of the tokens raising it makes the model say (measured output effects), whichever is higher.
- A small description match (cosine of the query with the neuron's description index, describe/index.py, x
  `DESC_WEIGHT`) breaks ties.
A query whose words and text the corpus never showed (fewer than `MIN_WORDS` word-like concept words, membership
>= 0.5 and cosine >= `MIN_WORD_COS`, and fewer than `MIN_WINDOWS` concept windows with cosine >= `MIN_WINDOW_COS`)
is refused with `NoConceptText` rather than answered with noise. Thresholds were set on the dev concepts of
bench/data/concepts.json only.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import NeuronscopeError
from .evidence import ConceptEvidence
from .records import NeuronMatch

SIDES = ("reads", "writes", "both")
DESC_WEIGHT = 0.1
MIN_EVIDENCE = 0.05
MIN_WORDS = 1
MIN_WORD_COS = 0.45
MIN_WINDOWS = 3
MIN_WINDOW_COS = 0.25
SYNONYM_COS = 0.45
MARGIN = 0.05


class NoConceptText(NeuronscopeError):
    """The corpus the statistics read shows neither words nor text of the concept: nothing can be said to read
    or write it."""


@dataclass
class ConceptHit:
    """One neuron polarity found for a concept, with the evidence on each side."""
    layer: int
    neuron: int
    polarity: str
    side: str                          # "reads" or "writes": the side it was ranked on
    score: float                       # that side's score + the description match
    reads: float                       # max(reads_tokens, reads_windows)
    reads_tokens: float
    reads_windows: float
    writes: float
    separation: float                  # exemplars in concept text / base rate of concept text
    separation_p: float                # one-sided binomial p of that many exemplars in concept text
    description_match: float
    measured: bool                     # its writes include measured output effects
    read_words: list[str] = field(default_factory=list)     # concept words among its exemplar tokens
    write_words: list[str] = field(default_factory=list)    # concept words among what it promotes / makes say
    description: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.layer}:{self.neuron}{'+' if self.polarity == 'pos' else '-'}"

    def match(self, side: str | None = None) -> NeuronMatch:
        """As a concept search row: scored on `side` ("writes": its writes score; else the ranking's score), with
        the concept words of the side it was ranked on."""
        return NeuronMatch(self.layer, self.neuron, self.polarity, self.writes if side == "writes" else self.score,
                           list(self.read_words if self.side == "reads" else self.write_words), self.side,
                           self.description)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ref"] = self.ref
        return d


@dataclass
class ConceptSupport:
    """What a concept's scores rest on: its words in the corpus and the corpus windows about it."""
    words: list[str]                   # concept words the corpus shows, best first
    n_words: int
    windows: list[int]                 # stored window ids about it, best first (at most 20 listed)
    n_windows: int
    base_rate: float                   # share of stored windows in concept text (soft)


@dataclass
class ConceptResult:
    query: str
    side: str
    hits: list[ConceptHit]
    support: ConceptSupport
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "side": self.side, "seconds": round(self.seconds, 4),
                "support": asdict(self.support), "hits": [h.to_dict() for h in self.hits]}


@dataclass
class ConceptScores:
    """Every polarity's scores for one query ([M] tensors in evidence row order) and the concept's support."""
    reads: torch.Tensor
    reads_tokens: torch.Tensor
    reads_windows: torch.Tensor
    writes: torch.Tensor
    description: torch.Tensor
    key_member: torch.Tensor          # [C]
    window_member: torch.Tensor       # [W]
    support: ConceptSupport


_CACHE: dict[str, tuple[float, ConceptEvidence, Any]] = {}


def open_evidence(folder: str | Path, embedder: Any = None) -> tuple[ConceptEvidence, Any]:
    """(the folder's concept evidence, its description index or None), loaded once per process per version."""
    from ..atlas.folder import AtlasFolder
    from ..describe.index import load_index
    from .evidence import EVIDENCE_FILE
    af = AtlasFolder.open(folder)
    key = str(af.path.resolve())
    f = af.path / EVIDENCE_FILE
    stamp = f.stat().st_mtime if f.is_file() else -1.0
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1], hit[2]
    ev = ConceptEvidence.open(af.path, embedder)
    stamp = f.stat().st_mtime if f.is_file() else -1.0
    idx = load_index(af.path)
    _CACHE[key] = (stamp, ev, idx)
    return ev, idx


def _member(z: torch.Tensor) -> torch.Tensor:
    return ((z - 2.0) / 2.0).clamp(0.0, 1.0)


def _zscore(sims: torch.Tensor) -> torch.Tensor:
    return (sims - sims.mean()) / sims.std().clamp_min(1e-6)


def _margin(cos: torch.Tensor, tops: tuple[torch.Tensor, torch.Tensor], synonym: torch.Tensor) -> torch.Tensor:
    """cos(query) - the best cosine with a topic that is not a synonym of the query, per row."""
    tcos, tid = tops
    other = torch.where(synonym[tid], torch.full_like(tcos, -1.0), tcos).amax(1)
    return cos - other


def memberships(ev: ConceptEvidence, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(key membership [C], key cosines [C], window membership [W], window cosines [W]) of a unit query vector."""
    syn = (ev.term_emb @ q) >= SYNONYM_COS
    kcos = ev.key_emb @ q
    km = _member(_zscore(kcos)) * ((_margin(kcos, ev.key_topics, syn) + MARGIN) / (2 * MARGIN)).clamp(0, 1)
    wcos = ev.window_emb @ q
    wm = _member(_zscore(wcos)) * ((_margin(wcos, ev.window_topics, syn) + MARGIN) / (2 * MARGIN)).clamp(0, 1)
    return km, kcos, wm, wcos


def score_concept(ev: ConceptEvidence, q: torch.Tensor, idx: Any = None) -> ConceptScores:
    """Every polarity's read and write scores for a unit query vector `q` [d]."""
    km, kcos, wm, wcos = memberships(ev, q)
    mats = ev.matrices()
    rt = mats.reads_tokens @ km
    rwin = mats.reads_windows @ wm
    writes = torch.maximum(mats.writes_decode @ km, mats.writes_measured @ km)
    desc = torch.zeros_like(rt)
    if idx is not None and idx.emb.shape[1] == q.shape[0]:
        sims = idx.emb @ idx.query(q.unsqueeze(0))[0]
        kt = idx.key_tensor
        rows = 2 * (kt[:, 0] * ev.n_neurons + kt[:, 1]) + kt[:, 2]
        ok = rows < desc.shape[0]
        desc[rows[ok]] = sims[ok].float()
    seen = ev.key_freq > 0
    wordlike = ev.wordlike
    strong_keys = ((km >= 0.5) & (kcos >= MIN_WORD_COS) & seen & wordlike).nonzero().flatten()
    strong_keys = strong_keys[kcos[strong_keys].argsort(descending=True)]
    strong_w = ((wm > 0.5) & (wcos >= MIN_WINDOW_COS)).nonzero().flatten()
    strong_w = strong_w[wcos[strong_w].argsort(descending=True)]
    support = ConceptSupport(words=[ev.keys[int(i)] for i in strong_keys[:20]], n_words=int(strong_keys.numel()),
                             windows=[ev.window_ids[int(i)] for i in strong_w[:20]], n_windows=int(strong_w.numel()),
                             base_rate=float(wm.mean()))
    return ConceptScores(torch.maximum(rt, rwin), rt, rwin, writes, desc, km, wm, support)


def concept_search(folder: str | Path, query: str, *, side: str = "both", k: int = 50, embedder: Any = None,
                   layers: Any = None) -> ConceptResult:
    """The top-k neuron polarities for a concept on one side ("reads", "writes") or both (each hit ranked on its
    better side), best first, with their evidence. See the module docstring for the scores."""
    t0 = time.perf_counter()
    if not isinstance(query, str) or not query.strip():
        raise NeuronscopeError("The concept is empty; give a word or phrase, like \"family relatives\".")
    if side not in SIDES:
        raise NeuronscopeError(f"The side must be one of {', '.join(SIDES)}, got '{side}'.")
    if k < 1:
        raise NeuronscopeError(f"k must be at least 1, got {k}.")
    from ..embed import load_embedder
    ev, idx = open_evidence(folder, embedder)
    emb = load_embedder(embedder)
    if emb is None:
        raise NeuronscopeError("Concept search needs the sentence embedder (the default all-MiniLM-L6-v2, or "
                               "--embedder PATH).")
    q = torch.nn.functional.normalize(torch.as_tensor(emb([query.strip()])).float()[0], dim=0)
    if q.shape[0] != ev.key_emb.shape[1]:
        raise NeuronscopeError(f"The embedder gives {q.shape[0]}-d vectors but the concept evidence holds "
                               f"{ev.key_emb.shape[1]}-d ones (built with {ev.embedder}); use that embedder.")
    sc = score_concept(ev, q, idx)
    sup = sc.support
    if sup.n_words < MIN_WORDS and sup.n_windows < MIN_WINDOWS:
        raise NoConceptText(f"The corpus the statistics read has no text about '{query.strip()}' (no word or "
                               "window close enough in meaning), so no neuron can be said to read or write it; "
                               "try a more common phrasing, or compute statistics on a corpus about it.")
    ranked = _rank(sc, side, layers, ev)
    base = float((sc.window_member > 0.5).float().mean())      # share of stored windows in concept text
    hits = [_hit(ev, sc, int(m), s, base) for m, s in ranked[:k]]
    _attach_descriptions(folder, hits)
    return ConceptResult(query.strip(), side, hits, sup, time.perf_counter() - t0)


def side_scores(sc: ConceptScores, side: str) -> torch.Tensor:
    """[M] ranking score of one side ("reads" / "writes"), with the description match; -inf where the side has no
    activation or output evidence (`MIN_EVIDENCE`): a description match alone finds nothing."""
    base = sc.reads if side == "reads" else sc.writes
    score = base + DESC_WEIGHT * sc.description.clamp_min(0)
    return torch.where(base >= MIN_EVIDENCE, score, torch.full_like(score, float("-inf")))


def _rank(sc: ConceptScores, side: str, layers: Any, ev: ConceptEvidence) -> list[tuple[int, str]]:
    sides = ["reads", "writes"] if side == "both" else [side]
    mask = None
    if layers is not None:
        keep = torch.zeros(ev.n_layers, dtype=torch.bool)
        for l in layers:
            if 0 <= int(l) < ev.n_layers:
                keep[int(l)] = True
        mask = keep.repeat_interleave(ev.n_neurons * 2)
    best: torch.Tensor | None = None
    which: torch.Tensor | None = None
    for j, s in enumerate(sides):
        v = side_scores(sc, s)
        if best is None:
            best, which = v, torch.zeros_like(v, dtype=torch.long)
        else:
            assert which is not None
            which = torch.where(v > best, torch.full_like(which, j), which)
            best = torch.maximum(best, v)
    assert best is not None and which is not None
    if mask is not None:
        best = torch.where(mask, best, torch.full_like(best, float("-inf")))
    # rounded, then a stable sort: ties (common: shares of a few tokens) keep row order whatever the thread count
    best = torch.round(best * 1e6) / 1e6
    vals, order = torch.sort(best, descending=True, stable=True)
    vals, order = vals[:5000], order[:5000]
    out = []
    for v, m in zip(vals.tolist(), order.tolist()):
        if not math.isfinite(v):                                  # no evidence on any side asked
            break
        out.append((m, sides[int(which[m])]))
    return out


def _binom_sf(x: int, n: int, p: float) -> float:
    """P(X >= x) for X ~ Binomial(n, p)."""
    from scipy.stats import binom
    return float(binom.sf(x - 1, n, p)) if n > 0 else 1.0


def _hit(ev: ConceptEvidence, sc: ConceptScores, m: int, side: str, base: float) -> ConceptHit:
    l, n, p = ev.neuron(m)
    codes = ev.read_codes[m]
    rows = ev.read_rows[m]
    ok = rows >= 0
    in_text = (sc.window_member[rows.clamp_min(0)] > 0.5) & ok
    n_ex = int(ok.sum())
    x = int(in_text.sum())
    sep = (x / n_ex) / base if n_ex and base > 0 else 0.0
    pval = _binom_sf(x, n_ex, max(base, 1e-6)) if n_ex else 1.0
    return ConceptHit(l, n, p, side, round(float(side_scores(sc, side)[m]), 5), round(float(sc.reads[m]), 5),
                      round(float(sc.reads_tokens[m]), 5), round(float(sc.reads_windows[m]), 5),
                      round(float(sc.writes[m]), 5), round(sep, 3), float(f"{pval:.3g}"),
                      round(float(sc.description[m]), 5), bool(ev.measured[m]),
                      _words(ev, sc, codes), _words(ev, sc, ev.write_codes[m]))


def _words(ev: ConceptEvidence, sc: ConceptScores, codes: torch.Tensor, n: int = 6) -> list[str]:
    out: list[str] = []
    for c in codes.tolist():
        if c >= 0 and float(sc.key_member[c]) > 0 and ev.keys[c] not in out:
            out.append(ev.keys[c])
            if len(out) >= n:
                break
    return out


def _attach_descriptions(folder: str | Path, hits: list[ConceptHit]) -> None:
    """Each hit's stored description text (one read of the database for all hits)."""
    from .. import store
    from ..atlas.folder import DESCRIPTIONS_TABLE
    if not hits or not (Path(folder) / store.DB).is_file():
        return
    con = store.open_db(folder)
    try:
        if con.execute("SELECT name FROM sqlite_master WHERE name=?", (DESCRIPTIONS_TABLE,)).fetchone() is None:
            return
        for h in hits:
            row = con.execute(f"SELECT text FROM {DESCRIPTIONS_TABLE} WHERE layer=? AND neuron=? AND polarity=?",
                              (h.layer, h.neuron, h.polarity)).fetchone()
            h.description = None if row is None else str(row[0])
    finally:
        con.close()
