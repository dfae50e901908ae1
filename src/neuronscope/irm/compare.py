"""Aligned runs against their matched controls: what the alignment adds that any trained injection does not.

A matched control is trained exactly like an aligned run (same layer set, seed, steps, options and frame
construction) on rows whose frame sentences are neutral instead of emotional, so an aligned run and its control
differ only in the alignment. Every comparison here is paired over such (aligned, control) pairs:

- striation: for each layer set, the striation share aligned minus control over its pairs (alignments x seeds),
  one-sided exact sign-flip permutation test (aligned above control), Holm-adjusted across layer sets;
- hidden indices: the per-index share (metrics.per_index_share) aligned minus control, for every index at once,
  one-sided sign-flip permutation with the max statistic over indices (Westfall-Young), so an index's adjusted p
  controls the family-wise error over all H indices; per alignment and over all pairs;
- recurrence: indices significant for two or more alignments;
- outlier dims: the significant indices against the model's own outlier dims (massive activations, known dims such
  as SmolLM2's 507 or Llama-2-7B's 1415/2533/1512), with the exact hypergeometric p of the overlap.

    pairs = [Pair("sadness-q1-s0", "control-q1-s0", "sadness", "q1", 0), ...]
    result = matched_comparison(pairs, means, outlier_dims=[507, 199, 247])
    result.findings                # one sentence per finding: which survive
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from ..errors import NeuronscopeError
from .metrics import index_share, per_index_share

ALPHA = 0.05
EXACT_MAX = 16          # up to 2^16 sign patterns are enumerated; beyond, random ones


@dataclass(frozen=True)
class Pair:
    """An aligned run and its matched control (same layer set and seed)."""
    aligned: str
    control: str
    alignment: str
    layer_set: str
    seed: int


@dataclass
class PairedTest:
    """One statistic aligned minus control over pairs; p: one-sided (aligned above) sign-flip permutation."""
    group: str
    n: int
    aligned_mean: float
    control_mean: float
    diff: float
    positive_pairs: int
    p_value: float | None
    p_holm: float | None = None
    test: str = "one-sided paired sign-flip permutation (aligned > control)"


@dataclass
class IndexResult:
    """One hidden index: mean per-index share aligned minus control, and its family-wise adjusted p."""
    index: int
    diff: float
    aligned_share: float
    control_share: float
    positive_pairs: int
    p_adjusted: float


@dataclass
class IndexComparison:
    """The index-wise comparison over one group of pairs (an alignment, or all pairs)."""
    group: str
    n_pairs: int
    sign_patterns: int
    min_p: float
    significant: list[IndexResult]
    top: list[IndexResult]
    method: str = ("per-index share aligned - control; one-sided sign-flip permutation of pairs with the max "
                   "statistic over all indices (Westfall-Young, family-wise)")


@dataclass
class OutlierOverlap:
    """The significant indices against the model's outlier dims (hypergeometric: a random index set of that size)."""
    significant: list[int]
    outlier_dims: list[int]
    overlap: list[int]
    hidden: int
    expected: float
    p_value: float | None


@dataclass
class SharedIndex:
    """An index significant (beyond the controls) for two or more alignments."""
    index: int
    alignments: list[str]


@dataclass
class MatchedComparison:
    """Everything the paired analysis found; `findings` says in words which findings survive."""
    alpha: float
    pairs: list[Pair]
    striation: list[PairedTest]
    indices: list[IndexComparison]
    recurrence: list[SharedIndex]
    outliers: OutlierOverlap | None
    findings: list[str] = field(default_factory=list)


