"""Chance levels for the IRM analysis's findings: every finding is reported with a null distribution (its mean and
95th percentile) and a p-value, so that structure is told from what chance or any trained injection gives.

Three nulls:
- permutation: hidden indices permuted independently within each injected layer (destroys index alignment across
  layers, keeps each layer's values) for the striation share; random top-k sets for recurrence (family-wise: the
  most-recurrent index of a random draw) and for outlier coincidences (hypergeometric);
- random-init IRM: the same shape with untrained random weights (PyTorch's default init, last layer included), run on
  the same tokens: what the architecture and the residual's own structure give an untrained map;
- control runs: IRMs trained the same way on control data (shuffled or neutral text): what any trained injection
  shows through the residual stream, as opposed to what the alignment causes.

p-values are (1 + #null >= value) / (1 + n) for sampled nulls; exact for the hypergeometric one.

    s = striation_test(M, n=1000)      # NullTest(value, null_mean, null_p95, p_value, n, ...)
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Sequence

import torch

from ..errors import NeuronscopeError
from .metrics import index_share

if TYPE_CHECKING:
    from .model import IRM, IRMConfig

ALPHA = 0.05


@dataclass
class NullTest:
    """A finding's value against one null distribution: its size n (None for an exact one), mean, 95th percentile
    and the p-value (None when no null could be computed, with a note saying why)."""
    null: str
    value: float
    n: int | None
    null_mean: float | None
    null_p95: float | None
    p_value: float | None
    note: str | None = None
    chance_level: float | None = None       # the striation share chance gives (1 / layers)


@dataclass
class CoincidenceTest(NullTest):
    """Overlap of a run's top indices with an outlier ranking's top set (value = its size)."""
    overlap: list[int] = field(default_factory=list)


@dataclass
class IndexCount:
    """An index in the top k of `runs` runs, with its family-wise p-value."""
    index: int
    runs: int
    p_value: float


@dataclass
class RecurrenceSummary:
    """How often indices recur in the runs' top k against random top-k sets (value: the most runs of any index)."""
    null: str
    k: int
    runs: int
    hidden: int
    expected_per_index: float
    null_mean: float
    null_p95: float
    value: int
    p_value: float | None


@dataclass
class RecurrenceTest(RecurrenceSummary):
    """The recurrence test with its rows: every index in some run's top k, with its count and family-wise p."""
    indices: list[IndexCount] = field(default_factory=list)

    def summary(self) -> RecurrenceSummary:
        return RecurrenceSummary(**{f.name: getattr(self, f.name) for f in fields(RecurrenceSummary)})


def summarize(value: float, null: Sequence[float], kind: str) -> NullTest:
    """A finding's value against a sampled null distribution (larger = more structure)."""
    t = torch.as_tensor(list(null), dtype=torch.float64)
    t = t[torch.isfinite(t)]
    if t.numel() == 0:
        return NullTest(kind, float(value), 0, None, None, None)
    return NullTest(kind, float(value), int(t.numel()), float(t.mean()), float(torch.quantile(t, 0.95)),
                    (1 + int((t >= float(value) - 1e-12).sum())) / (1 + t.numel()))


def index_shares(Ms: torch.Tensor) -> torch.Tensor:
    """Index share of each matrix in a batch [n, L, H] (vectorised striation)."""
    Ms = Ms.double()
    n, L, H = Ms.shape
    grand = Ms.mean(dim=(1, 2), keepdim=True)
    total = ((Ms - grand) ** 2).sum(dim=(1, 2))
    ss_idx = L * ((Ms.mean(1, keepdim=True) - grand) ** 2).sum(dim=(1, 2))
    return torch.where(total > 0, ss_idx / total.clamp(min=1e-300), torch.full_like(total, float("nan")))


