"""The CPU fold of one batch of activations into the running extremes: a single pass, compiled with numba.

torch has no "append the values above this row's threshold" primitive, so on a CPU the torch fold (extremes.py)
spends most of its time in masks, index lists, scatters and transposes over the whole batch. This kernel reads each
activation once and, per neuron (row), in that one pass:

- adds it to shifted float64 sums (batch mean and sum of squared deviations, merged outside with Chan's formula);
- appends it to the row's top buffer if it beats the row's threshold (a value that at least K kept values reach),
  and frees slack when the buffer is full (`_compact`: a sampled cut, or an exact partition); the same for the
  negated value and the bottom buffer;
- pushes its exemplar key into the row's top-E min-heap when the key beats the heap's root (and the same for the
  negated value).

Rows are split into blocks handled by separate threads (`prange`), so every row is folded by one thread, in token
order: the result does not depend on the number of threads. The buffers' layout and meaning are the same as the
torch fold's (extremes.TopBuffer), so a state can move between the two.
"""
from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numba import njit, prange

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]

LOW = np.int64(1) << np.int64(32)
PAD = np.iinfo(np.int64).min
BLOCK = 64          # rows per task: their buffers' write positions stay in cache while the tokens stream by


@njit(cache=True, inline="always")
def _ordered(bits: np.int32) -> np.int64:
    """int32 bits of a float32 -> an int64 that sorts like the float."""
    b: np.int64 = np.int64(bits)
    if b < 0:
        b = b ^ 0x7FFFFFFF
    return b


@njit(cache=True, inline="always")
def _ordered_negated(bits: np.int32) -> np.int64:
    """_ordered of the float whose sign is flipped (int32 bits with the sign bit flipped, in int64 arithmetic)."""
    b: np.int64 = np.int64(bits)
    b = b - 2147483648 if b >= 0 else b + 2147483648
    if b < 0:
        b = b ^ 0x7FFFFFFF
    return b


