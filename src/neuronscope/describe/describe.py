"""`describe_atlas` and `Descriptions`: scored descriptions of every neuron and polarity, stored in the atlas folder.

Kinds of description, each written from the neuron's training exemplars (never a held-out window):
- **label** (label.py): the tokens that fire it, ranked by specificity, with their recurring context;
- **context** (context.py): what the text around its activations is about, from sentence embeddings of its exemplar
  windows named with the shipped topic vocabulary ("in text about cooking, fires on 'the'", "fires on words about
  animals"); only where a topic or field stands out;
- **output** (effects.py): what it makes the model say: the tokens its causal effect on the next token raises and
  lowers through every later layer, measured on neutral prompts (train prompts), with an **output score** on
  held-out prompts; the write vector's direct decode ("promotes") stands in where it was not measured;
- **explainer** (optional): LLM-written candidates from the same exemplars.
Every input-side kind is scored the same way on the same held-out windows (score.py): the **Pearson** r of simulated
vs real per-token activations and the **detection** balanced accuracy (does it tell held-out windows where the neuron
fires from windows where it does not; a generic label scores at chance, 0.5). A description is **interpretable** when
both reach the thresholds recorded in the manifest ("descriptions.threshold", default 0.5, and
"descriptions.detection_threshold", default 0.75). The kept description joins the best input-side candidate
(interpretable first, then Pearson + detection - 0.5) with the output part: the measured output description when it
held on the held-out prompts (`output_passes`), else the decode's "promotes"; every candidate is stored with its
scores.

Storage: atlas.sqlite table `descriptions(layer, neuron, polarity, text, score, source, candidates, detection,
output_score, effect)` (score = the kept candidate's Pearson r; candidates = JSON of every kind with its scores); the
window/topic/key embeddings in `window_emb.safetensors` (windows.py); the search/cluster index of neuron embeddings in
`neuron_emb.safetensors` (index.py); manifest section "descriptions".
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from .. import store
from ..atlas.atlas import Atlas
from ..atlas.folder import DB, DESCRIPTIONS_TABLE, AtlasFolder
from ..stats.results import NeuronStats
from ..errors import NeuronscopeError
from ..refs import POLARITIES, check_neuron, check_polarity
from .context import ContextModel, describe_contexts
from .effects import LEVEL_RANK, N_TRAIN, PROMPTS, Effect, measure_effects, top_held
from .explainer import clean_reply, explain_prompt, make_explainer
from .forms import output_text, parse_label_items, split_parts
from .label import LabelVocab, excluded_token_ids, make_label
from .records import Description, DescriptionKind, DescriptionMatch
from .score import EvalSplit, Scores, Sim, score_sims
from .simulate import LLMSimulator, norm_token, token_match_predict
from .windows import WindowMeaning

if TYPE_CHECKING:
    from ..subject import Subject

TABLE = DESCRIPTIONS_TABLE
THRESHOLD = 0.5
DETECTION_THRESHOLD = 0.75
Key = tuple[int, int, str]


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


NEW_COLUMNS = (("detection", "REAL"), ("output_score", "REAL"), ("effect", "REAL"))


def _ensure_table(con: Any) -> None:
    """The descriptions table, with the columns added since its first version (a folder described before them
    gets them, NULL, on its next write)."""
    con.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (layer INTEGER NOT NULL, neuron INTEGER NOT NULL, "
                "polarity TEXT NOT NULL, text TEXT NOT NULL, score REAL, source TEXT NOT NULL, candidates TEXT, "
                "detection REAL, output_score REAL, effect REAL, PRIMARY KEY (layer, neuron, polarity))")
    have = {r[1] for r in con.execute(f"PRAGMA table_info({TABLE})")}
    for name, typ in NEW_COLUMNS:
        if name not in have:
            con.execute(f"ALTER TABLE {TABLE} ADD COLUMN {name} {typ}")


def decoded_site(polarity: str) -> str:
    """The atlas site whose tokens a neuron of this polarity promotes."""
    return "down.pos" if polarity == "pos" else "down.neg"


def parse_neuron_list(neurons: Iterable[Sequence[Any]], n_layers: int, n_neurons: int) -> list[tuple[int, int, str]]:
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


def _load_subject(af: AtlasFolder, subject: Subject | None) -> Subject:
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


def describe_atlas(atlas_dir: str | Path, *, explainer: Any = None, embedder: Any = "default", subject: Any = None,
                   neurons: Any = None, progress: bool = True, n_candidates: int = 3, n_exemplars: int = 20,
                   label_exemplars: int = 40, held_out: int = 10, n_random: int = 40, every: int = 5,
                   simulator: str = "tokens", threshold: float = THRESHOLD,
                   detection_threshold: float = DETECTION_THRESHOLD, outputs: str = "auto",
                   overwrite: bool = False) -> "Descriptions":
    """Describe and score neurons of an atlas folder (it needs corpus statistics; the atlas decodes add
    "promotes").

    explainer: None (labels only), an explainer object, a URL of an OpenAI-compatible endpoint, or a local instruct
    model (path / GGUF / Subject); with it, pass `neurons` (candidates cost LLM calls). embedder: for context
    descriptions and the semantic search/cluster index ("default": the pulled all-MiniLM-L6-v2; "none" or None:
    neither; a folder; an Embedder). subject: the studied model (default: the model the manifest names, when on
    disk). neurons: (layer, neuron[, polarity]) items (default: all). simulator for explainer candidates: "tokens" or
    "llm" (the explainer predicts the firing tokens). outputs: which neurons get a measured output description:
    "all", "none", or "auto" (all when the estimate fits OUTPUT_BUDGET_S seconds, else every OUTPUT_STRIDE-th
    neuron of each layer; `describe_outputs` adds any neuron on demand). Neurons already described by the same
    source are kept unless overwrite.
    """
    folder = Path(atlas_dir)
    _check_options(folder, simulator, threshold, detection_threshold, outputs)
    af = AtlasFolder.open(folder)
    stats = NeuronStats.from_folder(af)
    try:
        atlas = Atlas.from_folder(af)
    except NeuronscopeError:
        atlas = None
    subject = _load_subject(af, subject)
    explainer = make_explainer(explainer)
    if simulator == "llm" and explainer is None:
        raise NeuronscopeError("The llm simulator needs an explainer.")
    source = "explainer" if explainer is not None else "label"
    todo = _todo(folder, stats, neurons, source, overwrite)
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    split = EvalSplit(stats, every=every, n_random=n_random, held_out=held_out)
    vocab = LabelVocab.build(atlas.vocab if atlas is not None else _vocab_strings(subject), split.ids.values(),
                             excluded_token_ids(subject))
    labels = {key: make_label(vocab, *_fires(split, key, label_exemplars), _promote_ids(atlas, key))
              for key in todo}
    times["labels"] = time.perf_counter() - t0
    emb, emb_info = _embedder(embedder)
    contexts: dict[Key, tuple[str, Sim]] = {}
    tables = None
    if emb is not None and todo:
        t1 = time.perf_counter()
        wm = WindowMeaning.build(folder, subject, emb, vocab.keys, vocab.freq, progress=progress)
        cm = ContextModel.build(wm, vocab)
        tables = cm.tables
        contexts = describe_contexts(split, vocab, cm, labels, n_exemplars=label_exemplars)
        times["context"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    kinds: dict[str, dict[Key, Sim]] = {"label": {k: Sim(items=tuple(parse_label_items(v["text"]) or ()))
                                                  for k, v in labels.items()},
                                        "context": {k: sim for k, (_, sim) in contexts.items()}}
    scores = score_sims(subject, split, vocab, kinds, tables=tables, progress=progress) if todo else {}
    times["score"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    out_keys = _output_keys(todo, outputs, stats.n_neurons)
    effects = measure_effects(subject, stats, out_keys, key_of=_nameable(vocab), progress=progress,
                              compare={k: _promote_ids(atlas, k)[:4] for k in out_keys}) if out_keys else {}
    times["outputs"] = time.perf_counter() - t1
    rows = []
    bar = _bar(progress and explainer is not None, len(todo), "explain")
    for key in todo:
        cands = _candidates(key, labels, contexts, scores, effects, vocab, atlas)
        if explainer is not None:
            cands += _explain(explainer, split, subject, vocab, atlas, key, n_exemplars, n_candidates, simulator,
                              cands)
            if bar is not None:
                bar.update(1)
        rows.append(_row(key, cands, effects.get(key), vocab, threshold, detection_threshold))
    if bar is not None:
        bar.close()
    _write_rows(folder, rows)
    times["write"] = time.perf_counter() - t0 - sum(times.values())
    if emb is not None:
        from .index import build_index
        emb_info = build_index(folder, emb, progress=progress)
    times["total"] = time.perf_counter() - t0
    store.update_manifest(folder, "descriptions", {
        "threshold": float(threshold), "detection_threshold": float(detection_threshold), "detection": DETECTION,
        "output": {"prompts": list(PROMPTS), "n_train": N_TRAIN, "level_rank": LEVEL_RANK,
                   "top_held": top_held(len(vocab.key_of)),
                   "threshold": OUTPUT_THRESHOLD, "min_effect_nats": OUTPUT_MIN_EFFECT, "mode": outputs,
                   "measured_last_run": len(effects)},
        "source": source, "simulator": "tokens" if explainer is None else ("llm" if simulator == "llm" else "tokens"),
        "explainer": getattr(explainer, "name", None), "n_candidates": n_candidates if explainer is not None else 0,
        "n_exemplars": n_exemplars, "label_exemplars": label_exemplars, "split": split.info(),
        **summarise(folder, threshold, detection_threshold), "index": emb_info,
        "seconds_last_run": {k: round(v, 2) for k, v in times.items()}, "described_last_run": len(rows)})
    return Descriptions.open(folder)


DETECTION = ("balanced accuracy over the held-out scoring windows; a window fires when its strongest activation "
             "reaches half the neuron's strongest or its weakest stored exemplar, whichever is lower")


def _check_options(folder: Path, simulator: str, threshold: float, detection_threshold: float, outputs: str) -> None:
    """One sentence for the first bad option of `describe_atlas`."""
    if not folder.is_dir():
        raise NeuronscopeError(f"The atlas folder '{folder}' does not exist.")
    if simulator not in ("tokens", "llm", "auto"):
        raise NeuronscopeError(f"Unknown simulator '{simulator}'; use tokens or llm.")
    for name, v in (("interpretable", threshold), ("detection", detection_threshold)):
        if not 0.0 <= float(v) <= 1.0:
            raise NeuronscopeError(f"The {name} threshold must be in [0, 1], got {v}.")
    if outputs not in ("auto", "all", "none"):
        raise NeuronscopeError(f"--outputs is auto, all or none, got {outputs!r}.")


OUTPUT_BUDGET_S = 30 * 60.0
OUTPUT_STRIDE = 8
OUTPUT_SECONDS_PER_NEURON = 0.03        # measured on SmolLM2-135M, 2 CPU cores (bench/describe.py)
OUTPUT_THRESHOLD = 0.6
OUTPUT_MIN_EFFECT = 0.25


def output_passes(score: float | None, effect: float | None) -> bool:
    """Whether a measured output description held on the held-out prompts (its score and effect reach the
    thresholds); only then does it replace the write vector's decode in the kept text."""
    return score is not None and score >= OUTPUT_THRESHOLD and (effect or 0.0) >= OUTPUT_MIN_EFFECT


