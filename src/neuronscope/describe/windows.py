"""Sentence embeddings of the corpus windows, the topic vocabulary and the token keys: what context descriptions and
concept search read meaning from (`window_emb.safetensors` in the atlas folder).

    wm = WindowMeaning.build(folder, subject, embedder, vocab)   # or .load(folder) once built
    wm.window_z(term_vecs)          # [windows, terms] relevance of each stored window to each term, standardised
    wm.key_z(term_vecs)             # [keys, terms] relevance of each token key (label.LabelVocab codes)

- **Windows**: every corpus window the statistics stored (atlas.sqlite `stats_windows`), decoded to text with the
  model's tokenizer and embedded with the sentence embedder (all-MiniLM-L6-v2 by default), one unit vector each.
- **Topics**: the topic vocabulary the package ships (`describe/data/topics.txt`, ~370 everyday topics, semantic
  fields and kinds of text, written for neuronscope under its Apache-2.0 licence: no download, no licence question,
  broad rather than fitted to any evaluation). A context description names topics only from it; an explainer's free
  text may name others, embedded on demand.
- **Token keys**: the label vocabulary's keys (token strings with space markers stripped, lower case) that occur in
  the corpus, embedded one by one, so "fires on words about animals" can be simulated on any token (keys never seen
  are never simulated and keep a zero vector).
Relevance is the cosine of a text's vector with a term's, **standardised** per term over the reference set (all
stored windows; all keys weighted by their corpus count), because raw cosines of MiniLM differ in level from one term
to the next: z = (cos - mean) / sd. The file records the embedder's name and the statistics' identity; a stale file
(other statistics, other embedder) is rebuilt.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import store
from ..atlas.folder import WINDOW_EMB_FILE, WINDOWS_TABLE, check_safetensors
from ..errors import NeuronscopeError

Embedder = Any


def topic_terms() -> list[str]:
    """The shipped topic vocabulary, in file order (comments and blank lines left out, duplicates once)."""
    text = resources.files("neuronscope.describe").joinpath("data/topics.txt").read_text(encoding="utf-8")
    out: list[str] = []
    for line in text.splitlines():
        t = line.split("#", 1)[0].strip()
        if t and t not in out:
            out.append(t)
    return out


def stats_identity(folder: Path) -> str:
    """What the window embeddings depend on: the statistics' corpus, window size and token count."""
    sec = store.read_manifest(folder).get("stats") or {}
    ident = {k: sec.get(k) for k in ("corpus", "window", "tokens", "windows", "corpus_format")}
    return json.dumps(ident, sort_keys=True, default=str)


def read_windows(folder: Path) -> tuple[list[int], list[list[int]]]:
    """(window ids, token ids) of every stored window, in id order."""
    con = store.open_db(folder)
    try:
        rows = con.execute(f"SELECT window, token_ids FROM {WINDOWS_TABLE} ORDER BY window").fetchall()
    finally:
        con.close()
    return [int(w) for w, _ in rows], [json.loads(ids) for _, ids in rows]


