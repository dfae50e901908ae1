"""The neuron embedding index: one unit vector per described (layer, neuron, polarity), for semantic concept search
and clustering, stored as `neuron_emb.safetensors` in the atlas folder.

A neuron's vector is the weighted mean of the embeddings of what its description names: the tokens it fires on
(weights 1, 0.8, 0.6, 0.5, ... by rank) and the tokens it promotes (0.5, 0.35, 0.25, 0.15, ...), plus, for an
explainer's free-text description, the embedding of the whole text (weight 2); then L2-normalised. Sentence
embeddings share a large common direction (all words are ~0.3-0.5 alike in all-MiniLM-L6-v2), so averages of
unrelated tokens drift together (0.7-0.9 alike); every string's embedding is therefore centred on the mean embedding
of all strings the index names (stored as `center`; queries are centred the same way) before it is averaged.
Embedding the items one by one (each distinct string once) keeps
label boilerplate ("fires on", "promotes") out of the meaning and makes the index of a whole model cheap: SmolLM2's
92,160 neuron-polarities name ~20-40K distinct strings. Layout: `keys` [M, 3] int64 (layer, neuron, polarity 0=pos
1=neg), `emb` [M, d] float16; metadata: the embedder's name and the weights.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import store
from ..atlas.folder import DESCRIPTIONS_TABLE, EMBEDDINGS_FILE, check_safetensors
from ..errors import NeuronscopeError
from ..refs import POLARITIES
from .forms import split_parts

INDEX_FILE = EMBEDDINGS_FILE
W_FIRE = (1.0, 0.8, 0.6, 0.5)
W_PROMOTE = (0.5, 0.35, 0.25, 0.15)
W_TEXT = 2.0
_ITEM = re.compile(r"'([^']+)'|\"([^\"]+)\"")
POLS = POLARITIES                 # index 0 = pos, 1 = neg in `keys`
EmbedFn = Callable[[list[str]], Any]   # strings -> [n, d] embeddings (an `embed.Embedder`, or any array-like maker)


def description_items(text: str) -> list[tuple[str, float]]:
    """(string, weight) of what a description names: quoted items before ' | promotes' (fires; an item's 'after'
    context is left out) and after it (promotes), weighted by rank (W_FIRE, W_PROMOTE)."""
    head, tail = split_parts(text)
    out: list[tuple[str, float]] = []
    head = re.sub(r"\s+after\s+(?:'[^']+'|\"[^\"]+\")", "", head)
    for part, ws in ((head, W_FIRE), (tail, W_PROMOTE)):
        j = 0
        for m in _ITEM.finditer(part):
            s = (m.group(1) if m.group(1) is not None else m.group(2)).strip()
            if s:
                out.append((s, ws[min(j, len(ws) - 1)]))
                j += 1
    return out


@dataclass
class NeuronIndex:
    keys: list[tuple[int, int, str]]
    key_tensor: torch.Tensor        # [M, 3]
    emb: torch.Tensor               # [M, d] float32 unit rows
    embedder: str
    center: torch.Tensor            # [d] the mean string embedding subtracted before averaging

    def query(self, q: torch.Tensor) -> torch.Tensor:
        """A query's (or string's) unit embeddings [n, d], centred like the index."""
        return torch.nn.functional.normalize(torch.nn.functional.normalize(q.float(), dim=-1) - self.center, dim=-1)

    def position(self) -> dict[tuple[int, int, str], int]:
        """{key: row} (built once per index: a clustering of 300 neurons looked it up anew in 17 ms of its 125)."""
        pos = self.__dict__.get("_position")
        if pos is None:
            pos = self.__dict__["_position"] = {k: i for i, k in enumerate(self.keys)}
        return pos


def neuron_vectors(rows: list[tuple[str, str]], embedder: EmbedFn, batch: int = 512, center: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(vectors, center) for (text, source) descriptions; a description naming nothing gets a zero row. center:
    the mean string embedding to subtract (default: the mean over these rows' strings)."""
    from .label import token_key
    items = [description_items(t) for t, _ in rows]
    # one embedding per token key (case and space variants share it; the embedder is uncased anyway)
    rep: dict[str, str] = {}
    for its in items:
        for s, _ in its:
            rep.setdefault(token_key(s) or s, s)
    texts = {t for t, src in rows if src == "explainer"}
    strings = sorted(set(rep.values()) | texts)
    pos = {s: i for i, s in enumerate(strings)}
    for k, s in rep.items():
        pos.setdefault(k, pos[s])
    E = torch.cat([torch.as_tensor(embedder(strings[i:i + batch]), dtype=torch.float32)
                   for i in range(0, len(strings), batch)]) if strings else torch.zeros(0, 1)
    E = torch.nn.functional.normalize(E, dim=1) if len(strings) else E
    d = E.shape[1] if len(strings) else 1
    if center is None:
        center = E.mean(0) if len(strings) else torch.zeros(d)
    if len(strings):
        E = E - center
    out = torch.zeros(len(rows), d)
    for r, ((text, src), its) in enumerate(zip(rows, items)):
        parts = [(pos[token_key(s) or s], w) for s, w in its]
        if src == "explainer":
            parts.append((pos[text], W_TEXT))
        if not parts:
            continue
        idx = torch.tensor([i for i, _ in parts])
        w = torch.tensor([w for _, w in parts]).unsqueeze(1)
        out[r] = (E[idx] * w).sum(0)
    return torch.nn.functional.normalize(out, dim=1), center


