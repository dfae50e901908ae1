"""What IRMs learned: heat-maps of their output (injected layer x hidden index), a striation score, top hidden
indices and how often they recur across runs and alignments, a correlation matrix between runs, and the model's
own outlier dimensions (massive residual activations, large final-norm gains, large LM-head columns) to explain a
dominant index. Writes PNGs, analysis.json and report.md into one folder.

    result = analyze_runs(["runs/anger", "runs/sad"], "report/", subject=subject)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import NeuronscopeError
from ..interventions import Capture, intervene
from .generation import generate_texts
from .model import IRM
from .training import load_run

DEFAULT_PROMPTS = ["Tell me about your day.", "What is the capital of France?", "How do I bake bread?",
                   "Why is the sky blue?", "Write a short story about a dog.", "What should I do this weekend?"]


@dataclass
class RunOutputs:
    """Mean IRM output of one run over prompt and generated tokens."""
    name: str
    alignment: str
    layers: list[int]
    mean: torch.Tensor          # [n_inject, H] signed mean
    mean_abs: torch.Tensor      # [n_inject, H]
    tokens: int
    samples: list[tuple[str, str]] = field(default_factory=list)


# ---- statistics ---------------------------------------------------------------------------------------------------
def striation(M: torch.Tensor) -> dict[str, float]:
    """Two-way variance split of M [layers, H]: fractions explained by hidden index (columns) and by layer (rows).

    index_share near 1 = vertical striations (the same hidden index is large in every layer).
    """
    M = M.double()
    L, H = M.shape
    grand = M.mean()
    total = float(((M - grand) ** 2).sum())
    if total == 0:
        return {"index_share": float("nan"), "layer_share": float("nan"), "residual_share": float("nan")}
    ss_idx = float(L * ((M.mean(0) - grand) ** 2).sum())
    ss_layer = float(H * ((M.mean(1) - grand) ** 2).sum())
    return {"index_share": ss_idx / total, "layer_share": ss_layer / total,
            "residual_share": max(0.0, 1 - (ss_idx + ss_layer) / total)}


def index_scores(M: torch.Tensor) -> torch.Tensor:
    """Strength of each hidden index: root-mean-square over injected layers of the mean output [H]."""
    return M.double().pow(2).mean(0).sqrt()


def top_indices(M: torch.Tensor, k: int) -> list[int]:
    return torch.topk(index_scores(M), min(k, M.shape[1])).indices.tolist()


def run_correlations(outs: Sequence[RunOutputs]) -> tuple[torch.Tensor, str]:
    """Pearson correlation between runs: of the whole mean output when all runs inject the same layers,
    otherwise of the per-index profile (mean over layers)."""
    same = len({tuple(o.layers) for o in outs}) == 1
    vecs = torch.stack([(o.mean.flatten() if same else o.mean.mean(0)).double() for o in outs])
    c = torch.corrcoef(vecs) if len(outs) > 1 else torch.ones(1, 1, dtype=torch.float64)
    return c.nan_to_num(0.0), ("whole output (layer x index)" if same else "per-index profile (mean over layers)")


@torch.no_grad()
def outlier_dims(subject, prompts: Sequence[str], k: int = 10, chat: bool = False) -> dict[str, Any]:
    """The model's own outlier hidden dimensions, each as (top-k indices, values, ratio to the median):
    massive residual activations (max |resid.post| over layers and tokens, Sun et al. 2024), final-norm gains
    |g|, and LM-head column norms ||W_U[:, h]||."""
    peak = torch.zeros(subject.hidden_size, dtype=torch.float64)
    peak_layer = torch.zeros(subject.hidden_size, dtype=torch.long)
    for p in prompts:
        ids = subject.encode(p, chat=chat)
        cap = Capture(sites=("resid.post",))
        with intervene(subject, cap):
            subject.model(input_ids=ids)
        r = cap.get("resid.post").abs().double().cpu()          # [L, 1, T, H]
        per_layer = r.amax(dim=(1, 2))                          # [L, H]
        m, arg = per_layer.max(0)
        better = m > peak
        peak = torch.where(better, m, peak)
        peak_layer = torch.where(better, arg, peak_layer)
    gain = subject.spec.final_norm_gain(subject.model).detach().double().abs().cpu()
    lm_cols = subject.spec.unembedding(subject.model).detach().double().norm(dim=0).cpu()

    def rank(v: torch.Tensor, extra: dict[str, list] | None = None) -> dict[str, Any]:
        top = torch.topk(v, min(k, v.numel()))
        med = float(v.median()) or 1e-12
        order = torch.argsort(v, descending=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(1, v.numel() + 1)
        d = {"indices": top.indices.tolist(), "values": top.values.tolist(), "median": med,
             "ratio": [x / med for x in top.values.tolist()], "rank": ranks.tolist(), "all": v.tolist()}
        d.update(extra or {})
        return d
    return {"massive_activations": rank(peak, {"layer": [int(peak_layer[i]) for i in torch.topk(peak, min(k, peak.numel())).indices]}),
            "final_norm_gain": rank(gain), "lm_head_column_norm": rank(lm_cols), "k": k}


def coincidences(top: Sequence[int], outliers: dict[str, Any]) -> list[dict[str, Any]]:
    """For each top IRM index: its rank in each outlier ranking and whether it is in that ranking's top k."""
    k = outliers["k"]
    rows = []
    for h in top:
        row: dict[str, Any] = {"index": int(h)}
        hits = []
        for name in ("massive_activations", "final_norm_gain", "lm_head_column_norm"):
            r = int(outliers[name]["rank"][h])
            row[name + "_rank"] = r
            if r <= k:
                hits.append(name.replace("_", " "))
        row["coincides_with"] = hits
        rows.append(row)
    return rows


