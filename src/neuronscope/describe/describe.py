"""`describe_atlas` and `Descriptions`: one description per neuron and polarity, stored in the atlas folder.

Without an explainer a description is a label built from what the atlas and the statistics already know:
"fires on 'dog', 'dogs' | promotes 'bark', 'puppy'" (the exemplars' firing tokens, most frequent first, and the
tokens the write vector promotes for that polarity: down.pos for pos, down.neg for neg). With an explainer, it
writes `n_candidates` descriptions from the top exemplars (highlighted) and the decoded tokens; a simulator scores
each on held-out exemplars (Pearson correlation of predicted vs real activations) and the best is kept with its
score. Scoring needs the real per-token activations, so it runs when a `subject` is given.

Storage: atlas.sqlite table `descriptions(layer, neuron, polarity, text, score, source, candidates)`;
embeddings (when an embedder is given) in `descriptions_emb.safetensors`; manifest section "descriptions".
"""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from .. import store
from ..errors import NeuronscopeError
from .explainer import clean_reply, explain_prompt, make_explainer
from .simulate import LLMSimulator, norm_token, score_description, token_match_predict

TABLE = "descriptions"
EMB_FILE = "descriptions_emb.safetensors"
POLARITIES = ("pos", "neg")
_STOP = {"the", "a", "an", "of", "and", "or", "to", "in", "on", "for", "with", "is", "it", "this", "that", "fires",
         "promotes", "neuron", "tokens", "token", "words", "word", "responds", "about", "like", "as", "at", "by"}

Embedder = Callable[[list[str]], Any]


def _ensure_table(con) -> None:
    con.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (layer INTEGER NOT NULL, neuron INTEGER NOT NULL, "
                "polarity TEXT NOT NULL, text TEXT NOT NULL, score REAL, source TEXT NOT NULL, candidates TEXT, "
                "PRIMARY KEY (layer, neuron, polarity))")


def _open_optional(atlas_dir: Path):
    """(Atlas or None, NeuronStats or None) for a folder."""
    atlas = stats = None
    try:
        from ..atlas import Atlas
        atlas = Atlas.open(atlas_dir)
    except (NeuronscopeError, ImportError):
        pass
    try:
        from ..stats import NeuronStats
        stats = NeuronStats.open(atlas_dir)
    except NeuronscopeError:
        pass
    return atlas, stats


def decoded_site(polarity: str) -> str:
    """The atlas site whose tokens a neuron of this polarity promotes."""
    return "down.pos" if polarity == "pos" else "down.neg"


def decoded_tokens(atlas, layer: int, neuron: int, polarity: str, k: int = 5) -> list[str]:
    if atlas is None:
        return []
    site = decoded_site(polarity)
    if site not in atlas.sites:
        return []
    return [t for t in atlas.top_tokens(layer, neuron, site, k) if norm_token(t)]


def firing_tokens(exemplars: Sequence[dict], k: int = 5) -> list[str]:
    """The exemplars' firing tokens (at each exemplar's position), most frequent first (ties: strongest first)."""
    counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    shown: dict[str, str] = {}
    for j, e in enumerate(exemplars):
        tok = e["tokens"][e["position"]]
        key = norm_token(tok)
        if not key:
            key, tok = repr(tok), tok
        counts[key] += 1
        first.setdefault(key, j)
        shown.setdefault(key, tok.strip() or tok)
    order = sorted(counts, key=lambda t: (-counts[t], first[t]))
    return [shown[t] for t in order[:k]]


def make_label(fires: Sequence[str], promotes: Sequence[str]) -> str:
    parts = []
    if fires:
        parts.append("fires on " + ", ".join(repr(t) for t in fires))
    if promotes:
        parts.append("promotes " + ", ".join(repr(t.strip() or t) for t in promotes))
    return " | ".join(parts) or "no data"


def parse_neuron_list(neurons, n_layers: int, n_neurons: int) -> list[tuple[int, int, str]]:
    """(layer, neuron, polarity) triples from a list of triples / (layer, neuron) pairs (both polarities)."""
    out = []
    for item in neurons:
        item = tuple(item)
        if len(item) == 2:
            pols: Iterable[str] = POLARITIES
        elif len(item) == 3:
            pols = (item[2],)
        else:
            raise NeuronscopeError(f"A neuron is (layer, neuron) or (layer, neuron, polarity), got {item!r}.")
        l, n = item[0], item[1]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (l, n)) or not 0 <= l < n_layers \
                or not 0 <= n < n_neurons:
            raise NeuronscopeError(f"Neuron {item!r} is out of range: layers 0-{n_layers - 1}, "
                                   f"neurons 0-{n_neurons - 1}.")
        for p in pols:
            if p not in POLARITIES:
                raise NeuronscopeError(f"Polarity must be 'pos' or 'neg', got {p!r}.")
            out.append((l, n, p))
    return out


