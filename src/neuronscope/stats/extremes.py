"""Running per-neuron extremes: exact top-K / bottom-K values, top-E exemplar positions, count, mean and variance.

One `LayerExtremes` holds, for its rows (the neurons of one layer, or of all layers at once on a GPU):
- `top` [N, K] and `bot` [N, K] float32: the K largest values and the K largest of the negated values (so the K
  smallest), in no particular order while running (padding -inf when fewer than K were seen);
- `ex_top` / `ex_bot` [N, E] int64 *keys*: a key packs a float32 value (as an order-preserving int32) in the high
  32 bits and (2**32 - 1 - token index) in the low 32 bits, so keys are unique, sort like (value, then smaller token
  index first), and a top-E of keys is one exact, deterministic answer whatever the batch or shard order;
- count, mean and M2 (sum of squared deviations) in float64, merged per batch with Chan's formula.

Values go into a `TopBuffer` with slack: a value is appended only if it beats the row's threshold (the K-th largest
at the row's last compaction, a lower bound of the final K-th largest), and a row is compacted back to its K largest
only when its slack is full, so after the first K values few enter and the cost per activation is a comparison.

Two folds implement this, with the same state layout: on a CPU, `fold_cpu.fold` (numba) does everything for a batch
in one pass over the activations; on other devices (a GPU) the torch fold below works on whole tensors, folding all
layers at once. A state saved by one can be continued by the other.
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

    `buf` [N, K + S]: per row, `fill` valid values (the rest -inf). A new value enters only if it is > the row's
    threshold: the K-th largest at the row's last compaction, a lower bound of the final K-th largest, or -inf
    before the first (a value equal to it cannot change the multiset of the K largest), so after the first K values
    few do. When a row's slack runs out it is compacted back to its
    K largest (one top-k over that row only).
    """

    def __init__(self, n: int, k: int, slack: int, device: torch.device | str = "cpu"):
        self.k, self.cap = k, k + max(1, slack)
        self.buf = torch.full((n, self.cap), float("-inf"), device=device)
        self.fill = torch.zeros(n, dtype=torch.int64, device=device)
        self.thr = torch.full((n,), float("-inf"), device=device)

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
        self.buf[rr, _slots(rr, cnt) + self.fill[rr]] = new[rr, cc]
        self.fill += cnt

    def values(self) -> torch.Tensor:
        """The K largest of each row, unordered [N, K] (-inf padding when fewer were seen)."""
        if self.cap == self.k:
            return self.buf
        return torch.topk(self.buf, self.k, dim=1, sorted=False).values

    def set_values(self, vals: torch.Tensor) -> None:
        """Start from these K values per row (a finished run's extremes)."""
        vals = vals.to(self.buf.device)
        self.buf[:, :self.k] = torch.sort(vals, dim=1, descending=True).values
        self.buf[:, self.k:] = float("-inf")
        self.fill.copy_((vals > float("-inf")).sum(dim=1))
        full = self.fill >= self.k
        self.thr.copy_(torch.where(full, vals.min(dim=1).values, torch.full_like(self.thr, float("-inf"))))

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}buf": self.buf, f"{prefix}fill": self.fill, f"{prefix}thr": self.thr}

    def load_state(self, t: dict[str, torch.Tensor], prefix: str) -> None:
        """Copy a saved state in place (so that views of a larger buffer are filled too). A state saved with another
        slack (a GPU run continued on a CPU) is reduced to its K largest values per row, which is exact."""
        buf = t[f"{prefix}buf"]
        if buf.shape[0] != self.buf.shape[0] or buf.shape[1] < self.k:
            raise ValueError("checkpoint buffer shape differs")
        if buf.shape != self.buf.shape:
            self.set_values(torch.topk(buf, self.k, dim=1, sorted=False).values)
            return
        for n in ("buf", "fill", "thr"):
            getattr(self, n).copy_(t[f"{prefix}{n}"])

    def rows(self, start: int, n: int) -> "TopBuffer":
        """A view of rows [start, start + n) that shares this buffer's memory."""
        v = TopBuffer.__new__(TopBuffer)
        v.k, v.cap = self.k, self.cap
        v.buf, v.fill, v.thr = (t.narrow(0, start, n) for t in (self.buf, self.fill, self.thr))
        return v


