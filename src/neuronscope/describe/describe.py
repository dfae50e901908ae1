"""`describe_atlas` and `Descriptions`: one scored description per neuron and polarity, stored in the atlas folder.

Every (layer, neuron, polarity) gets an offline **label** (label.py: what fires it, ranked by specificity, with its
recurring context, and what its write vector promotes) written from its exemplars outside the held-out windows, and
a **simulator score**: the Pearson correlation of the token simulator's predictions with the real activations over
held-out windows (score.py: its top held-out exemplar windows plus random held-out windows). All labels of a model
are scored together in one pass over the needed windows.

With an explainer (a local instruct model or an OpenAI-compatible URL) the chosen neurons also get `n_candidates`
explainer descriptions written from the same training exemplars (highlighted) and decodes, scored on the same
held-out windows by the chosen simulator; the best of label and candidates is kept, with its source.

A description is **interpretable** when its score is at least the threshold recorded in the manifest
("descriptions.threshold", default 0.5). Storage: atlas.sqlite table
`descriptions(layer, neuron, polarity, text, score, source, candidates)`; the search/cluster index of neuron
embeddings in `neuron_emb.safetensors` (index.py); manifest section "descriptions".
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Iterable

from .. import store
from ..atlas.folder import DB, DESCRIPTIONS_TABLE, AtlasFolder
from ..errors import NeuronscopeError
from ..refs import POLARITIES, check_neuron, check_polarity
from .explainer import clean_reply, explain_prompt, make_explainer
from .label import LabelVocab, excluded_token_ids, make_label, parse_label_items
from .score import EvalSplit, score_token_labels
from .simulate import LLMSimulator, norm_token, token_match_predict

TABLE = DESCRIPTIONS_TABLE
THRESHOLD = 0.5


REMEDY = "run `neuronscope describe` again in a new folder"
_CHECKED: dict[str, tuple[float, int]] = {}


def check_db_once(af: AtlasFolder, remedy: str = REMEDY) -> None:
    """af.check_db (one sentence for a damaged atlas.sqlite), done once per process while the file is unchanged:
    a quick_check of a whole model's database takes ~60 ms, too long for every concept query."""
    path = af.db_path
    st = path.stat() if path.is_file() else None
    key = (st.st_mtime, st.st_size) if st is not None else None
    if key is not None and _CHECKED.get(str(path)) == key:
        return
    af.check_db(remedy)
    if key is not None:
        _CHECKED[str(path)] = key


def _ensure_table(con) -> None:
    con.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (layer INTEGER NOT NULL, neuron INTEGER NOT NULL, "
                "polarity TEXT NOT NULL, text TEXT NOT NULL, score REAL, source TEXT NOT NULL, candidates TEXT, "
                "PRIMARY KEY (layer, neuron, polarity))")


def decoded_site(polarity: str) -> str:
    """The atlas site whose tokens a neuron of this polarity promotes."""
    return "down.pos" if polarity == "pos" else "down.neg"


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
        l, n = check_neuron(item[0], item[1], n_layers, n_neurons, where="these statistics")
        for p in pols:
            out.append((l, n, check_polarity(p)))
    return out


def _load_subject(af: AtlasFolder, subject):
    """The studied model: the one given (checked against the fingerprint) or the one the manifest names."""
    folder = af.path
    fp = af.fingerprint
    if subject is None:
        path = af.model_path()   # a relative name resolves against the folder
        if path is None:
            raise NeuronscopeError(f"Scoring descriptions needs the model of '{folder}' (to compute real "
                                   "activations on held-out windows); give it with --model.")
        from ..subject import Subject
        subject = Subject.load(path)
    if fp and subject.fingerprint != fp:
        raise NeuronscopeError(f"The model given ({subject.name}) is not the one the atlas in '{folder}' was built "
                               "for; give the right model.")
    return subject