def _todo(folder: Path, stats: Any, neurons: Any, source: str, overwrite: bool) -> list[Key]:
    """The (layer, neuron, polarity) items to describe: those asked for, less those already described by the same
    source (unless overwrite)."""
    todo = parse_neuron_list(neurons, stats.n_layers, stats.n_neurons) if neurons is not None else \
        [(l, n, p) for l in range(stats.n_layers) for n in range(stats.n_neurons) for p in POLARITIES]
    con = store.open_db(folder)
    try:
        with con:
            _ensure_table(con)
        if not overwrite:
            done = {(l, n, p) for l, n, p in con.execute(
                f"SELECT layer, neuron, polarity FROM {TABLE} WHERE source = ? OR ? = 'label'", (source, source))}
            todo = [t for t in todo if t not in done]
    finally:
        con.close()
    return todo


def _vocab_strings(subject: Any) -> list[str]:
    from ..atlas.vocab import token_texts
    return list(token_texts(subject))


def _fires(split: EvalSplit, key: Key, k: int) -> tuple[list[int], list[int]]:
    """(firing token ids, the ids before them) of a neuron's training exemplars."""
    ex = split.train_exemplars(*key, k)
    return [split.ids[w][pos] for w, pos in ex], [split.ids[w][pos - 1] if pos > 0 else -1 for w, pos in ex]


