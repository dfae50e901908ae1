"""Running per-neuron extremes: exact top-K / bottom-K values, top-E exemplar positions, count, mean and variance.

One `LayerExtremes` per layer holds, for its N neurons:
- `top` [N, K] and `bot` [N, K] float32: the K largest values and the K largest of the negated values (so the K
  smallest), in no particular order while running (padding -inf when fewer than K were seen);
- `ex_top` / `ex_bot` [N, E] int64 *keys*: a key packs a float32 value (as an order-preserving int32) in the high
  32 bits and (2**32 - 1 - token index) in the low 32 bits, so keys are unique, sort like (value, then smaller token
  index first), and a top-E of keys is one exact, deterministic answer whatever the batch or shard order;
- count, mean and M2 (sum of squared deviations) in float64, merged per batch with Chan's formula.

New activations are buffered and folded in chunks of about 2048 tokens. The values go into a `TopBuffer` with slack:
a value is appended only if it beats the row's threshold (the K-th largest at the last compaction), and a row is
compacted back to K (one top-k) only when its slack is full, so after the first K tokens the cost per token is a
comparison; exemplar keys use the same threshold idea with a small top-k per chunk.
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


class TopBuffer:
    """Exact running top-K values of each row, with slack so that a full top-k runs only now and then.

    `buf` [N, K + S]: per row, `fill` valid values (the rest -inf). A new value enters only if it is >= the row's
    threshold (the K-th largest at the row's last compaction, a lower bound of the final K-th largest, or -inf
    before the first), so after the first K values few do. When a row's slack runs out it is compacted back to its
    K largest (one top-k over that row only).
    """

    def __init__(self, n: int, k: int, slack: int):
        self.k, self.cap = k, k + max(1, slack)
        self.buf = torch.full((n, self.cap), float("-inf"))
        self.fill = torch.zeros(n, dtype=torch.int64)
        self.thr = torch.full((n,), float("-inf"))

    def _compact(self, rows: torch.Tensor) -> None:
        sub = self.buf.index_select(0, rows)
        top = torch.topk(sub, self.k, dim=1, sorted=False).values
        sub[:, :self.k] = top
        sub[:, self.k:] = float("-inf")
        self.buf[rows] = sub
        self.fill[rows] = self.k
        self.thr[rows] = top.min(dim=1).values

    def add(self, new: torch.Tensor) -> None:
        """Fold in new values [N, C]."""
        c = new.shape[1]
        f0 = int(self.fill[0])
        if f0 + c <= self.cap and bool(torch.isneginf(self.thr).all()) and bool((self.fill == f0).all()):
            # before the first compaction every value is kept: a plain copy
            self.buf[:, f0:f0 + c] = new
            self.fill += c
            return
        mask = new > self.thr.unsqueeze(1)
        cnt = mask.sum(dim=1)
        over = (self.fill + cnt) > self.cap
        if bool(over.any()):
            rows = over.nonzero().squeeze(1)
            self._compact(rows)
            mask[rows] = new[rows] > self.thr[rows].unsqueeze(1)
            cnt[rows] = mask[rows].sum(dim=1)
            still = (self.fill + cnt) > self.cap
            if bool(still.any()):   # more new candidates than slack: fold those rows directly
                r2 = still.nonzero().squeeze(1)
                both = torch.cat([self.buf[r2, :self.k], new[r2]], dim=1)
                top = torch.topk(both, self.k, dim=1, sorted=False).values
                self.buf[r2, :self.k] = top
                self.buf[r2, self.k:] = float("-inf")
                self.fill[r2] = self.k
                self.thr[r2] = top.min(dim=1).values
                mask[r2] = False
                cnt[r2] = 0
        if not bool(cnt.any()):
            return
        rr, cc = mask.nonzero(as_tuple=True)
        slot = (mask.cumsum(dim=1) - 1)[rr, cc] + self.fill[rr]
        self.buf[rr, slot] = new[rr, cc]
        self.fill += cnt

    def values(self) -> torch.Tensor:
        """The K largest of each row, unordered [N, K] (-inf padding when fewer were seen)."""
        if self.cap == self.k:
            return self.buf
        return torch.topk(self.buf, self.k, dim=1, sorted=False).values

    def set_values(self, vals: torch.Tensor) -> None:
        """Start from these K values per row (a finished run's extremes)."""
        self.buf[:, :self.k] = torch.sort(vals, dim=1, descending=True).values
        self.buf[:, self.k:] = float("-inf")
        self.fill = (vals > float("-inf")).sum(dim=1)
        full = self.fill >= self.k
        self.thr = torch.where(full, vals.min(dim=1).values, torch.full_like(self.thr, float("-inf")))

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}buf": self.buf, f"{prefix}fill": self.fill, f"{prefix}thr": self.thr}

    def load_state(self, t: dict[str, torch.Tensor], prefix: str) -> None:
        if t[f"{prefix}buf"].shape != self.buf.shape:
            raise ValueError("checkpoint buffer shape differs")
        self.buf, self.fill, self.thr = (t[f"{prefix}{n}"].clone() for n in ("buf", "fill", "thr"))