def describe_atlas(atlas_dir, *, explainer=None, embedder: Embedder | None = None, subject=None, neurons=None,
                   progress: bool = True, n_candidates: int = 3, n_exemplars: int = 20, held_out: int = 5,
                   simulator: str = "auto", overwrite: bool = False) -> "Descriptions":
    """Describe neurons of an atlas folder (it needs the atlas decodes or the corpus statistics, ideally both).

    explainer: None (labels), an explainer object, a URL of an OpenAI-compatible endpoint, or a local instruct model
    (path / GGUF / Subject). embedder: a callable list[str] -> [n, d] embeddings (e.g. a sentence-transformers
    model's `encode`), for similarity search and clustering. subject: the studied model, to recompute per-token
    activations for highlighting and scoring. neurons: (layer, neuron[, polarity]) items (default: all).
    simulator: "tokens" (token match), "llm" (ask the explainer), or "auto" (llm when there is an explainer).
    Neurons already described by the same source are skipped unless overwrite (so an interrupted run resumes).
    """
    folder = Path(atlas_dir)
    if not folder.is_dir():
        raise NeuronscopeError(f"The atlas folder '{folder}' does not exist.")
    atlas, stats = _open_optional(folder)
    if atlas is None and stats is None:
        raise NeuronscopeError(f"'{folder}' has neither an atlas nor corpus statistics to describe neurons from; "
                               "run `neuronscope atlas build` and/or `neuronscope stats` first.")
    src = atlas or stats
    n_layers, n_neurons = src.n_layers, src.n_neurons
    todo = parse_neuron_list(neurons, n_layers, n_neurons) if neurons is not None else \
        [(l, n, p) for l in range(n_layers) for n in range(n_neurons) for p in POLARITIES]
    if simulator not in ("auto", "tokens", "llm"):
        raise NeuronscopeError(f"Unknown simulator '{simulator}'; use auto, tokens or llm.")
    explainer = make_explainer(explainer)
    if simulator == "llm" and explainer is None:
        raise NeuronscopeError("The llm simulator needs an explainer.")
    predict = LLMSimulator(explainer) if explainer is not None and simulator in ("auto", "llm") \
        else token_match_predict
    source = "explainer" if explainer is not None else "label"

    con = store.open_db(folder)
    with con:
        _ensure_table(con)
    done = set()
    if not overwrite:
        done = {(l, n, p) for l, n, p in con.execute(f"SELECT layer, neuron, polarity FROM {TABLE} WHERE source = ?",
                                                     (source,))}
    todo = [t for t in todo if t not in done]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), unit="neuron", desc="describe", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for l, n, p in todo:
            ex = stats.exemplars(l, n, p, n=n_exemplars + held_out, subject=subject) if stats is not None else []
            train, held = ex[:n_exemplars], ex[n_exemplars:]
            promotes = decoded_tokens(atlas, l, n, p)
            label = make_label(firing_tokens(train), promotes)
            candidates: list[dict[str, Any]] = []
            if explainer is None:
                candidates.append({"text": label, "score": score_description(label, held, p, token_match_predict)})
            else:
                messages = explain_prompt(train[:n_exemplars], p, promotes)
                for j in range(n_candidates):
                    reply = clean_reply(explainer.complete(messages, temperature=0.0 if j == 0 else 0.7, seed=j))
                    if reply and reply not in (c["text"] for c in candidates):
                        candidates.append({"text": reply, "score": score_description(reply, held, p, predict)})
                if not candidates:
                    candidates.append({"text": label, "score": score_description(label, held, p,
                                                                                 token_match_predict)})
            best = max(candidates, key=lambda c: -2.0 if c["score"] is None else c["score"])
            with con:
                con.execute(f"INSERT OR REPLACE INTO {TABLE} VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (l, n, p, best["text"], best["score"], source if best["text"] != label or
                             explainer is None else "label", json.dumps(candidates)))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        con.close()
    if embedder is not None:
        embed_descriptions(folder, embedder)
    store.update_manifest(folder, "descriptions", {
        "source": source, "explainer": getattr(explainer, "name", None) if explainer is not None else None,
        "simulator": "none" if subject is None else ("llm" if isinstance(predict, LLMSimulator) else "tokens"),
        "n_candidates": n_candidates if explainer is not None else 1, "n_exemplars": n_exemplars,
        "held_out": held_out, "described": Descriptions.count_rows(folder), "embeddings": embedder is not None or
        (folder / EMB_FILE).is_file(), "seconds": round(time.perf_counter() - t0, 3)})
    return Descriptions.open(folder, embedder=embedder)


