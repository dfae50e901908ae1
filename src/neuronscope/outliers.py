"""The model's own outlier hidden dimensions, measured on its weights and on real text, each with its value and its
multiple of the median:

- massive residual activations (Sun et al. 2024): entries of the residual stream (block outputs) whose magnitude is
  at least `factor` x (default 10x) the median magnitude of that layer, by dimension: the layers where it happens,
  the peak multiple and the tokens that carry it;
- super-weight candidates (Yu et al. 2024): for each massive dimension h, the largest |down_proj[h, j]| entries of
  the early layers (those that write dimension h), as multiples of that matrix's median |weight|;
- norm gains: |g_h| of the final norm and the largest per-block norm gain of each dimension;
- LM-head column norms ||W_U[:, h]||.

    rep = model_outliers(subject, texts, factor=10.0)
    rep.massive.dims                # [MassiveDim(dim=1415, layers=[2, 3, ...], max_multiple=1200.0, tokens=[...])]
    rep.rankings["massive_activations"].rank[h]   # rank of dim h (1 = largest)

Llama-2-7B for comparison: massive dims 1415 and 2533 (Sun et al.), super weight layers[1].mlp.down_proj[2533, 7890]
(Yu et al.).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .errors import NeuronscopeError

if TYPE_CHECKING:
    from .subject import Subject

DEFAULT_TEXTS = ["The capital of France is Paris, and the capital of Japan is Tokyo.",
                 "Once upon a time, there was a little girl who loved to play in the park.",
                 "Summer is hot. Winter is cold. In spring, the flowers bloom again.",
                 "def add(a, b):\n    return a + b\n"]


@dataclass
class Ranking:
    """Top-k dims of a per-dimension score, with the median, the multiples of the median, every dim's rank (1 =
    largest) and every dim's score (`rank` and `all` are left out of the saved JSON)."""
    indices: list[int]
    values: list[float]
    median: float
    multiples: list[float]
    rank: list[int]
    all: list[float]


@dataclass
class MassiveDim:
    """A residual dim at least `factor` x its layer's median |activation| somewhere in the texts."""
    dim: int
    layers: list[int]
    max_value: float
    max_multiple: float
    occurrences: int
    tokens: list[str]              # the tokens it peaks on, most often first
    positions: list[int]


@dataclass
class Massive:
    dims: list[MassiveDim]
    definition: str


@dataclass
class SuperWeight:
    """A down_proj entry of an early layer that writes a massive dim (a super-weight candidate)."""
    layer: int
    dim: int
    neuron: int
    weight: float
    multiple_of_median: float
    name: str                      # layers[l].mlp.down_proj[dim, neuron]


@dataclass
class OutlierReport:
    """`model_outliers`' result: massive activations, super-weight candidates and the four rankings."""
    model: str
    factor: float
    k: int
    texts: int
    hidden_size: int
    n_layers: int
    layer_median_abs: list[float]
    massive: Massive
    super_weight_candidates: list[SuperWeight]
    early_layers: int
    rankings: dict[str, Ranking]

    def to_json(self) -> dict[str, Any]:
        """A JSON object (outliers.json, analysis.json's "outliers"): each ranking without `rank` and `all`, which
        hold one number a dim."""
        d = asdict(self)
        for r in d["rankings"].values():
            r.pop("rank")
            r.pop("all")
        return d


def ranking(v: torch.Tensor, k: int) -> Ranking:
    """Top-k of a per-dimension score, with the median, the multiples of the median and every dim's rank."""
    v = v.double().cpu()
    top = torch.topk(v, min(k, v.numel()))
    med = float(v.median())
    med = med if med > 0 else 1e-12
    order = torch.argsort(v, descending=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, v.numel() + 1)
    return Ranking(top.indices.tolist(), top.values.tolist(), med, [x / med for x in top.values.tolist()],
                   ranks.tolist(), v.tolist())


def _block_norm_gains(subject: Subject) -> torch.Tensor:
    """Per dimension, the largest |gain| over the blocks' own norms (weights of shape [hidden] in each layer)."""
    H = subject.hidden_size
    best = torch.zeros(H, dtype=torch.float64)
    for layer in subject.spec.decoder_layers(subject.model):
        for name, mod in layer.named_modules():
            w = getattr(mod, "weight", None)
            if "norm" in name.lower() and isinstance(w, torch.Tensor) and w.ndim == 1 and w.numel() == H:
                best = torch.maximum(best, (w.detach().double().cpu() + subject.spec.norm_gain_offset).abs())
    return best


