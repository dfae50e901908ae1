"""What every neuron polarity reads and writes, as token keys and windows: the evidence concept search, concept
clusters and concept steering rank neurons by (`concept_evidence.safetensors` in the atlas folder).

    ev = ConceptEvidence.open("atlas-smollm", embedder)     # built once (~1 min on SmolLM2), then loaded
    ev.read_codes[m]    # token keys of polarity m's strongest exemplars (the statistics' top activations)
    ev.read_rows[m]     # the stored windows those exemplars are in (rows of the window embeddings)
    ev.write_codes[m]   # token keys its write vector promotes (decode), and what raising it makes the model say
                        # (the measured output effects of `describe`, where measured)

Rows are neuron polarities in the order (layer, neuron, polarity) with pos before neg: m = 2 * (l * N + n) + p.

- **Reads**: the `EXEMPLARS` strongest exemplars of the statistics (activation, window, position), each as its token
  key (`describe.label.token_key`) and its window; weights are activations over the neuron's strongest one. A token
  that the next token continues without a space ('Mad' of 'Madrid') is a piece of a longer word: it keeps its weight
  and window but spells no word (code `PIECE`).
- **Writes**: the decoded top tokens of the down column (`atlas build`), weighted 1/sqrt(rank); where `describe`
  measured the neuron's output effect and it held on the held-out prompts (`describe.output_passes`), the tokens it
  makes the model say are kept beside them (the causal effect outranks the decode, docs/describe.md).
- **Key vectors**: the sentence embedding of every token key, also of keys the corpus never showed (window_emb holds
  zeros for those), so a writer of rare words is found.
- **Form share**: the share of a polarity's exemplar tokens that are punctuation, digits, whitespace or function
  words (`data/function_words.txt`), what marks syntax and formatting neurons.
The file records the statistics' and the embedder's identity; a stale file is rebuilt.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .. import store
from ..atlas.folder import DESCRIPTIONS_TABLE, AtlasFolder, check_safetensors
from ..errors import NeuronscopeError

EVIDENCE_FILE = "concept_evidence.safetensors"
EXEMPLARS = 50
PIECE = -2                       # read code of an exemplar token that is a piece of a longer word
TOP_READS = 20
TOPS = 8
WRITE_TOP = 20
Neuron = tuple[int, int, str]


def has_concept_evidence(folder: str | Path) -> bool:
    """Whether concept evidence is there or can be built: the folder has statistics and window embeddings
    (`neuronscope stats`, then `neuronscope describe` with an embedder)."""
    from ..atlas.folder import STATS_FILE, WINDOW_EMB_FILE
    p = Path(folder)
    return (p / EVIDENCE_FILE).is_file() or ((p / WINDOW_EMB_FILE).is_file() and (p / STATS_FILE).is_file())


def function_words() -> frozenset[str]:
    """The shipped list of English function words (articles, pronouns, prepositions, auxiliaries...)."""
    text = resources.files("neuronscope.concepts").joinpath("data/function_words.txt").read_text(encoding="utf-8")
    return frozenset(w.strip().lower() for line in text.splitlines()
                     for w in line.split("#", 1)[0].split() if w.strip())


def is_form_key(key: str, words: frozenset[str]) -> bool:
    """Whether a token key is form rather than content: no letter at all (punctuation, digits, markers), or a
    function word."""
    return not any(ch.isalpha() for ch in key) or key in words


def row_of(layer: int, neuron: int, polarity: str, n_neurons: int) -> int:
    return 2 * (layer * n_neurons + neuron) + (0 if polarity == "pos" else 1)


def key_of_row(m: int, n_neurons: int) -> Neuron:
    ln, p = divmod(int(m), 2)
    l, n = divmod(ln, n_neurons)
    return (l, n, "pos" if p == 0 else "neg")


@dataclass
class ConceptEvidence:
    """Per neuron polarity: the keys and windows it reads, the keys it writes; per key: its unit vector."""
    n_layers: int
    n_neurons: int
    keys: list[str]                    # key code -> key text (the window embeddings' key order)
    key_emb: torch.Tensor              # [C, d] unit vectors (all keys)
    key_freq: torch.Tensor             # [C] corpus counts
    form_key: torch.Tensor             # [C] bool: punctuation, digits, whitespace or a function word
    read_codes: torch.Tensor           # [M, E] int64 key codes (-1: none)
    read_rows: torch.Tensor            # [M, E] int64 rows of the window embeddings (-1: none)
    read_w: torch.Tensor               # [M, E] float weights (0 where none)
    write_codes: torch.Tensor          # [M, K] int64 key codes (-1: none)
    write_w: torch.Tensor              # [M, K] float weights
    measured: torch.Tensor             # [M] bool: writes include measured output effects
    window_ids: list[int]              # stored window id per row of the window embeddings
    window_emb: torch.Tensor           # [W, d] unit vectors
    embedder: str
    terms: list[str]                   # the topic vocabulary (describe/data/topics.txt)
    term_emb: torch.Tensor             # [K, d]
    key_topics: tuple[torch.Tensor, torch.Tensor]      # ([C, TOPS] cosines, [C, TOPS] topic ids), best first
    window_topics: tuple[torch.Tensor, torch.Tensor]   # ([W, TOPS] cosines, [W, TOPS] topic ids)

    @property
    def form_share(self) -> torch.Tensor:
        """[M] weighted share of each polarity's exemplar tokens that are form (punctuation, function words)."""
        if not hasattr(self, "_form_share"):
            codes = self.read_codes.clamp_min(0)
            f = self.form_key[codes].float() * (self.read_codes >= 0)
            self._form_share = (f * self.read_w).sum(1) / self.read_w.sum(1).clamp_min(1e-9)
        return self._form_share

    def matrices(self) -> "EvidenceMatrices":
        """The evidence as row-normalised sparse matrices (built once): scores are then one product each."""
        if not hasattr(self, "_mats"):
            C, W = len(self.keys), self.window_emb.shape[0]
            half = self.write_w.shape[1] // 2
            self._mats = EvidenceMatrices(
                _csr(self.read_codes, self.read_w, C),
                _csr(self.read_codes[:, :TOP_READS], self.read_w[:, :TOP_READS], C),
                _csr(self.read_rows, self.read_w, W),
                _csr(self.write_codes[:, :half], self.write_w[:, :half], C),
                _csr(self.write_codes[:, half:], self.write_w[:, half:], C))
        return self._mats

    @property
    def code_of(self) -> dict[str, int]:
        """{key text: key code} (built once)."""
        if not hasattr(self, "_code_of"):
            self._code_of = {k: i for i, k in enumerate(self.keys)}
        return self._code_of

    @property
    def wordlike(self) -> torch.Tensor:
        """[C] bool: keys that look like words (letters only, at least 3), what a concept's support may name."""
        if not hasattr(self, "_wordlike"):
            self._wordlike = torch.tensor([len(k) >= 3 and k.isalpha() for k in self.keys], dtype=torch.bool)
        return self._wordlike

    def neuron(self, m: int) -> Neuron:
        return key_of_row(m, self.n_neurons)

    def row(self, layer: int, neuron: int, polarity: str) -> int:
        return row_of(layer, neuron, polarity, self.n_neurons)

    # ---- build / load ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path, embedder: Any = None) -> "ConceptEvidence":
        """The folder's evidence, built (and stored) when missing or stale. Needs statistics (`neuronscope stats`)
        and window embeddings (`neuronscope describe`); decodes (`atlas build`) give the write side."""
        from ..describe.describe import check_db_once
        af = AtlasFolder.open(folder)
        if af.db_path.is_file():
            check_db_once(af)                          # a damaged atlas.sqlite: one sentence, not a traceback
        ident = _identity(af)
        old = cls.load(af.path, expect_identity=ident)
        if old is not None:
            return old
        return cls.build(af, embedder)

    @classmethod
    def load(cls, folder: str | Path, *, expect_identity: str | None = None) -> "ConceptEvidence | None":
        path = Path(folder) / EVIDENCE_FILE
        if not path.is_file():
            return None
        check_safetensors(path, "delete it; concept search rebuilds it")
        meta = store.read_metadata(path)
        if expect_identity is not None and meta.get("identity") != expect_identity:
            return None
        t = store.load_tensors(path)
        return cls(int(meta["n_layers"]), int(meta["n_neurons"]), json.loads(meta["keys"]),
                   t["key_emb"].float(), t["key_freq"].float(), t["form_key"].bool(), t["read_codes"].long(),
                   t["read_rows"].long(), t["read_w"].float(), t["write_codes"].long(), t["write_w"].float(),
                   t["measured"].bool(), [int(x) for x in t["window_ids"].tolist()], t["window_emb"].float(),
                   str(meta.get("embedder", "")), json.loads(meta["terms"]), t["term_emb"].float(),
                   (t["key_topic_cos"].float(), t["key_topic_id"].long()),
                   (t["window_topic_cos"].float(), t["window_topic_id"].long()))

    @classmethod
    def build(cls, af: AtlasFolder, embedder: Any = None) -> "ConceptEvidence":
        from ..describe.label import token_key
        from ..describe.windows import WindowMeaning
        from ..embed import load_embedder
        from ..stats.results import NeuronStats
        t0 = time.perf_counter()
        wm = WindowMeaning.load(af.path)
        if wm is None:
            raise NeuronscopeError(f"'{af.path}' has no window embeddings; run `neuronscope describe {af.path}` "
                                   "(with the default embedder) first.")
        try:
            stats = NeuronStats.from_folder(af)
        except NeuronscopeError as e:
            raise NeuronscopeError(f"Concept evidence needs the statistics: {e}") from None
        vocab = _vocab(af)
        code = {k: i for i, k in enumerate(wm.keys)}
        key_of = torch.tensor([code.get(token_key(t), -1) for t in vocab] + [-1], dtype=torch.long)
        L, N, T = stats.n_layers, stats.n_neurons, int(stats.window)
        # reads: exemplar token keys and windows
        table, row_of_window = _window_table(af.path, wm, T)
        continues = torch.tensor([bool(t) and t[0].isalpha() for t in vocab], dtype=torch.bool)
        codes_r, rows_r, w_r = [], [], []
        for p in ("pos", "neg"):
            gi = stats._a[f"ex_{p}_index"][..., :EXEMPLARS].long()                # [L, N, E]
            val = stats._a[f"ex_{p}_value"][..., :EXEMPLARS].float().abs()
            ok = gi >= 0
            w_id = torch.where(ok, gi // T, torch.zeros_like(gi))
            pos = torch.where(ok, gi % T, torch.zeros_like(gi))
            wrow = row_of_window[w_id.clamp(max=row_of_window.shape[0] - 1)]
            ok = ok & (wrow >= 0)
            tok = table[wrow.clamp_min(0), pos]
            c = key_of[torch.where(tok >= 0, tok, torch.full_like(tok, len(vocab)))]
            nxt = table[wrow.clamp_min(0), (pos + 1).clamp(max=T - 1)]
            piece = (pos + 1 < T) & (nxt >= 0) & continues[nxt.clamp_min(0)]
            top = val.amax(-1, keepdim=True).clamp_min(1e-9)
            # a token that the next one continues ('Mad' of 'Madrid') is a piece of another word: it counts as an
            # exemplar that is no word (PIECE), not as the word its key spells
            codes_r.append(torch.where(ok & (c >= 0), torch.where(piece, torch.full_like(c, PIECE), c), -1))
            rows_r.append(torch.where(ok, wrow, -1))
            w_r.append(torch.where(ok & (c >= 0), val / top, torch.zeros_like(val)))
        read_codes = _interleave(codes_r)
        read_rows = _interleave(rows_r)
        read_w = _interleave(w_r)
        write_codes, write_w, measured = _writes(af, key_of, code, L, N)
        emb = load_embedder(embedder)
        key_emb = wm.key_emb.clone()
        missing = [i for i in range(len(wm.keys)) if float(key_emb[i].norm()) < 0.5 and wm.keys[i].strip()]
        if missing:
            if emb is None:
                raise NeuronscopeError("Building the concept evidence needs the sentence embedder (the default "
                                       "all-MiniLM-L6-v2, or --embedder PATH).")
            for s in range(0, len(missing), 1024):
                part = missing[s:s + 1024]
                key_emb[torch.tensor(part)] = torch.as_tensor(emb([wm.keys[i] for i in part])).float()
        words = function_words()
        form_key = torch.tensor([is_form_key(k, words) for k in wm.keys], dtype=torch.bool)
        key_emb = torch.nn.functional.normalize(key_emb, dim=1)
        kt = _top_topics(key_emb, wm.term_emb)
        wt = _top_topics(wm.window_emb, wm.term_emb)
        ev = cls(L, N, list(wm.keys), key_emb, wm.key_freq, form_key, read_codes, read_rows, read_w, write_codes,
                 write_w, measured, list(wm.windows), wm.window_emb, wm.embedder, list(wm.terms), wm.term_emb, kt, wt)
        meta = {"identity": _identity(af), "n_layers": str(L), "n_neurons": str(N), "keys": json.dumps(ev.keys),
                "terms": json.dumps(ev.terms), "embedder": wm.embedder, "seconds": f"{time.perf_counter() - t0:.2f}"}
        store.save_tensors(af.path / EVIDENCE_FILE, {
            "key_emb": key_emb.half(), "key_freq": wm.key_freq, "form_key": form_key.to(torch.uint8),
            "read_codes": read_codes.int(), "read_rows": read_rows.int(), "read_w": read_w.half(),
            "write_codes": write_codes.int(), "write_w": write_w.half(), "measured": measured.to(torch.uint8),
            "window_ids": torch.tensor(ev.window_ids, dtype=torch.int64), "window_emb": wm.window_emb.half(),
            "term_emb": wm.term_emb.half(), "key_topic_cos": kt[0].half(), "key_topic_id": kt[1].int(),
            "window_topic_cos": wt[0].half(), "window_topic_id": wt[1].int()}, meta)
        return ev


@dataclass
class EvidenceMatrices:
    """[M, C] / [M, W] sparse CSR matrices, rows summing to 1 (or 0): exemplar keys, exemplar windows, decoded keys,
    measured keys."""
    reads_tokens: torch.Tensor
    reads_top: torch.Tensor              # the strongest TOP_READS exemplars only (what clusters name neurons by)
    reads_windows: torch.Tensor
    writes_decode: torch.Tensor
    writes_measured: torch.Tensor


def _csr(cols: torch.Tensor, weights: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Rows of (column, weight) pairs (-1: none; PIECE: counts in the row's total but in no column) as a
    row-normalised CSR matrix, duplicates summed."""
    M = cols.shape[0]
    counted = ((cols >= 0) | (cols == PIECE)) & (weights > 0)
    all_rows = torch.arange(M).unsqueeze(1).expand_as(cols)
    tot = torch.zeros(M).index_add_(0, all_rows[counted], weights[counted].float()).clamp_min(1e-9)
    ok = (cols >= 0) & (weights > 0)
    rows = all_rows[ok]
    w = weights[ok].float()
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols[ok]]), w / tot[rows], (M, n_cols),
                                  check_invariants=True).coalesce()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return coo.to_sparse_csr()


def _top_topics(vecs: torch.Tensor, term_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's TOPS most similar topics (cosines, ids), in chunks."""
    cos, ids = [], []
    for s in range(0, vecs.shape[0], 8192):
        v, i = (vecs[s:s + 8192].float() @ term_emb.float().T).topk(min(TOPS, term_emb.shape[0]), dim=1)
        cos.append(v)
        ids.append(i)
    return torch.cat(cos), torch.cat(ids)


def _identity(af: AtlasFolder) -> str:
    """What the evidence depends on: the statistics, the window embeddings, the decodes and the descriptions."""
    from ..atlas.folder import WINDOW_EMB_FILE, site_file
    from ..describe.windows import stats_identity
    parts = [stats_identity(af.path)]
    for f in (af.path / WINDOW_EMB_FILE, site_file(af.path, "down.pos"), site_file(af.path, "down.neg")):
        parts.append(f"{f.name}:{f.stat().st_mtime_ns if f.is_file() else 0}")
    sec = af.section("descriptions")
    parts.append(json.dumps(sec.get("written", sec.get("seconds")), default=str))
    parts.append(str(_descriptions_count(af)))
    return "|".join(parts)


def _descriptions_count(af: AtlasFolder) -> int:
    if not af.db_path.is_file():
        return 0
    con = store.open_db(af.path)
    try:
        has = con.execute("SELECT name FROM sqlite_master WHERE name=?", (DESCRIPTIONS_TABLE,)).fetchone()
        return int(con.execute(f"SELECT count(*) FROM {DESCRIPTIONS_TABLE} WHERE output_score IS NOT NULL")
                   .fetchone()[0]) if has else 0
    finally:
        con.close()


def _vocab(af: AtlasFolder) -> list[str]:
    from ..atlas.vocab import read_vocab
    vocab = read_vocab(af.path)
    if not vocab:
        raise NeuronscopeError(f"'{af.path}' stores no vocabulary; run `neuronscope atlas build` first.")
    return vocab


def _window_table(folder: Path, wm: Any, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([rows, T] token ids per window embedding row, -1 padded; [max window id + 2] row per window id, -1 none)."""
    from ..describe.windows import read_windows
    wins, ids = read_windows(folder)
    table = torch.full((len(wm.windows), T), -1, dtype=torch.long)
    by = dict(zip(wins, ids))
    for r, w in enumerate(wm.windows):
        x = by.get(w, [])[:T]
        if x:
            table[r, :len(x)] = torch.tensor(x)
    row = torch.full((max(wm.windows, default=0) + 2,), -1, dtype=torch.long)
    row[torch.tensor(wm.windows, dtype=torch.long)] = torch.arange(len(wm.windows))
    return table, row


def _interleave(pair: list[torch.Tensor]) -> torch.Tensor:
    """[L, N, E] pos and neg -> [L * N * 2, E] in row_of order."""
    return torch.stack(pair, dim=2).reshape(-1, pair[0].shape[-1])


def _writes(af: AtlasFolder, key_of: torch.Tensor, code: dict[str, int], L: int, N: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write-side key codes and weights per polarity: the decode's top tokens, plus measured output effects."""
    from ..atlas.atlas import Atlas
    K = WRITE_TOP
    codes = torch.full((L, N, 2, 2 * K), -1, dtype=torch.long)
    weights = torch.zeros(L, N, 2, 2 * K)
    measured = torch.zeros(L, N, 2, dtype=torch.bool)
    try:
        atlas = Atlas.from_folder(af)
    except NeuronscopeError:
        atlas = None
    rank_w = 1.0 / torch.arange(1, K + 1, dtype=torch.float32).sqrt()
    if atlas is not None:
        for p, site in enumerate(("down.pos", "down.neg")):
            if site not in atlas.sites:
                continue
            ids = atlas.top_ids(site)[..., :K].long()
            c = key_of[ids.clamp(0, key_of.shape[0] - 1)]
            k = ids.shape[-1]
            codes[:, :, p, :k] = c
            weights[:, :, p, :k] = torch.where(c >= 0, rank_w[:k], torch.zeros(()))
    for (l, n, pol), says in _measured_says(af).items():
        if not (0 <= l < L and 0 <= n < N):
            continue
        pi = 0 if pol == "pos" else 1
        cs = [code[k] for k in says if k in code][:K]
        if cs:
            codes[l, n, pi, K:K + len(cs)] = torch.tensor(cs)
            weights[l, n, pi, K:K + len(cs)] = 1.0
            measured[l, n, pi] = True
    return codes.reshape(L * N * 2, 2 * K), weights.reshape(L * N * 2, 2 * K), measured.reshape(-1)


def _measured_says(af: AtlasFolder) -> dict[Neuron, list[str]]:
    """Token keys each measured output description says raising the neuron makes the model say."""
    from ..describe.forms import parse
    from ..describe.label import token_key
    out: dict[Neuron, list[str]] = {}
    if not af.db_path.is_file():
        return out
    con = store.open_db(af.path)
    try:
        has = con.execute("SELECT name FROM sqlite_master WHERE name=?", (DESCRIPTIONS_TABLE,)).fetchone()
        rows = con.execute(f"SELECT layer, neuron, polarity, candidates, output_score, effect FROM "
                           f"{DESCRIPTIONS_TABLE} WHERE output_score IS NOT NULL").fetchall() if has else []
    finally:
        con.close()
    from ..describe.describe import output_passes
    for l, n, p, cands, score, effect in rows:
        if not output_passes(score, effect):          # an effect that did not hold on the held-out prompts
            continue
        for c in json.loads(cands or "[]"):
            if c.get("source") != "output":
                continue
            items = parse("| " + str(c.get("text", ""))).says
            keys = [token_key(s) for s in items]
            out[(int(l), int(n), str(p))] = [k for k in keys if k]
    return out
