"""Quantile levels and the normalised activation: the one home of both (issue 14).

A level p < 1/2 is the low tail, 1 - p the high tail. Over n tokens the level is the r-th most extreme value of its
tail, r = ceil(p * n) (at least 1); its *effective rank* is r / n. When n * p < 1 the rank is still 1, so the
"quantile" is only the sample extreme (the minimum or maximum): over 100K tokens q(1e-7), q(1e-6) and q(1e-5) are all
the minimum. Such a level is *unresolved* by the corpus: its effective rank r / n is larger than p, and it is marked
(`Level.mark`, the manifest's `stats.level_ranks`, `atlas show`, the Monitor).

The normalised activation (DESIGN.md) is act / q(1 - 1e-5) for act >= 0 and act / |q(1e-5)| for act < 0. When the
corpus does not resolve 1e-5, the most extreme level it does resolve that is not beyond 1e-5 is used instead
(for example 1e-4 over 20K tokens), so |normalised| > 1 still means "rarer than that level"; `norm_levels` names the
two levels used. When no stored level is resolved (a tiny corpus), the least extreme stored level is used, marked.

    lv = Levels(LEVELS, n_tokens=20_000, k=10_000)
    lv.norm_levels()                 # (0.9999, 0.0001): 1e-5 needs >= 100,000 tokens
    lv.get(1e-5).mark                # 'sample extreme (n*p = 0.2 < 1)'
    normalise(acts, hi, lo)          # hi, lo: the positive divisors [..., N] (NeuronStats.norm_scale())
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import torch

LEVELS: tuple[float, ...] = (1e-7, 1e-6, 1e-5, 1e-4, 1 - 1e-4, 1 - 1e-5, 1 - 1e-6, 1 - 1e-7)
FIRE = 1e-5           # the DESIGN.md normalisation ("firing") level of each tail
STRONG = 1e-7         # the "strengthen" steering level (DESIGN.md), or the most extreme resolved one
TINY = 1e-12          # divisor floor: a tail that never leaves zero reads any activation of its sign as firing


def tail_of(level: float) -> tuple[str, float]:
    """('low', p) for level p < 1/2, ('high', 1 - level) otherwise."""
    return ("low", float(level)) if level < 0.5 else ("high", 1.0 - float(level))


def tail_rank(p: float, n: int) -> int:
    """r = ceil(p * n), at least 1, computed without float noise (1e-5 * 100000 is exactly rank 1)."""
    x = p * n
    r = math.ceil(x - 1e-9 * max(1.0, abs(x)))
    return max(1, r)


def fmt_level(level: float) -> str:
    """A level as text that stays exact for the high tail: '1e-05', '1-1e-05' (not '0.99999' or '1')."""
    side, p = tail_of(level)
    if p < 1e-3:                            # 1e-04, 1e-05 (not 0.0001 next to 1e-05)
        m, e = f"{p:.3e}".split("e")
        text = f"{m.rstrip('0').rstrip('.')}e{e}"
    else:
        text = f"{p:.4g}"
    return text if side == "low" else f"1-{text}"


def covers(p: float, n: int) -> bool:
    """Whether n tokens resolve tail probability p: n * p >= 1 (else the level is only the sample extreme)."""
    return n > 0 and p * n >= 1.0 - 1e-9


def parse_levels(levels: Iterable[float] | str | None) -> tuple[float, ...]:
    """Levels from a sequence or 'a,b,c' text (None: LEVELS), each strictly between 0 and 1, sorted, distinct."""
    from ..errors import NeuronscopeError
    if levels is None:
        return LEVELS
    if isinstance(levels, str):
        try:
            vals = [float(x) for x in levels.replace(" ", "").split(",") if x]
        except ValueError:
            raise NeuronscopeError(f"Quantile levels are numbers separated by commas (e.g. 1e-7,1e-5,0.99999), got "
                                   f"'{levels}'.") from None
    else:
        vals = [float(x) for x in levels]
    if not vals or any(not (0.0 < v < 1.0) or v == 0.5 for v in vals):
        raise NeuronscopeError(f"Each quantile level must be strictly between 0 and 1 (and not 0.5), got {vals}.")
    return tuple(sorted(set(vals)))


def ranks_needed(levels: Sequence[float], n: int) -> int:
    """The extremes per side a run over n tokens must keep so that every level is exact: max ceil(p * n)."""
    return max(tail_rank(tail_of(lv)[1], n) for lv in levels) if n > 0 else 1


@dataclass(frozen=True)
class Level:
    """One quantile level over a corpus of n tokens with k extremes kept per side."""

    level: float
    n: int                # tokens
    tail: str             # 'low' or 'high'
    p: float              # tail probability
    rank: int             # r = ceil(p * n): the r-th most extreme value of the tail
    effective: float      # r / n (> p when the corpus is too small for the level)
    resolved: bool        # n * p >= 1 (the corpus resolves the level)
    kept: bool            # r <= k (the value is stored; else it is NaN)

    @property
    def mark(self) -> str:
        """'' for a resolved level, else a short reason shown beside the value."""
        if not self.kept:
            return f"not stored (rank {self.rank} > K)"
        if not self.resolved:
            return f"sample extreme (n*p = {self.p * self.n:.4g} < 1)"
        return ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mark"] = self.mark
        return d


class Levels:
    """The levels of one statistics run: their ranks over n tokens, which are resolved, which normalise."""

    def __init__(self, levels: Sequence[float], n_tokens: int, k: int | None = None):
        self.n = int(n_tokens)
        self.k = k
        self.items: list[Level] = []
        for lv in levels:
            side, p = tail_of(float(lv))
            r = tail_rank(p, self.n)
            eff = r / self.n if self.n else math.inf
            self.items.append(Level(float(lv), self.n, side, p, r, eff, covers(p, self.n),
                                    k is None or (r <= k and r <= self.n)))

    @property
    def levels(self) -> list[float]:
        return [x.level for x in self.items]

    def get(self, level: float) -> Level:
        for x in self.items:
            if math.isclose(x.level, float(level), rel_tol=1e-9, abs_tol=1e-12):
                return x
        from ..errors import NeuronscopeError
        raise NeuronscopeError(f"No quantile at level {level:g}; the stored levels are "
                               f"{', '.join(f'{x:g}' for x in self.levels)}.")

    def not_stored(self) -> list[float]:
        """Levels whose rank is beyond the K extremes kept (stored as NaN)."""
        return [x.level for x in self.items if not x.kept]

    def unresolved(self) -> list[float]:
        """Levels the corpus does not resolve (n * p < 1) or that are not stored (r > K)."""
        return [x.level for x in self.items if not (x.resolved and x.kept)]

    def most_extreme(self, tail: str, target: float = FIRE) -> Level:
        """The most extreme usable level of `tail` ('low'/'high') that is not beyond tail probability `target`:
        resolved and stored if any is, else the least extreme stored level of that tail."""
        side = [x for x in self.items if x.tail == tail and x.kept]
        if not side:
            from ..errors import NeuronscopeError
            raise NeuronscopeError(f"No stored quantile level in the {tail} tail to normalise by.")
        ok = [x for x in side if x.resolved and x.p >= target * (1 - 1e-9)]
        if ok:
            return min(ok, key=lambda x: x.p)
        return max(side, key=lambda x: x.p)

    def norm_levels(self) -> tuple[float, float]:
        """(high level, low level) that `normalise` divides by: 1 - 1e-5 and 1e-5 when resolved."""
        return self.most_extreme("high").level, self.most_extreme("low").level

    def strong_levels(self) -> tuple[float, float]:
        """(high level, low level) for "strengthen" steering: 1 - 1e-7 and 1e-7, or the most extreme resolved."""
        return self.most_extreme("high", STRONG).level, self.most_extreme("low", STRONG).level

    def to_manifest(self) -> dict[str, Any]:
        """What the manifest's stats section records about the levels."""
        hi, lo = self.norm_levels()
        return {"levels": self.levels, "level_ranks": [x.as_dict() for x in self.items],
                "unresolved_levels": self.unresolved(), "not_stored_levels": self.not_stored(),
                "normalised_by": {"pos": hi, "neg": lo}}


def normalise(acts: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Signed normalised activations: acts / hi where acts >= 0, acts / lo where acts < 0.

    hi, lo: positive divisors broadcastable against acts (|q| of the high and low normalisation levels, floored
    at TINY; see `divisors`). |result| > 1 means beyond that level; the sign is the polarity.
    """
    a = torch.as_tensor(acts).float()
    return torch.where(a >= 0, a / hi.to(a.device, torch.float32), a / lo.to(a.device, torch.float32))


def divisors(q_hi: torch.Tensor, q_lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_hi floored at TINY, -q_lo floored at TINY) as float32: the divisors of `normalise`. NaN (not stored)
    becomes TINY too, so the value reads as beyond the level rather than as NaN."""
    hi = torch.nan_to_num(q_hi.float(), nan=TINY).clamp_min(TINY)
    lo = torch.nan_to_num((-q_lo).float(), nan=TINY).clamp_min(TINY)
    return hi, lo