def _promote_ids(atlas: Any, key: Key) -> list[int]:
    """The write vector's decoded top token ids for a polarity (none without atlas decodes)."""
    l, n, p = key
    site = decoded_site(p)
    if atlas is None or site not in atlas.sites:
        return []
    return [int(i) for i in atlas.top_ids(site)[l, n].tolist()]


def _nameable(vocab: LabelVocab) -> list[int]:
    """Key code per vocabulary id for output descriptions: tokens seen in the corpus only (-1 for the others)."""
    return [c if c >= 0 and vocab.freq[c] > 0 else -1 for c in vocab.key_of]


def _embedder(embedder: Any) -> tuple[Any, dict[str, Any] | None]:
    """The embedder asked for, or (None, a note) when the default one is not pulled (a warning says so)."""
    if embedder is None or (isinstance(embedder, str) and embedder.lower() == "none"):
        return None, None
    from ..embed import load_embedder
    try:
        return load_embedder(None if embedder == "default" else embedder), None
    except NeuronscopeError as exc:
        if embedder != "default":
            raise
        import warnings
        warnings.warn(f"No semantic search index or context descriptions were built: {exc}", stacklevel=3)
        return None, {"skipped": str(exc)}


def _output_keys(todo: list[Key], outputs: str, n_neurons: int) -> list[Key]:
    """Which neurons get a measured output description (see describe_atlas's `outputs`)."""
    if outputs == "none":
        return []
    if outputs == "all" or len(todo) * OUTPUT_SECONDS_PER_NEURON <= OUTPUT_BUDGET_S:
        return list(todo)
    return [k for k in todo if k[1] % OUTPUT_STRIDE == 0]