def _slots(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """For the row ids of a row-major `nonzero` (each row's entries consecutive) and the entries per row: each
    entry's rank within its row, 0, 1, 2..."""
    return torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]


def _fold_keys(state: torch.Tensor, new: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Top-E keys of `state` [N, E] and of the values `new` [N, C] at token indices `index` [C].

    Once every row's state is full, only values >= the row's E-th value can enter, and after the first few
    thousand tokens those are rare: they are picked out with one comparison and merged through a small padded
    matrix. Otherwise (the first batches, or a row with a burst of candidates) the dense path below runs.
    """
    e, c = state.shape[1], new.shape[1]
    thr_key = state.min(dim=1).values
    if c > e and not bool((thr_key == PAD_KEY).any()):
        mask = new >= from_ordered_int(thr_key >> 32).unsqueeze(1)
        cnt = mask.sum(dim=1)
        m = int(cnt.max())
        if m == 0:
            return state
        if m <= 4 * e:
            rr, cc = mask.nonzero(as_tuple=True)
            pad = torch.full((state.shape[0], m), PAD_KEY, dtype=torch.int64, device=state.device)
            pad[rr, _slots(rr, cnt)] = make_keys(new[rr, cc], index[cc])
            return torch.topk(torch.cat([state, pad], dim=1), e, dim=1, sorted=False).values
    return _fold_keys_dense(state, new, index, thr_key)


def _fold_keys_dense(state: torch.Tensor, new: torch.Tensor, index: torch.Tensor,
                     thr_key: torch.Tensor) -> torch.Tensor:
    """_fold_keys by a top-E of each row of the new values (thr_key: each row's smallest key in `state`).

    Only values >= max(the state's E-th value, the chunk's E-th value) can enter (ties included, since the key
    breaks them), so keys are made for those candidates only.
    """
    e, c = state.shape[1], new.shape[1]
    thr = torch.where(thr_key == PAD_KEY, torch.full(thr_key.shape, float("-inf"), device=state.device),
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


def default_slack(k: int) -> int:
    """Free places per row beyond K: a compaction (one partition of the row) runs once per `slack` entries.
    Small K (a state sized by the question) gets a small slack too, so the state follows K."""
    return max(256, k // 2)


class LayerExtremes:
    """The running statistics of a set of neurons (rows); see the module docstring.

    device: where the state lives and the fold runs. fold: "numba" (CPU only) or "torch"; default numba on a CPU.
    """

    def __init__(self, n_neurons: int, k: int, n_exemplars: int, slack: int | None = None,
                 device: torch.device | str = "cpu", fold: str | None = None):
        self.n, self.k, self.e = n_neurons, k, n_exemplars
        self.device = torch.device(device)
        self.fold = fold or ("numba" if self.device.type == "cpu" else "torch")
        if self.fold not in ("numba", "torch") or (self.fold == "numba" and self.device.type != "cpu"):
            raise ValueError(f"fold must be 'torch', or 'numba' on a CPU; got {fold!r} on {self.device}")
        slack = default_slack(k) if slack is None else slack
        self._top = TopBuffer(n_neurons, k, slack, self.device)
        self._bot = TopBuffer(n_neurons, k, slack, self.device)
        self._ex_top = torch.full((n_neurons, n_exemplars), PAD_KEY, dtype=torch.int64, device=self.device)
        self._ex_bot = torch.full((n_neurons, n_exemplars), PAD_KEY, dtype=torch.int64, device=self.device)
        self._heaps = True          # ex_top / ex_bot rows are min-heaps (what the CPU fold needs)
        self.count = 0
        self.mean = torch.zeros(n_neurons, dtype=torch.float64, device=self.device)
        self.m2 = torch.zeros(n_neurons, dtype=torch.float64, device=self.device)

    @staticmethod
    def state_bytes(n_neurons: int, k: int, n_exemplars: int, slack: int | None = None) -> int:
        """Memory the state of n_neurons rows takes."""
        slack = default_slack(k) if slack is None else slack
        return n_neurons * (2 * (k + slack) * 4 + 2 * n_exemplars * 8 + 2 * 8 + 2 * 12)

    # ---- exemplar keys ---------------------------------------------------------------------------------------
    @property
    def ex_top(self) -> torch.Tensor:
        return self._ex_top

    @ex_top.setter
    def ex_top(self, keys: torch.Tensor) -> None:
        self._ex_top = keys.to(self.device)
        self._heaps = False

    @property
    def ex_bot(self) -> torch.Tensor:
        return self._ex_bot

    @ex_bot.setter
    def ex_bot(self, keys: torch.Tensor) -> None:
        self._ex_bot = keys.to(self.device)
        self._heaps = False

    def _make_heaps(self) -> None:
        if not self._heaps:         # an ascending row is a min-heap
            self._ex_top.copy_(torch.sort(self._ex_top, dim=1).values)
            self._ex_bot.copy_(torch.sort(self._ex_bot, dim=1).values)
            self._heaps = True

    # ---- updates ----------------------------------------------------------------------------------------
    def add(self, acts: torch.Tensor, index: torch.Tensor) -> None:
        """Fold in acts [T, N] (any float dtype; compared as float32) at global token indices `index` [T]."""
        acts = acts.detach().to(self.device, torch.float32)
        index = index.to(self.device, torch.int64)
        if acts.ndim != 2 or acts.shape[1] != self.n or index.shape != (acts.shape[0],):
            raise ValueError(f"expected activations [T, {self.n}] and indices [T], got {tuple(acts.shape)} and "
                             f"{tuple(index.shape)}")
        if acts.shape[0] == 0:
            return
        if self.fold == "numba":
            self._add_cpu(acts.contiguous(), index)
        else:
            self._add_torch(acts, index)

    def _merge_moments(self, nb: int, mb: torch.Tensor, m2b: torch.Tensor) -> None:
        if self.count == 0:
            self.mean, self.m2 = mb, m2b
        else:
            n = self.count + nb
            delta = mb - self.mean
            self.mean = self.mean + delta * (nb / n)
            self.m2 = self.m2 + m2b + delta * delta * (self.count * nb / n)
        self.count += nb

    def _add_cpu(self, acts: torch.Tensor, index: torch.Tensor) -> None:
        from .fold_cpu import fold
        self._make_heaps()
        nb = acts.shape[0]
        shift = self.mean if self.count else acts[0].double()
        s1 = torch.empty(self.n, dtype=torch.float64)
        s2 = torch.empty(self.n, dtype=torch.float64)
        a = acts.numpy()
        threads = torch.get_num_threads()
        try:
            fold(a, a.view("int32"), ((LOW - 1) - index).numpy(), shift.contiguous().numpy(),
                 self._top.buf.numpy(), self._top.fill.numpy(), self._top.thr.numpy(),
                 self._bot.buf.numpy(), self._bot.fill.numpy(), self._bot.thr.numpy(),
                 self._ex_top.numpy(), self._ex_bot.numpy(), s1.numpy(), s2.numpy(), self.k)
        finally:
            if torch.get_num_threads() != threads:  # numba's OpenMP layer set this thread's OpenMP thread count
                torch.set_num_threads(threads)
        mb = shift + s1 / nb
        m2b = (s2 - s1 * s1 / nb).clamp_min(0.0)
        self._merge_moments(nb, mb, m2b)

    def _add_torch(self, acts: torch.Tensor, index: torch.Tensor) -> None:
        nb = acts.shape[0]
        vb, mb = torch.var_mean(acts, dim=0, correction=0)
        self._merge_moments(nb, mb.double(), vb.double() * nb)
        p = acts.t().contiguous()                               # [N, T]
        self._top.add(p)
        self._ex_top = _fold_keys(self._ex_top, p, index)
        p = torch.neg(p)                                        # never in place: p may be a view of acts
        self._bot.add(p)
        self._ex_bot = _fold_keys(self._ex_bot, p, index)
        self._heaps = False

    @property
    def top(self) -> torch.Tensor:
        """The K largest values so far, unordered [N, K]."""
        return self._top.values()

    @top.setter
    def top(self, vals: torch.Tensor) -> None:
        self._top.set_values(vals)

    @property
    def bot(self) -> torch.Tensor:
        """The K largest negated values (the K smallest, negated), unordered [N, K]."""
        return self._bot.values()

    @bot.setter
    def bot(self, vals: torch.Tensor) -> None:
        self._bot.set_values(vals)

    # ---- results ----------------------------------------------------------------------------------------
    def sorted_top(self) -> torch.Tensor:
        """The K largest values, descending [N, K] (-inf padding at the end when fewer were seen)."""
        return torch.sort(self.top, dim=1, descending=True).values

    def sorted_bottom(self) -> torch.Tensor:
        """The K smallest values, ascending [N, K] (+inf padding at the end)."""
        return -torch.sort(self.bot, dim=1, descending=True).values

    def var(self) -> torch.Tensor:
        """Population variance (float64)."""
        return self.m2 / max(self.count, 1)

    # ---- views and devices ----------------------------------------------------------------------------------
    def rows(self, start: int, n: int) -> "LayerExtremes":
        """A view of rows [start, start + n) sharing this state's memory (for per-layer checkpoints and results)."""
        v = LayerExtremes.__new__(LayerExtremes)
        v.n, v.k, v.e, v.device, v._heaps, v.count = n, self.k, self.e, self.device, self._heaps, self.count
        v.fold = self.fold
        v._top, v._bot = self._top.rows(start, n), self._bot.rows(start, n)
        v._ex_top, v._ex_bot, v.mean, v.m2 = (t.narrow(0, start, n) for t in
                                              (self._ex_top, self._ex_bot, self.mean, self.m2))
        return v

    def split(self, parts: int) -> list["LayerExtremes"]:
        """Equal row views (all layers folded at once -> one view per layer)."""
        if self.n % parts:
            raise ValueError(f"{self.n} rows do not split into {parts} equal parts")
        m = self.n // parts
        return [self.rows(i * m, m) for i in range(parts)]

    def to(self, device: torch.device | str) -> "LayerExtremes":
        """A copy of this state on another device."""
        out = LayerExtremes(self.n, self.k, self.e, slack=self._top.cap - self.k, device=device)
        out.load_state(self.state(""), "")
        return out

    # ---- (de)serialisation --------------------------------------------------------------------------------
    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The whole running state as CPU tensors (a checkpoint)."""
        out = {**self._top.state(f"{prefix}top."), **self._bot.state(f"{prefix}bot."), f"{prefix}ex_top": self._ex_top,
               f"{prefix}ex_bot": self._ex_bot, f"{prefix}mean": self.mean, f"{prefix}m2": self.m2,
               f"{prefix}count": torch.tensor([self.count], dtype=torch.int64)}
        return {k: v.cpu() for k, v in out.items()}

    def load_state(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        """Load a checkpoint in place (into views too)."""
        self._top.load_state(tensors, f"{prefix}top.")
        self._bot.load_state(tensors, f"{prefix}bot.")
        for name in ("ex_top", "ex_bot", "mean", "m2"):
            src = tensors[f"{prefix}{name}"]
            dst = getattr(self, name)
            if src.shape != dst.shape:
                raise ValueError("checkpoint shape differs")
            dst.copy_(src)
        self._heaps = False
        self.count = int(tensors[f"{prefix}count"][0])

    def merge(self, other: "LayerExtremes") -> None:
        """Fold another run's statistics of the same rows into this one (exact for extremes and exemplars)."""
        k, e = self.k, self.e
        dev = self.device
        self.top = torch.topk(torch.cat([self.top, other.top.to(dev)], 1), k, dim=1, sorted=False).values
        self.bot = torch.topk(torch.cat([self.bot, other.bot.to(dev)], 1), k, dim=1, sorted=False).values
        self.ex_top = torch.topk(torch.cat([self.ex_top, other.ex_top.to(dev)], 1), e, dim=1, sorted=False).values
        self.ex_bot = torch.topk(torch.cat([self.ex_bot, other.ex_bot.to(dev)], 1), e, dim=1, sorted=False).values
        if other.count:
            self._merge_moments(other.count, other.mean.to(dev).clone(), other.m2.to(dev).clone())
