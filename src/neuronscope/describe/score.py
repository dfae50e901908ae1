"""Which windows a description is written from and which it is scored on, and the scoring of every label at once.

The corpus windows of the statistics are split once, by window id: window w is **held out** when
`w % every == 0` (default every 5th). Descriptions are written from a neuron's exemplars in the other windows only
(`train_exemplars`); the score is the Pearson correlation of simulated vs real activations over the tokens of the
neuron's top `held_out` exemplar windows among the held-out windows plus `n_random` random held-out windows (the
same for every neuron; drawn with a fixed seed from the held-out windows stored in atlas.sqlite). So no window a
description was written from is ever scored, and top-only windows do not inflate the score.

`EvalSplit.score(subject, l, n, p, text, predict)` scores one description (any simulator); `score_token_labels`
scores the token simulator's predictions for many neurons in one pass over the needed windows (all layers captured
together), with the same windows and the same numbers as the one-neuron path (tests check both agree).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import torch

from .. import store
from ..atlas.folder import WINDOWS_TABLE
from ..errors import NeuronscopeError
from ..refs import POLARITIES
from .label import LabelVocab
from .simulate import Predictor, pearson

Key = tuple[int, int, str]


class EvalSplit:
    """The held-out split of a NeuronStats' windows and each neuron's training and scoring windows."""

    def __init__(self, stats: Any, *, every: int = 5, n_random: int = 40, held_out: int = 10, seed: int = 0):
        if every < 2:
            raise NeuronscopeError(f"The held-out split needs every >= 2, got {every}.")
        self.stats, self.every, self.held_out = stats, int(every), int(held_out)
        con = store.open_db(stats.folder)
        try:
            rows = con.execute(f"SELECT window, token_ids, tokens FROM {WINDOWS_TABLE} ORDER BY window").fetchall()
        finally:
            con.close()
        if not rows:
            raise NeuronscopeError(f"The statistics in '{stats.folder}' store no windows; run `neuronscope stats` "
                                   "again.")
        self.ids: dict[int, list[int]] = {}
        self.tokens: dict[int, list[str]] = {}
        for w, ids, toks in rows:
            self.ids[int(w)] = json.loads(ids)
            self.tokens[int(w)] = json.loads(toks)
        self.T = int(stats.window)
        held = [w for w in self.ids if self.is_held(w)]
        rng = random.Random(seed)
        self.random: list[int] = sorted(rng.sample(held, min(n_random, len(held))))
        wmax = max(self.ids) + 1
        table = torch.full((wmax + 1, self.T), -1, dtype=torch.long)
        for w, ids in self.ids.items():
            table[w, :len(ids)] = torch.tensor(ids[:self.T])
        self.table = table                 # [windows + 1, T]; row wmax is all -1 (missing windows point there)

    def thresholds(self) -> dict[str, torch.Tensor]:
        """`detection_thresholds` of these statistics (computed once)."""
        if not hasattr(self, "_thr"):
            self._thr = detection_thresholds(self)
        return self._thr

    def is_held(self, w: int) -> bool:
        return w % self.every == 0

    def info(self) -> dict[str, Any]:
        return {"held_out_windows": f"window % {self.every} == 0", "n_random": len(self.random),
                "held_out_per_neuron": self.held_out, "stored_windows": len(self.ids),
                "corpus_windows": int(self.stats.tokens // max(1, self.T))}

    # ---- per neuron ---------------------------------------------------------------------------------------
    def _index(self, l: int, n: int, p: str) -> list[int]:
        return [int(x) for x in self.stats._a[f"ex_{p}_index"][l, n].tolist() if x >= 0]

    def train_exemplars(self, l: int, n: int, p: str, k: int) -> list[tuple[int, int]]:
        """(window, position) of the neuron's strongest `k` exemplars outside the held-out windows."""
        out = []
        for gi in self._index(l, n, p):
            w, pos = divmod(gi, self.T)
            if not self.is_held(w) and w in self.ids:
                out.append((w, pos))
                if len(out) >= k:
                    break
        return out

    def eval_windows(self, l: int, n: int, p: str) -> list[int]:
        """The held-out windows a description of (l, n, p) is scored on: its top held-out exemplar windows, then
        the random ones (no repeats)."""
        top: list[int] = []
        for gi in self._index(l, n, p):
            w = gi // self.T
            if self.is_held(w) and w in self.ids and w not in top:
                top.append(w)
                if len(top) >= self.held_out:
                    break
        return top + [w for w in self.random if w not in top]

    def score(self, subject: Any, l: int, n: int, p: str, text: str, predict: Predictor,
              acts: dict[int, list[float]] | None = None) -> float:
        """Pearson correlation of `predict(text, tokens)` with the real (sign-flipped for neg) activations over
        the neuron's scoring windows. `acts` caches {window: activations} of this neuron between candidates."""
        return self.scores(subject, l, n, p, text, predict, acts).pearson

    def scores(self, subject: Any, l: int, n: int, p: str, text: str, predict: Predictor,
               acts: dict[int, list[float]] | None = None) -> "Scores":
        """Pearson r and detection balanced accuracy of one description with any simulator (`predict(text,
        tokens) -> per-token predictions`; a window is predicted to fire where a prediction reaches 0.5)."""
        from ..stats.results import window_activations
        ws = self.eval_windows(l, n, p)
        if acts is None:
            acts = {}
        need = [w for w in ws if w not in acts]
        if need:
            for w, a in zip(need, window_activations(subject, [self.ids[w] for w in need], l, n)):
                acts[w] = a
        sign = -1.0 if p == "neg" else 1.0
        thr = float(self.thresholds()[p][l, n])
        pred: list[float] = []
        real: list[float] = []
        det = [0, 0, 0, 0]
        for w in ws:
            pr = predict(text, self.tokens[w])
            if len(pr) != len(acts[w]):
                raise NeuronscopeError("The simulator returned a prediction of the wrong length.")
            pred.extend(pr)
            ys = [sign * a for a in acts[w]]
            real.extend(ys)
            fires, hit = max(ys) >= thr, max(pr) >= 0.5
            det[0 if fires else 2] += int(hit == fires)
            det[1 if fires else 3] += 1
        tpr = det[0] / det[1] if det[1] else 0.5
        tnr = det[2] / det[3] if det[3] else 0.5
        return Scores(pearson(pred, real), (tpr + tnr) / 2)