def _shown(vocab: LabelVocab, ids: list[int]) -> list[str]:
    return [vocab.shown[vocab.code(i)] for i in ids if vocab.code(i) >= 0]


def _candidates(key: Key, labels: dict[Key, dict[str, Any]], contexts: dict[Key, tuple[str, Sim]],
                scores: dict[str, dict[Key, Scores]], effects: dict[Key, Effect], vocab: LabelVocab,
                atlas: Any) -> list[dict[str, Any]]:
    """Every description kind of one neuron with its scores (input parts; the output kind on its own)."""
    head, tail = split_parts(labels[key]["text"])
    eff = effects.get(key)
    out: list[dict[str, Any]] = []
    for kind, text in (("label", head.strip()), ("context", contexts[key][0] if key in contexts else None)):
        sc = scores.get(kind, {}).get(key)
        if text is None or sc is None:
            continue
        c: dict[str, Any] = {"text": text, "source": kind, "score": round(sc.pearson, 6),
                             "detection": round(sc.detection, 6)}
        out.append(c)
    if eff is not None:
        out.append({"text": output_text(_shown(vocab, eff.says), _shown(vocab, eff.less)).lstrip(" |").strip(),
                    "source": "output", "score": None, "detection": None, "output_score": eff.score,
                    "effect": eff.effect, "value": eff.value,
                    "decode_output_score": eff.compare_score, "decode_effect": eff.compare_effect})
    if tail:
        out.append({"text": tail.lstrip(" |").strip(), "source": "decode", "score": None, "detection": None})
    return out


