"""The stats part of an atlas folder: writing it, and `NeuronStats`, the reader used by the CLI, web app and notebooks.

Files in the atlas folder:
- `stats.safetensors`: `quantiles` [levels, L, N] float32, `count` [L, N] int64, `mean`, `var` [L, N] float64,
  `ex_pos_value`/`ex_neg_value` [L, N, E] float32 and `ex_pos_index`/`ex_neg_index` [L, N, E] int64 (global token
  index = window * window_size + position; -1 where a neuron has fewer exemplars);
- `stats_extremes.safetensors` (only with --keep-extremes, the default for a shard): per layer l, `top.l` [N, K]
  (descending), `bottom.l` [N, K] (ascending) and the exemplar keys `ex_top.l`, `ex_bot.l` [N, E] (what
  `merge_shards` needs to merge exactly);
- atlas.sqlite table `stats_windows(window INTEGER PRIMARY KEY, token_ids TEXT, tokens TEXT, text TEXT)`: the
  windows any exemplar points into (JSON lists of ids and token strings, and the decoded text);
- manifest.json section "stats": settings, corpus, counts, timing, and `complete: true`.
"""
from __future__ import annotations

import json
import math
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .. import store
from ..errors import NeuronscopeError
from .extremes import LayerExtremes, sort_keys_desc, split_keys
from . import levels as levels_mod
from .levels import LEVELS, Levels, fmt_level
from .quantiles import quantiles_from_extremes

if TYPE_CHECKING:
    from ..atlas.folder import AtlasFolder
    from ..subject import Subject

STATS_FILE = "stats.safetensors"
EXTREMES_FILE = "stats_extremes.safetensors"
WINDOWS_TABLE = "stats_windows"


def _ensure_windows_table(con: sqlite3.Connection) -> None:
    con.execute(f"CREATE TABLE IF NOT EXISTS {WINDOWS_TABLE} (window INTEGER PRIMARY KEY, token_ids TEXT NOT NULL, "
                "tokens TEXT NOT NULL, text TEXT NOT NULL)")