def _fold_keys(state: torch.Tensor, new: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Top-E keys of `state` [N, E] and of the values `new` [N, C] at token indices `index` [C].

    Only values >= max(the state's E-th value, the chunk's E-th value) can enter (ties included, since the key
    breaks them), so keys are made for those candidates only.
    """
    e, c = state.shape[1], new.shape[1]
    thr_key = state.min(dim=1).values
    thr = torch.where(thr_key == PAD_KEY, torch.full(thr_key.shape, float("-inf")),
                      from_ordered_int(thr_key >> 32))
    if c > e:
        vals, pos = torch.topk(new, e, dim=1, sorted=False)
        kth = vals.min(dim=1).values
        # the chunk's top-E is exactly its candidate set unless a row has ties at its E-th value
        if int((new >= kth.unsqueeze(1)).sum(dim=1).max()) == e:
            keep = vals >= thr.unsqueeze(1)
            if not bool(keep.any()):
                return state
            keys = torch.where(keep, make_keys(vals, index[pos]), torch.full_like(pos, PAD_KEY))
            return torch.topk(torch.cat([state, keys], dim=1), e, dim=1, sorted=False).values
        thr = torch.maximum(thr, kth)
    m = int((new >= thr.unsqueeze(1)).sum(dim=1).max())
    if m == 0:
        return state
    if m >= c:
        keys = make_keys(new, index.unsqueeze(0))
    else:
        vals, pos = torch.topk(new, m, dim=1, sorted=False)
        keys = make_keys(vals, index[pos])
    return torch.topk(torch.cat([state, keys], dim=1), e, dim=1, sorted=False).values


class LayerExtremes:
    """The running statistics of one layer's neurons (see the module docstring)."""

    def __init__(self, n_neurons: int, k: int, n_exemplars: int, chunk: int | None = None,
                 slack: int | None = None):
        self.n, self.k, self.e = n_neurons, k, n_exemplars
        slack = max(1024, k // 2) if slack is None else slack
        self._top = TopBuffer(n_neurons, k, slack)
        self._bot = TopBuffer(n_neurons, k, slack)
        self.ex_top = torch.full((n_neurons, n_exemplars), PAD_KEY, dtype=torch.int64)
        self.ex_bot = torch.full((n_neurons, n_exemplars), PAD_KEY, dtype=torch.int64)
        self.count = 0
        self.mean = torch.zeros(n_neurons, dtype=torch.float64)
        self.m2 = torch.zeros(n_neurons, dtype=torch.float64)
        self.chunk = chunk or 2048
        self._pending: list[torch.Tensor] = []
        self._pending_idx: list[torch.Tensor] = []
        self._pending_n = 0

    # ---- updates ----------------------------------------------------------------------------------------
    def add(self, acts: torch.Tensor, index: torch.Tensor) -> None:
        """acts [T, N] float32 at global token indices `index` [T] (int64)."""
        acts = acts.detach().to("cpu", torch.float32)
        nb = acts.shape[0]
        vb, mb = torch.var_mean(acts, dim=0, correction=0)
        mb = mb.double()
        m2b = vb.double() * nb
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
        self._top.add(p)
        self._bot.add(neg)
        self.ex_top = _fold_keys(self.ex_top, p, idx)
        self.ex_bot = _fold_keys(self.ex_bot, neg, idx)

    @property
    def top(self) -> torch.Tensor:
        """The K largest values so far, unordered [N, K]."""
        self.flush()
        return self._top.values()

    @top.setter
    def top(self, vals: torch.Tensor) -> None:
        self._top.set_values(vals)

    @property
    def bot(self) -> torch.Tensor:
        """The K largest negated values (the K smallest, negated), unordered [N, K]."""
        self.flush()
        return self._bot.values()

    @bot.setter
    def bot(self, vals: torch.Tensor) -> None:
        self._bot.set_values(vals)

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
        return {**self._top.state(f"{prefix}top."), **self._bot.state(f"{prefix}bot."), f"{prefix}ex_top": self.ex_top,
                f"{prefix}ex_bot": self.ex_bot, f"{prefix}mean": self.mean, f"{prefix}m2": self.m2,
                f"{prefix}count": torch.tensor([self.count], dtype=torch.int64)}

    def load_state(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        self._top.load_state(tensors, f"{prefix}top.")
        self._bot.load_state(tensors, f"{prefix}bot.")
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