def _explain(explainer: Any, split: EvalSplit, subject: Any, vocab: LabelVocab, atlas: Any, key: Key,
             n_exemplars: int, n_candidates: int, simulator: str, cands: list[dict[str, Any]]
             ) -> list[dict[str, Any]]:
    """Explainer candidates of one neuron, scored on the same held-out windows as the other kinds."""
    l, n, p = key
    acts: dict[int, list[float]] = {}
    exs = _exemplar_dicts(split, subject, l, n, p, n_exemplars)
    promotes = _shown(vocab, _promote_ids(atlas, key)[:8])[:5]
    messages = explain_prompt(exs, p, promotes)
    predict = LLMSimulator(explainer) if simulator == "llm" else token_match_predict
    out: list[dict[str, Any]] = []
    seen = {c["text"] for c in cands}
    for j in range(n_candidates):
        reply = clean_reply(explainer.complete(messages, temperature=0.0 if j == 0 else 0.7, seed=j))
        if reply and reply not in seen:
            seen.add(reply)
            sc = split.scores(subject, l, n, p, reply, predict, acts)
            out.append({"text": reply, "source": "explainer", "score": round(sc.pearson, 6),
                        "detection": round(sc.detection, 6)})
    return out


def _passes(c: dict[str, Any], threshold: float, detection_threshold: float) -> bool:
    return c.get("score") is not None and c["score"] >= threshold and c.get("detection", 0.0) >= detection_threshold


def _row(key: Key, cands: list[dict[str, Any]], eff: Effect | None, vocab: LabelVocab, threshold: float,
         detection_threshold: float) -> tuple[Any, ...]:
    """The stored row: the best input-side candidate joined with the output part, and every candidate."""
    inputs = [c for c in cands if c.get("score") is not None]
    best = max(inputs, key=lambda c: (_passes(c, threshold, detection_threshold),
                                      c["score"] + c.get("detection", 0.5) - 0.5))
    text = best["text"]
    out_score = effect = None
    if eff is not None:
        out_score, effect = eff.score, eff.effect
    dec = next((c for c in cands if c["source"] == "decode"), None)
    if eff is not None and output_passes(eff.score, eff.effect):
        text += output_text(_shown(vocab, eff.says), _shown(vocab, eff.less))
    elif dec is not None:
        text += " | " + dec["text"]
    l, n, p = key
    return (l, n, p, text, round(float(best["score"]), 6), best["source"], json.dumps(cands),
            round(float(best.get("detection", 0.5)), 6), out_score, effect)


def _write_rows(folder: Path, rows: list[tuple[Any, ...]]) -> None:
    con = store.open_db(folder)
    try:
        with con:
            con.executemany(f"INSERT OR REPLACE INTO {TABLE} (layer, neuron, polarity, text, score, source, "
                            "candidates, detection, output_score, effect) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            rows)
    finally:
        con.close()


def _bar(on: bool, total: int, desc: str) -> Any:
    if not on:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="neuron", desc=desc, dynamic_ncols=True)


def _exemplar_dicts(split: EvalSplit, subject: Any, l: int, n: int, p: str, k: int) -> list[dict[str, Any]]:
    """Training exemplars as the explainer prompt wants them (tokens, position, per-token activations)."""
    from ..stats.results import window_activations
    ex = split.train_exemplars(l, n, p, k)
    acts = window_activations(subject, [split.ids[w] for w, _ in ex], l, n) if ex else []
    return [{"tokens": split.tokens[w], "position": pos, "acts": a} for (w, pos), a in zip(ex, acts)]


