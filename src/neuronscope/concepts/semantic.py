"""Semantic concept search: neuron polarities ranked by meaning, read from the descriptions' embedding index.

semantic_search(folder, query): score = cos(embedding of the query, the neuron's vector in the index that
`neuronscope describe` stores: its description's firing and promoted tokens, describe/index.py) + token_weight /
(words in the query) x min(1, token score of `atlas.search.search` at the site that polarity promotes), so an exact
vocabulary match still counts, and "animals" finds dog and cat neurons although no token is "animals". With
`interpretable=True` only neurons whose description is interpretable (both scores, Descriptions.interpretable) are
ranked.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from ..atlas.search import _concept_direction, _cosines, _pol_rows, concept_ids
from ..errors import NeuronscopeError
from .records import SemanticHit

_ATLASES: dict[str, tuple[float, object]] = {}


def _open_atlas(folder: Any) -> Any:
    """The folder's Atlas, opened once per process while its manifest is unchanged (None without decodes)."""
    from pathlib import Path

    from ..atlas.atlas import Atlas
    from ..atlas.folder import MANIFEST
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



def semantic_search(folder: Any, query: str, *, k: int = 50, embedder: Any = None, interpretable: bool = False,
                    token_weight: float = 0.5, subject: Any = None) -> list[SemanticHit]:
    """Neuron polarities for a concept by meaning, best first (`records.SemanticHit`).

    embedder: an Embedder, a folder, None (the pulled default). Needs the index of `neuronscope describe`.
    """
    from .. import store
    from ..describe.describe import Descriptions, check_db_once
    from ..describe.index import load_index
    from ..embed import load_embedder
    from ..atlas.folder import DESCRIPTIONS_TABLE as TABLE
    from ..atlas.folder import AtlasFolder
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
    sec = af.section("descriptions")
    ok = Descriptions(folder, float(sec.get("threshold", 0.5)), sec.get("detection_threshold")).interpretable()
    con = store.open_db(folder)
    try:
        if interpretable:
            mask = torch.tensor([key in ok for key in idx.keys], dtype=torch.bool)
            score = torch.where(mask, score, torch.full_like(score, float("-inf")))
        take = min(k, int(torch.isfinite(score).sum()))
        vals, order = score.topk(take)
        out: list[SemanticHit] = []
        for v, j in zip(vals.tolist(), order.tolist()):
            l, n, p = idx.keys[j]
            row = con.execute(f"SELECT text, score FROM {TABLE} WHERE layer=? AND neuron=? AND polarity=?",
                              (l, n, p)).fetchone()
            ds = None if row is None else row[1]
            site = "down.pos" if p == "pos" else "down.neg"
            out.append(SemanticHit(l, n, p, round(v, 6), round(float(sim[j]), 6), round(float(tok[j]), 6),
                                   None if row is None else row[0], ds, (l, n, p) in ok,
                                   atlas.top_tokens(l, n, site, 5) if atlas is not None and site in atlas.sites
                                   else []))
    finally:
        con.close()
    return out
