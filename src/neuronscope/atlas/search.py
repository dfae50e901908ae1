"""Decode search: `search` ranks neurons by their decoded tokens (semantic search by meaning, which reads the
descriptions, lives above atlas/ and describe/ in `neuronscope.concepts.semantic`).

search(atlas, query):

score = token score + cosine, where
- token score = sum over the neuron's top-k tokens that match a query word (or its plural/singular) of 1/(rank+1)
  (a match at rank 0 counts 1, at rank 1 counts 1/2, ...);
- cosine (only with `subject`, the atlas's own model) = cos(g * v, mean of the unit-normalised unembedding rows of
  the matching tokens), with v the neuron's up/gate row or its write vector (negated for down.neg), and g the final
  norm gain when the atlas was built with it. It ranks neurons whose concept tokens lie just outside the top-k.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Protocol, Sequence

import torch

from ..errors import NeuronscopeError
from .records import NeuronHit
from .vocab import normalise, word_forms

if TYPE_CHECKING:
    from ..describe.index import NeuronIndex
    from ..subject import Subject


class AtlasLike(Protocol):
    """What the search reads of an `atlas.Atlas` (a protocol: atlas.py imports this module, not the reverse)."""
    vocab: list[str]
    sites: list[str]
    layers: list[int]
    n_layers: int
    n_neurons: int
    top_k: int
    apply_norm: bool
    model_name: str
    fingerprint: str | None
    _by_normalised: dict[str, list[int]] | None

    def top_ids(self, site: str) -> torch.Tensor: ...

    def _row(self, layer: int, neuron: int, site: str, score: float, n_tokens: int = 5) -> NeuronHit: ...


def concept_ids(atlas: AtlasLike, query: str, subject: Subject | None = None) -> list[int]:
    """Vocabulary ids that stand for the query's words (all inflections, with or without a leading space)."""
    words = [w for w in re.split(r"[\s,;]+", query or "") if w]
    if not words:
        raise NeuronscopeError("The search query is empty; give one or more words, like \"dog\".")
    forms: set[str] = set()
    for w in words:
        forms |= word_forms(w)
    by_form = _normalised_vocab(atlas)
    ids = [i for f in forms for i in by_form.get(f, ())]
    if not ids and subject is not None and subject.tokenizer is not None:
        for w in words:
            ids += subject.tokenizer(" " + w, add_special_tokens=False)["input_ids"][:1]
    if not ids:
        raise NeuronscopeError(f"No token of this model's vocabulary matches '{query}'; try another spelling.")
    return sorted(set(ids))


def _normalised_vocab(atlas: AtlasLike) -> dict[str, list[int]]:
    """normalise(token) -> ids, computed once per opened atlas (49K tokens take ~0.2 s to normalise)."""
    cached = atlas._by_normalised
    if cached is None:
        cached = {}
        for i, t in enumerate(atlas.vocab):
            cached.setdefault(normalise(t), []).append(i)
        atlas._by_normalised = cached
    return cached


def _pol_rows(idx: NeuronIndex, pol: int) -> torch.Tensor:
    """Rows of the index holding polarity `pol` (0 pos, 1 neg), computed once per loaded index."""
    cache: dict[int, torch.Tensor] = idx.__dict__.setdefault("_pol_rows", {})
    if pol not in cache:
        cache[pol] = (idx.key_tensor[:, 2] == pol).nonzero().squeeze(1)
    return cache[pol]


def search(atlas: AtlasLike, query: str, *, k: int = 50, sites: str | Sequence[str] | None = None,
           subject: Subject | None = None) -> list[NeuronHit]:
    """Neurons ranked for a concept (`records.NeuronHit`: layer, neuron, site, score, tokens), best first."""
    if k < 1:
        raise NeuronscopeError(f"k must be at least 1, got {k}.")
    names = _sites(atlas, sites)
    if subject is not None and atlas.fingerprint and subject.fingerprint != atlas.fingerprint:
        raise NeuronscopeError(f"The model given ({subject.name}) is not the one this atlas was built from "
                               f"({atlas.model_name}); search without it or give the right model.")
    ids = concept_ids(atlas, query, subject)
    idt = torch.tensor(ids)
    weights = 1.0 / torch.arange(1, atlas.top_k + 1, dtype=torch.float32)
    direction = _concept_direction(subject, idt, atlas.apply_norm) if subject is not None else None
    scored: list[torch.Tensor] = []
    for s in names:
        hit = torch.isin(atlas.top_ids(s), idt).float()                     # [L, N, k]
        score = (hit * weights).sum(-1)                                     # [L, N]
        if direction is not None and subject is not None:
            score = score + _cosines(subject, s, direction, atlas.apply_norm, atlas.layers)
        scored.append(score)
    allscores = torch.stack(scored)                                          # [S, L, N]
    flat = allscores.reshape(-1)
    take = min(k, int((flat > 0).sum()))
    vals, idx = flat.topk(take)
    L, N = atlas.n_layers, atlas.n_neurons
    out: list[NeuronHit] = []
    for v, j in zip(vals.tolist(), idx.tolist()):
        s, rem = divmod(j, L * N)
        l, n = divmod(rem, N)
        out.append(atlas._row(l, n, names[s], v))
    return out


def _sites(atlas: AtlasLike, sites: str | Sequence[str] | None) -> list[str]:
    if sites is None:
        return list(atlas.sites)
    if isinstance(sites, str):
        sites = [x.strip() for x in sites.split(",") if x.strip()]
    for s in sites:
        if s not in atlas.sites:
            raise NeuronscopeError(f"This atlas has no site '{s}'; it has {', '.join(atlas.sites)}.")
    return list(sites)


def _concept_direction(subject: Subject, ids: torch.Tensor, apply_norm: bool) -> torch.Tensor:
    W = subject.spec.unembedding(subject.model).detach().float().cpu()[ids]
    d = (W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)).mean(0)
    unit: torch.Tensor = d / d.norm().clamp_min(1e-12)
    return unit


def _cosines(subject: Subject, site: str, direction: torch.Tensor, apply_norm: bool,
             layers: Sequence[int] | None = None) -> torch.Tensor:
    """cos(g * v, direction) for every neuron of every layer at `site`: [L, N]; 0 for layers not in `layers` (the
    layers an atlas was built for, so a search never names a neuron of a layer the atlas lacks)."""
    spec, hf = subject.spec, subject.model
    g = spec.final_norm_gain(hf).detach().float().cpu() if apply_norm else None
    built = set(range(subject.n_layers) if layers is None else layers)
    rows: list[torch.Tensor] = []
    with torch.no_grad():
        for l in range(subject.n_layers):
            if l not in built:
                rows.append(torch.zeros(subject.n_neurons))
                continue
            if site in ("up", "gate"):
                v = spec.read_vectors(hf, l)[site]
            else:
                v = spec.write_vectors(hf, l)
            v = v.detach().float().cpu()
            if g is not None:
                v = v * g
            if site == "down.neg":
                v = -v
            rows.append((v @ direction) / v.norm(dim=1).clamp_min(1e-12))
    return torch.stack(rows)