def summarise(folder: Path, threshold: float, detection_threshold: float | None = None) -> dict[str, Any]:
    """Counts and score distributions of the stored descriptions: all, per kept source, and per kind of candidate
    (each kind's own scores, whichever was kept), with the share interpretable under the two-score rule."""
    con = store.open_db(folder)
    try:
        rows = con.execute(f"SELECT score, source, detection, candidates, output_score, effect FROM {TABLE}"
                           ).fetchall()
    finally:
        con.close()
    out: dict[str, Any] = {"described": len(rows)}
    dt = detection_threshold

    def dist(pairs: list[tuple[float, float | None]]) -> dict[str, Any]:
        sc = [s for s, _ in pairs]
        ok = [s >= threshold and (dt is None or (d is not None and d >= dt)) for s, d in pairs]
        res: dict[str, Any] = {"n": len(sc), "median": round(statistics.median(sc), 4),
                               "share_ge_0.5": round(sum(s >= 0.5 for s in sc) / len(sc), 4),
                               "share_interpretable": round(sum(ok) / len(sc), 4)}
        dets = [d for _, d in pairs if d is not None]
        if dets:
            res["detection_median"] = round(statistics.median(dets), 4)
        return res
    groups: dict[str, list[tuple[float, float | None]]] = {"all": [], "label": [], "context": [], "explainer": []}
    kinds: dict[str, list[tuple[float, float | None]]] = {}
    outs: list[tuple[float, float]] = []
    for score, source, det, cands, osc, eff in rows:
        if score is None:
            continue
        groups["all"].append((float(score), det))
        groups.setdefault(source, []).append((float(score), det))
        for c in json.loads(cands or "[]"):
            if c.get("score") is not None:
                kinds.setdefault(c["source"], []).append((float(c["score"]), c.get("detection")))
        if osc is not None:
            outs.append((float(osc), float(eff or 0.0)))
    for name, pairs in groups.items():
        if pairs:
            out[f"scores_{name}"] = dist(pairs)
    out["kinds"] = {name: dist(pairs) for name, pairs in kinds.items() if pairs}
    if outs:
        out["scores_output"] = {"n": len(outs), "median": round(statistics.median(s for s, _ in outs), 4),
                                "effect_median": round(statistics.median(e for _, e in outs), 4),
                                "share_interpretable": round(sum(output_passes(s, e) for s, e in outs) / len(outs), 4)}
    return out


COLUMNS = "layer, neuron, polarity, text, score, source, detection, output_score, effect"


