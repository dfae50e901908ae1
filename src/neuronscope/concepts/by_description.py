"""`cluster_neurons`: group neuron polarities by the meaning of their descriptions and decodes (the clustering for
atlases without concept evidence, and `neuronscope cluster --by description`; clusters.py groups by activation
evidence).

Each (layer, neuron, polarity) is its vector in the embedding index (index.py: the embedded tokens its description
says fire it and that it promotes; computed on the fly with the embedder for neurons not in the index; with no
embedder at all, weighted one-hot vectors of the tokens they name). Clusters
are scipy's average-linkage agglomeration on cosine distance, cut at `threshold` (Transluce's Monitor: 0.6);
clusters of at least `min_size` (default 3) are returned, each with
- a name read from what its members share: the tokens named by at least half of its members, else the two member
  tokens nearest the cluster's mean vector (with an explainer: a name the LLM writes from the members'
  descriptions);
- a coherence score: the mean pairwise cosine similarity of its members (1 = the same meaning);
- `steer`: the members in the neuron-list form that `neuronscope generate --steer` takes (steer.py).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import store
from ..atlas.folder import DESCRIPTIONS_TABLE, AtlasFolder
from ..errors import NeuronscopeError
from ..describe.describe import check_db_once, decoded_site
from ..describe.index import description_items, load_index, neuron_vectors
from ..describe.label import quote, token_key
from .clusters import ConceptCluster, neuron_items, steer_form

Key = tuple[int, int, str]


def _folder(atlas: Any) -> Path:
    return Path(getattr(atlas, "folder", atlas))


def cluster_neurons(atlas: Any, neurons: Sequence[Sequence[Any]], *, threshold: float = 0.6, min_size: int = 3,
                    embedder: Any = None, explainer: Any = None) -> list[ConceptCluster]:
    """Clusters of `neurons` ([(layer, neuron, polarity)]; a polarity left out means pos), biggest first, each a
    `ConceptCluster` of kind "description" (name, members [[l, n, p], ...], size, coherence, tokens, steer)."""
    folder = _folder(atlas)
    if not 0 < float(threshold) <= 2:
        raise NeuronscopeError(f"The distance threshold must be in (0, 2], got {threshold}.")
    if min_size < 1:
        raise NeuronscopeError(f"min_size must be at least 1, got {min_size}.")
    m = AtlasFolder.open(folder).model
    items = neuron_items(neurons, m.get("n_layers"), m.get("n_neurons"))
    if not items:
        return []
    texts = _texts(folder, items)
    idx = load_index(folder)
    vec = _vectors(items, texts, idx, embedder)
    center = idx.center if idx is not None else None
    out: list[ConceptCluster] = []
    for g in _groups(vec, float(threshold)):
        if len(g) < min_size:
            continue
        members = [items[j] for j in sorted(g, key=lambda j: items[j])]
        V = vec[g]
        coherence = 1.0 if len(g) == 1 else float(((V @ V.T).sum() - len(g)) / (len(g) * (len(g) - 1)))
        name, tokens = _name(members, texts, V, embedder, center)
        if explainer is not None:
            name = _llm_name(explainer, [texts[it][0] for it in members]) or name
        out.append(ConceptCluster(name, "description", [list(it) for it in members], len(members),
                                  round(coherence, 4), tokens, steer=steer_form(members)))
    out.sort(key=lambda c: (-c.size, -c.coherence, c.members[0]))
    return out


def _vectors(items: list[Key], texts: dict[Key, tuple[str, str]], idx: Any, embedder: Any) -> torch.Tensor:
    """Each neuron's vector: its row of the embedding index, embedded on the fly when missing, or (no embedder at
    all) weighted one-hot tokens."""
    pos = idx.position() if idx is not None else {}
    vec = torch.zeros(len(items), idx.emb.shape[1] if idx is not None else 1)
    for j, it in enumerate(items):
        if it in pos:
            vec[j] = idx.emb[pos[it]]
    missing = [j for j, it in enumerate(items) if it not in pos]
    if not missing:
        return vec
    from ..embed import load_embedder
    try:
        emb = load_embedder(embedder)
    except NeuronscopeError:
        if embedder is not None:
            raise
        emb = None                       # the default embedder is not pulled: shared tokens only
    if emb is None:
        return _bag_vectors([texts[it] for it in items])
    extra, _ = neuron_vectors([texts[items[j]] for j in missing], emb, center=idx.center if idx is not None else None)
    if idx is None:
        vec = torch.zeros(len(items), extra.shape[1])
    for j, v in zip(missing, extra):
        vec[j] = v
    return vec


def _groups(vec: torch.Tensor, threshold: float) -> list[list[int]]:
    """Average-linkage groups (cosine distance cut at `threshold`) of the rows with a vector; rows without one alone."""
    alive = [j for j in range(vec.shape[0]) if float(vec[j].norm()) > 0.5]
    groups: list[list[int]] = [[j] for j in range(vec.shape[0]) if j not in alive]
    if len(alive) >= 2:
        from scipy.cluster.hierarchy import fcluster, linkage
        Z = linkage(vec[alive].double().numpy(), method="average", metric="cosine")
        labels = fcluster(Z, t=threshold, criterion="distance")
        by: dict[int, list[int]] = {}
        for j, c in zip(alive, labels.tolist()):
            by.setdefault(int(c), []).append(j)
        groups += list(by.values())
    elif alive:
        groups.append(alive)
    return groups


def _bag_vectors(texts: list[tuple[str, str]]) -> torch.Tensor:
    """Without an embedder: each description as weighted one-hot token keys (neurons alike only when they name the
    same tokens)."""
    rows = [{token_key(s) or s: w for s, w in description_items(t)} for t, _ in texts]
    keys = {k: i for i, k in enumerate(sorted({k for r in rows for k in r}))}
    out = torch.zeros(len(rows), max(1, len(keys)))
    for i, r in enumerate(rows):
        for k, w in r.items():
            out[i, keys[k]] = max(float(out[i, keys[k]]), w)
    return torch.nn.functional.normalize(out, dim=1)


def _texts(folder: Path, items: list[tuple[int, int, str]]) -> dict[tuple[int, int, str], tuple[str, str]]:
    """(description text, source) per neuron; without a description, its decoded tokens as a label."""
    out: dict[tuple[int, int, str], tuple[str, str]] = {}
    af = AtlasFolder.open(folder)
    if af.db_path.is_file():
        check_db_once(af)
    con = store.open_db(folder)
    try:
        has = con.execute("SELECT name FROM sqlite_master WHERE name=?", (DESCRIPTIONS_TABLE,)).fetchone()
        for it in items:
            r = con.execute(f"SELECT text, source FROM {DESCRIPTIONS_TABLE} WHERE layer=? AND neuron=? AND "
                            "polarity=?", it).fetchone() if has else None
            if r is not None:
                out[it] = (r[0], r[1])
    finally:
        con.close()
    lacking = [it for it in items if it not in out]
    if lacking:
        from ..atlas import Atlas
        try:
            atlas = Atlas.open(folder)
        except NeuronscopeError:
            raise NeuronscopeError(f"'{folder}' has neither descriptions nor decodes for {lacking[0][0]}:"
                                   f"{lacking[0][1]}; run `neuronscope describe` first.") from None
        for l, n, p in lacking:
            toks = [t.strip() for t in atlas.top_tokens(l, n, decoded_site(p), 5) if t.strip()]
            out[(l, n, p)] = ("| promotes " + ", ".join(quote(t) for t in toks), "decode")
    return out


def _name(members: list[Key], texts: dict[Key, tuple[str, str]], V: torch.Tensor, embedder: Any,
          center: torch.Tensor | None) -> tuple[str, list[str]]:
    share: Counter[str] = Counter()
    weight: Counter[str] = Counter()
    shown: dict[str, str] = {}
    for it in members:
        keys: dict[str, float] = {}
        for s, w in description_items(texts[it][0]):
            k = token_key(s)
            if not k:
                continue
            shown.setdefault(k, s)
            keys[k] = max(keys.get(k, 0.0), w)
        share.update(keys.keys())
        weight.update(keys)
    need = max(2, (len(members) + 1) // 2)
    common = [k for k, _ in sorted(weight.items(), key=lambda x: (-x[1], x[0])) if share[k] >= need]
    if common:
        tokens = [shown[k] for k in common[:5]]
        top = weight[common[0]]
        return " / ".join(shown[k] for k in common[:3] if weight[k] >= 0.5 * top), tokens
    strings = sorted(shown.values())
    if not strings:
        return "cluster", []
    try:
        from ..embed import load_embedder
        emb = load_embedder(embedder)
    except NeuronscopeError:
        emb = None
    if emb is None:
        tokens = [shown[k] for k, _ in share.most_common(2)]
        return " / ".join(tokens), tokens
    E = _embed_cached(emb, strings)
    if center is not None:
        E = torch.nn.functional.normalize(E - center, dim=1)
    centre = torch.nn.functional.normalize(V.mean(0), dim=0)
    best = (E @ centre).argsort(descending=True)[:2].tolist()
    tokens = [strings[i] for i in best]
    return " / ".join(tokens) + " (nearest)", tokens


_STRING_EMB: dict[tuple[int, str], torch.Tensor] = {}


def _embed_cached(emb: Any, strings: list[str]) -> torch.Tensor:
    """Unit embeddings of token strings, each computed once per embedder and process (cluster names repeat)."""
    need = [s for s in strings if (id(emb), s) not in _STRING_EMB]
    if need:
        for s, v in zip(need, torch.nn.functional.normalize(torch.as_tensor(emb(need), dtype=torch.float32), dim=1)):
            _STRING_EMB[(id(emb), s)] = v
    return torch.stack([_STRING_EMB[(id(emb), s)] for s in strings])


def _llm_name(explainer: Any, descriptions: list[str]) -> str:
    from ..describe.explainer import clean_reply, make_explainer
    ex = make_explainer(explainer)
    lines = "\n".join(f"- {d}" for d in descriptions[:30])
    reply = ex.complete([{"role": "system", "content": "You name groups of language-model neurons."},
                         {"role": "user", "content": f"Descriptions of the neurons in one group:\n{lines}\n"
                                                     "Name the concept they share in one to four words."}],
                        temperature=0.0, seed=0, max_tokens=16)
    return clean_reply(reply)[:60]
