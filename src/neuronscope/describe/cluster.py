"""`cluster_neurons`: group neurons into concepts by what they decode to (and what their descriptions say).

Each (layer, neuron, polarity) is a sparse distribution over normalised token strings (space markers stripped,
lower case): the atlas's top-k tokens for the site that polarity promotes (down.pos / down.neg), with their
probabilities. The distance of two neurons is 1 - cosine similarity of those vectors; when the folder has
description embeddings for both, the distance is the mean of that and 1 - cosine of the embeddings. Clusters come
from average-linkage agglomeration cut at `threshold` (Monitor: 0.6); each is named after the tokens its members
share most (or, failing that, the commonest words of their descriptions).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import torch

from ..errors import NeuronscopeError
from .describe import POLARITIES, Descriptions, decoded_site, description_words
from .simulate import norm_token


def _atlas(atlas):
    if hasattr(atlas, "top_ids"):
        return atlas
    from ..atlas import Atlas
    return Atlas.open(atlas)


def average_linkage(dist: torch.Tensor, threshold: float) -> list[list[int]]:
    """Agglomerative clustering of a symmetric distance matrix, average linkage, merging while the closest pair
    of clusters is at distance < threshold. Returns clusters as lists of indices (deterministic)."""
    n = dist.shape[0]
    d = dist.double().clone()
    d.fill_diagonal_(float("inf"))
    clusters: dict[int, list[int]] = {i: [i] for i in range(n)}
    active = torch.ones(n, dtype=torch.bool)
    while int(active.sum()) > 1:
        masked = d.clone()
        masked[~active] = float("inf")
        masked[:, ~active] = float("inf")
        flat = int(torch.argmin(masked))
        i, j = divmod(flat, n)
        if not masked[i, j] < threshold:
            break
        i, j = min(i, j), max(i, j)
        ni, nj = len(clusters[i]), len(clusters[j])
        new = (ni * d[i] + nj * d[j]) / (ni + nj)          # Lance-Williams, average linkage
        d[i], d[:, i] = new, new
        d[i, i] = float("inf")
        active[j] = False
        clusters[i] = clusters[i] + clusters.pop(j)
    return [sorted(c) for c in clusters.values()]


def cluster_neurons(atlas, neurons: Sequence[Sequence], *, threshold: float = 0.6, min_size: int = 2,
                    use_descriptions: bool = True) -> list[dict]:
    """Clusters of `neurons` ([(layer, neuron, polarity)]; a polarity may be left out: pos) as
    [{"name", "members": [[layer, neuron, polarity], ...], "tokens": [str]}], biggest first."""
    atlas = _atlas(atlas)
    if not 0 < float(threshold) <= 2:
        raise NeuronscopeError(f"The distance threshold must be in (0, 2], got {threshold}.")
    if min_size < 1:
        raise NeuronscopeError(f"min_size must be at least 1, got {min_size}.")
    items: list[tuple[int, int, str]] = []
    seen = set()
    for it in neurons:
        it = tuple(it)
        if len(it) not in (2, 3):
            raise NeuronscopeError(f"A neuron is (layer, neuron[, polarity]), got {it!r}.")
        l, n = int(it[0]), int(it[1])
        p = it[2] if len(it) == 3 else "pos"
        if p not in POLARITIES:
            raise NeuronscopeError(f"Polarity must be 'pos' or 'neg', got {p!r}.")
        atlas.check(l, n)
        if (l, n, p) not in seen:
            seen.add((l, n, p))
            items.append((l, n, p))
    if not items:
        return []
    # token distributions
    vocab: dict[str, int] = {}
    rows: list[dict[int, float]] = []
    shown: dict[str, str] = {}
    for l, n, p in items:
        site = decoded_site(p) if decoded_site(p) in atlas.sites else atlas.sites[0]
        ids = atlas.top_ids(site)[l, n].tolist()
        probs = atlas.top_probs(site)[l, n].tolist()
        row: dict[int, float] = defaultdict(float)
        for t, pr in zip(ids, probs):
            s = atlas.token(t)
            key = norm_token(s)
            if not key:
                continue
            shown.setdefault(key, s.strip() or s)
            row[vocab.setdefault(key, len(vocab))] += pr
        rows.append(row)
    m = torch.zeros(len(items), max(1, len(vocab)), dtype=torch.float64)
    for r, row in enumerate(rows):
        for c, v in row.items():
            m[r, c] = v
    m = torch.nn.functional.normalize(m, dim=1)
    dist = 1.0 - m @ m.T
    # description embeddings, where present
    descs = None
    if use_descriptions:
        try:
            descs = Descriptions.open(Path(atlas.folder))
        except NeuronscopeError:
            descs = None
    if descs is not None:
        embs = descs.embeddings()
        if embs and all(it in embs for it in items):
            e = torch.stack([embs[it] for it in items]).double()
            dist = (dist + (1.0 - e @ e.T)) / 2
    dist = dist.clamp_min(0.0)
    groups = average_linkage(dist, float(threshold))
    out = []
    for g in groups:
        if len(g) < min_size:
            continue
        share: Counter[str] = Counter()
        weight: Counter[str] = Counter()
        inv = {v: k for k, v in vocab.items()}
        for r in g:
            for c, v in rows[r].items():
                share[inv[c]] += 1
                weight[inv[c]] += v
        common = sorted((t for t in share if share[t] >= 2 or len(g) == 1),
                        key=lambda t: (-share[t], -weight[t], t))
        tokens = [shown[t] for t in common[:5]]
        name = " / ".join(tokens[:3])
        if not name and descs is not None:
            words: Counter[str] = Counter()
            for r in g:
                d = descs.get(*items[r])
                if d:
                    words.update(set(description_words(d["text"])))
            name = " / ".join(w for w, _ in words.most_common(3))
        if not name:
            name = " / ".join(shown[inv[c]] for c, _ in sorted(rows[g[0]].items(), key=lambda x: -x[1])[:3])
        out.append({"name": name or "cluster", "members": [list(items[r]) for r in g], "tokens": tokens})
    out.sort(key=lambda c: (-len(c["members"]), c["members"][0]))
    return out