@njit(cache=True)
def _compact(buf: F32, fill: I64, thr: F32, r: int, k: int) -> None:
    """Free slack in the full row r. First try a cheap cut: a threshold t read off a strided sample of the row so
    that about k + slack/4 values are >= t; if a counting pass confirms that at least k and at most k + slack/2 are,
    keep exactly those (so t is a valid threshold: k values >= t are kept) in one branch-free pass. Otherwise (ties,
    an unlucky sample, a short row) keep exactly the k largest by a partition. Either way no value that can still
    be among the k largest is dropped, so the final top-k is exact."""
    cap = buf.shape[1]
    slack = cap - k
    m = min(512, cap // 4)
    if m >= 16 and slack >= 4:
        step = cap // m
        smp = np.empty(m, np.float32)
        for i in range(m):
            smp[i] = buf[r, i * step]
        want = k + slack // 4
        j = m - (want * m + cap - 1) // cap       # ascending sample rank of the cut
        if j < 0:
            j = 0
        t = np.partition(smp, j)[j]
        cnt = 0
        for i in range(cap):
            cnt += buf[r, i] >= t
        if k <= cnt <= k + slack // 2:
            w = 0
            for i in range(cap):
                v = buf[r, i]
                buf[r, w] = v
                w += v >= t
            for i in range(w, cap):
                buf[r, i] = -np.inf
            fill[r] = w
            thr[r] = t
            return
    p = np.partition(buf[r], cap - k)
    for j in range(k):
        buf[r, j] = p[cap - k + j]
    for j in range(k, cap):
        buf[r, j] = -np.inf
    fill[r] = k
    thr[r] = p[cap - k]


@njit(cache=True, inline="always")
def _heap_push(heap: I64, r: int, key: np.int64) -> None:
    """Replace the root of row r's min-heap of keys with `key` (> root) and restore the heap."""
    e = heap.shape[1]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= e:
            break
        if c + 1 < e and heap[r, c + 1] < heap[r, c]:
            c += 1
        if heap[r, c] < key:
            heap[r, i] = heap[r, c]
            i = c
        else:
            break
    heap[r, i] = key


@njit(cache=True, inline="always")
def _enter(buf: F32, fill: I64, thr: F32, r: int, v: np.float32, k: int) -> bool:
    """Append v to row r's buffer if it beats the threshold (compacting a full row first); True if the threshold
    moved."""
    moved = False
    if v > thr[r]:
        if fill[r] == buf.shape[1]:
            _compact(buf, fill, thr, r, k)
            moved = True
        if v > thr[r]:
            buf[r, fill[r]] = v
            fill[r] += 1
    return moved


@njit(cache=True, inline="always")
def _offer(heap: I64, r: int, o: np.int64, lo: np.int64) -> bool:
    """Push the key of ordered value o at token key lo into row r's heap if it beats the root; True if it did."""
    if o >= (heap[r, 0] >> 32):
        key = o * LOW + lo
        if key > heap[r, 0]:
            _heap_push(heap, r, key)
            return True
    return False


@njit(cache=True, inline="always")
def _key_floor(heap: I64, r: int, tmp: I32, tmpf: F32) -> float:
    """A float32 that no value whose key can enter row r's heap is below: the root's value (-inf if padding)."""
    root = heap[r, 0]
    if root == PAD:
        return -np.inf
    o = root >> 32
    if o < 0:
        o = o ^ 0x7FFFFFFF
    tmp[0] = np.int32(o)
    floor: float = tmpf[0]
    return floor


@njit(parallel=True, cache=True, nogil=True)
def fold(acts: F32, bits: I32, low: I64, shift: F64, tbuf: F32, tfill: I64, tthr: F32, bbuf: F32, bfill: I64,
         bthr: F32, extop: I64, exbot: I64, s1: F64, s2: F64, k: int) -> None:
    """Fold acts [T, R] float32 (bits: the same memory as int32) at token keys `low` [T] (2**32 - 1 - index).

    shift [R] float64: subtracted before summing; s1, s2 [R] float64 receive sum(d) and sum(d*d), d = a - shift.
    tbuf/bbuf [R, cap], tfill/bfill [R] int64, tthr/bthr [R] float32: top buffers of the values and of the
    negated values. extop/exbot [R, E] int64: min-heaps of exemplar keys.

    Each block of rows keeps two float gates per row: `up` (no value below it can enter the top buffer or the top
    exemplars) and `dn` (the same for the bottom side, on the values themselves). The inner loop over a token's
    rows only sums and tests the gates, so it vectorises; the exact updates run for tokens that pass a gate.
    """
    t_n, r_n = acts.shape
    n_blocks = (r_n + BLOCK - 1) // BLOCK
    for b in prange(n_blocks):
        r0 = b * BLOCK
        w = min(r_n, r0 + BLOCK) - r0
        ls1 = np.zeros(BLOCK, np.float64)
        ls2 = np.zeros(BLOCK, np.float64)
        sh = np.empty(BLOCK, np.float64)
        up = np.empty(BLOCK, np.float32)
        dn = np.empty(BLOCK, np.float32)
        tmp = np.empty(1, np.int32)
        tmpf = tmp.view(np.float32)
        for j in range(w):
            r = r0 + j
            sh[j] = shift[r]
            up[j] = min(tthr[r], _key_floor(extop, r, tmp, tmpf))
            dn[j] = -min(bthr[r], _key_floor(exbot, r, tmp, tmpf))
        for t in range(t_n):
            row = acts[t, r0:r0 + w]
            hit = False
            for j in range(w):
                v = row[j]
                d = np.float64(v) - sh[j]
                ls1[j] += d
                ls2[j] += d * d
                hit |= (v >= up[j]) | (v <= dn[j])
            if not hit:
                continue
            lo = low[t]
            for j in range(w):
                v = row[j]
                if not ((v >= up[j]) | (v <= dn[j])):
                    continue
                r = r0 + j
                ch_up = _enter(tbuf, tfill, tthr, r, v, k) | _offer(extop, r, _ordered(bits[t, r]), lo)
                ch_dn = _enter(bbuf, bfill, bthr, r, -v, k) | _offer(exbot, r, _ordered_negated(bits[t, r]), lo)
                if ch_up:
                    up[j] = min(tthr[r], _key_floor(extop, r, tmp, tmpf))
                if ch_dn:
                    dn[j] = -min(bthr[r], _key_floor(exbot, r, tmp, tmpf))
        for j in range(w):
            s1[r0 + j] = ls1[j]
            s2[r0 + j] = ls2[j]


def warm_up() -> None:
    """Compile the kernel (about 10 s once; numba caches the machine code for later processes)."""
    acts = np.zeros((2, 3), np.float32)
    buf = np.full((3, 4), -np.inf, np.float32)
    heap = np.full((3, 2), PAD, np.int64)
    fold(acts, acts.view(np.int32), np.array([LOW - 1, LOW - 2]), np.zeros(3), buf, np.zeros(3, np.int64),
         np.full(3, -np.inf, np.float32), buf.copy(), np.zeros(3, np.int64), np.full(3, -np.inf, np.float32),
         heap, heap.copy(), np.zeros(3), np.zeros(3), 2)


if __name__ == "__main__":
    warm_up()