def detection_thresholds(split: EvalSplit) -> dict[str, torch.Tensor]:
    """The fixed activation threshold of the detection score, per polarity [L, N]: half the neuron's strongest
    activation over the corpus or its weakest stored exemplar (its n_exemplars-th strongest token), whichever is
    lower (sign-flipped for neg; at least a tiny positive number). A window *fires* when its strongest (signed)
    activation reaches it: a neuron that fires on many tokens alike counts all of them, one with a few outliers
    counts its top tokens."""
    out = {}
    for p in POLARITIES:
        v = split.stats._a[f"ex_{p}_value"].float()
        idx = split.stats._a[f"ex_{p}_index"]
        valid = idx >= 0
        last = torch.where(valid, torch.arange(v.shape[-1]).expand_as(v), torch.full_like(idx, -1)).amax(-1)
        weakest = v.gather(-1, last.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        strongest = v[..., 0]
        if p == "neg":
            weakest, strongest = -weakest, -strongest
        val = torch.minimum(weakest, 0.5 * strongest)
        out[p] = torch.where(last >= 0, val, torch.full_like(val, float("inf"))).clamp_min(1e-6)
    return out


@dataclass(frozen=True)
class Sim:
    """What the batched simulator predicts for one description: token items (key, context key or None), a topic
    gate (column of `Tables.gate`, -1 none), a token field (column of `Tables.field`, -1 none), and whether it
    fires on every token (of its topic's windows)."""
    items: tuple[tuple[str, str | None], ...] = ()
    topic: int = -1
    field: int = -1
    whole: bool = False


@dataclass
class Tables:
    """Per-window topic gates and per-key field predictions for the simulator, in [0, 1].

    gate: [max window id + 2, K] (row = window id; the last row, used for missing windows, is 1);
    field: [key codes + 1, F] (the last row, for tokens without a key, is 0)."""
    gate: torch.Tensor | None = None
    field: torch.Tensor | None = None


@dataclass(frozen=True)
class Scores:
    """A description's scores on its held-out windows: Pearson r of simulated vs real per-token activations, and the
    detection balanced accuracy (windows that fire vs windows that do not, at `detection_thresholds`; 0.5 when a
    side has no windows)."""
    pearson: float
    detection: float


def gate_of(z: torch.Tensor) -> torch.Tensor:
    """Topic gate from a window's standardised relevance: 0 at or below the average window, 1 from two standard
    deviations above it (so a window counts as "about" the topic, >= 0.5, from one sd up)."""
    return (z / 2.0).clamp(0.0, 1.0)


def field_of(z: torch.Tensor) -> torch.Tensor:
    """Field prediction of a token from its key's standardised relevance: 0 up to two sd above the average corpus
    token, 1 from four sd (>= 0.5 from three sd)."""
    return ((z - 2.0) / 2.0).clamp(0.0, 1.0)


def score_token_labels(subject: Any, split: EvalSplit, vocab: LabelVocab,
                       items: dict[Key, list[tuple[str, str | None]]], *, batch: int = 16,
                       progress: bool = False) -> dict[Key, float]:
    """Token-simulator Pearson scores of many labels at once (items as `forms.parse_label_items` gives them), over
    each neuron's `split.eval_windows`. Returns {(layer, neuron, polarity): Pearson r}."""
    sims = {k: Sim(items=tuple(v)) for k, v in items.items()}
    got = score_sims(subject, split, vocab, {"label": sims}, batch=batch, progress=progress)["label"]
    return {k: v.pearson for k, v in got.items()}


class _Group:
    """The simulator arrays of one (kind, layer, polarity): which neurons predict what."""

    def __init__(self, N: int):
        self.lists: dict[str, list[int]] = {k: [] for k in ("pj", "pc", "cj", "cc", "cx")}
        self.topic = torch.full((N,), -1, dtype=torch.long)
        self.field = torch.full((N,), -1, dtype=torch.long)
        self.whole = torch.zeros(N, dtype=torch.bool)
        self.wanted = torch.zeros(N, dtype=torch.bool)
        self.sums = torch.zeros(6, N, dtype=torch.float64)
        self.det = torch.zeros(4, N, dtype=torch.float64)        # true pos, pos, true neg, neg

    def freeze(self) -> None:
        self.a = {k: torch.tensor(v, dtype=torch.long) for k, v in self.lists.items()}
        self.tn = self.topic.ge(0).nonzero().squeeze(1)
        self.fn = self.field.ge(0).nonzero().squeeze(1)
        self.wn = self.whole.nonzero().squeeze(1)


def _predict(g: _Group, tabs: Tables, codes: torch.Tensor, prev: torch.Tensor, uniq: torch.Tensor,
             inv: torch.Tensor, ws: list[int], B: int, T: int, N: int) -> torch.Tensor:
    """[B*T, N] simulated activations of one group's descriptions on a batch of windows."""
    a = g.a
    M = torch.zeros(len(uniq), N)
    sel = torch.isin(a["pc"], uniq)
    if sel.any():
        M[torch.searchsorted(uniq, a["pc"][sel]), a["pj"][sel]] = 1.0
    P = M[inv]
    sel = torch.isin(a["cc"], uniq)
    if sel.any():
        C = torch.full((len(uniq), N), -2, dtype=torch.long)
        C[torch.searchsorted(uniq, a["cc"][sel]), a["cj"][sel]] = a["cx"][sel]
        Cp = C[inv]
        hit = Cp > -2
        P = torch.where(hit, torch.where(Cp == prev[:, None], 1.0, 0.5), P)
    if len(g.wn):
        P[:, g.wn] = 1.0
    if len(g.fn) and tabs.field is not None:
        F = tabs.field[codes.clamp_max(tabs.field.shape[0] - 1)]          # code -1 -> the last row (0)
        P[:, g.fn] = torch.maximum(P[:, g.fn], F[:, g.field[g.fn]])
    if len(g.tn) and tabs.gate is not None:
        rows = torch.tensor([min(w, tabs.gate.shape[0] - 1) for w in ws], dtype=torch.long)
        G = tabs.gate[rows][:, g.topic[g.tn]]                           # [B, n_topic]
        P[:, g.tn] = P[:, g.tn] * G.repeat_interleave(T, dim=0)
    return P


def score_sims(subject: Any, split: EvalSplit, vocab: LabelVocab, kinds: dict[str, dict[Key, Sim]], *,
               tables: Tables | None = None, batch: int = 16, progress: bool = False
               ) -> dict[str, dict[Key, Scores]]:
    """Scores (Pearson and detection) of many descriptions of several kinds at once, each over its neuron's
    `split.eval_windows`, in one pass of the model over the needed windows (all layers captured together).
    Returns {kind: {(layer, neuron, polarity): Scores}}."""
    from ..interventions import BoundCapture, Capture, intervene
    tabs = tables or Tables()
    code_of_id = torch.tensor(vocab.key_of + [-1], dtype=torch.long)     # index -1 (missing) -> -1
    N = split.stats.n_neurons
    thr = split.thresholds()
    groups = _groups(vocab, kinds, N)
    own, windows = _scoring_windows(split, kinds)
    layers = sorted({l for _, l, _ in groups})
    order = sorted(windows)
    rand = set(split.random)
    spec = Capture(layers=layers)        # one spec for the whole run: bound captures are kept per spec
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(order), unit="window", desc="score", dynamic_ncols=True)
    with torch.no_grad():
        for s in range(0, len(order), batch):
            ws = order[s:s + batch]
            bt = _batch(split, ws, code_of_id)
            with intervene(subject, spec) as (cap,):
                subject.model(input_ids=bt.ids.to(subject.device))
            assert isinstance(cap, BoundCapture)
            for l in layers:
                A = cap.get("neurons", l).reshape(bt.B * bt.T, -1).float().cpu()
                for p in POLARITIES:
                    gs = [groups[(kind, l, p)] for kind in kinds if (kind, l, p) in groups]
                    if gs:
                        real = _Real.of(A, p, thr[p][l], _window_mask(ws, rand, own.get((l, p), {}), N), bt.T)
                        for g in gs:
                            _accumulate(g, _predict(g, tabs, bt.codes, bt.prev, bt.uniq, bt.inv, ws, bt.B, bt.T, N),
                                        real)
            if bar is not None:
                bar.update(len(ws))
    if bar is not None:
        bar.close()
    return _results(groups, kinds)


