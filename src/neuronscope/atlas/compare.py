"""Comparing two atlases of models with the same shape and vocabulary (base vs instruct, Davies 2025): share of
neurons whose top-1 decoded token agrees, per layer and overall, mean top-k overlap, the neurons that changed most,
a PNG plot and a JSON summary."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import store
from ..errors import NeuronscopeError
from .folder import COMPARE_FILE, COMPARE_PLOT

if TYPE_CHECKING:
    from .atlas import Atlas

_MARK = "neuronscope-compare"


@dataclass
class LayerAgreement:
    layer: int
    top1_agreement: float          # share of the layer's neurons whose top-1 decoded token agrees
    topk_overlap: float            # mean share of the top k shared


@dataclass
class ChangedNeuron:
    layer: int
    neuron: int
    topk_overlap: float
    top1_agree: bool
    tokens_a: list[str]
    tokens_b: list[str]


@dataclass
class AtlasSide:
    folder: str
    model: str
    fingerprint: str | None


@dataclass
class AtlasComparison:
    """What `compare_atlases` found (compare.json holds `to_json()`)."""
    site: str
    a: AtlasSide
    b: AtlasSide
    top_k: int
    n_layers: int
    n_neurons: int
    top1_agreement: float
    topk_overlap: float
    per_layer: list[LayerAgreement]
    changed_most: list[ChangedNeuron] = field(default_factory=list)
    plot: str | None = None        # agreement.png, when written

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if self.plot is None:
            d.pop("plot")
        return d


def compare_atlases(a: Atlas | str | os.PathLike[str], b: Atlas | str | os.PathLike[str], *, site: str = "up",
                    out_dir: str | os.PathLike[str] | None = None, n_changed: int = 20) -> AtlasComparison:
    """Compare atlas `a` with atlas `b` (Atlas objects or folders) at `site`: top-1 agreement and top-k overlap
    overall and per layer, the neurons that changed most; with `out_dir`, also writes compare.json and
    agreement.png there."""
    from .atlas import Atlas
    a = a if isinstance(a, Atlas) else Atlas.open(a)
    b = b if isinstance(b, Atlas) else Atlas.open(b)
    _check_match(a, b, site)
    ia, ib = a.top_ids(site), b.top_ids(site)                     # [L, N, k]
    k = ia.shape[-1]
    top1 = ia[..., 0] == ib[..., 0]                                # [L, N]
    overlap = (ia[..., :, None] == ib[..., None, :]).any(-1).float().mean(-1)   # [L, N]
    per_layer = [LayerAgreement(l, float(top1[l].float().mean()), float(overlap[l].mean()))
                 for l in range(a.n_layers)]
    # most changed: lowest top-k overlap, then top-1 disagreement, then the strongest top-1 in A
    key = overlap + 0.5 * top1.float() / k - 1e-3 * a.top_probs(site)[..., 0]
    order = key.reshape(-1).argsort()[:n_changed].tolist()
    changed: list[ChangedNeuron] = []
    for j in order:
        l, n = divmod(j, a.n_neurons)
        if overlap[l, n] == 1.0 and top1[l, n]:
            break                                                  # the rest did not change at all
        changed.append(ChangedNeuron(l, n, float(overlap[l, n]), bool(top1[l, n]), a.top_tokens(l, n, site, 5),
                                     b.top_tokens(l, n, site, 5)))
    summary = AtlasComparison(site, AtlasSide(str(a.folder), a.model_name, a.fingerprint),
                              AtlasSide(str(b.folder), b.model_name, b.fingerprint), k, a.n_layers, a.n_neurons,
                              float(top1.float().mean()), float(overlap.mean()), per_layer, changed)
    if out_dir is not None:
        out = Path(out_dir)
        _check_out(out)
        out.mkdir(parents=True, exist_ok=True)
        summary.plot = str(out / COMPARE_PLOT)
        plot_agreement(summary, out / COMPARE_PLOT)
        store.write_json(out / COMPARE_FILE, {**summary.to_json(), "format": _MARK})
    return summary


def _ours(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and (data.get("format") == _MARK or
                                       {"site", "a", "b", "per_layer", "top1_agreement"} <= set(data))


def _check_out(out: Path) -> None:
    """Refuse to replace a compare.json or agreement.png that an earlier comparison did not write."""
    js, png = out / COMPARE_FILE, out / COMPARE_PLOT
    if (js.exists() and not _ours(js)) or (png.exists() and not (js.exists() and _ours(js))):
        raise NeuronscopeError(f"'{out}' already holds a {COMPARE_FILE} or {COMPARE_PLOT} that is not an earlier "
                               "comparison's; choose another --out folder (nothing was changed).")


def _check_match(a: Atlas, b: Atlas, site: str) -> None:
    for what, x, y in (("layer count", a.n_layers, b.n_layers), ("neurons per layer", a.n_neurons, b.n_neurons),
                       ("vocabulary size", len(a.vocab), len(b.vocab)), ("top_k", a.top_k, b.top_k)):
        if x != y:
            raise NeuronscopeError(f"The atlases do not match: {what} is {x} in '{a.folder}' but {y} in "
                                   f"'{b.folder}'.")
    if a.vocab != b.vocab:
        diff = next(i for i, (x, y) in enumerate(zip(a.vocab, b.vocab)) if x != y)
        raise NeuronscopeError(f"The atlases do not match: their vocabularies differ (token {diff} is "
                               f"{a.vocab[diff]!r} vs {b.vocab[diff]!r}).")
    for at in (a, b):
        if site not in at.sites:
            raise NeuronscopeError(f"The atlas '{at.folder}' has no site '{site}'; it has {', '.join(at.sites)}.")
    if a.apply_norm != b.apply_norm:
        raise NeuronscopeError("The atlases do not match: one was built with the final norm's gain and the other "
                               "without (--no-norm); build both the same way.")


def plot_agreement(summary: AtlasComparison, path: str | os.PathLike[str]) -> None:
    """Bar plot of top-1 agreement by layer, with the mean top-k overlap as a line; saved atomically as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = [r.layer for r in summary.per_layer]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(layers) + 2), 3.5))
    ax.bar(layers, [100 * r.top1_agreement for r in summary.per_layer], color="#4878a8",
           label="top-1 token agrees")
    ax.plot(layers, [100 * r.topk_overlap for r in summary.per_layer], color="#d0703a", marker="o",
            label=f"mean top-{summary.top_k} overlap")
    ax.set_ylim(0, 105)
    ax.set_xlabel("layer")
    ax.set_ylabel("% of neurons")
    ax.set_title(f"{summary.a.model} vs {summary.b.model} ({summary.site}): "
                 f"{100 * summary.top1_agreement:.1f}% top-1 agree", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    with store.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