def exemplar_windows(layers: Sequence[LayerExtremes], window: int) -> set[int]:
    """Ids of the windows that any exemplar of any neuron points into."""
    need: set[int] = set()
    for st in layers:
        for keys in (st.ex_top, st.ex_bot):
            _, idx = split_keys(keys)
            w = torch.unique(idx[idx >= 0] // window)
            need.update(int(x) for x in w.tolist())
    return need


def write_windows(folder: Path, rows: dict[int, list[int]], token_strings: Callable[[list[int]], list[str]]) -> None:
    """Store windows (id -> token ids) in atlas.sqlite, replacing the table's previous content."""
    con = store.open_db(folder)
    try:
        with con:
            _ensure_windows_table(con)
            con.execute(f"DELETE FROM {WINDOWS_TABLE}")
            for w in sorted(rows):
                ids = rows[w]
                toks = token_strings(ids)
                con.execute(f"INSERT INTO {WINDOWS_TABLE} VALUES (?, ?, ?, ?)",
                            (w, json.dumps(ids), json.dumps(toks), "".join(toks)))
    finally:
        con.close()


def copy_windows(src_folders: Sequence[Path], dest: Path, need: set[int]) -> None:
    """Copy the needed windows from several stats folders' databases into `dest`'s."""
    rows = {}
    for src in src_folders:
        con = store.open_db(src)
        try:
            for w, ids, toks, text in con.execute(f"SELECT window, token_ids, tokens, text FROM {WINDOWS_TABLE}"):
                if w in need:
                    rows[w] = (ids, toks, text)
        finally:
            con.close()
    missing = need - set(rows)
    if missing:
        raise NeuronscopeError(f"{len(missing)} exemplar windows are missing from the shard databases; "
                               "re-run the incomplete shards.")
    con = store.open_db(dest)
    try:
        with con:
            _ensure_windows_table(con)
            con.execute(f"DELETE FROM {WINDOWS_TABLE}")
            con.executemany(f"INSERT INTO {WINDOWS_TABLE} VALUES (?, ?, ?, ?)",
                            [(w, *rows[w]) for w in sorted(rows)])
    finally:
        con.close()


def write_arrays(folder: Path, layers: Sequence[LayerExtremes], meta: dict[str, Any], *,
                 keep_extremes: bool = True, step: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write stats.safetensors (and stats_extremes.safetensors with keep_extremes; else a stale one is removed)
    from finished per-layer statistics; returns the manifest entries about the levels (`Levels.to_manifest`:
    ranks, unresolved levels, normalisation levels). step: called after each layer and each file."""
    n = layers[0].count
    extremes: dict[str, torch.Tensor] = {}
    levels = tuple(meta.get("levels") or LEVELS)
    L, N, E = len(layers), layers[0].n, layers[0].e
    quants, means, vars_ = [], [], []
    # the exemplar arrays are filled in place, layer by layer (no lists of copies to stack: the finishing steps
    # should not need more memory than the arrays they write)
    ex = {"pv": torch.empty(L, N, E), "pi": torch.empty(L, N, E, dtype=torch.int64),
          "nv": torch.empty(L, N, E), "ni": torch.empty(L, N, E, dtype=torch.int64)}
    for l, st in enumerate(layers):
        top, bot = st.sorted_top(), st.sorted_bottom()
        kt, kb = sort_keys_desc(st.ex_top), sort_keys_desc(st.ex_bot)
        if keep_extremes:
            extremes.update({f"top.{l}": top, f"bottom.{l}": bot, f"ex_top.{l}": kt, f"ex_bot.{l}": kb})
        q = quantiles_from_extremes(top, bot, n, levels, warn=False)
        quants.append(q)
        means.append(st.mean)
        vars_.append(st.var())
        pv, pi = split_keys(kt)
        nv, ni = split_keys(kb)
        ex["pv"][l], ex["pi"][l], ex["nv"][l], ex["ni"][l] = pv, pi, -nv, ni
        del pv, pi, nv, ni, kt, kb
        if step is not None:
            step()
    q = torch.stack(quants, dim=1)                        # [levels, L, N]
    info = Levels(levels, n, layers[0].k).to_manifest()
    if info["not_stored_levels"]:
        import warnings
        warnings.warn(f"Quantiles {', '.join(fmt_level(x) for x in info['not_stored_levels'])} are not resolvable "
                      f"from {n} tokens with K={layers[0].k} (rank > K); stored as NaN.", stacklevel=3)
    arrays = {
        "quantiles": q,
        "levels": torch.tensor(levels, dtype=torch.float64),
        "count": torch.full((L, N), n, dtype=torch.int64),
        "mean": torch.stack(means), "var": torch.stack(vars_),
        "ex_pos_value": ex["pv"], "ex_pos_index": ex["pi"], "ex_neg_value": ex["nv"], "ex_neg_index": ex["ni"],
    }
    if keep_extremes:
        store.save_tensors(folder / EXTREMES_FILE, extremes, {"k": str(layers[0].k), "count": str(n)})
    else:
        (folder / EXTREMES_FILE).unlink(missing_ok=True)    # a previous run's: it would not match these results
    if step is not None:
        step()
    store.save_tensors(folder / STATS_FILE, arrays, {"window": str(meta["window"])})
    return info


def load_layers(folder: Path) -> list[LayerExtremes]:
    """The per-layer statistics of a finished stats folder (for merging)."""
    sec = store.read_manifest(folder).get("stats") or {}
    if not sec.get("complete"):
        raise NeuronscopeError(f"'{folder}' holds no finished statistics run.")
    if not (Path(folder) / EXTREMES_FILE).is_file():
        raise NeuronscopeError(f"'{folder}' was computed without --keep-extremes, so it holds no extremes to merge; "
                               "re-run it with --keep-extremes (the default for --shard).")
    t = store.load_tensors(Path(folder) / EXTREMES_FILE)
    small = store.load_tensors(Path(folder) / STATS_FILE)
    out = []
    for l in range(sec["n_layers"]):
        top = t[f"top.{l}"]
        st = LayerExtremes(top.shape[0], top.shape[1], t[f"ex_top.{l}"].shape[1])
        st.top, st.bot = top.clone(), -t[f"bottom.{l}"]
        st.ex_top, st.ex_bot = t[f"ex_top.{l}"].clone(), t[f"ex_bot.{l}"].clone()
        st.count = int(small["count"][l, 0])
        st.mean = small["mean"][l].clone()
        st.m2 = small["var"][l] * st.count
        out.append(st)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the reader
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Exemplar:
    """A stored window where a neuron fires most (top, `pos`) or least (bottom, `neg`): the activation at the firing
    token, the window's id, the firing token's position in it, its token ids, token strings and text, and `acts`
    (the neuron at every token of the window) once `with_window_acts` has run the model."""
    activation: float
    window: int
    position: int
    token_ids: list[int]
    tokens: list[str]
    text: str
    acts: list[float] | None = None


class NeuronStats:
    """Corpus statistics of every neuron of one model, read from an atlas folder (no model needed)."""

    def __init__(self, folder: Path, manifest: dict[str, Any], arrays: dict[str, torch.Tensor]):
        self.folder = Path(folder)
        self.manifest = manifest
        self.info = manifest["stats"]
        self._a = arrays
        self.levels: list[float] = [float(x) for x in arrays["levels"].tolist()]
        self.window: int = int(self.info["window"])
        self.n_layers, self.n_neurons = int(arrays["mean"].shape[0]), int(arrays["mean"].shape[1])
        self._win_cache: dict[int, tuple[list[int], list[str], str]] = {}

    @classmethod
    def from_folder(cls, af: AtlasFolder) -> "NeuronStats":
        """The statistics of an opened atlas folder, its files checked for damage first (one sentence each)."""
        if af.section("stats").get("complete"):
            af.check_file(STATS_FILE, "run `neuronscope stats` again to rewrite it")
            if (af.path / EXTREMES_FILE).exists():
                af.check_file(EXTREMES_FILE, "run `neuronscope stats` again to rewrite it")
            af.check_db("run `neuronscope stats` again in a new folder")
        return cls.open(af.path)

    @classmethod
    def open(cls, atlas_dir: str | os.PathLike[str]) -> NeuronStats:
        folder = Path(atlas_dir)
        if not folder.is_dir():
            raise NeuronscopeError(f"The atlas folder '{folder}' does not exist.")
        manifest = store.read_manifest(folder)
        sec = manifest.get("stats")
        if not sec or not sec.get("complete") or not (folder / STATS_FILE).is_file():
            raise NeuronscopeError(f"The atlas '{folder}' has no corpus statistics yet; run "
                                   f"`neuronscope stats MODEL --corpus FILE --atlas {folder}` first.")
        return cls(folder, manifest, store.load_tensors(folder / STATS_FILE))

    # ---- numbers ------------------------------------------------------------------------------------------
    @property
    def count(self) -> torch.Tensor:
        return self._a["count"]

    @property
    def mean(self) -> torch.Tensor:
        return self._a["mean"]

    @property
    def var(self) -> torch.Tensor:
        return self._a["var"]

    @property
    def tokens(self) -> int:
        return int(self._a["count"][0, 0])

    def quantile(self, level: float) -> torch.Tensor:
        """Per-neuron quantile [L, N] at one of `.levels` (NaN where not resolvable)."""
        for i, lv in enumerate(self.levels):
            if math.isclose(lv, float(level), rel_tol=1e-9, abs_tol=1e-12):
                return self._a["quantiles"][i]
        raise NeuronscopeError(f"No quantile at level {level}; the stored levels are "
                               f"{', '.join(f'{x:g}' for x in self.levels)}.")

    @property
    def level_info(self) -> Levels:
        """The stored levels over this corpus: each one's rank r, effective rank r/n, and whether the corpus
        resolves it (n * p >= 1; else it is only the sample extreme) and it is stored (r <= K)."""
        k = self.info.get("k")
        return Levels(self.levels, self.tokens, int(k) if k is not None else None)

    def norm_levels(self) -> tuple[float, float]:
        """(high, low) levels that `normalise` divides by: 1 - 1e-5 and 1e-5, or the most extreme levels this
        corpus resolves that are not beyond them (see levels.py)."""
        return self.level_info.norm_levels()

    def norm_scale(self, layers: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The positive divisors (hi, lo) [L, N] float32 of the normalised activation (for `layers`, or all)."""
        lv_hi, lv_lo = self.norm_levels()
        hi, lo = levels_mod.divisors(self.quantile(lv_hi), self.quantile(lv_lo))
        if layers is not None:
            idx = torch.as_tensor(list(layers), dtype=torch.long)
            hi, lo = hi[idx], lo[idx]
        return hi, lo

    def normalise(self, acts: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
        """Signed normalised activations: positive values / q(1-1e-5), negative values / |q(1e-5)| (DESIGN.md),
        or by the most extreme levels the corpus resolves (`norm_levels`) when it is too small for 1e-5.

        acts: [..., L, T, N] (or [L, T, N]) for all layers, or for `layers` (their count as L). |result| > 1 means
        beyond the level; the sign is the polarity. A neuron whose positive (negative) tail never passes zero
        divides by a tiny number instead, so any activation of that sign reads as firing.
        """
        acts = torch.as_tensor(acts)
        hi, lo = self.norm_scale(layers)
        if acts.ndim < 3 or acts.shape[-3] != hi.shape[0] or acts.shape[-1] != hi.shape[1]:
            raise NeuronscopeError(f"Activations must have shape [..., {hi.shape[0]}, T, {hi.shape[1]}], "
                                   f"got {list(acts.shape)}.")
        return levels_mod.normalise(acts, hi.unsqueeze(1), lo.unsqueeze(1))

    # ---- exemplars ----------------------------------------------------------------------------------------
    def _window(self, w: int) -> tuple[list[int], list[str], str]:
        hit = self._win_cache.get(w)
        if hit is None:
            con = store.open_db(self.folder)
            try:
                row = con.execute(f"SELECT token_ids, tokens, text FROM {WINDOWS_TABLE} WHERE window = ?",
                                  (w,)).fetchone()
            finally:
                con.close()
            if row is None:
                raise NeuronscopeError(f"Window {w} is missing from {self.folder / store.DB}.")
            hit = self._win_cache[w] = (json.loads(row[0]), json.loads(row[1]), row[2])
        return hit

    def exemplars(self, layer: int, i: int, polarity: str = "pos", n: int = 20) -> list[Exemplar]:
        """The top (`pos`) or bottom (`neg`) exemplars of neuron (layer, i), strongest first, read from the folder,
        with `acts` None (a reader never runs the model: `with_window_acts(subject, exemplars, layer, i)` fills it
        in)."""
        from ..refs import check_neuron, check_polarity
        check_polarity(polarity)
        check_neuron(layer, i, self.n_layers, self.n_neurons, where="the statistics")
        if n < 1:
            return []
        vals = self._a[f"ex_{polarity}_value"][layer, i]
        idx = self._a[f"ex_{polarity}_index"][layer, i]
        out: list[Exemplar] = []
        for v, gi in zip(vals.tolist(), idx.tolist()):
            if gi < 0 or len(out) >= n:
                break
            w, pos = divmod(int(gi), self.window)
            ids, toks, text = self._window(w)
            out.append(Exemplar(float(v), w, pos, list(ids), list(toks), text))
        return out

    def extremes(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(top [N, K] descending, bottom [N, K] ascending) for one layer (read from disk on demand)."""
        from safetensors import safe_open
        if not (self.folder / EXTREMES_FILE).is_file():
            raise NeuronscopeError(f"The atlas '{self.folder}' keeps quantiles and exemplars but not the full "
                                   "extremes; run `neuronscope stats` with --keep-extremes to keep them.")
        with safe_open(str(self.folder / EXTREMES_FILE), framework="pt") as f:
            return f.get_tensor(f"top.{layer}"), f.get_tensor(f"bottom.{layer}")


def with_window_acts(subject: Subject, exemplars: list[Exemplar], layer: int, neuron: int) -> list[Exemplar]:
    """`exemplars` (from `NeuronStats.exemplars`) with `acts` filled in: this neuron's activation at every token of
    each window, recomputed with `subject` (one batched forward per window length)."""
    if exemplars:
        acts = window_activations(subject, [e.token_ids for e in exemplars], layer, neuron)
        for e, a in zip(exemplars, acts):
            e.acts = a
    return exemplars


def window_activations(subject: Subject, windows: Sequence[Sequence[int]], layer: int,
                       neuron: int) -> list[list[float]]:
    """Neuron (layer, neuron)'s activation at every token of each window (windows of one length, batched)."""
    from ..interventions import capture
    out: list[list[float]] = []
    by_len: dict[int, list[int]] = {}
    for j, w in enumerate(windows):
        by_len.setdefault(len(w), []).append(j)
    res: dict[int, list[float]] = {}
    for _, js in by_len.items():
        for s in range(0, len(js), 32):
            part = js[s:s + 32]
            ids = torch.tensor([list(windows[j]) for j in part], dtype=torch.long)
            _, cap = capture(subject, ids, layers=[layer], neurons=[neuron])
            a = cap.get("neurons", layer)[..., 0].float().cpu()
            for j, row in zip(part, a):
                res[j] = row.tolist()
    out = [res[j] for j in range(len(windows))]
    return out
