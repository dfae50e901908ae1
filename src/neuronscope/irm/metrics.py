"""Measures of an IRM's mean output M [injected layers, hidden]: the striation split, each hidden index's share of
it, index strengths, and the degeneracy check every analysis applies first.

This module imports nothing else of irm/, so analysis.py, nulls.py and compare.py all depend on it one way.

    striation(M)["index_share"]     # fraction of the variance of M explained by the hidden index alone
    per_index_share(M)              # [H]: each index's part of that fraction (they sum to the index share)
    degeneracy(M)                   # None, or one sentence saying why M cannot be analysed
"""
from __future__ import annotations

import math

import torch


def striation(M: torch.Tensor) -> dict[str, float]:
    """Two-way variance split of M [layers, H]: fractions explained by hidden index (columns) and by layer (rows).

    index_share near 1 = vertical striations (the same hidden index is large in every layer). All three are nan when
    M is constant (no variance to split)."""
    M = M.double()
    L, H = M.shape
    grand = M.mean()
    total = float(((M - grand) ** 2).sum())
    if total == 0 or not math.isfinite(total):
        return {"index_share": float("nan"), "layer_share": float("nan"), "residual_share": float("nan")}
    ss_idx = float(L * ((M.mean(0) - grand) ** 2).sum())
    ss_layer = float(H * ((M.mean(1) - grand) ** 2).sum())
    return {"index_share": ss_idx / total, "layer_share": ss_layer / total,
            "residual_share": max(0.0, 1 - (ss_idx + ss_layer) / total)}


def index_share(M: torch.Tensor) -> float:
    """The striation share of M [layers, H] (nan for a constant M)."""
    return float(striation(M)["index_share"])


def per_index_share(M: torch.Tensor) -> torch.Tensor:
    """Each hidden index's share of the variance of M [layers, H]: L (mean_h - grand)^2 / total, [H] float64.

    The shares sum to the index (striation) share; an index that is large in every layer has a large share. A
    constant M gives nan everywhere."""
    M = M.double()
    L = M.shape[0]
    grand = M.mean()
    total = float(((M - grand) ** 2).sum())
    if total == 0 or not math.isfinite(total):
        return torch.full((M.shape[1],), float("nan"), dtype=torch.float64)
    return L * (M.mean(0) - grand) ** 2 / total


def index_scores(M: torch.Tensor) -> torch.Tensor:
    """Strength of each hidden index: root-mean-square over injected layers of the mean output [H]."""
    return M.double().pow(2).mean(0).sqrt()


def top_indices(M: torch.Tensor, k: int) -> list[int]:
    """The k strongest hidden indices (index_scores), strongest first."""
    idx: list[int] = torch.topk(index_scores(M), min(k, M.shape[1])).indices.tolist()
    return idx


def degeneracy(M: torch.Tensor, *, rel_tol: float = 1e-6) -> str | None:
    """Why a run's mean output M cannot be analysed, or None when it can.

    Degenerate: any NaN or infinity, all zero, or constant (every entry within rel_tol x max|M| of the mean): its
    striation share is nan or meaningless and its "top indices" are ties in index order."""
    M = M.double()
    if M.numel() == 0:
        return "its output is empty"
    if not bool(torch.isfinite(M).all()):
        return "its output holds NaN or infinite values"
    peak = float(M.abs().max())
    if peak == 0:
        return "its output is all zero (the IRM writes nothing)"
    if float((M - M.mean()).abs().max()) <= rel_tol * peak:
        return "its output is constant (the same value at every layer and index)"
    return None


__all__ = ["striation", "index_share", "per_index_share", "index_scores", "top_indices", "degeneracy"]