# ---- permutation machinery ------------------------------------------------------------------------------------------
def sign_patterns(n: int, n_random: int = 20000, seed: int = 0) -> tuple[torch.Tensor, bool]:
    """Sign flips of n pairs [P, n] (float64): all 2^n when n <= EXACT_MAX (exact), else the identity plus
    n_random - 1 random ones. Returns (patterns, exact)."""
    if n < 1:
        raise NeuronscopeError("A paired test needs at least one pair.")
    if n <= EXACT_MAX:
        k = torch.arange(2 ** n)
        bits = (k[:, None] >> torch.arange(n)) & 1
        return (1 - 2 * bits).double(), True
    g = torch.Generator().manual_seed(seed)
    rnd = torch.randint(0, 2, (n_random - 1, n), generator=g).double() * 2 - 1
    return torch.cat([torch.ones(1, n, dtype=torch.float64), rnd]), False


def paired_test(aligned: Sequence[float], control: Sequence[float], group: str = "") -> PairedTest:
    """Aligned minus control over pairs; one-sided sign-flip permutation p (exact for <= 16 pairs, identity
    included, so the smallest p is 1/2^n); p None when no pair has a finite difference."""
    a = torch.tensor(list(aligned), dtype=torch.float64)
    c = torch.tensor(list(control), dtype=torch.float64)
    if a.shape != c.shape:
        raise NeuronscopeError("A paired test needs as many control values as aligned values.")
    ok = torch.isfinite(a) & torch.isfinite(c)
    a, c = a[ok], c[ok]
    n = int(a.numel())
    if n == 0:
        return PairedTest(group, 0, math.nan, math.nan, math.nan, 0, None)
    d = a - c
    S, _ = sign_patterns(n)
    stats = S @ d
    obs = float(d.sum())
    p = float((stats >= obs - 1e-12).double().mean())
    return PairedTest(group, n, float(a.mean()), float(c.mean()), float(d.mean()), int((d > 0).sum()), p)


