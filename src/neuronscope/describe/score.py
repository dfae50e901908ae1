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
from typing import Callable

import torch

from .. import store
from ..atlas.folder import WINDOWS_TABLE
from ..errors import NeuronscopeError
from ..refs import POLARITIES
from .label import LabelVocab
from .simulate import pearson

Key = tuple[int, int, str]


class EvalSplit:
    """The held-out split of a NeuronStats' windows and each neuron's training and scoring windows."""

    def __init__(self, stats, *, every: int = 5, n_random: int = 40, held_out: int = 10, seed: int = 0):
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

    def is_held(self, w: int) -> bool:
        return w % self.every == 0

    def info(self) -> dict:
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

    def score(self, subject, l: int, n: int, p: str, text: str, predict: Callable, acts: dict | None = None
              ) -> float:
        """Pearson correlation of `predict(text, tokens)` with the real (sign-flipped for neg) activations over
        the neuron's scoring windows. `acts` caches {window: activations} of this neuron between candidates."""
        from ..stats.results import window_activations
        ws = self.eval_windows(l, n, p)
        if acts is None:
            acts = {}
        need = [w for w in ws if w not in acts]
        if need:
            for w, a in zip(need, window_activations(subject, [self.ids[w] for w in need], l, n)):
                acts[w] = a
        sign = -1.0 if p == "neg" else 1.0
        pred: list[float] = []
        real: list[float] = []
        for w in ws:
            pr = predict(text, self.tokens[w])
            if len(pr) != len(acts[w]):
                raise NeuronscopeError("The simulator returned a prediction of the wrong length.")
            pred.extend(pr)
            real.extend(sign * a for a in acts[w])
        return pearson(pred, real)


def score_token_labels(subject, split: EvalSplit, vocab: LabelVocab, items: dict[Key, list[tuple[str, str | None]]],
                       *, batch: int = 16, progress: bool = False) -> dict[Key, float]:
    """Token-simulator scores of many labels at once (items as `label.parse_label_items` gives them), over each
    neuron's `split.eval_windows`. Returns {(layer, neuron, polarity): Pearson r}."""
    from ..interventions import Capture, intervene
    code_of = {k: c for c, k in enumerate(vocab.keys)}
    code_of_id = torch.tensor(vocab.key_of + [-1], dtype=torch.long)     # index -1 (missing) -> -1
    N = split.stats.n_neurons
    per: dict[tuple[int, str], dict[str, list]] = {}
    windows: set[int] = set(split.random)
    for (l, n, p), its in items.items():
        d = per.setdefault((l, p), {"pj": [], "pc": [], "cj": [], "cc": [], "cx": [], "wj": [], "ww": []})
        for k, ctx in its:
            c = code_of.get(k)
            if c is None:
                continue
            if ctx is None:
                d["pj"].append(n)
                d["pc"].append(c)
            elif ctx in code_of:
                d["cj"].append(n)
                d["cc"].append(c)
                d["cx"].append(code_of[ctx])
        for w in split.eval_windows(l, n, p)[:split.held_out]:
            if w not in split.random:
                d["wj"].append(n)
                d["ww"].append(w)
                windows.add(w)
    arrays = {key: {k: torch.tensor(v, dtype=torch.long) for k, v in d.items()} for key, d in per.items()}
    wanted = {key: torch.zeros(N, dtype=torch.bool) for key in per}
    for (l, n, p) in items:
        wanted[(l, p)][n] = True
    sums = {key: torch.zeros(6, N, dtype=torch.float64) for key in per}
    layers = sorted({l for l, _ in per})
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
            ids = torch.tensor([split.ids[w] for w in ws], dtype=torch.long)
            B, T = ids.shape
            codes = code_of_id[ids.clamp_min(0)].reshape(-1)
            prev = torch.cat([torch.full((B, 1), -1, dtype=torch.long), code_of_id[ids.clamp_min(0)][:, :-1]], 1
                             ).reshape(-1)
            uniq, inv = torch.unique(codes, return_inverse=True)
            wpos = {w: i for i, w in enumerate(ws)}
            wt = torch.tensor(ws, dtype=torch.long)
            with intervene(subject, spec) as (cap,):
                subject.model(input_ids=ids.to(subject.device))
            for l in layers:
                A = cap.get("neurons", l).reshape(B * T, -1).float().cpu()
                for p in POLARITIES:
                    if (l, p) not in arrays:
                        continue
                    a = arrays[(l, p)]
                    y = -A if p == "neg" else A
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
                    Wm = torch.zeros(B, N)
                    for i, w in enumerate(ws):
                        if w in rand:
                            Wm[i] = 1.0
                    sel = torch.isin(a["ww"], wt)
                    if sel.any():
                        rows = torch.tensor([wpos[int(w)] for w in a["ww"][sel].tolist()], dtype=torch.long)
                        Wm[rows, a["wj"][sel]] = 1.0
                    W = Wm.repeat_interleave(T, dim=0)
                    PW, yW = P * W, y * W
                    acc = sums[(l, p)]
                    acc[0] += W.sum(0).double()
                    acc[1] += PW.sum(0).double()
                    acc[2] += yW.sum(0).double()
                    acc[3] += (PW * P).sum(0).double()
                    acc[4] += (yW * y).double().sum(0)
                    acc[5] += (PW * y).double().sum(0)
            if bar is not None:
                bar.update(len(ws))
    if bar is not None:
        bar.close()
    out: dict[Key, float] = {}
    for (l, p), acc in sums.items():
        n_, sx, sy, sxx, syy, sxy = acc
        vx = sxx - sx * sx / n_.clamp_min(1)
        vy = syy - sy * sy / n_.clamp_min(1)
        cov = sxy - sx * sy / n_.clamp_min(1)
        ok = (vx > 1e-12 * n_.clamp_min(1)) & (vy > 0) & (n_ >= 2)
        r = torch.where(ok, cov / (vx.clamp_min(1e-30) * vy.clamp_min(1e-30)).sqrt(), torch.zeros_like(cov))
        for n in wanted[(l, p)].nonzero().squeeze(1).tolist():
            out[(l, n, p)] = float(r[n])
    return out