def _groups(vocab: LabelVocab, kinds: dict[str, dict[Key, Sim]], N: int) -> dict[tuple[str, int, str], _Group]:
    """The simulator arrays of every (kind, layer, polarity) asked for, frozen: each described neuron's token items
    as key codes (items whose key or context the vocabulary lacks are left out), topic, field and whole flags."""
    code_of = {k: c for c, k in enumerate(vocab.keys)}
    groups: dict[tuple[str, int, str], _Group] = {}
    for kind, sims in kinds.items():
        for (l, n, p), sim in sims.items():
            g = groups.get((kind, l, p))
            if g is None:
                g = groups[(kind, l, p)] = _Group(N)
            g.wanted[n] = True
            g.topic[n], g.field[n], g.whole[n] = sim.topic, sim.field, sim.whole
            for k, ctx in sim.items:
                c = code_of.get(k)
                if c is None:
                    continue
                if ctx is None:
                    g.lists["pj"].append(n)
                    g.lists["pc"].append(c)
                elif ctx in code_of:
                    g.lists["cj"].append(n)
                    g.lists["cc"].append(c)
                    g.lists["cx"].append(code_of[ctx])
    for g in groups.values():
        g.freeze()
    return groups


def _scoring_windows(split: EvalSplit, kinds: dict[str, dict[Key, Sim]]
                     ) -> tuple[dict[tuple[int, str], dict[int, torch.Tensor]], set[int]]:
    """Which windows each neuron is scored on besides the random ones (its top held-out exemplar windows):
    ({(layer, polarity): {window: neuron ids}}, every window the run needs, random ones included)."""
    wins: dict[tuple[int, str], dict[int, list[int]]] = {}               # (l, p) -> window -> neurons
    seen: set[Key] = set()
    windows: set[int] = set(split.random)
    for sims in kinds.values():
        for (l, n, p) in sims:
            per = wins.setdefault((l, p), {})
            if (l, n, p) not in seen:
                seen.add((l, n, p))
                for w in split.eval_windows(l, n, p)[:split.held_out]:
                    if w not in split.random:
                        per.setdefault(w, []).append(n)
                        windows.add(w)
    own = {key: {w: torch.tensor(sorted(set(ns)), dtype=torch.long) for w, ns in per.items()}
           for key, per in wins.items()}
    return own, windows


