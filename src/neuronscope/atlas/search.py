"""Concept search. `semantic_search` ranks neuron polarities by meaning; `search` by decoded tokens.

semantic_search(folder, query): score = cos(embedding of the query, the neuron's vector in the index that
`neuronscope describe` stores: its description's firing and promoted tokens, describe/index.py) + token_weight /
(words in the query) x min(1, token score of `search` below at the site that polarity promotes), so an exact
vocabulary match still counts, and "animals" finds dog and cat neurons although no token is "animals". With
`interpretable=True` only neurons whose description scores at least the manifest's threshold are ranked.

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

import torch

from ..errors import NeuronscopeError
from .vocab import normalise, word_forms


def concept_ids(atlas, query: str, subject=None) -> list[int]:
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


def _normalised_vocab(atlas) -> dict[str, list[int]]:
    """normalise(token) -> ids, computed once per opened atlas (49K tokens take ~0.2 s to normalise)."""
    cached = getattr(atlas, "_by_normalised", None)
    if cached is None:
        cached = {}
        for i, t in enumerate(atlas.vocab):
            cached.setdefault(normalise(t), []).append(i)
        atlas._by_normalised = cached
    return cached


_ATLASES: dict[str, tuple[float, object]] = {}


def _open_atlas(folder):
    """The folder's Atlas, opened once per process while its manifest is unchanged (None without decodes)."""
    from pathlib import Path

    from .atlas import Atlas
    from .folder import MANIFEST
    man = Path(folder) / MANIFEST
    key = str(Path(folder).resolve())
    mtime = man.stat().st_mtime if man.is_file() else -1.0
    hit = _ATLASES.get(key)
    if hit is not None and hit[0] == mtime:
        return hit[1]
    try:
        atlas = Atlas.open(folder)
    except NeuronscopeError:
        atlas = None
    _ATLASES[key] = (mtime, atlas)
    return atlas


def _pol_rows(idx, pol: int) -> torch.Tensor:
    """Rows of the index holding polarity `pol` (0 pos, 1 neg), computed once per loaded index."""
    cache = idx.__dict__.setdefault("_pol_rows", {})
    if pol not in cache:
        cache[pol] = (idx.key_tensor[:, 2] == pol).nonzero().squeeze(1)
    return cache[pol]


def search(atlas, query: str, *, k: int = 50, sites=None, subject=None) -> list[dict]:
    """Neurons ranked for a concept: [{"layer", "neuron", "site", "score", "tokens"}], best first."""
    if k < 1:
        raise NeuronscopeError(f"k must be at least 1, got {k}.")
    sites = _sites(atlas, sites)
    if subject is not None and atlas.fingerprint and subject.fingerprint != atlas.fingerprint:
        raise NeuronscopeError(f"The model given ({subject.name}) is not the one this atlas was built from "
                               f"({atlas.model_name}); search without it or give the right model.")
    ids = concept_ids(atlas, query, subject)
    idt = torch.tensor(ids)
    weights = 1.0 / torch.arange(1, atlas.top_k + 1, dtype=torch.float32)
    direction = _concept_direction(subject, idt, atlas.apply_norm) if subject is not None else None
    scored = []
    for s in sites:
        hit = torch.isin(atlas.top_ids(s), idt).float()                     # [L, N, k]
        score = (hit * weights).sum(-1)                                     # [L, N]
        if direction is not None:
            score = score + _cosines(subject, s, direction, atlas.apply_norm, atlas.layers)
        scored.append(score)
    allscores = torch.stack(scored)                                          # [S, L, N]
    flat = allscores.reshape(-1)
    take = min(k, int((flat > 0).sum()))
    vals, idx = flat.topk(take)
    L, N = atlas.n_layers, atlas.n_neurons
    out = []
    for v, j in zip(vals.tolist(), idx.tolist()):
        s, rem = divmod(j, L * N)
        l, n = divmod(rem, N)
        out.append(atlas._row(l, n, sites[s], v))
    return out


def _sites(atlas, sites) -> list[str]:
    if sites is None:
        return list(atlas.sites)
    if isinstance(sites, str):
        sites = [x.strip() for x in sites.split(",") if x.strip()]
    for s in sites:
        if s not in atlas.sites:
            raise NeuronscopeError(f"This atlas has no site '{s}'; it has {', '.join(atlas.sites)}.")
    return list(sites)


def _concept_direction(subject, ids: torch.Tensor, apply_norm: bool) -> torch.Tensor:
    W = subject.spec.unembedding(subject.model).detach().float().cpu()[ids]
    d = (W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)).mean(0)
    return d / d.norm().clamp_min(1e-12)


def _cosines(subject, site: str, direction: torch.Tensor, apply_norm: bool, layers=None) -> torch.Tensor:
    """cos(g * v, direction) for every neuron of every layer at `site`: [L, N]; 0 for layers not in `layers` (the
    layers an atlas was built for, so a search never names a neuron of a layer the atlas lacks)."""
    spec, hf = subject.spec, subject.model
    g = spec.final_norm_gain(hf).detach().float().cpu() if apply_norm else None
    built = set(range(subject.n_layers) if layers is None else layers)
    rows = []
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