class Descriptions:
    """The stored descriptions of an atlas folder: look up, filter by interpretability, text search.

    Each is a `records.Description` (text, Pearson r of the kept input-side description, its source, detection,
    the measured output description's scores, interpretable under the folder's thresholds, Pearson alone for
    folders described before detection existed); `get(..., candidates=True)` adds every kind with its scores
    (`records.DescriptionKind`)."""

    def __init__(self, folder: Path, threshold: float = THRESHOLD, detection_threshold: float | None = None):
        self.folder = Path(folder)
        self.threshold = float(threshold)
        self.detection_threshold = None if detection_threshold is None else float(detection_threshold)

    @staticmethod
    def count_rows(folder: str | Path) -> int:
        con = store.open_db(folder)
        try:
            _ensure_table(con)
            return int(con.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0])
        finally:
            con.close()

    @classmethod
    def open(cls, atlas_dir: str | Path, embedder: Any = None) -> "Descriptions":
        af = AtlasFolder.open(atlas_dir)
        folder = af.path
        sec = af.section("descriptions") if (folder / DB).is_file() else None
        if sec:
            check_db_once(af)
        if not sec:
            raise NeuronscopeError(f"The atlas '{folder}' has no neuron descriptions yet; run "
                                   f"`neuronscope describe {folder}` first.")
        return cls(folder, float(sec.get("threshold", THRESHOLD)), sec.get("detection_threshold"))

    @property
    def _columns(self) -> str:
        """COLUMNS, with NULL for the columns a folder described before them lacks (read-only: nothing altered)."""
        if not hasattr(self, "_cols"):
            have = {r[1] for r in self._rows(f"PRAGMA table_info({TABLE})")}
            self._cols = ", ".join(c if c in have or c not in dict(NEW_COLUMNS) else f"NULL AS {c}"
                                   for c in COLUMNS.split(", "))
        return self._cols

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        con = store.open_db(self.folder)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def _where_interpretable(self) -> tuple[str, tuple[Any, ...]]:
        if self.detection_threshold is None or "NULL AS detection" in self._columns:
            return "score >= ?", (self.threshold,)
        return "score >= ? AND detection >= ?", (self.threshold, self.detection_threshold)

    def _row(self, l: int, n: int, p: str, text: str, score: float | None, source: str, detection: float | None,
             output_score: float | None, effect: float | None) -> Description:
        ok = score is not None and score >= self.threshold and (
            self.detection_threshold is None or (detection is not None and detection >= self.detection_threshold))
        return Description(l, n, p, text, score, source, detection, output_score, effect, ok,
                           output_passes(output_score, effect))

    def get(self, layer: int, i: int, polarity: str = "pos", candidates: bool = False) -> Description | None:
        """The neuron polarity's description or None; candidates=True fills in `candidates`, every kind of
        description with its scores."""
        check_polarity(polarity)
        r = self._rows(f"SELECT {self._columns}, candidates FROM {TABLE} WHERE layer=? AND neuron=? AND polarity=?",
                       (int(layer), int(i), polarity))
        if not r:
            return None
        row = self._row(*r[0][:-1])
        if candidates:
            row.candidates = [DescriptionKind.from_json(c) for c in json.loads(r[0][-1] or "[]")]
        return row

    def all(self, interpretable: bool = False, *, layers: Iterable[int] | None = None, source: str | None = None,
            min_score: float | None = None, min_detection: float | None = None) -> list[Description]:
        """Every stored description, optionally only the interpretable ones, of some layers, of one kept source
        (label, context, explainer; 'output' keeps rows with a measured output description), or from a score or
        detection up."""
        where: list[str] = []
        args: list[Any] = []
        if interpretable:
            w, a = self._where_interpretable()
            where.append(w)
            args.extend(a)
        if layers is not None:
            ls = sorted({int(x) for x in layers})
            where.append(f"layer IN ({', '.join('?' * len(ls))})" if ls else "0")
            args.extend(ls)
        if source == "output":
            where.append("output_score IS NOT NULL")
        elif source is not None:
            where.append("source = ?")
            args.append(source)
        if min_score is not None:
            where.append("score >= ?")
            args.append(float(min_score))
        if min_detection is not None:
            where.append("detection >= ?")
            args.append(float(min_detection))
        sql = f"SELECT {self._columns} FROM {TABLE}" + (" WHERE " + " AND ".join(where) if where else "")
        return [self._row(*r) for r in self._rows(sql + " ORDER BY layer, neuron, polarity", tuple(args))]

    def interpretable(self) -> set[tuple[int, int, str]]:
        w, a = self._where_interpretable()
        return {(l, n, p) for l, n, p in self._rows(f"SELECT layer, neuron, polarity FROM {TABLE} WHERE {w}", a)}

    def embeddings(self) -> dict[tuple[int, int, str], Any]:
        """{(layer, neuron, polarity): unit vector} from the index (neuron_emb.safetensors), or {}."""
        from .index import load_index
        idx = load_index(self.folder)
        if idx is None:
            return {}
        return {k: v for k, v in zip(idx.keys, idx.emb.float())}

    def search(self, text: str, k: int = 50, interpretable: bool = False) -> list[DescriptionMatch]:
        """Descriptions whose words match `text` (`match`: share of the query's words found, whole words then
        prefixes; ties by simulator score), best first. Search by meaning: neuronscope.concepts."""
        import re
        if not isinstance(text, str) or not text.strip():
            raise NeuronscopeError("Give some text to search the descriptions for.")
        words = [w for w in (norm_token(x) for x in re.findall(r"\w+", text)) if w]
        scored = []
        for r in self.all(interpretable):
            terms = [norm_token(x) for x in re.findall(r"\w+", r.text)]
            tset = set(terms)
            s = sum(1.0 if w in tset else 0.5 if any(t.startswith(w) for t in terms) else 0.0
                    for w in words) / max(1, len(words))
            if s > 0:
                scored.append((s + 1e-3 * (r.score or 0.0), r))
        scored.sort(key=lambda x: -x[0])
        return [DescriptionMatch(r, round(s, 6)) for s, r in scored[:k]]