@torch.no_grad()
def model_outliers(subject: Subject, texts: Sequence[str] | None = None, *, factor: float = 10.0, k: int = 10,
                   early_layers: int | None = None, chat: bool = False, progress: bool = True) -> OutlierReport:
    """Outlier dimensions of `subject` measured on `texts` (a few varied sentences by default); see module doc."""
    from tqdm.auto import tqdm
    from .interventions import BoundCapture, Capture, intervene
    if not factor > 1:
        raise NeuronscopeError(f"The massive-activation factor must be > 1 (a multiple of the median), got {factor}.")
    if k < 1:
        raise NeuronscopeError("k must be at least 1.")
    texts = [t for t in (texts or DEFAULT_TEXTS) if t.strip()]
    if not texts:
        raise NeuronscopeError("Give at least one text to measure activations on.")
    L, H = subject.n_layers, subject.hidden_size
    peak = torch.zeros(L, H, dtype=torch.float64)         # max |x| per layer and dim
    medians = torch.zeros(L, dtype=torch.float64)         # mean over texts of each layer's median |x|
    hits: list[dict[str, Any]] = []                       # (layer, dim, value, token) entries over factor x median
    for text in tqdm(texts, desc="outliers: activations", disable=not progress, dynamic_ncols=True):
        ids = subject.encode(text, chat=chat)
        with intervene(subject, Capture(sites=("resid.post",))) as (cap,):
            subject.model(input_ids=ids)
        assert isinstance(cap, BoundCapture)
        r = cap.get("resid.post").abs().double().cpu()[:, 0]       # [L, T, H]
        med = r.flatten(1).median(1).values                        # [L]
        medians += med / len(texts)
        peak = torch.maximum(peak, r.amax(1))
        toks = subject.token_strings(ids[0])
        over = (r >= factor * med.clamp(min=1e-12)[:, None, None]).nonzero().tolist()
        for l, t, h in over:
            hits.append({"layer": l, "dim": h, "value": float(r[l, t, h]), "multiple": float(r[l, t, h] / med[l]),
                         "token": toks[t], "position": t})
    by_dim: dict[int, list[dict[str, Any]]] = {}
    for e in hits:
        by_dim.setdefault(e["dim"], []).append(e)
    dims = []
    for h, es in by_dim.items():
        tok = Counter(e["token"] for e in es)
        dims.append(MassiveDim(h, sorted({e["layer"] for e in es}), max(e["value"] for e in es),
                               max(e["multiple"] for e in es), len(es), [t for t, _ in tok.most_common(5)],
                               sorted({e["position"] for e in es})[:10]))
    dims.sort(key=lambda d: -d.max_multiple)
    mult = peak / medians.clamp(min=1e-12)[:, None]                 # [L, H] peak as a multiple of the layer median
    massive_score = mult.amax(0)

    n_early = early_layers if early_layers is not None else max(2, L // 4)
    supers = []
    for d in dims[:k]:
        h = d.dim
        for l in range(min(n_early, L)):
            W = subject.spec.write_vectors(subject.model, l).detach().double().cpu()   # [neurons, H]: W[j, h]
            col = W[:, h].abs()
            w_med = float(W.abs().median()) or 1e-12
            j = int(col.argmax())
            supers.append(SuperWeight(l, h, j, float(W[j, h]), float(col[j] / w_med),
                                      f"layers[{l}].mlp.down_proj[{h}, {j}]"))
    supers.sort(key=lambda s: -s.multiple_of_median)

    rankings = {"massive_activations": ranking(massive_score, k),
                "final_norm_gain": ranking(subject.spec.final_norm_gain(subject.model).detach().abs(), k),
                "block_norm_gain": ranking(_block_norm_gains(subject), k),
                "lm_head_column_norm": ranking(subject.spec.unembedding(subject.model).detach().double().norm(dim=0),
                                               k)}
    return OutlierReport(subject.name, factor, k, len(texts), H, L, medians.tolist(),
                         Massive(dims, f">= {factor:g} x the median |residual| of the same layer"), supers[:k],
                         n_early, rankings)


def massive_dims(rep: OutlierReport) -> list[int]:
    """The massive dims, the most massive first."""
    return [d.dim for d in rep.massive.dims]


def render_outliers(rep: OutlierReport, top: int = 10) -> str:
    """A Markdown summary of `model_outliers`' result."""
    L = [f"# Outlier dimensions of {rep.model}", "",
         f"Measured on {rep.texts} texts; massive = {rep.massive.definition}.", "",
         "## Massive residual activations", ""]
    if rep.massive.dims:
        L += ["| dim | layers | peak | x median | tokens |", "|---|---|---|---|---|"]
        for d in rep.massive.dims[:top]:
            L.append(f"| {d.dim} | {_span(d.layers)} | {d.max_value:.1f} | {d.max_multiple:.0f}x | "
                     + ", ".join(repr(t) for t in d.tokens) + " |")
    else:
        L.append(f"None at {rep.factor:g}x the median.")
    L += ["", "## Super-weight candidates (down_proj entries writing the massive dims, layers "
          f"0-{rep.early_layers - 1})", ""]
    if rep.super_weight_candidates:
        L += ["| weight | value | x median abs weight |", "|---|---|---|"]
        for s in rep.super_weight_candidates[:top]:
            L.append(f"| {s.name} | {s.weight:+.3f} | {s.multiple_of_median:.0f}x |")
    else:
        L.append("None (no massive dims).")
    L += ["", "## Rankings (top dims, value and multiple of the median)", "", "| kind | top dims |", "|---|---|"]
    for name, r in rep.rankings.items():
        L.append(f"| {name.replace('_', ' ')} | " + ", ".join(
            f"{i} ({v:.3g}, {m:.1f}x)" for i, v, m in zip(r.indices[:top], r.values, r.multiples)) + " |")
    return "\n".join(L) + "\n"


def _span(layers: Sequence[int]) -> str:
    if len(layers) > 2 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


__all__ = ["model_outliers", "ranking", "massive_dims", "render_outliers", "DEFAULT_TEXTS", "OutlierReport", "Ranking",
           "MassiveDim", "Massive", "SuperWeight"]
