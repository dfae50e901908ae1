"""The report section of the matched comparison (irm.compare), in Markdown, from its JSON form."""
from __future__ import annotations

from typing import Any, Mapping


def _p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"


def render_comparison(r: Mapping[str, Any]) -> list[str]:
    """The report's section on aligned runs vs matched controls (Markdown lines), from the comparison's JSON form
    (dataclasses.asdict of a MatchedComparison)."""
    L = ["## Aligned runs against their matched controls", "",
         f"{len(r['pairs'])} pairs (aligned run, control with the same layer set and seed, neutral frame sentences in "
         f"place of the emotional ones). A finding survives at p < {r['alpha']}.", ""]
    L += [f"- {s}" for s in r["findings"]]
    L += ["", "| layer set | pairs | aligned | control | difference | pairs higher | p | Holm p |",
          "|---|---|---|---|---|---|---|---|"]
    for t in r["striation"]:
        L.append(f"| {t['group']} | {t['n']} | {t['aligned_mean']:.3f} | {t['control_mean']:.3f} | {t['diff']:+.3f} | "
                 f"{t['positive_pairs']}/{t['n']} | {_p(t['p_value'])} | {_p(t['p_holm'])} |")
    for g in r["indices"]:
        L += ["", f"Largest per-index excess, {g['group']} ({g['n_pairs']} pairs, {g['sign_patterns']} sign "
              "patterns):", "", "| index | aligned share | control share | difference | pairs higher | adjusted p |",
              "|---|---|---|---|---|---|"]
        for x in g["top"]:
            L.append(f"| {x['index']} | {x['aligned_share']:.4f} | {x['control_share']:.4f} | {x['diff']:+.4f} | "
                     f"{x['positive_pairs']}/{g['n_pairs']} | {x['p_adjusted']:.3g} |")
    return L + [""]


__all__ = ["render_comparison"]