def _standardise(sims: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Column-wise z-scores of [n, k] cosines (weighted by row weights when given)."""
    if weights is None:
        mu = sims.mean(0, keepdim=True)
        sd = sims.std(0, keepdim=True)
    else:
        w = (weights / weights.sum().clamp_min(1e-9)).unsqueeze(1)
        mu = (sims * w).sum(0, keepdim=True)
        sd = (((sims - mu) ** 2) * w).sum(0, keepdim=True).sqrt()
    return (sims - mu) / sd.clamp_min(1e-6)


@dataclass
class WindowMeaning:
    """Unit embeddings of the stored windows, the topic terms and the token keys of one atlas folder."""
    windows: list[int]                  # stored window ids, ascending
    window_emb: torch.Tensor            # [W, d]
    terms: list[str]
    term_emb: torch.Tensor              # [K, d]
    keys: list[str]                     # label vocabulary keys (code order)
    key_emb: torch.Tensor               # [C, d]
    key_freq: torch.Tensor              # [C] corpus counts of the keys (weights of the key standardisation)
    embedder: str
    row_of: dict[int, int]

    @classmethod
    def build(cls, folder: str | Path, subject: Any, embedder: Embedder, keys: Sequence[str],
              key_freq: Sequence[int], *, progress: bool = False) -> "WindowMeaning":
        """Embed every stored window (decoded with the subject's tokenizer), the topics and the keys; write the
        file; return the result. Reuses the file when it matches (same statistics, embedder and keys)."""
        folder = Path(folder)
        name = str(getattr(embedder, "name", "embedder"))
        ident = stats_identity(folder)
        old = cls.load(folder, expect_embedder=name, expect_identity=ident)
        if old is not None and old.keys == list(keys):
            return old
        t0 = time.perf_counter()
        wins, ids = read_windows(folder)
        if not wins:
            raise NeuronscopeError(f"The statistics in '{folder}' store no windows; run `neuronscope stats` again.")
        texts = [subject.tokenizer.decode(x, skip_special_tokens=True) for x in ids]
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(texts) + sum(f > 0 for f in key_freq), unit="text", desc="embed windows",
                       dynamic_ncols=True)
        wemb = _embed(embedder, texts, bar)
        terms = topic_terms()
        temb = embedder(terms).float()
        seen = [i for i, f in enumerate(key_freq) if f > 0]          # keys never in the corpus are never simulated
        kemb = torch.zeros(len(keys), wemb.shape[1])
        if seen:
            kemb[torch.tensor(seen)] = _embed(embedder, [keys[i] if keys[i].strip() else " " for i in seen], bar)
        if bar is not None:
            bar.close()
        meta = {"embedder": name, "stats": ident, "terms": json.dumps(terms), "keys": json.dumps(list(keys)),
                "seconds": f"{time.perf_counter() - t0:.2f}"}
        store.save_tensors(folder / WINDOW_EMB_FILE, {
            "windows": torch.tensor(wins, dtype=torch.int64), "window_emb": wemb.half(), "term_emb": temb.half(),
            "key_emb": kemb.half(), "key_freq": torch.tensor(list(key_freq), dtype=torch.float32)}, meta)
        return cls(wins, wemb, terms, temb, list(keys), kemb, torch.tensor(list(key_freq), dtype=torch.float32),
                   name, {w: i for i, w in enumerate(wins)})

    @classmethod
    def load(cls, folder: str | Path, *, expect_embedder: str | None = None,
             expect_identity: str | None = None) -> "WindowMeaning | None":
        """The stored embeddings, or None when there are none (or they are stale for the given expectations)."""
        path = Path(folder) / WINDOW_EMB_FILE
        if not path.is_file():
            return None
        check_safetensors(path, "delete it and run `neuronscope describe` again to rebuild it")
        meta = store.read_metadata(path)
        if expect_embedder is not None and meta.get("embedder") != expect_embedder:
            return None
        if expect_identity is not None and meta.get("stats") != expect_identity:
            return None
        t = store.load_tensors(path)
        wins = [int(x) for x in t["windows"].tolist()]
        return cls(wins, t["window_emb"].float(), json.loads(meta.get("terms", "[]")), t["term_emb"].float(),
                   json.loads(meta.get("keys", "[]")), t["key_emb"].float(), t["key_freq"].float(),
                   str(meta.get("embedder", "")), {w: i for i, w in enumerate(wins)})

    # ---- relevance -------------------------------------------------------------------------------------------
    def window_z(self, term_vecs: torch.Tensor) -> torch.Tensor:
        """[W, k] standardised relevance of every stored window to each term vector."""
        return _standardise(self.window_emb @ term_vecs.T)

    def key_z(self, term_vecs: torch.Tensor) -> torch.Tensor:
        """[C, k] standardised relevance of every token key to each term vector (weighted by corpus counts)."""
        return _standardise(self.key_emb @ term_vecs.T, self.key_freq + 1e-3)

    def term_vectors(self, terms: Sequence[str], embedder: Embedder | None = None) -> torch.Tensor:
        """Unit vectors of terms: from the shipped vocabulary when there, else embedded (needs `embedder`)."""
        pos = {t: i for i, t in enumerate(self.terms)}
        missing = [t for t in terms if t not in pos]
        extra: dict[str, torch.Tensor] = {}
        if missing:
            if embedder is None:
                raise NeuronscopeError(f"Embedding the terms {missing[:3]} needs the sentence embedder.")
            for t, v in zip(missing, embedder(list(missing)).float()):
                extra[t] = v
        return torch.stack([self.term_emb[pos[t]] if t in pos else extra[t] for t in terms]) if terms else \
            torch.zeros(0, self.term_emb.shape[1])


def _embed(embedder: Embedder, texts: list[str], bar: Any, chunk: int = 512) -> torch.Tensor:
    out = []
    for s in range(0, len(texts), chunk):
        out.append(embedder(texts[s:s + chunk]).float())
        if bar is not None:
            bar.update(len(texts[s:s + chunk]))
    return torch.cat(out) if out else torch.zeros(0, 1)
