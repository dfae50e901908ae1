"""Extreme quantiles from the stored top-K / bottom-K values, with one exact, documented definition.

With n activations of a neuron and a level p < 1/2, let r = ceil(p * n) (at least 1). Then
    q(p)     = the r-th smallest activation  (sorted ascending, index r - 1),
    q(1 - p) = the r-th largest activation   (sorted descending, index r - 1).
So q(p) is numpy's "inverted_cdf" quantile at p, and q(1 - p) is the mirror image (-q(p) of the negated values); the
two tails are treated alike. The value is resolvable only when r <= K (the kept extremes) and r <= n; otherwise the
quantile is NaN and a warning says how many more values (a larger K) or fewer tokens it would need. Levels, ranks
and which levels a corpus resolves: levels.py.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from .levels import LEVELS, tail_of, tail_rank

LOW_LEVELS = tuple(x for x in LEVELS if x < 0.5)


def quantiles_from_extremes(top_desc: torch.Tensor, bottom_asc: torch.Tensor, n: int,
                            levels: Sequence[float] = LEVELS, warn: bool = True) -> torch.Tensor:
    """[len(levels), *batch] quantiles from sorted extremes top_desc/bottom_asc [..., K] of n values each."""
    k = top_desc.shape[-1]
    out = []
    for level in levels:
        side, p = tail_of(level)
        r = tail_rank(p, n)
        if n <= 0 or r > min(k, n):
            if warn:
                warnings.warn(f"The {level:g} quantile is not resolvable: it is rank {r} of {n} values but only "
                              f"{k} extremes are kept (use a larger K); stored as NaN.", stacklevel=2)
            out.append(torch.full(top_desc.shape[:-1], float("nan")))
            continue
        src = bottom_asc if side == "low" else top_desc
        out.append(src[..., r - 1].float())
    return torch.stack(out)