def embed_descriptions(folder: Path, embedder: Embedder, batch: int = 256) -> None:
    """Embed every stored description (unit vectors) into descriptions_emb.safetensors."""
    con = store.open_db(folder)
    try:
        rows = con.execute(f"SELECT layer, neuron, polarity, text FROM {TABLE} ORDER BY layer, neuron, polarity"
                           ).fetchall()
    finally:
        con.close()
    if not rows:
        return
    embs = []
    for s in range(0, len(rows), batch):
        e = torch.as_tensor(embedder([r[3] for r in rows[s:s + batch]]), dtype=torch.float32)
        if e.ndim != 2 or e.shape[0] != len(rows[s:s + batch]):
            raise NeuronscopeError("The embedder must return one vector per text ([n, d]).")
        embs.append(torch.nn.functional.normalize(e, dim=1))
    keys = torch.tensor([[r[0], r[1], POLARITIES.index(r[2])] for r in rows], dtype=torch.int64)
    store.save_tensors(folder / EMB_FILE, {"keys": keys, "emb": torch.cat(embs)})


class Descriptions:
    """The stored descriptions of an atlas folder: look up, text search, similarity search (with an embedder)."""

    def __init__(self, folder: Path, embedder: Embedder | None = None):
        self.folder = Path(folder)
        self.embedder = embedder
        self._emb: dict[str, torch.Tensor] | None = None

    @staticmethod
    def count_rows(folder) -> int:
        con = store.open_db(folder)
        try:
            _ensure_table(con)
            return int(con.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0])
        finally:
            con.close()

    @classmethod
    def open(cls, atlas_dir, embedder: Embedder | None = None) -> "Descriptions":
        folder = Path(atlas_dir)
        if not (folder / store.DB).is_file() or "descriptions" not in store.read_manifest(folder):
            raise NeuronscopeError(f"The atlas '{folder}' has no neuron descriptions yet; run "
                                   f"`neuronscope describe {folder}` first.")
        return cls(folder, embedder)

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        con = store.open_db(self.folder)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def get(self, layer: int, i: int, polarity: str = "pos") -> dict | None:
        """{"text", "score", "source"} of one neuron and polarity, or None."""
        if polarity not in POLARITIES:
            raise NeuronscopeError(f"Polarity must be 'pos' or 'neg', got '{polarity}'.")
        r = self._rows(f"SELECT text, score, source FROM {TABLE} WHERE layer=? AND neuron=? AND polarity=?",
                       (int(layer), int(i), polarity))
        return {"text": r[0][0], "score": r[0][1], "source": r[0][2]} if r else None

    def all(self) -> list[dict]:
        return [{"layer": l, "neuron": n, "polarity": p, "text": t, "score": s}
                for l, n, p, t, s in self._rows(f"SELECT layer, neuron, polarity, text, score FROM {TABLE} "
                                                "ORDER BY layer, neuron, polarity")]

    def embeddings(self) -> dict[tuple[int, int, str], torch.Tensor]:
        """{(layer, neuron, polarity): unit vector} when embeddings were stored, else {}."""
        if self._emb is None:
            f = self.folder / EMB_FILE
            self._emb = store.load_tensors(f) if f.is_file() else {}
        if not self._emb:
            return {}
        return {(int(k[0]), int(k[1]), POLARITIES[int(k[2])]): v for k, v in zip(self._emb["keys"], self._emb["emb"])}

    def search(self, text: str, k: int = 50) -> list[dict]:
        """Descriptions matching `text`, best first: [{"layer", "neuron", "polarity", "text", "score"}].

        With an embedder and stored embeddings: cosine similarity to the query's embedding. Otherwise a text match:
        the share of the query's words found in the description (whole words, then prefixes), ties by the
        description's simulator score. `score` in the result is the match score.
        """
        if not isinstance(text, str) or not text.strip():
            raise NeuronscopeError("Give some text to search the descriptions for.")
        rows = self.all()
        if self.embedder is not None and (self.folder / EMB_FILE).is_file():
            embs = self.embeddings()
            q = torch.nn.functional.normalize(torch.as_tensor(self.embedder([text]), dtype=torch.float32), dim=1)[0]
            scored = [(float(embs[(r["layer"], r["neuron"], r["polarity"])] @ q), r) for r in rows
                      if (r["layer"], r["neuron"], r["polarity"]) in embs]
        else:
            words = [w for w in (norm_token(x) for x in re.findall(r"\w+", text)) if w]
            if not words:
                return []
            scored = []
            for r in rows:
                terms = [norm_token(x) for x in re.findall(r"\w+", r["text"])]
                tset = set(terms)
                s = sum(1.0 if w in tset else 0.5 if any(t.startswith(w) for t in terms) else 0.0
                        for w in words) / len(words)
                if s > 0:
                    scored.append((s + 1e-3 * (r["score"] or 0.0), r))
        scored.sort(key=lambda x: -x[0])
        return [{"layer": r["layer"], "neuron": r["neuron"], "polarity": r["polarity"], "text": r["text"],
                 "score": round(s, 6)} for s, r in scored[:k]]


def description_words(text: str) -> list[str]:
    """Content words of a description (for naming clusters)."""
    return [w for w in (norm_token(x) for x in re.findall(r"\w+", text)) if w and w not in _STOP and len(w) > 1]
