"""The IRM analysis in words: one sentence per finding (which survive their nulls and which do not), and report.md.

Both read the analysis's JSON form (`Analysis.to_json()`, analysis.json), so a saved analysis can be re-rendered.
"""
from __future__ import annotations

from typing import Any, Sequence

from .compare_text import render_comparison


def findings(r: dict[str, Any]) -> list[str]:
    """One sentence per finding: which survive every available null at alpha, which do not. The sweep's excluded
    runs and refused (degenerate) runs come first, then the matched comparison, then each run against its nulls."""
    out = [x["sentence"] for x in r.get("sweep", {}).get("excluded", [])]
    out += [x["reason"] for x in r.get("refused", [])]
    if r.get("matched"):
        out += list(r["matched"]["findings"])
    for x in r["runs"]:
        out += run_findings(x, r["alpha"], r["top_k"])
    if r["recurrence"]:
        out.append(recurrence_finding(r))
    return out


def _verdict_word(ok: bool | None) -> str:
    return {True: "SURVIVES", False: "does not survive", None: "cannot be tested"}[ok]


def run_findings(x: dict[str, Any], alpha: float, top_k: int) -> list[str]:
    """One run's striation and outlier coincidences against their nulls, in words."""
    txt = "; ".join(f"{d['null']}: mean {_f(d['null_mean'])}, 95th pct {_f(d['null_p95'])}, p {_f(d['p_value'])}"
                    for d in x["striation_tests"] if d.get("p_value") is not None)
    out = [f"{x['name']}: striation share {x['striation']['index_share']:.3f} {_verdict_word(x['striation_survives'])} "
           f"(needs p < {alpha} under every null){' — ' + txt if txt else ''}."]
    for kind, c in x["coincidences"].items():
        if c["value"] > 0:
            ps = ", ".join(f"{d['null'].split(' (')[0]} p {_f(d['p_value'])}" for d in c["tests"])
            ov = ", ".join(map(str, c["overlap"]))
            out.append(f"{x['name']}: {c['value']} of its top {top_k} indices ({ov}) "
                       f"are top-{top_k} {kind.replace('_', ' ')} dims: {_verdict_word(c['survives'])} ({ps}).")
    return out


def recurrence_finding(r: dict[str, Any]) -> str:
    """The most recurrent top index across runs against the family-wise null."""
    top = r["recurrence"][0]
    rt = r["recurrence_test"]
    ok = top["p_value"] < r["alpha"]
    return (f"Recurrence: index {top['index']} is in the top {r['top_k']} of {top['runs']}/{len(r['runs'])} "
            f"runs (chance: most-recurrent index mean {rt['null_mean']:.2f}, 95th pct {rt['null_p95']:.0f}; "
            f"p {top['p_value']:.3g}): {'SURVIVES' if ok else 'does not survive'}"
            + (f"; it is also in the top of {top['control_runs']}/{len(r['controls'])} control runs"
               if r["controls"] else "") + ".")


def _f(v: object) -> str:
    return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))


def render_report(r: dict[str, Any]) -> str:
    """report.md: findings in words first, then the sweep's verdicts, the matched comparison and each section."""
    L = [f"# IRM analysis: {r['model']}", "",
         f"Model weights fingerprint `{r['fingerprint']}`. Inputs: {len(r['prompts'])} prompts ({r['prompt_source']}), "
         f"each followed by the frozen model's own {r['max_new_tokens']}-token continuation: {r['tokens']} tokens, "
         f"read at {r['read_site']}. Nulls: {r['n_permutations']} within-layer permutations, {r['n_random']} "
         f"random-init IRMs of each run's shape, {len(r['controls'])} control runs. A finding survives when p < "
         f"{r['alpha']} under every null available.", "", "## Findings", ""]
    L += [f"- {s}" for s in r["findings"]]
    L += [""]
    if r.get("sweep"):
        L += _sweep_section(r["sweep"])
    if r.get("matched"):
        L += render_comparison(r["matched"])
    for part in (_runs_section, _recurrence_section, _correlation_section, _outliers_section, _controls_section):
        L += part(r)
    L += ["", "## Inputs (frozen model's continuations)", ""]
    for s in r["samples"]:
        L.append(f"- _{s['prompt']}_ → {s['frozen'].strip()[:200]!r}")
    return "\n".join(L) + "\n"


def _sweep_section(sw: dict[str, Any]) -> list[str]:
    L = ["## Runs judged by the sweep", "", sw.get("note", ""), "",
         "| run | verdict | target x (p) | opposite diff | repetition x | factual right off -> on | same opening | "
         "training s |", "|---|---|---|---|---|---|---|---|"]
    for x in sw.get("judged", []):
        L.append(f"| {x['name']} | {'passed' if x['passed'] else 'failed: ' + str(x.get('reason'))} | "
                 f"{_f(x.get('target_ratio'))} ({_f(x.get('target_p'))}) | {_f(x.get('opposite_diff'))} | "
                 f"{_f(x.get('repetition_ratio'))} | {_f(x.get('factual_off'))} -> {_f(x.get('factual_on'))} | "
                 f"{_f(x.get('same_opening_on'))} | {_f(x.get('train_seconds'))} |")
    return L + [""]