# ---- collection ---------------------------------------------------------------------------------------------------
def collect_outputs(subject, irm: IRM, prompts: Sequence[str], *, name: str, alignment: str,
                    max_new_tokens: int = 32, chat: bool = False) -> RunOutputs:
    """Run the IRM over each prompt and its generated tokens (one prompt at a time: no padding in the average)."""
    n, H = irm.n_inject, irm.config.hidden_size
    acc = {"sum": torch.zeros(n, H, dtype=torch.float64), "abs": torch.zeros(n, H, dtype=torch.float64), "t": 0}

    def record(out: torch.Tensor, ctx) -> None:
        o = out.detach().double().cpu()
        acc["sum"] += o.sum(dim=(0, 1))
        acc["abs"] += o.abs().sum(dim=(0, 1))
        acc["t"] += o.shape[0] * o.shape[1]
    samples = []
    for p in prompts:
        text = generate_texts(subject, [p], irm=irm, chat=chat, max_new_tokens=max_new_tokens, on_output=record)[0]
        samples.append((p, text))
    t = max(1, acc["t"])
    return RunOutputs(name, alignment, list(irm.config.inject_layers), (acc["sum"] / t).float(),
                      (acc["abs"] / t).float(), acc["t"], samples)


# ---- plots ---------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_heatmap(o: RunOutputs, path: Path, top: Sequence[int]) -> None:
    plt = _plt()
    M = o.mean.numpy()
    lim = float(abs(M).max()) or 1.0
    fig, ax = plt.subplots(figsize=(12, max(2.5, 0.18 * len(o.layers) + 1.5)))
    im = ax.imshow(M, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_yticks(range(len(o.layers)))
    ax.set_yticklabels([str(l) for l in o.layers], fontsize=6 if len(o.layers) > 12 else 8)
    ax.set_xlabel("hidden index")
    ax.set_ylabel("injected layer")
    ax.set_title(f"{o.name} ({o.alignment}): mean IRM output over {o.tokens} tokens; top: "
                 + ", ".join(map(str, top[:5])))
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_profiles(outs: Sequence[RunOutputs], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(len(outs), 1, figsize=(12, 2.2 * len(outs)), squeeze=False)
    for ax, o in zip(axes[:, 0], outs):
        s = index_scores(o.mean).numpy()
        ax.bar(range(len(s)), s, width=1.0, color="tab:purple")
        for h in top_indices(o.mean, 3):
            ax.annotate(str(h), (h, s[h]), fontsize=8, ha="center", va="bottom")
        ax.set_ylabel("RMS over layers")
        ax.set_title(f"{o.name} ({o.alignment})", fontsize=9)
    axes[-1, 0].set_xlabel("hidden index")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_correlation(c: torch.Tensor, names: Sequence[str], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(2 + 0.8 * len(names), 1.5 + 0.8 * len(names)))
    im = ax.imshow(c.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{float(c[i, j]):.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.05)
    ax.set_title("correlation between runs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_outliers(outliers: dict[str, Any], tops: Sequence[int], path: Path) -> None:
    plt = _plt()
    names = ("massive_activations", "final_norm_gain", "lm_head_column_norm")
    fig, axes = plt.subplots(3, 1, figsize=(12, 7))
    for ax, name in zip(axes, names):
        v = outliers[name]["all"]
        ax.bar(range(len(v)), v, width=1.0, color="tab:gray")
        for h in tops:
            ax.axvline(h, color="tab:red", alpha=0.35, lw=0.8)
        for h in outliers[name]["indices"][:3]:
            ax.annotate(str(h), (h, v[h]), fontsize=8, ha="center", va="bottom")
        ax.set_title(name.replace("_", " ") + " (red lines: top IRM indices)", fontsize=9)
    axes[-1].set_xlabel("hidden index")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the whole analysis ---------------------------------------------------------------------------------------------
def _default_prompts(runs: Sequence[dict[str, Any]], per_run: int = 4) -> list[str]:
    from .data import read_table
    prompts: list[str] = []
    for run in runs:
        path = run.get("data", {}).get("path")
        if not path or not Path(path).is_file():
            continue
        try:
            rows = read_table(path)
        except NeuronscopeError:
            continue
        for r in rows[-per_run:]:
            p = r.get("prompt") or " ".join(str(r.get("text", "")).split()[:8])
            if p and p not in prompts:
                prompts.append(p)
    return prompts or list(DEFAULT_PROMPTS)


def analyze_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, *, subject=None,
                 prompts: Sequence[str] | None = None, max_new_tokens: int = 32, top_k: int = 10,
                 chat: bool | None = None) -> dict[str, Any]:
    """The full analysis of one or more IRM runs on the same model; returns analysis.json's content."""
    from ..store import write_json, write_text
    if not run_dirs:
        raise NeuronscopeError("Give at least one IRM run folder to analyse.")
    if top_k < 1:
        raise NeuronscopeError("top_k must be at least 1.")
    loaded = [load_run(d) for d in run_dirs]
    fps = {run.get("fingerprint") for _, run in loaded}
    if len(fps) > 1:
        raise NeuronscopeError("These runs were trained on different models; analyse runs of one model together.")
    if subject is None:
        from ..subject import Subject
        subject = Subject.load(loaded[0][1]["model"])
    for irm, _ in loaded:
        irm.check_subject(subject, strict=True)
    if chat is None:
        chat = bool(loaded[0][1]["train"].get("chat")) and subject.has_chat_template
    prompts = list(prompts) if prompts else _default_prompts([r for _, r in loaded])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    names = _unique_names([Path(d).name for d in run_dirs])
    outs = []
    for (irm, run), name in zip(loaded, names):
        irm.to(subject.device).eval()
        outs.append(collect_outputs(subject, irm, prompts, name=name, alignment=run["data"].get("alignment", "?"),
                                    max_new_tokens=max_new_tokens, chat=chat))
    outliers = outlier_dims(subject, prompts, k=top_k, chat=chat)
    corr, corr_kind = run_correlations(outs)

    per_run = []
    all_tops: set[int] = set()
    for o in outs:
        top = top_indices(o.mean, top_k)
        all_tops.update(top)
        png = f"heatmap_{o.name}.png"
        plot_heatmap(o, out_dir / png, top)
        per_run.append({"name": o.name, "alignment": o.alignment, "layers": o.layers, "tokens": o.tokens,
                        "striation": striation(o.mean), "top_indices": top,
                        "top_scores": [float(index_scores(o.mean)[h]) for h in top],
                        "mean_abs_output": float(o.mean_abs.mean()), "heatmap": png,
                        "coincidences": coincidences(top, outliers),
                        "samples": [{"prompt": p, "on": t} for p, t in o.samples[:3]]})
    recurrence = []
    for h in sorted(all_tops):
        runs_with = [r["name"] for r in per_run if h in r["top_indices"]]
        aligns = sorted({r["alignment"] for r in per_run if h in r["top_indices"]})
        recurrence.append({"index": h, "runs": len(runs_with), "run_names": runs_with, "alignments": aligns})
    recurrence.sort(key=lambda r: (-r["runs"], r["index"]))
    plot_profiles(outs, out_dir / "top_indices.png")
    plot_correlation(corr, names, out_dir / "correlation.png")
    plot_outliers(outliers, sorted(all_tops), out_dir / "outliers.png")

    result = {"model": subject.name, "fingerprint": subject.fingerprint, "prompts": prompts,
              "max_new_tokens": max_new_tokens, "top_k": top_k, "runs": per_run, "recurrence": recurrence,
              "correlation": {"kind": corr_kind, "names": names, "matrix": corr.tolist()},
              "outliers": {k: ({kk: vv for kk, vv in v.items() if kk not in ("all", "rank")} if isinstance(v, dict)
                               else v) for k, v in outliers.items()},
              "figures": [r["heatmap"] for r in per_run] + ["top_indices.png", "correlation.png", "outliers.png"]}
    write_json(out_dir / "analysis.json", result)
    write_text(out_dir / "report.md", render_report(result))
    return result


def _unique_names(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


def render_report(r: dict[str, Any]) -> str:
    L = [f"# IRM analysis: {r['model']}", "",
         f"Model weights fingerprint `{r['fingerprint']}`; {len(r['prompts'])} prompts, {r['max_new_tokens']} "
         "generated tokens each; IRM outputs averaged over every prompt and generated token.", "",
         "## Runs", "", "| run | alignment | injected layers | tokens | index share | layer share | top indices |",
         "|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
        s = x["striation"]
        L.append(f"| {x['name']} | {x['alignment']} | {_layers_text(x['layers'])} | {x['tokens']} | "
                 f"{s['index_share']:.3f} | {s['layer_share']:.3f} | {', '.join(map(str, x['top_indices']))} |")
    L += ["", "Striation score = index share: the fraction of the variance of the mean output (layer x index) "
          "explained by the hidden index alone (vertical stripes); layer share is the fraction explained by the "
          "layer alone.", "", "## Heat-maps", ""]
    for x in r["runs"]:
        L += [f"![{x['name']}]({x['heatmap']})", ""]
    L += ["![top indices](top_indices.png)", "", "## Recurring indices", "",
          f"Indices in the top {r['top_k']} of at least one run, by how many runs share them.", "",
          "| index | runs | alignments |", "|---|---|---|"]
    for x in r["recurrence"][:30]:
        L.append(f"| {x['index']} | {x['runs']}/{len(r['runs'])} | {', '.join(x['alignments'])} |")
    c = r["correlation"]
    L += ["", f"## Correlation between runs ({c['kind']})", "", "![correlation](correlation.png)", "",
          "| | " + " | ".join(c["names"]) + " |", "|---" * (len(c["names"]) + 1) + "|"]
    for n, row in zip(c["names"], c["matrix"]):
        L.append(f"| {n} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    o = r["outliers"]
    L += ["", "## The model's own outlier dimensions", "", "![outliers](outliers.png)", "",
          "| kind | top indices (value / median) |", "|---|---|"]
    for name in ("massive_activations", "final_norm_gain", "lm_head_column_norm"):
        d = o[name]
        L.append(f"| {name.replace('_', ' ')} | " + ", ".join(
            f"{i} ({q:.1f}x)" for i, q in zip(d["indices"], d["ratio"])) + " |")
    L += ["", "## Do the top IRM indices coincide with outlier dimensions?", "",
          f"Ranks among {len(o['final_norm_gain']['all']) if 'all' in o['final_norm_gain'] else 'all'} "
          f"hidden dims; 'yes' = in that ranking's top {o['k']}.", ""]
    for x in r["runs"]:
        L += [f"### {x['name']}", "", "| IRM index | massive act. rank | final-norm gain rank | LM-head column rank "
              "| coincides with |", "|---|---|---|---|---|"]
        for row in x["coincidences"]:
            L.append(f"| {row['index']} | {row['massive_activations_rank']} | {row['final_norm_gain_rank']} | "
                     f"{row['lm_head_column_norm_rank']} | {', '.join(row['coincides_with']) or 'none'} |")
        L.append("")
    L += ["## Samples (IRM on)", ""]
    for x in r["runs"]:
        for s in x["samples"][:2]:
            L.append(f"- **{x['name']}** — _{s['prompt']}_ → {s['on'].strip()[:300]!r}")
    return "\n".join(L) + "\n"


def _layers_text(layers: Sequence[int]) -> str:
    if len(layers) > 1 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


__all__ = ["analyze_runs", "striation", "index_scores", "top_indices", "outlier_dims", "coincidences",
           "collect_outputs", "run_correlations", "RunOutputs", "render_report"]