def semantic_search(folder, query: str, *, k: int = 50, embedder=None, interpretable: bool = False,
                    token_weight: float = 0.5, subject=None) -> list[dict]:
    """Neuron polarities for a concept by meaning, best first: [{"layer", "neuron", "polarity", "score",
    "similarity", "token_score", "description", "desc_score", "interpretable", "tokens"}].

    embedder: an Embedder, a folder, None (the pulled default). Needs the index of `neuronscope describe`.
    """
    from .. import store
    from ..describe.describe import check_db_once
    from ..describe.index import load_index
    from ..embed import load_embedder
    from .folder import DESCRIPTIONS_TABLE as TABLE
    from .folder import AtlasFolder
    if not isinstance(query, str) or not query.strip():
        raise NeuronscopeError("The search query is empty; give a word or phrase, like \"animals\".")
    if k < 1:
        raise NeuronscopeError(f"k must be at least 1, got {k}.")
    af = AtlasFolder.open(folder)
    folder = af.path
    idx = load_index(folder)
    if idx is None:
        raise NeuronscopeError(f"'{folder}' has no neuron embedding index; run `neuronscope describe {folder}` "
                               "(with the default embedder, or --embedder PATH) first.")
    emb = load_embedder(embedder)
    if emb is None:
        raise NeuronscopeError("Semantic search needs an embedder; --embedder none leaves only the token search "
                               "(--tokens-only).")
    q = idx.query(torch.as_tensor(emb([query.strip()]), dtype=torch.float32))[0]
    if q.shape[0] != idx.emb.shape[1]:
        raise NeuronscopeError(f"The embedder gives {q.shape[0]}-d vectors but the index holds "
                               f"{idx.emb.shape[1]}-d ones (built with {idx.embedder}); use that embedder.")
    sim = idx.emb @ q                                                          # [M]
    tok = torch.zeros_like(sim)
    atlas = _open_atlas(folder)
    if atlas is not None and token_weight:
        try:
            ids = torch.tensor(concept_ids(atlas, query, subject))
        except NeuronscopeError:          # no token spells the query: meaning alone
            ids = None
        if ids is not None:
            weights = 1.0 / torch.arange(1, atlas.top_k + 1, dtype=torch.float32)
            kt = idx.key_tensor
            for pol, site in ((0, "down.pos"), (1, "down.neg")):
                if site not in atlas.sites:
                    continue
                top = atlas.top_ids(site)
                table = torch.zeros(max(len(atlas.vocab), int(top.max()) + 1))
                table[ids] = 1.0                                  # a lookup, not isin: ~30x faster here
                ts = (table[top] * weights).sum(-1)                                         # [L, N]
                if subject is not None:
                    ts = ts + _cosines(subject, site, _concept_direction(subject, ids, atlas.apply_norm),
                                       atlas.apply_norm, atlas.layers).clamp_min(0)
                sel = _pol_rows(idx, pol)
                tok[sel] = ts[kt[sel, 0], kt[sel, 1]].clamp(max=1.0)
    n_words = max(1, len([w for w in re.split(r"[\s,;]+", query) if w]))
    score = sim + float(token_weight) / n_words * tok            # one matching word of several counts less
    check_db_once(af)
    threshold = float(af.section("descriptions").get("threshold", 0.5))
    con = store.open_db(folder)
    try:
        if interpretable:
            ok = set(con.execute(f"SELECT layer, neuron, polarity FROM {TABLE} WHERE score >= ?",
                                 (threshold,)).fetchall())
            mask = torch.tensor([key in ok for key in idx.keys], dtype=torch.bool)
            score = torch.where(mask, score, torch.full_like(score, float("-inf")))
        take = min(k, int(torch.isfinite(score).sum()))
        vals, order = score.topk(take)
        out = []
        for v, j in zip(vals.tolist(), order.tolist()):
            l, n, p = idx.keys[j]
            row = con.execute(f"SELECT text, score FROM {TABLE} WHERE layer=? AND neuron=? AND polarity=?",
                              (l, n, p)).fetchone()
            ds = None if row is None else row[1]
            out.append({"layer": l, "neuron": n, "polarity": p, "score": round(v, 6),
                        "similarity": round(float(sim[j]), 6), "token_score": round(float(tok[j]), 6),
                        "description": None if row is None else row[0], "desc_score": ds,
                        "interpretable": ds is not None and ds >= threshold,
                        "tokens": atlas.top_tokens(l, n, "down.pos" if p == "pos" else "down.neg", 5)
                        if atlas is not None and ("down.pos" if p == "pos" else "down.neg") in atlas.sites else []})
    finally:
        con.close()
    return out