def holm(ps: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of p-values (None stays None)."""
    idx = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])  # type: ignore[arg-type,return-value]
    m = len(idx)
    out: list[float | None] = [None] * len(ps)
    running = 0.0
    for rank, i in enumerate(idx):
        p = ps[i]
        assert p is not None
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def index_test(A: torch.Tensor, C: torch.Tensor, group: str, *, alpha: float = ALPHA, top: int = 10,
               seed: int = 0) -> IndexComparison:
    """Per-index shares of aligned runs A [n, H] against their matched controls C [n, H] (row i = pair i).

    Statistic per index: the mean difference over pairs. Null: every pair's sign flipped at random, the same flip for
    all indices of a pair (the pairs' dependence across indices is kept); adjusted p of index h = share of sign
    patterns whose largest statistic over all indices reaches h's observed one (identity pattern included)."""
    if A.shape != C.shape or A.ndim != 2:
        raise NeuronscopeError("The index comparison needs aligned and control shares of the same shape [pairs, H].")
    D = (A - C).double()
    n, H = D.shape
    S, exact = sign_patterns(n, seed=seed)
    obs = D.mean(0)
    maxes = torch.cat([(S[i:i + 4096] @ D).amax(1) / n for i in range(0, S.shape[0], 4096)])
    srt = torch.sort(maxes).values
    ge = srt.numel() - torch.searchsorted(srt, obs - 1e-12, right=False)     # count of maxes >= obs
    p = ge.double() / srt.numel() if exact else (ge.double() + 1) / (srt.numel() + 1)
    rows = [IndexResult(int(h), float(obs[h]), float(A[:, h].mean()), float(C[:, h].mean()),
                        int((D[:, h] > 0).sum()), float(p[h])) for h in torch.argsort(-obs).tolist()]
    sig = [r for r in rows if r.p_adjusted < alpha and r.diff > 0]
    return IndexComparison(group, n, int(S.shape[0]), float(1 / S.shape[0]) if exact else 1 / (S.shape[0] + 1),
                           sig, rows[:top])


def outlier_overlap(significant: Sequence[int], outlier_dims: Sequence[int], hidden: int) -> OutlierOverlap:
    """How many significant indices are outlier dims, against a random index set of the same size."""
    from scipy.stats import hypergeom
    s, o = sorted(set(significant)), sorted(set(int(x) for x in outlier_dims if 0 <= int(x) < hidden))
    ov = sorted(set(s) & set(o))
    if not s or not o:
        return OutlierOverlap(s, o, ov, hidden, 0.0, None)
    dist = hypergeom(hidden, len(o), len(s))
    return OutlierOverlap(s, o, ov, hidden, float(dist.mean()), float(dist.sf(len(ov) - 1)))


# ---- the comparison -------------------------------------------------------------------------------------------------
def check_pairs(pairs: Sequence[Pair], means: Mapping[str, torch.Tensor]) -> None:
    """Every pair names two known runs of the same shape."""
    if not pairs:
        raise NeuronscopeError("No (aligned, matched control) pairs to compare.")
    for p in pairs:
        for name in (p.aligned, p.control):
            if name not in means:
                raise NeuronscopeError(f"No output for run '{name}' of pair {p.aligned} / {p.control}.")
        if means[p.aligned].shape != means[p.control].shape:
            raise NeuronscopeError(f"'{p.aligned}' and its control '{p.control}' inject different layers; a matched "
                                   "control must use the same layer set.")


def striation_by_set(pairs: Sequence[Pair], means: Mapping[str, torch.Tensor]) -> list[PairedTest]:
    """Per layer set: striation share aligned vs matched control, paired over its pairs; Holm across sets."""
    tests = []
    for s in dict.fromkeys(p.layer_set for p in pairs):
        ps = [p for p in pairs if p.layer_set == s]
        tests.append(paired_test([index_share(means[p.aligned]) for p in ps],
                                 [index_share(means[p.control]) for p in ps], group=s))
    for t, adj in zip(tests, holm([t.p_value for t in tests])):
        t.p_holm = adj
    return tests


def indices_by_group(pairs: Sequence[Pair], means: Mapping[str, torch.Tensor], *, alpha: float,
                     seed: int) -> list[IndexComparison]:
    """The index-wise test over all pairs, then per alignment (when there are several)."""
    groups: list[tuple[str, list[Pair]]] = [("all pairs", list(pairs))]
    aligns = list(dict.fromkeys(p.alignment for p in pairs))
    if len(aligns) > 1:
        groups += [(f"alignment {a}", [p for p in pairs if p.alignment == a]) for a in aligns]
    out = []
    for name, ps in groups:
        A = torch.stack([per_index_share(means[p.aligned]) for p in ps])
        C = torch.stack([per_index_share(means[p.control]) for p in ps])
        out.append(index_test(A, C, name, alpha=alpha, seed=seed))
    return out


def recurrence(indices: Sequence[IndexComparison]) -> list[SharedIndex]:
    """Indices significant in two or more alignments' own tests."""
    seen: dict[int, list[str]] = {}
    for g in indices:
        if g.group.startswith("alignment "):
            for r in g.significant:
                seen.setdefault(r.index, []).append(g.group.removeprefix("alignment "))
    return [SharedIndex(h, a) for h, a in sorted(seen.items(), key=lambda x: (-len(x[1]), x[0])) if len(a) > 1]


def matched_comparison(pairs: Sequence[Pair], means: Mapping[str, torch.Tensor], *,
                       outlier_dims: Sequence[int] = (), alpha: float = ALPHA, seed: int = 0) -> MatchedComparison:
    """The paired analysis of aligned runs against their matched controls (see the module doc).

    means: each run's mean IRM output [injected layers, H] by name (aligned runs and controls)."""
    check_pairs(pairs, means)
    stri = striation_by_set(pairs, means)
    idx = indices_by_group(pairs, means, alpha=alpha, seed=seed)
    H = int(next(iter(means.values())).shape[1])
    ovl = outlier_overlap([r.index for r in idx[0].significant], outlier_dims, H) if outlier_dims else None
    res = MatchedComparison(alpha, list(pairs), stri, idx, recurrence(idx), ovl)
    res.findings = comparison_findings(res)
    return res


# ---- in words -------------------------------------------------------------------------------------------------------
def _p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"


def striation_sentence(t: PairedTest, alpha: float) -> str:
    """Layer set t.group: is the striation of aligned runs above their matched controls?"""
    if t.p_value is None:
        return f"Layer set {t.group}: no pair with a finite striation share; cannot be tested."
    p = t.p_holm if t.p_holm is not None else t.p_value
    floor = 0.5 ** t.n
    head = (f"Layer set {t.group}: striation share aligned {t.aligned_mean:.3f} vs matched control "
            f"{t.control_mean:.3f} (mean difference {t.diff:+.3f}, {t.positive_pairs}/{t.n} pairs higher; paired "
            f"sign-flip p {_p(t.p_value)}, Holm {_p(t.p_holm)}): ")
    if p < alpha and t.diff > 0:
        return head + "SURVIVES: the alignment adds striation beyond the control."
    if floor >= alpha:
        return head + (f"cannot be decided: with {t.n} pairs the smallest possible p is {floor:.3g} (add seeds or "
                       "alignments that pass).")
    return head + "does not survive: the controls explain it."


def index_sentence(g: IndexComparison) -> str:
    """Which indices dominate aligned runs beyond their controls in group g."""
    floor = (f" (cannot be decided: with {g.n_pairs} pairs the smallest possible p is {g.min_p:.3g})"
             if g.min_p >= 0.05 else "")
    if not g.significant:
        best = g.top[0] if g.top else None
        lead = (f"; the largest excess is index {best.index} ({best.diff:+.4f}, adjusted p {best.p_adjusted:.3g})"
                if best else "")
        return f"Indices, {g.group}: no index dominates aligned runs beyond their controls{lead}{floor}."
    items = ", ".join(f"{r.index} ({r.diff:+.4f}, p {r.p_adjusted:.3g})" for r in g.significant[:10])
    return (f"Indices, {g.group}: {len(g.significant)} index(es) SURVIVE the family-wise test over all indices "
            f"(share aligned - control, adjusted p): {items}.")


def comparison_findings(r: MatchedComparison) -> list[str]:
    """Every finding of the matched comparison as a sentence."""
    out = [striation_sentence(t, r.alpha) for t in r.striation]
    out += [index_sentence(g) for g in r.indices]
    n_align = len({p.alignment for p in r.pairs})
    if n_align > 1:
        if r.recurrence:
            out.append("Recurrence across alignments: " + "; ".join(
                f"index {x.index} in {', '.join(x.alignments)}" for x in r.recurrence[:10]) + ".")
        else:
            out.append(f"Recurrence across alignments: no index is significant for two or more of the {n_align} "
                       "alignments.")
    o = r.outliers
    if o is not None:
        if not o.significant:
            out.append(f"Outlier dims ({', '.join(map(str, o.outlier_dims[:8]))}): no significant index to compare.")
        else:
            ok = o.p_value is not None and o.p_value < r.alpha
            out.append(f"Outlier dims ({', '.join(map(str, o.outlier_dims[:8]))}): {len(o.overlap)} of the "
                       f"{len(o.significant)} significant indices are among them ({', '.join(map(str, o.overlap))}; "
                       f"chance {o.expected:.2f}, hypergeometric p {_p(o.p_value)}): "
                       + ("SURVIVES." if ok else "does not survive."))
    return out


__all__ = ["Pair", "PairedTest", "IndexResult", "IndexComparison", "OutlierOverlap", "MatchedComparison",
           "sign_patterns", "paired_test", "holm", "index_test", "outlier_overlap", "striation_by_set",
           "indices_by_group", "recurrence", "matched_comparison", "comparison_findings", "striation_sentence",
           "index_sentence", "ALPHA"]
