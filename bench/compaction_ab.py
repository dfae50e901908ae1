"""A/B of the numba fold's compaction on real value distributions: the exact partition to K against the sampled
cut (stats/fold_cpu._compact). Rows: 10,000 real top values of 512 neurons of three layers (from a finished stats
run's stats_extremes.safetensors) plus 5,000 values resampled from them with 1% noise, shuffled.

    .venv/bin/python bench/compaction_ab.py ATLAS_DIR
"""

import sys

import numpy as np
import time
from safetensors.torch import load_file
from neuronscope.stats.fold_cpu import _compact
from numba import njit


@njit(cache=False)
def exact(buf, fill, thr, r, k):
    cap = buf.shape[1]
    p = np.partition(buf[r], cap - k)
    for j in range(k):
        buf[r, j] = p[cap - k + j]
    for j in range(k, cap):
        buf[r, j] = -np.inf
    fill[r] = k
    thr[r] = p[cap - k]


@njit(cache=False)
def run(f, buf, fill, thr, k):
    for r in range(buf.shape[0]):
        f(buf, fill, thr, r, k)


t = load_file(sys.argv[1] + "/stats_extremes.safetensors")
rows = []
rng = np.random.default_rng(0)
for l in (2, 14, 26):
    top = t[f"top.{l}"].numpy()[:512]  # [512, 10000] real values, sorted desc
    new = top[:, rng.integers(0, 10000, size=5000)] * (1 + 0.01 * rng.standard_normal((512, 5000))).astype(np.float32)
    rows.append(np.concatenate([top, new], 1)[:, rng.permutation(15000)].astype(np.float32))
B = np.ascontiguousarray(np.concatenate(rows))
for name, f in (("exact", exact), ("sampled", _compact), ("exact", exact), ("sampled", _compact)):
    buf = B.copy()
    fill = np.full(len(buf), 15000, np.int64)
    thr = np.full(len(buf), -np.inf, np.float32)
    run(f, buf[:2].copy(), fill[:2].copy(), thr[:2].copy(), 10000)
    a = time.perf_counter()
    run(f, buf, fill, thr, 10000)
    dt = time.perf_counter() - a
    print(
        name,
        f"{dt / len(buf) * 1e6:.1f} us/row",
        "fallback share",
        float((fill == 10000).mean()),
        "mean fill",
        fill.mean(),
    )