@dataclass
class _Batch:
    """One batch of scoring windows as the simulator reads it: token ids [B, T], each token's key code and the code
    before it (flattened, [B*T]; -1 at a window start or for tokens without a key), and the distinct codes."""
    ids: torch.Tensor
    B: int
    T: int
    codes: torch.Tensor
    prev: torch.Tensor
    uniq: torch.Tensor
    inv: torch.Tensor


def _batch(split: EvalSplit, ws: list[int], code_of_id: torch.Tensor) -> _Batch:
    ids = torch.tensor([split.ids[w] for w in ws], dtype=torch.long)
    B, T = ids.shape
    c2 = code_of_id[ids.clamp_min(0)]
    codes = c2.reshape(-1)
    prev = torch.cat([torch.full((B, 1), -1, dtype=torch.long), c2[:, :-1]], 1).reshape(-1)
    uniq, inv = torch.unique(codes, return_inverse=True)
    return _Batch(ids, B, T, codes, prev, uniq, inv)


def _window_mask(ws: list[int], rand: set[int], own: dict[int, torch.Tensor], N: int) -> torch.Tensor:
    """[B, N] 1 where a window of the batch is one of the neuron's scoring windows (random ones: every neuron's)."""
    Wm = torch.zeros(len(ws), N)
    for i, w in enumerate(ws):
        if w in rand:
            Wm[i] = 1.0
        ns = own.get(w)
        if ns is not None:
            Wm[i, ns] = 1.0
    return Wm


