"""What IRMs learned, each finding tested against chance: heat-maps of |mean output| (injected layer x hidden
index), the striation share, top hidden indices and their recurrence across runs, a correlation matrix between
runs, and coincidences with the model's own outlier dimensions (neuronscope.outliers). Every finding carries null
distributions (irm.nulls: within-layer permutations, random-init IRMs, and control runs trained the same way on
control data) with mean, 95th percentile and p-value, and the report says in words which findings survive.
Writes PNGs, analysis.json and report.md into one folder.

    result = analyze_runs(["runs/anger", "runs/sad"], "report/", subject=subject, controls=["runs/shuffled"])

Inputs: held-out prompts only (the runs' validation rows, minus any prompt also used in training; a built-in list
when there are none), each followed by the frozen model's own continuation. The IRM reads its input upstream of
every injection, so its output on these tokens depends on the tokens alone: every run, random-init IRM and control
run is measured on exactly the same tokens.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..errors import NeuronscopeError
from ..interventions import BoundCapture, Capture, intervene
from . import nulls
from .compare import MatchedComparison, Pair, matched_comparison
from .report import findings, render_report
from .nulls import NullTest, RecurrenceSummary
from .metrics import degeneracy, index_scores, index_share, striation, top_indices
from .training import load_run

if TYPE_CHECKING:
    from ..outliers import OutlierReport
    from ..subject import Subject
    from .model import IRM

DEFAULT_PROMPTS = ["Tell me about your day.", "What is the capital of France?", "How do I bake bread?",
                   "Why is the sky blue?", "Write a short story about a dog.", "What should I do this weekend?"]


OUTLIER_KINDS = ("massive_activations", "final_norm_gain", "block_norm_gain", "lm_head_column_norm")


@dataclass
class RunOutputs:
    """Mean IRM output of one run over the analysis tokens."""
    name: str
    alignment: str
    layers: list[int]
    mean: torch.Tensor          # [n_inject, H] signed mean
    mean_abs: torch.Tensor      # [n_inject, H]
    tokens: int
    samples: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Coincidence:
    """A run's top indices against one outlier ranking's top set: the overlap and its tests (hypergeometric,
    random-init IRMs, control runs)."""
    value: int
    overlap: list[int]
    tests: list[NullTest]
    survives: bool | None


@dataclass
class RunAnalysis:
    """One run's findings against their nulls (a row of analysis.json's "runs")."""
    name: str
    alignment: str
    layers: list[int]
    tokens: int
    striation: dict[str, float]
    striation_tests: list[NullTest]
    striation_survives: bool | None
    top_indices: list[int]
    top_scores: list[float]
    mean_abs_output: float
    heatmap: str
    outlier_ranks_of_top: dict[str, list[int]]
    coincidences: dict[str, Coincidence]


@dataclass
class Recurrence:
    """An index in the top k of several runs (analysis.json's "recurrence" rows): how many, its family-wise p, which
    runs and alignments, in how many control runs' top k, and its rank in each outlier ranking."""
    index: int
    runs: int
    p_value: float
    run_names: list[str]
    alignments: list[str]
    control_runs: int
    outlier_ranks: dict[str, int]


@dataclass
class ControlSummary:
    """A control run as the analysis saw it."""
    name: str
    alignment: str
    layers: list[int]
    striation: float
    top_indices: list[int]


@dataclass
class Refusal:
    """A degenerate run left out, and the sentence that says why."""
    name: str
    reason: str


@dataclass
class Analysis:
    """analyze_runs' result; to_json() is analysis.json (the keys it always had; "refused", "matched" and "sweep"
    are new in issue 20, the last two only when present)."""
    model: str
    fingerprint: str
    prompts: list[str]
    prompt_source: str
    max_new_tokens: int
    top_k: int
    tokens: int
    read_site: str
    n_random: int
    n_permutations: int
    alpha: float
    controls: list[ControlSummary]
    runs: list[RunAnalysis]
    recurrence: list[Recurrence]
    recurrence_test: RecurrenceSummary | None
    correlation: dict[str, Any]
    outliers: dict[str, Any]        # OutlierReport.to_json(): without each dim's rank and score
    samples: list[dict[str, str]]
    figures: list[str]
    refused: list[Refusal]
    matched: MatchedComparison | None = None
    sweep: dict[str, Any] | None = None
    findings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("matched", "sweep"):
            if d[k] is None:
                del d[k]
        d["findings"] = d.pop("findings")
        return d


# ---- statistics ---------------------------------------------------------------------------------------------------
def run_correlations(outs: Sequence[RunOutputs]) -> tuple[torch.Tensor, str]:
    """Pearson correlation between runs: of the whole mean output when all runs inject the same layers,
    otherwise of the per-index profile (mean over layers)."""
    same = len({tuple(o.layers) for o in outs}) == 1
    vecs = torch.stack([(o.mean.flatten() if same else o.mean.mean(0)).double() for o in outs])
    c = torch.corrcoef(vecs) if len(outs) > 1 else torch.ones(1, 1, dtype=torch.float64)
    return c.nan_to_num(0.0), ("whole output (layer x index)" if same else "per-index profile (mean over layers)")


# ---- plots ---------------------------------------------------------------------------------------------------------
def _plt() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_heatmap(o: RunOutputs, path: Path, top: Sequence[int]) -> None:
    """|mean output| per (injected layer, hidden index) on one colour scale from 0, so that one strong layer shows."""
    plt = _plt()
    M = o.mean.abs().numpy()
    lim = float(M.max()) or 1.0
    fig, ax = plt.subplots(figsize=(12, max(2.5, 0.18 * len(o.layers) + 1.5)))
    im = ax.imshow(M, aspect="auto", cmap="magma", vmin=0, vmax=lim, interpolation="nearest")
    ax.set_yticks(range(len(o.layers)))
    ax.set_yticklabels([str(l) for l in o.layers], fontsize=6 if len(o.layers) > 12 else 8)
    ax.set_xlabel("hidden index")
    ax.set_ylabel("injected layer")
    ax.set_title(f"{o.name} ({o.alignment}): |mean IRM output| over {o.tokens} tokens; top: "
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


def plot_outliers(outliers: OutlierReport, tops: Sequence[int], path: Path) -> None:
    plt = _plt()
    names = OUTLIER_KINDS
    fig, axes = plt.subplots(len(names), 1, figsize=(12, 9))
    for ax, name in zip(axes, names):
        v = outliers.rankings[name].all
        ax.bar(range(len(v)), v, width=1.0, color="tab:gray")
        for h in tops:
            ax.axvline(h, color="tab:red", alpha=0.35, lw=0.8)
        for h in outliers.rankings[name].indices[:3]:
            ax.annotate(str(h), (h, v[h]), fontsize=8, ha="center", va="bottom")
        ax.set_title(name.replace("_", " ") + " (red lines: top IRM indices)", fontsize=9)
    axes[-1].set_xlabel("hidden index")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- inputs ---------------------------------------------------------------------------------------------------------
def held_out_prompts(runs: Sequence[tuple[dict[str, Any], Path]], per_run: int = 8) -> tuple[list[str], str]:
    """Prompts of the runs' validation rows that are not also training prompts; the built-in list otherwise.
    Returns (prompts, where they came from)."""
    from ..store import read_json
    from .data import read_table
    prompts: list[str] = []
    training: set[str] = set()
    for run, run_dir in runs:
        path = run.get("data", {}).get("path")
        sp_file = Path(run_dir) / "split.json"
        if not path or not Path(path).is_file() or not sp_file.is_file():
            continue
        try:
            rows = read_table(path)
        except NeuronscopeError:
            continue
        sp = read_json(sp_file)
        val = set(sp.get("val_rows", []))
        key = [_prompt_of(r) for r in rows]
        training.update(k for i, k in enumerate(key) if i not in val)
        prompts += [key[i] for i in sorted(val)[:per_run] if i < len(key)]
    held = [p for p in dict.fromkeys(prompts) if p and p not in training]
    if held:
        return held, "held-out validation rows of the runs (minus prompts also used in training)"
    return [p for p in DEFAULT_PROMPTS if p not in training], "built-in neutral prompts (not in any training row)"


def _prompt_of(row: dict[str, Any]) -> str:
    p = row.get("prompt")
    if isinstance(p, str) and p.strip():
        return p.strip()
    return " ".join(str(row.get("text", "")).split()[:8])


@torch.no_grad()
def read_inputs(subject: Subject, prompts: Sequence[str], *, read_layer: int, read_site: str, chat: bool,
                max_new_tokens: int, progress: bool = True) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """The residual at the IRM's read site [N, H] over each prompt and the frozen model's continuation of it."""
    from tqdm.auto import tqdm
    rows, samples = [], []
    for p in tqdm(prompts, desc="analysis inputs", disable=not progress, dynamic_ncols=True):
        ids = subject.encode(p, chat=chat)
        new = subject.generate_ids(ids, max_new_tokens=max_new_tokens) if max_new_tokens > 0 else ids[:, :0]
        full = torch.cat([ids, new.to(ids.device)], 1)
        with intervene(subject, Capture(layers=[read_layer], sites=(read_site,))) as (cap,):
            subject.model(input_ids=full)
        assert isinstance(cap, BoundCapture)
        rows.append(cap.get(read_site)[0, 0].float().cpu())
        samples.append((p, subject.decode(new[0])))
    return torch.cat(rows, 0), samples


def outputs_of(irm: IRM, X: torch.Tensor, *, name: str, alignment: str) -> RunOutputs:
    """Mean and mean-|.| output of `irm` over the read-site rows X."""
    with torch.no_grad():
        mean = nulls.mean_output(irm, X)
        absm = torch.zeros_like(mean, dtype=torch.float64)
        for i in range(0, X.shape[0], 512):
            absm += irm(X[i:i + 512].to(next(irm.parameters()).device)).abs().double().sum(0).cpu()
    return RunOutputs(name, alignment, list(irm.config.inject_layers), mean, (absm / X.shape[0]).float(), X.shape[0])


# ---- the whole analysis ---------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    """The runs of one analysis, loaded and checked against one model."""
    subject: Subject
    runs: list[tuple[IRM, dict[str, Any], Path]]       # (IRM, run.json, folder) of the aligned runs
    controls: list[tuple[IRM, dict[str, Any], Path]]
    read_layer: int
    read_site: str


def load_runs(run_dirs: Sequence[str | Path], controls: Sequence[str | Path], subject: Subject | None) -> Loaded:
    """Load runs and controls; they must share one model and one read site."""
    if not run_dirs:
        raise NeuronscopeError("Give at least one IRM run folder to analyse.")
    loaded = [(*load_run(d), Path(d)) for d in run_dirs]
    ctrl = [(*load_run(d), Path(d)) for d in controls]
    if len({run.get("fingerprint") for _, run, _ in loaded + ctrl}) > 1:
        raise NeuronscopeError("These runs were trained on different models; analyse runs of one model together.")
    if subject is None:
        from ..subject import Subject
        subject = Subject.load(loaded[0][1]["model"])
    for irm, _, _ in loaded + ctrl:
        irm.check_subject(subject, strict=True)
    sites = {(irm.config.read_layer, irm.config.read_site) for irm, _, _ in loaded + ctrl}
    if len(sites) > 1:
        raise NeuronscopeError("These runs read different sites; analyse runs with the same --read-layer and "
                               "--read-site together.")
    read_layer, read_site = sites.pop()
    return Loaded(subject, loaded, ctrl, read_layer, read_site)


def screen(outs: list[RunOutputs], skip: bool) -> tuple[list[RunOutputs], list[Refusal]]:
    """Refuse degenerate runs (metrics.degeneracy): an error naming the run, or (skip) left out and listed."""
    kept: list[RunOutputs] = []
    refused: list[Refusal] = []
    for o in outs:
        why = degeneracy(o.mean)
        if why is None:
            kept.append(o)
            continue
        sentence = f"Run '{o.name}' is degenerate: {why}; it is refused (not analysed)."
        if not skip:
            raise NeuronscopeError(sentence + " Retrain it or leave it out.")
        refused.append(Refusal(o.name, sentence))
    return kept, refused


def striation_tests(o: RunOutputs, rand: Sequence[RunOutputs], couts: Sequence[RunOutputs], *, n_permutations: int,
                    seed: int) -> list[NullTest]:
    """The striation share of one run against its nulls (permutation, random-init, same-layer controls)."""
    stri = [nulls.striation_test(o.mean, n=n_permutations, seed=seed)]
    if len(o.layers) > 1:
        stri.append(nulls.summarize(stri[0].value, [index_share(r.mean) for r in rand],
                                    "random-init IRM of the same shape"))
        same = [c for c in couts if c.layers == o.layers]
        if same:
            stri.append(nulls.summarize(stri[0].value, [index_share(c.mean) for c in same],
                                        "control runs (same layers, control data)"))
    return stri


def coincidences(top: Sequence[int], rand: Sequence[RunOutputs], couts: Sequence[RunOutputs],
                 outl: OutlierReport, top_k: int, H: int) -> dict[str, Coincidence]:
    """Overlap of a run's top indices with each outlier ranking's top set, against its nulls."""
    coinc = {}
    for kind in OUTLIER_KINDS:
        ref = set(outl.rankings[kind].indices)
        first = nulls.coincidence_test(top, list(ref), H)
        v = int(first.value)
        t: list[NullTest] = [first, nulls.summarize(v, [len(set(top_indices(r.mean, top_k)) & ref) for r in rand],
                                                    "random-init IRM of the same shape")]
        if couts:
            t.append(nulls.summarize(v, [len(set(top_indices(c.mean, top_k)) & ref) for c in couts], "control runs"))
        coinc[kind] = Coincidence(v, first.overlap, t, nulls.survives(t))
    return coinc


def run_record(irm: IRM, o: RunOutputs, couts: Sequence[RunOutputs], X: torch.Tensor, outl: OutlierReport,
               out_dir: Path, *, top_k: int, n_random: int, n_permutations: int, seed: int) -> RunAnalysis:
    """One run's findings with their nulls, and its heat-map."""
    device = next(irm.parameters()).device
    top = top_indices(o.mean, top_k)
    rand = [outputs_of(nulls.random_init_irm(irm.config, seed + 1000 + i).to(device).eval(), X,
                       name="random", alignment="random") for i in range(n_random)]
    stri = striation_tests(o, rand, couts, n_permutations=n_permutations, seed=seed)
    png = f"heatmap_{o.name}.png"
    plot_heatmap(o, out_dir / png, top)
    ranks = {kind: [int(outl.rankings[kind].rank[h]) for h in top] for kind in OUTLIER_KINDS}
    return RunAnalysis(o.name, o.alignment, o.layers, o.tokens, striation(o.mean), stri, nulls.survives(stri), top,
                       [float(index_scores(o.mean)[h]) for h in top], float(o.mean_abs.mean()), png, ranks,
                       coincidences(top, rand, couts, outl, top_k, int(X.shape[1])))


def recurrence_rows(outs: Sequence[RunOutputs], per_run: Sequence[RunAnalysis], couts: Sequence[RunOutputs],
                    outl: OutlierReport, top_k: int, seed: int) -> tuple[list[Recurrence], RecurrenceSummary | None]:
    """Indices in the top k of several runs, with the family-wise null and their control and outlier ranks."""
    if len(outs) < 2:
        return [], None
    rec = nulls.recurrence_test([index_scores(o.mean) for o in outs], top_k, seed=seed)
    ctrl_tops = [set(top_indices(c.mean, top_k)) for c in couts]
    rows = [Recurrence(row.index, row.runs, row.p_value, [r.name for r in per_run if row.index in r.top_indices],
                       sorted({r.alignment for r in per_run if row.index in r.top_indices}),
                       sum(row.index in t for t in ctrl_tops),
                       {k: int(outl.rankings[k].rank[row.index]) for k in OUTLIER_KINDS})
            for row in rec.indices]
    return rows, rec.summary()


def analysis_inputs(ld: Loaded, prompts: Sequence[str] | None, chat: bool | None, max_new_tokens: int,
                    progress: bool) -> tuple[torch.Tensor, list[tuple[str, str]], list[str], str, bool]:
    """The held-out (or given) prompts, their frozen continuations and the read-site residual over them."""
    if chat is None:
        chat = bool(ld.runs[0][1]["train"].get("chat")) and ld.subject.has_chat_template
    if prompts:
        prompts, source = list(prompts), "given by the user"
    else:
        prompts, source = held_out_prompts([(r, d) for _, r, d in ld.runs + ld.controls])
    if not prompts:
        raise NeuronscopeError("No held-out prompts left; pass --prompts.")
    X, samples = read_inputs(ld.subject, prompts, read_layer=ld.read_layer, read_site=ld.read_site, chat=chat,
                             max_new_tokens=max_new_tokens, progress=progress)
    return X, samples, list(prompts), source, chat


def analyze_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, *, subject: Subject | None = None,
                 prompts: Sequence[str] | None = None, max_new_tokens: int = 32, top_k: int = 10,
                 chat: bool | None = None, controls: Sequence[str | Path] = (), n_random: int = 20,
                 n_permutations: int = 1000, factor: float = 10.0, seed: int = 0, progress: bool = True,
                 pairs: Sequence[Pair] = (), known_dims: Sequence[int] = (), skip_degenerate: bool = False,
                 sweep: dict[str, Any] | None = None) -> Analysis:
    """The full analysis of one or more IRM runs on the same model (control runs give the trained-injection null);
    returns an Analysis (its to_json() is analysis.json).

    A degenerate run or control (zero, constant or NaN output) is refused: an error, or with skip_degenerate it is
    left out and listed under "refused". With `pairs` (aligned run name, matched control name, ...; names are the
    folder names) the paired comparison of irm.compare is added under "matched", tested against the model's massive
    dims plus `known_dims`. `sweep` (the sweep's verdicts and excluded runs) is reported first."""
    from ..outliers import massive_dims, model_outliers
    from ..store import write_json, write_text
    from tqdm.auto import tqdm
    if top_k < 1:
        raise NeuronscopeError("top_k must be at least 1.")
    ld = load_runs(run_dirs, controls, subject)
    subject = ld.subject
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    X, samples, prompts, source, chat = analysis_inputs(ld, prompts, chat, max_new_tokens, progress)
    outl = model_outliers(subject, [p + " " + c for p, c in samples], factor=factor, k=top_k, chat=chat,
                          progress=progress)
    names = _unique_names([d.name for _, _, d in ld.runs])
    cnames = _unique_names([d.name for _, _, d in ld.controls])
    irms = {n: irm.to(subject.device).eval() for (irm, _, _), n in zip(ld.runs + ld.controls, names + cnames)}
    outs, refused = screen([outputs_of(irms[n], X, name=n, alignment=r["data"].get("alignment", "?"))
                            for (_, r, _), n in zip(ld.runs, names)], skip_degenerate)
    couts, c_refused = screen([outputs_of(irms[n], X, name=n, alignment=r["data"].get("alignment", "control"))
                               for (_, r, _), n in zip(ld.controls, cnames)], skip_degenerate)
    refused += c_refused
    if not outs:
        raise NeuronscopeError("Every run is degenerate; nothing to analyse: " + " ".join(r.reason for r in refused))
    per_run = [run_record(irms[o.name], o, couts, X, outl, out_dir, top_k=top_k, n_random=n_random,
                          n_permutations=n_permutations, seed=seed)
               for o in tqdm(outs, desc="nulls per run", disable=not progress)]
    recurrence, rec_test = recurrence_rows(outs, per_run, couts, outl, top_k, seed)
    corr, corr_kind = run_correlations(outs)
    plot_profiles(outs, out_dir / "top_indices.png")
    plot_correlation(corr, [o.name for o in outs], out_dir / "correlation.png")
    plot_outliers(outl, sorted({h for r in per_run for h in r.top_indices}), out_dir / "outliers.png")
    # the k most massive dims (by peak multiple of the layer median: on SmolLM2 most dims pass 10x somewhere, so
    # "every dim over the factor" would make any index an outlier) and the dims the user names
    outlier_dims = massive_dims(outl)[:top_k] + list(known_dims)
    result = Analysis(
        subject.name, subject.fingerprint, prompts, source, max_new_tokens, top_k, int(X.shape[0]),
        f"layer {ld.read_layer} {ld.read_site}", n_random, n_permutations, nulls.ALPHA,
        [ControlSummary(c.name, c.alignment, c.layers, striation(c.mean)["index_share"], top_indices(c.mean, top_k))
         for c in couts],
        per_run, recurrence, rec_test,
        {"kind": corr_kind, "names": [o.name for o in outs], "matrix": corr.tolist()}, outl.to_json(),
        [{"prompt": p, "frozen": c} for p, c in samples[:4]],
        [r.heatmap for r in per_run] + ["top_indices.png", "correlation.png", "outliers.png"], refused,
        matched_section(pairs, outs + couts, outlier_dims, seed=seed) if pairs else None,
        sweep)
    js = result.to_json()
    result.findings = findings(js)
    js["findings"] = result.findings
    write_json(out_dir / "analysis.json", js)
    write_text(out_dir / "report.md", render_report(js))
    return result


def matched_section(pairs: Sequence[Pair], outs: Sequence[RunOutputs], outlier_dims: Sequence[int], *,
                    seed: int) -> MatchedComparison | None:
    """The paired comparison over the pairs whose two runs were both analysed (irm.compare)."""
    means = {o.name: o.mean for o in outs}
    ok = [p for p in pairs if p.aligned in means and p.control in means]
    if not ok:
        return None
    return matched_comparison(ok, means, outlier_dims=list(dict.fromkeys(outlier_dims)), seed=seed)


def _unique_names(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


__all__ = ["Analysis", "RunAnalysis", "ControlSummary", "Refusal", "analyze_runs", "striation", "index_scores",
           "top_indices", "run_correlations", "RunOutputs", "render_report", "held_out_prompts", "read_inputs",
           "outputs_of", "findings", "OUTLIER_KINDS"]
