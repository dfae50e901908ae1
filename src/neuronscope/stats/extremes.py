"""Running per-neuron extremes: exact top-K / bottom-K values, top-E exemplar positions, count, mean and variance.

One `LayerExtremes` per layer holds, for its N neurons:
- `top` [N, K] and `bot` [N, K] float32: the K largest values and the K largest of the negated values (so the K
  smallest), in no particular order while running (padding -inf when fewer than K were seen);
- `ex_top` / `ex_bot` [N, E] int64 *keys*: a key packs a float32 value (as an order-preserving int32) in the high
  32 bits and (2**32 - 1 - token index) in the low 32 bits, so keys are unique, sort like (value, then smaller token
  index first), and a top-E of keys is one exact, deterministic answer whatever the batch or shard order;
- count, mean and M2 (sum of squared deviations) in float64, merged per batch with Chan's formula.

New activations are buffered and folded in chunks; only candidates that can still enter a set (values at or above
the current K-th/E-th value) take part in the top-k of a fold, so the cost per token falls as the run goes on.
"""
from __future__ import annotations

import torch

LOW = 1 << 32
PAD_KEY = torch.iinfo(torch.int64).min


def ordered_int(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 that sorts like the floats (as int64)."""
    bits = x.contiguous().view(torch.int32)
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)


def from_ordered_int(o: torch.Tensor) -> torch.Tensor:
    o32 = o.to(torch.int32)
    bits = torch.where(o32 >= 0, o32, o32 ^ 0x7FFFFFFF)
    return bits.view(torch.float32)


def make_keys(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Keys for float32 `values` at global token indices `index` (same shape, or broadcastable)."""
    return ordered_int(values) * LOW + (LOW - 1 - index)


def split_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values float32, token index int64; -1 and NaN for padding) from keys."""
    pad = keys == PAD_KEY
    values = from_ordered_int(keys >> 32)
    index = (LOW - 1) - (keys & (LOW - 1))
    values = torch.where(pad, torch.full_like(values, float("nan")), values)
    index = torch.where(pad, torch.full_like(index, -1), index)
    return values, index


def sort_keys_desc(keys: torch.Tensor) -> torch.Tensor:
    return torch.sort(keys, dim=-1, descending=True).values


def _fold_values(state: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Top-K of rows of `state` [N, K] and `new` [N, C] (values only, unordered)."""
    k = state.shape[1]
    thr = state.min(dim=1).values                      # -inf while not full
    m = int((new >= thr.unsqueeze(1)).sum(dim=1).max())
    if m == 0:
        return state
    cand = new if m >= new.shape[1] else torch.topk(new, m, dim=1, sorted=False).values
    return torch.topk(torch.cat([state, cand], dim=1), k, dim=1, sorted=False).values


