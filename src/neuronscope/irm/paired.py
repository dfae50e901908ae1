"""Paired comparisons of one measure taken twice on the same items (IRM off, then on): mean difference, a seeded
bootstrap 95% interval, a two-sided sign-flip permutation p-value, and the paired t-test for reference.

    d = paired_difference(off_rates, on_rates)   # PairedStats(off=.., on=.., diff=.., ci95=[lo, hi], p_value=..)
    d.to_json()                                  # the JSON form saved in judged.json (as before it was a class)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import NeuronscopeError


@dataclass
class PairedStats:
    """One measure taken on the same items twice: means, mean difference on - off, its bootstrap 95% interval, the
    sign-flip permutation p-value and the paired t-test's; ppl_off / ppl_on only for the answers' loss."""
    n: int
    off: float
    on: float
    diff: float
    ci95: list[float]
    p_value: float
    t_test_p: float | None
    ratio: float | None
    test: str = "two-sided paired sign-flip permutation"
    ppl_off: float | None = None
    ppl_on: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON form (the ppl keys only when set, as before)."""
        d = asdict(self)
        for k in ("ppl_off", "ppl_on"):
            if d[k] is None:
                del d[k]
        return d


def paired_difference(off: Sequence[float], on: Sequence[float], *, n_resamples: int = 10000,
                      seed: int = 0) -> PairedStats:
    """Statistics of on - off over paired items; p_value is the two-sided sign-flip permutation test of a zero
    mean difference (exact for n <= 16, else n_resamples random flips, with the +1 correction)."""
    a = np.asarray(off, dtype=np.float64)
    b = np.asarray(on, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise NeuronscopeError("Paired measures need the same number of items with the IRM off and on.")
    n = a.size
    if n == 0:
        raise NeuronscopeError("No items to compare.")
    d = b - a
    rng = np.random.default_rng(seed)
    mean = float(d.mean())
    if n > 1:
        boot = d[rng.integers(0, n, size=(n_resamples, n))].mean(1)
        lo, hi = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    else:
        lo = hi = mean
    obs = abs(d.sum())
    if n <= 16:
        signs = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1) * 2 - 1
        p = float((np.abs(signs @ d) >= obs - 1e-12).mean())
    else:
        signs = rng.choice([-1.0, 1.0], size=(n_resamples, n))
        p = float(((np.abs(signs @ d) >= obs - 1e-12).sum() + 1) / (n_resamples + 1))
    t_p = None
    if n > 1 and d.std(ddof=1) > 0:
        from scipy.stats import ttest_rel
        t_p = float(ttest_rel(b, a).pvalue)
    ma, mb = float(a.mean()), float(b.mean())
    return PairedStats(int(n), ma, mb, mean, [lo, hi], p, t_p, (mb / ma) if ma > 0 else (math.inf if mb > 0 else None))


__all__ = ["paired_difference", "PairedStats"]