def build_index(folder: str | os.PathLike[str], embedder: EmbedFn, progress: bool = False) -> dict[str, Any]:
    """(Re)build the index of every stored description; returns what the manifest records about it."""
    import time
    t0 = time.perf_counter()
    path = Path(folder)
    con = store.open_db(path)
    try:
        rows = con.execute(f"SELECT layer, neuron, polarity, text, source FROM {DESCRIPTIONS_TABLE} ORDER BY layer, "
                           "neuron, polarity").fetchall()
    finally:
        con.close()
    vecs, center = neuron_vectors([(r[3], r[4]) for r in rows], embedder)
    keys = torch.tensor([[r[0], r[1], POLS.index(r[2])] for r in rows], dtype=torch.int64).reshape(-1, 3)
    name = str(getattr(embedder, "name", getattr(embedder, "__name__", "embedder")))
    store.save_tensors(path / INDEX_FILE, {"keys": keys, "emb": vecs.half(), "center": center.float()},
                       {"embedder": name})
    return {"file": INDEX_FILE, "embedder": name, "n": len(rows), "dim": int(vecs.shape[1]),
            "seconds": round(time.perf_counter() - t0, 2),
            "weights": {"fires": list(W_FIRE), "promotes": list(W_PROMOTE), "explainer_text": W_TEXT},
            "centred": True}


_CACHE: dict[str, tuple[float, NeuronIndex]] = {}


def load_index(folder: str | os.PathLike[str] | None) -> NeuronIndex | None:
    """The folder's index (cached per process while the file is unchanged), or None (also for no folder)."""
    if folder is None:
        return None
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        return None
    mtime = path.stat().st_mtime
    hit = _CACHE.get(str(path))
    if hit is not None and hit[0] == mtime:
        return hit[1]
    from safetensors import safe_open
    remedy = "delete it and run `neuronscope describe` again to rebuild the index"
    check_safetensors(path, remedy)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            kt = f.get_tensor("keys")
            emb = f.get_tensor("emb").float()
            center = f.get_tensor("center").float() if "center" in f.keys() else torch.zeros(emb.shape[1])
    except Exception as exc:  # noqa: BLE001 - a readable header over damaged data or missing tensors
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise NeuronscopeError(f"The file '{path}' is damaged (not a neuron index: {why}); {remedy}.") from None
    keys = [(int(a), int(b), POLS[int(c)]) for a, b, c in kt.tolist()]
    idx = NeuronIndex(keys, kt, emb, meta.get("embedder", "?"), center)
    _CACHE[str(path)] = (mtime, idx)
    return idx