def _fold_keys(state: torch.Tensor, new: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Top-E keys of `state` [N, E] and of the values `new` [N, C] at token indices `index` [C]."""
    e = state.shape[1]
    thr_key = state.min(dim=1).values
    thr = torch.where(thr_key == PAD_KEY, torch.full_like(thr_key, 0).float() - float("inf"),
                      from_ordered_int(thr_key >> 32))
    m = int((new >= thr.unsqueeze(1)).sum(dim=1).max())
    if m == 0:
        return state
    if m >= new.shape[1]:
        keys = make_keys(new, index.unsqueeze(0))
    else:
        vals, pos = torch.topk(new, m, dim=1, sorted=False)
        keys = make_keys(vals, index[pos])
    return torch.topk(torch.cat([state, keys], dim=1), e, dim=1, sorted=False).values


class LayerExtremes:
    """The running statistics of one layer's neurons (see the module docstring)."""

    def __init__(self, n_neurons: int, k: int, n_exemplars: int, chunk: int | None = None):
        self.n, self.k, self.e = n_neurons, k, n_exemplars
        self.top = torch.full((n_neurons, k), float("-inf"))
        self.bot = torch.full((n_neurons, k), float("-inf"))
        self.ex_top = torch.full((n_neurons, n_exemplars), PAD_KEY, dtype=torch.int64)
        self.ex_bot = torch.full((n_neurons, n_exemplars), PAD_KEY, dtype=torch.int64)
        self.count = 0
        self.mean = torch.zeros(n_neurons, dtype=torch.float64)
        self.m2 = torch.zeros(n_neurons, dtype=torch.float64)
        self.chunk = chunk or max(1024, min(k, 8192))
        self._pending: list[torch.Tensor] = []
        self._pending_idx: list[torch.Tensor] = []
        self._pending_n = 0

    # ---- updates ----------------------------------------------------------------------------------------
    def add(self, acts: torch.Tensor, index: torch.Tensor) -> None:
        """acts [T, N] float32 at global token indices `index` [T] (int64)."""
        acts = acts.detach().to("cpu", torch.float32)
        x = acts.double()
        nb = x.shape[0]
        mb = x.mean(dim=0)
        m2b = ((x - mb) ** 2).sum(dim=0)
        if self.count == 0:
            self.mean, self.m2 = mb, m2b
        else:
            n = self.count + nb
            delta = mb - self.mean
            self.mean = self.mean + delta * (nb / n)
            self.m2 = self.m2 + m2b + delta * delta * (self.count * nb / n)
        self.count += nb
        self._pending.append(acts)
        self._pending_idx.append(index.to("cpu", torch.int64))
        self._pending_n += nb
        if self._pending_n >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        p = torch.cat(self._pending).t().contiguous()          # [N, C]
        idx = torch.cat(self._pending_idx)
        self._pending, self._pending_idx, self._pending_n = [], [], 0
        neg = -p
        self.top = _fold_values(self.top, p)
        self.bot = _fold_values(self.bot, neg)
        self.ex_top = _fold_keys(self.ex_top, p, idx)
        self.ex_bot = _fold_keys(self.ex_bot, neg, idx)

    # ---- results ----------------------------------------------------------------------------------------
    def sorted_top(self) -> torch.Tensor:
        """The K largest values, descending [N, K] (-inf padding at the end when fewer were seen)."""
        self.flush()
        return torch.sort(self.top, dim=1, descending=True).values

    def sorted_bottom(self) -> torch.Tensor:
        """The K smallest values, ascending [N, K] (+inf padding at the end)."""
        self.flush()
        return -torch.sort(self.bot, dim=1, descending=True).values

    def var(self) -> torch.Tensor:
        """Population variance (float64)."""
        return self.m2 / max(self.count, 1)

    # ---- (de)serialisation --------------------------------------------------------------------------------
    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        self.flush()
        return {f"{prefix}top": self.top, f"{prefix}bot": self.bot, f"{prefix}ex_top": self.ex_top,
                f"{prefix}ex_bot": self.ex_bot, f"{prefix}mean": self.mean, f"{prefix}m2": self.m2,
                f"{prefix}count": torch.tensor([self.count], dtype=torch.int64)}

    def load_state(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        self.top, self.bot = tensors[f"{prefix}top"].clone(), tensors[f"{prefix}bot"].clone()
        self.ex_top, self.ex_bot = tensors[f"{prefix}ex_top"].clone(), tensors[f"{prefix}ex_bot"].clone()
        self.mean, self.m2 = tensors[f"{prefix}mean"].clone(), tensors[f"{prefix}m2"].clone()
        self.count = int(tensors[f"{prefix}count"][0])

    def merge(self, other: "LayerExtremes") -> None:
        """Fold another run's statistics of the same layer into this one (exact for extremes and exemplars)."""
        self.flush()
        other.flush()
        k, e = self.k, self.e
        self.top = torch.topk(torch.cat([self.top, other.top], 1), k, dim=1, sorted=False).values
        self.bot = torch.topk(torch.cat([self.bot, other.bot], 1), k, dim=1, sorted=False).values
        self.ex_top = torch.topk(torch.cat([self.ex_top, other.ex_top], 1), e, dim=1, sorted=False).values
        self.ex_bot = torch.topk(torch.cat([self.ex_bot, other.ex_bot], 1), e, dim=1, sorted=False).values
        if other.count:
            if self.count == 0:
                self.mean, self.m2 = other.mean.clone(), other.m2.clone()
            else:
                n = self.count + other.count
                delta = other.mean - self.mean
                self.mean = self.mean + delta * (other.count / n)
                self.m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
            self.count += other.count