def _runs_section(r: dict[str, Any]) -> list[str]:
    L: list[str] = []
    share = {c["name"]: c["striation"] for c in r.get("controls", [])}
    matched = {p["aligned"]: share.get(p["control"]) for p in (r.get("matched") or {}).get("pairs", [])}
    L += ["## Runs", "", "| run | alignment | injected layers | index share | matched control's share | "
          "chance 1/layers | permutation p | random-init p95 | control p95 | top indices |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
        t = {d["null"].split(" ")[0]: d for d in x["striation_tests"]}
        perm, rnd, ctl = t.get("permutation", {}), t.get("random-init", {}), t.get("control", {})
        L.append(f"| {x['name']} | {x['alignment']} | {_layers_text(x['layers'])} | "
                 f"{x['striation']['index_share']:.3f} | {_f(matched.get(x['name']))} | {1 / len(x['layers']):.3f} | "
                 f"{_f(perm.get('p_value'))} | {_f(rnd.get('null_p95'))} | {_f(ctl.get('null_p95'))} | "
                 f"{', '.join(map(str, x['top_indices']))} |")
    L += ["", "Index share: the fraction of the variance of the mean output (layer x index) explained by the hidden "
          "index alone (vertical stripes). Under the within-layer permutation null it sits near 1/layers.", "",
          "## Heat-maps (|mean output|, one colour scale from 0)", ""]
    for x in r["runs"]:
        L += [f"![{x['name']}]({x['heatmap']})", ""]
    L += ["![top indices](top_indices.png)", ""]
    return L


def _recurrence_section(r: dict[str, Any]) -> list[str]:
    L: list[str] = []
    if r["recurrence"]:
        rt = r["recurrence_test"]
        L += ["## Recurring indices", "",
              f"Indices in the top {r['top_k']} of at least two runs. Chance: each run's top {r['top_k']} a random "
              f"set of {rt['hidden']} dims gives {rt['expected_per_index']:.2f} runs per index; the most recurrent "
              f"index of a random draw has mean {rt['null_mean']:.2f}, 95th percentile {rt['null_p95']:.0f} runs "
              "(p is family-wise against that).", "",
              "| index | runs | p | control runs | alignments | massive rank | LM-head rank |",
              "|---|---|---|---|---|---|---|"]
        for x in [x for x in r["recurrence"] if x["runs"] > 1][:30]:
            o = x["outlier_ranks"]
            L.append(f"| {x['index']} | {x['runs']}/{len(r['runs'])} | {x['p_value']:.3g} | {x['control_runs']}/"
                     f"{len(r['controls'])} | {', '.join(x['alignments'])} | {o['massive_activations']} | "
                     f"{o['lm_head_column_norm']} |")
        L.append("")
    return L


def _correlation_section(r: dict[str, Any]) -> list[str]:
    c = r["correlation"]
    L = [f"## Correlation between runs ({c['kind']})", "", "![correlation](correlation.png)", "",
          "| | " + " | ".join(c["names"]) + " |", "|---" * (len(c["names"]) + 1) + "|"]
    for n, row in zip(c["names"], c["matrix"]):
        L.append(f"| {n} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    return L


def _outliers_section(r: dict[str, Any]) -> list[str]:
    o = r["outliers"]
    L = ["", "## The model's own outlier dimensions", "", "![outliers](outliers.png)", "",
          f"Massive = {o['massive']['definition']}: "
          + (", ".join(f"dim {d['dim']} ({d['max_multiple']:.0f}x, layers {_layers_text(d['layers'])}, tokens "
                       f"{', '.join(repr(t) for t in d['tokens'][:3])})" for d in o["massive"]["dims"][:8])
             or "none") + ".", "", "| kind | top dims (value, x median) |", "|---|---|"]
    for name, d in o["rankings"].items():
        L.append(f"| {name.replace('_', ' ')} | " + ", ".join(
            f"{i} ({v:.3g}, {q:.1f}x)" for i, v, q in zip(d["indices"], d["values"], d["multiples"])) + " |")
    L += ["", "## Coincidence of top IRM indices with outlier dims", "",
          "| run | kind | overlap | hypergeometric mean / p | random-init p95 / p | control p |",
          "|---|---|---|---|---|---|"]
    for x in r["runs"]:
        for kind, cz in x["coincidences"].items():
            t = cz["tests"]
            ctl = t[2]["p_value"] if len(t) > 2 else None
            ov = ", ".join(map(str, cz["overlap"]))
            L.append(f"| {x['name']} | {kind.replace('_', ' ')} | {cz['value']} ({ov}) | "
                     f"{t[0]['null_mean']:.2f} / {_f(t[0]['p_value'])} | "
                     f"{_f(t[1]['null_p95'])} / {_f(t[1]['p_value'])} | "
                     f"{_f(ctl)} |")
    return L


def _controls_section(r: dict[str, Any]) -> list[str]:
    L: list[str] = []
    if r["controls"]:
        L += ["", "## Control runs", "", "| control | alignment | layers | index share | top indices |",
              "|---|---|---|---|---|"]
        for c2 in r["controls"]:
            L.append(f"| {c2['name']} | {c2['alignment']} | {_layers_text(c2['layers'])} | {c2['striation']:.3f} | "
                     f"{', '.join(map(str, c2['top_indices']))} |")
    return L


def _layers_text(layers: Sequence[int]) -> str:
    if len(layers) > 1 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


__all__ = ["findings", "run_findings", "recurrence_finding", "render_report"]