def permute_within_layers(M: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n copies of M [L, H], each row's hidden indices permuted independently: [n, L, H]."""
    L, H = M.shape
    idx = torch.rand(n, L, H, generator=generator).argsort(-1)
    return torch.gather(M.double().expand(n, L, H), 2, idx)


def striation_test(M: torch.Tensor, n: int = 1000, seed: int = 0) -> NullTest:
    """The striation (index) share of M [layers, H] against its within-layer permutation null."""
    if M.ndim != 2:
        raise NeuronscopeError("The striation test needs a [layers, hidden] matrix.")
    value = index_share(M)
    if M.shape[0] < 2:
        return NullTest("permutation", value, 0, None, None, None,
                        note="one injected layer: the index share is 1 by construction")
    g = torch.Generator().manual_seed(seed)
    null: list[float] = []
    for start in range(0, n, 100):
        null += index_shares(permute_within_layers(M, min(100, n - start), g)).tolist()
    out = summarize(value, null, "permutation of hidden indices within layers")
    out.chance_level = 1.0 / M.shape[0]
    return out


def recurrence_test(scores: Sequence[torch.Tensor], k: int, n: int = 2000, seed: int = 0) -> RecurrenceTest:
    """How often each index is in the top k of the runs' scores [H], against random top-k sets (family-wise null:
    the largest count of any index when every run's top k is a uniformly random k-subset)."""
    R = len(scores)
    if R == 0:
        raise NeuronscopeError("No runs to count recurrences over.")
    H = scores[0].numel()
    k = min(k, H)
    tops = [set(torch.topk(s.double(), k).indices.tolist()) for s in scores]
    counts: dict[int, int] = {}
    for t in tops:
        for h in t:
            counts[h] = counts.get(h, 0) + 1
    g = torch.Generator().manual_seed(seed)
    maxes = []
    for start in range(0, n, 200):
        m = min(200, n - start)
        idx = torch.rand(m, R, H, generator=g).argsort(-1)[..., :k]           # random top-k per run
        hit = torch.zeros(m, H, dtype=torch.long)
        hit.scatter_add_(1, idx.reshape(m, -1), torch.ones(m, R * k, dtype=torch.long))
        maxes += hit.amax(1).tolist()
    null = torch.tensor(maxes, dtype=torch.float64)
    rows = [IndexCount(h, c, (1 + int((null >= c).sum())) / (1 + null.numel()))
            for h, c in sorted(counts.items(), key=lambda x: (-x[1], x[0]))]
    return RecurrenceTest("random top-k sets (family-wise: the most recurrent index)", k, R, H, R * k / H,
                          float(null.mean()), float(torch.quantile(null, 0.95)), rows[0].runs if rows else 0,
                          rows[0].p_value if rows else None, rows)


def coincidence_test(top: Sequence[int], outlier_top: Sequence[int], hidden: int) -> CoincidenceTest:
    """Overlap of the IRM's top indices with an outlier ranking's top set, against the hypergeometric null."""
    from scipy.stats import hypergeom
    a, b = set(int(x) for x in top), set(int(x) for x in outlier_top)
    c = len(a & b)
    dist = hypergeom(hidden, len(b), len(a))
    return CoincidenceTest("hypergeometric (random top set)", c, None, float(dist.mean()), float(dist.ppf(0.95)),
                           float(dist.sf(c - 1)), overlap=sorted(a & b))


def random_init_irm(config: IRMConfig, seed: int) -> IRM:
    """An IRM of the same shape as `config` with PyTorch's default random init in every layer (none zeroed)."""
    from torch import nn
    from .model import IRM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        irm = IRM(config)
        out = irm.net[-1]
        assert isinstance(out, nn.Linear)
        out.reset_parameters()
    return irm


@torch.no_grad()
def mean_output(irm: IRM, X: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Mean IRM output [n_inject, H] over the read-site residual rows X [N, H]."""
    acc: torch.Tensor | None = None
    for i in range(0, X.shape[0], chunk):
        o: torch.Tensor = irm(X[i:i + chunk].to(next(irm.parameters()).device)).double().sum(0).cpu()
        acc = o if acc is None else acc + o
    assert acc is not None
    return (acc / X.shape[0]).float()


def survives(tests: Sequence[NullTest], alpha: float = ALPHA) -> bool | None:
    """True when every available null gives p < alpha; None when no null could be computed."""
    ps = [float(t.p_value) for t in tests if t.p_value is not None]
    if not ps:
        return None
    return all(p < alpha for p in ps)


__all__ = ["NullTest", "CoincidenceTest", "IndexCount", "RecurrenceSummary", "RecurrenceTest", "summarize",
           "striation_test", "recurrence_test", "coincidence_test", "random_init_irm", "mean_output", "survives",
           "index_shares", "permute_within_layers", "ALPHA"]