def describe_atlas(atlas_dir, *, explainer=None, embedder: Any = "default", subject=None, neurons=None,
                   progress: bool = True, n_candidates: int = 3, n_exemplars: int = 20, label_exemplars: int = 40,
                   held_out: int = 10, n_random: int = 40, every: int = 5, simulator: str = "tokens",
                   threshold: float = THRESHOLD, overwrite: bool = False) -> "Descriptions":
    """Describe and score neurons of an atlas folder (it needs corpus statistics; the atlas decodes add
    "promotes").

    explainer: None (labels only), an explainer object, a URL of an OpenAI-compatible endpoint, or a local instruct
    model (path / GGUF / Subject); with it, pass `neurons` (candidates cost LLM calls). embedder: for the semantic
    search/cluster index ("default": the pulled all-MiniLM-L6-v2; "none" or None: no index; a folder; an Embedder).
    subject: the studied model (default: the model the manifest names, when it is on disk). neurons:
    (layer, neuron[, polarity]) items (default: all). simulator for explainer candidates: "tokens" or "llm" (the
    explainer predicts the firing tokens). Neurons already described by the same source are kept unless overwrite.
    """
    folder = Path(atlas_dir)
    if not folder.is_dir():
        raise NeuronscopeError(f"The atlas folder '{folder}' does not exist.")
    if simulator not in ("tokens", "llm", "auto"):
        raise NeuronscopeError(f"Unknown simulator '{simulator}'; use tokens or llm.")
    if not 0.0 <= float(threshold) <= 1.0:
        raise NeuronscopeError(f"The interpretable threshold must be in [0, 1], got {threshold}.")
    af = AtlasFolder.open(folder)
    stats = af.open_stats()
    atlas = None
    try:
        atlas = af.open_atlas()
    except NeuronscopeError:
        pass
    subject = _load_subject(af, subject)
    todo = parse_neuron_list(neurons, stats.n_layers, stats.n_neurons) if neurons is not None else \
        [(l, n, p) for l in range(stats.n_layers) for n in range(stats.n_neurons) for p in POLARITIES]
    explainer = make_explainer(explainer)
    if simulator == "llm" and explainer is None:
        raise NeuronscopeError("The llm simulator needs an explainer.")
    source = "explainer" if explainer is not None else "label"
    con = store.open_db(folder)
    with con:
        _ensure_table(con)
    if not overwrite:
        done = {(l, n, p) for l, n, p in con.execute(
            f"SELECT layer, neuron, polarity FROM {TABLE} WHERE source = ? OR ? = 'label'", (source, source))}
        todo = [t for t in todo if t not in done]
    con.close()
    t0 = time.perf_counter()
    split = EvalSplit(stats, every=every, n_random=n_random, held_out=held_out)
    if atlas is not None:
        vocab_strings = atlas.vocab
    else:
        from ..atlas.vocab import token_texts
        vocab_strings = token_texts(subject)
    vocab = LabelVocab.build(vocab_strings, split.ids.values(), excluded_token_ids(subject))
    labels: dict[tuple[int, int, str], dict] = {}
    for l, n, p in todo:
        ex = split.train_exemplars(l, n, p, label_exemplars)
        fire = [split.ids[w][pos] for w, pos in ex]
        prev = [split.ids[w][pos - 1] if pos > 0 else -1 for w, pos in ex]
        promote = atlas.top_ids(decoded_site(p))[l, n].tolist() if atlas is not None and \
            decoded_site(p) in atlas.sites else []
        labels[(l, n, p)] = make_label(vocab, fire, prev, promote)
    t_label = time.perf_counter() - t0
    scores = score_token_labels(subject, split, vocab, {k: parse_label_items(v["text"]) or [] for k, v in
                                                        labels.items()}, progress=progress) if labels else {}
    t_score = time.perf_counter() - t0 - t_label
    rows = []
    predict = LLMSimulator(explainer) if simulator == "llm" else token_match_predict
    bar = None
    if explainer is not None and progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), unit="neuron", desc="explain", dynamic_ncols=True)
    for key in todo:
        l, n, p = key
        cands: list[dict[str, Any]] = [{"text": labels[key]["text"], "score": scores.get(key, 0.0),
                                        "source": "label"}]
        if explainer is not None:
            acts: dict = {}
            exs = _exemplar_dicts(split, subject, l, n, p, n_exemplars)
            promotes = [vocab.shown[vocab.code(i)] for i in (atlas.top_ids(decoded_site(p))[l, n].tolist()[:8]
                        if atlas is not None else []) if vocab.code(i) >= 0][:5]
            messages = explain_prompt(exs, p, promotes)
            for j in range(n_candidates):
                reply = clean_reply(explainer.complete(messages, temperature=0.0 if j == 0 else 0.7, seed=j))
                if reply and reply not in (c["text"] for c in cands):
                    cands.append({"text": reply, "score": split.score(subject, l, n, p, reply, predict, acts),
                                  "source": "explainer"})
            if bar is not None:
                bar.update(1)
        best = max(cands, key=lambda c: c["score"])
        rows.append((l, n, p, best["text"], round(float(best["score"]), 6), best["source"], json.dumps(cands)))
    if bar is not None:
        bar.close()
    con = store.open_db(folder)
    try:
        with con:
            con.executemany(f"INSERT OR REPLACE INTO {TABLE} VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    finally:
        con.close()
    t_write = time.perf_counter() - t0 - t_label - t_score
    emb_info = None
    if embedder is not None and not (isinstance(embedder, str) and embedder.lower() == "none"):
        from ..embed import load_embedder
        from .index import build_index
        try:
            emb = load_embedder(None if embedder == "default" else embedder)
        except NeuronscopeError as exc:
            if embedder != "default":
                raise
            import warnings
            warnings.warn(f"No semantic search index was built: {exc}", stacklevel=2)
            emb, emb_info = None, {"skipped": str(exc)}
        if emb is not None:
            emb_info = build_index(folder, emb, progress=progress)
    summary = summarise(folder, threshold)
    store.update_manifest(folder, "descriptions", {
        "threshold": float(threshold), "source": source, "simulator": "tokens" if explainer is None else
        ("llm" if simulator == "llm" else "tokens"), "explainer": getattr(explainer, "name", None),
        "n_candidates": n_candidates if explainer is not None else 0, "n_exemplars": n_exemplars,
        "label_exemplars": label_exemplars, "split": split.info(), **summary, "index": emb_info,
        "seconds_last_run": {"labels": round(t_label, 2), "score": round(t_score, 2), "explain_write":
                             round(t_write, 2), "total": round(time.perf_counter() - t0, 2)},
        "described_last_run": len(rows)})
    return Descriptions.open(folder)


def _exemplar_dicts(split: EvalSplit, subject, l: int, n: int, p: str, k: int) -> list[dict]:
    """Training exemplars as the explainer prompt wants them (tokens, position, per-token activations)."""
    from ..stats.results import window_activations
    ex = split.train_exemplars(l, n, p, k)
    acts = window_activations(subject, [split.ids[w] for w, _ in ex], l, n) if ex else []
    return [{"tokens": split.tokens[w], "position": pos, "acts": a} for (w, pos), a in zip(ex, acts)]


def summarise(folder: Path, threshold: float) -> dict:
    """Counts and the score distribution of the stored descriptions, per source."""
    con = store.open_db(folder)
    try:
        rows = con.execute(f"SELECT score, source FROM {TABLE}").fetchall()
    finally:
        con.close()
    out: dict[str, Any] = {"described": len(rows)}
    for name, sel in (("all", rows), ("label", [r for r in rows if r[1] == "label"]),
                      ("explainer", [r for r in rows if r[1] == "explainer"])):
        sc = [float(r[0]) for r in sel if r[0] is not None]
        if sc:
            out[f"scores_{name}"] = {"n": len(sc), "median": round(statistics.median(sc), 4),
                                     "share_ge_0.5": round(sum(s >= 0.5 for s in sc) / len(sc), 4),
                                     "share_interpretable": round(sum(s >= threshold for s in sc) / len(sc), 4)}
    return out


class Descriptions:
    """The stored descriptions of an atlas folder: look up, filter by interpretability, text search."""

    def __init__(self, folder: Path, threshold: float = THRESHOLD):
        self.folder = Path(folder)
        self.threshold = float(threshold)

    @staticmethod
    def count_rows(folder) -> int:
        con = store.open_db(folder)
        try:
            _ensure_table(con)
            return int(con.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0])
        finally:
            con.close()

    @classmethod
    def open(cls, atlas_dir, embedder: Any = None) -> "Descriptions":
        af = AtlasFolder.open(atlas_dir)
        folder = af.path
        sec = af.section("descriptions") if (folder / DB).is_file() else None
        if sec:
            check_db_once(af)
        if not sec:
            raise NeuronscopeError(f"The atlas '{folder}' has no neuron descriptions yet; run "
                                   f"`neuronscope describe {folder}` first.")
        return cls(folder, float(sec.get("threshold", THRESHOLD)))

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        con = store.open_db(self.folder)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def _row(self, l, n, p, text, score, source) -> dict:
        return {"layer": l, "neuron": n, "polarity": p, "text": text, "score": score, "source": source,
                "interpretable": score is not None and score >= self.threshold}

    def get(self, layer: int, i: int, polarity: str = "pos") -> dict | None:
        """{"layer", "neuron", "polarity", "text", "score", "source", "interpretable"} or None."""
        check_polarity(polarity)
        r = self._rows(f"SELECT layer, neuron, polarity, text, score, source FROM {TABLE} WHERE layer=? AND "
                       "neuron=? AND polarity=?", (int(layer), int(i), polarity))
        return self._row(*r[0]) if r else None

    def all(self, interpretable: bool = False) -> list[dict]:
        """Every stored description (only the interpretable ones with interpretable=True)."""
        sql = f"SELECT layer, neuron, polarity, text, score, source FROM {TABLE}"
        args: tuple = ()
        if interpretable:
            sql += " WHERE score >= ?"
            args = (self.threshold,)
        return [self._row(*r) for r in self._rows(sql + " ORDER BY layer, neuron, polarity", args)]

    def interpretable(self) -> set[tuple[int, int, str]]:
        return {(l, n, p) for l, n, p in self._rows(f"SELECT layer, neuron, polarity FROM {TABLE} WHERE score >= ?",
                                                     (self.threshold,))}

    def embeddings(self) -> dict[tuple[int, int, str], Any]:
        """{(layer, neuron, polarity): unit vector} from the index (neuron_emb.safetensors), or {}."""
        from .index import load_index
        idx = load_index(self.folder)
        if idx is None:
            return {}
        return {k: v for k, v in zip(idx.keys, idx.emb.float())}

    def search(self, text: str, k: int = 50, interpretable: bool = False) -> list[dict]:
        """Descriptions whose words match `text` (share of the query's words found, whole words then prefixes;
        ties by simulator score), best first; "score" is the match, "desc_score" the simulator score. Semantic
        search: neuronscope.atlas.search.semantic_search."""
        import re
        if not isinstance(text, str) or not text.strip():
            raise NeuronscopeError("Give some text to search the descriptions for.")
        words = [w for w in (norm_token(x) for x in re.findall(r"\w+", text)) if w]
        scored = []
        for r in self.all(interpretable):
            terms = [norm_token(x) for x in re.findall(r"\w+", r["text"])]
            tset = set(terms)
            s = sum(1.0 if w in tset else 0.5 if any(t.startswith(w) for t in terms) else 0.0
                    for w in words) / max(1, len(words))
            if s > 0:
                scored.append((s + 1e-3 * (r["score"] or 0.0), r))
        scored.sort(key=lambda x: -x[0])
        return [dict(r, score=round(s, 6), desc_score=r["score"]) for s, r in scored[:k]]