@dataclass
class _Real:
    """The real (sign-flipped for neg) activations of one layer and polarity on a batch, weighted by the scoring
    windows, and which scoring windows fire (the detection score's positives) or not."""
    y: torch.Tensor             # [B*T, N]
    W: torch.Tensor             # [B*T, N] scoring-window weights
    yW: torch.Tensor
    pos_w: torch.Tensor         # [B, N] float64: scoring windows that fire
    neg_w: torch.Tensor         # [B, N] float64: scoring windows that do not

    @classmethod
    def of(cls, A: torch.Tensor, p: str, thr: torch.Tensor, Wm: torch.Tensor, T: int) -> "_Real":
        B, N = Wm.shape
        y = -A if p == "neg" else A
        W = Wm.repeat_interleave(T, dim=0)
        fires = y.reshape(B, T, N).amax(1) >= thr                # [B, N]
        Wb = Wm > 0
        return cls(y, W, y * W, (fires & Wb).double(), (~fires & Wb).double())


def _accumulate(g: _Group, P: torch.Tensor, r: _Real) -> None:
    """Add one batch to a group's Pearson sums (n, sum x, sum y, sum xx, sum yy, sum xy over scoring-window tokens)
    and detection counts (true positives, positives, true negatives, negatives over scoring windows)."""
    B, N = r.pos_w.shape
    PW = P * r.W
    acc = g.sums
    acc[0] += r.W.sum(0).double()
    acc[1] += PW.sum(0).double()
    acc[2] += r.yW.sum(0).double()
    acc[3] += (PW * P).sum(0).double()
    acc[4] += (r.yW * r.y).double().sum(0)
    acc[5] += (PW * r.y).double().sum(0)
    hit = (P.reshape(B, -1, N).amax(1) >= 0.5).double()
    g.det[0] += (r.pos_w * hit).sum(0)
    g.det[1] += r.pos_w.sum(0)
    g.det[2] += (r.neg_w * (1 - hit)).sum(0)
    g.det[3] += r.neg_w.sum(0)


def _results(groups: dict[tuple[str, int, str], _Group], kinds: dict[str, dict[Key, Sim]]
             ) -> dict[str, dict[Key, Scores]]:
    """Pearson r and detection balanced accuracy of every described neuron from its group's sums."""
    out: dict[str, dict[Key, Scores]] = {kind: {} for kind in kinds}
    for (kind, l, p), g in groups.items():
        n_, sx, sy, sxx, syy, sxy = g.sums
        vx = sxx - sx * sx / n_.clamp_min(1)
        vy = syy - sy * sy / n_.clamp_min(1)
        cov = sxy - sx * sy / n_.clamp_min(1)
        ok = (vx > 1e-12 * n_.clamp_min(1)) & (vy > 0) & (n_ >= 2)
        r = torch.where(ok, cov / (vx.clamp_min(1e-30) * vy.clamp_min(1e-30)).sqrt(), torch.zeros_like(cov))
        tpr = torch.where(g.det[1] > 0, g.det[0] / g.det[1].clamp_min(1), torch.full_like(cov, 0.5))
        tnr = torch.where(g.det[3] > 0, g.det[2] / g.det[3].clamp_min(1), torch.full_like(cov, 0.5))
        ba = (tpr + tnr) / 2
        for n in g.wanted.nonzero().squeeze(1).tolist():
            out[kind][(l, n, p)] = Scores(float(r[n]), float(ba[n]))
    return out
