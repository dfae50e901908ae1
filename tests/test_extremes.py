"""The running extremes (stats/extremes.py and the numba fold in stats/fold_cpu.py) against exact computations.

Random activations with heavy ties, drifting scales (so thresholds move and rows compact many times), batches of
uneven sizes: the CPU (numba) fold and the torch fold must both give exactly the top-K / bottom-K values and top-E
exemplar keys of a full sort, the same moments, and states that move between them.
"""
from __future__ import annotations

import pytest
import torch

from neuronscope.stats.extremes import PAD_KEY, LayerExtremes, make_keys, sort_keys_desc, split_keys

K, E, SLACK = 37, 5, 11


def data(seed: int, t: int = 900, n: int = 23) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, generator=g) * torch.linspace(0.2, 3.0, t).unsqueeze(1)  # growing scale: many entries
    x[:, 0] = torch.round(x[:, 0])                # heavy ties
    x[:, 1] = 0.0                                 # a dead neuron: all ties
    x[::7, 2] = -0.0                              # signed zeros
    x[:, 3] = torch.linspace(5, -5, t)            # decreasing: nothing enters the top after the start
    return x


def batches(x: torch.Tensor, sizes=(1, 5, 64, 3, 200, 17)):
    s, i = 0, 0
    while s < x.shape[0]:
        b = sizes[i % len(sizes)]
        yield x[s:s + b], torch.arange(s, min(s + b, x.shape[0]))
        s += b
        i += 1


def exact_keys(x: torch.Tensor, e: int) -> torch.Tensor:
    idx = torch.arange(x.shape[0]).unsqueeze(1).expand_as(x)
    return torch.sort(make_keys(x, idx).T, dim=1, descending=True).values[:, :e]


def run(x: torch.Tensor, device: str) -> LayerExtremes:
    st = LayerExtremes(x.shape[1], K, E, slack=SLACK, device=device)
    for a, idx in batches(x):
        st.add(a, idx)
    return st


def check_exact(st: LayerExtremes, x: torch.Tensor, tol: float = 1e-6) -> None:
    """tol: the moments' tolerance (the CPU fold sums in float64; the torch fold's batch moments are float32)."""
    full = torch.sort(x.T, dim=1, descending=True).values
    assert torch.equal(st.sorted_top(), full[:, :K])
    assert torch.equal(st.sorted_bottom(), full.flip(1)[:, :K])
    assert torch.equal(sort_keys_desc(st.ex_top), exact_keys(x, E))
    assert torch.equal(sort_keys_desc(st.ex_bot), exact_keys(-x, E))
    assert st.count == x.shape[0]
    assert torch.allclose(st.mean, x.double().mean(0), rtol=tol, atol=tol)
    assert torch.allclose(st.var(), x.double().var(0, unbiased=False), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", ["cpu", "meta-torch"])
def test_fold_equals_a_full_sort(device):
    x = data(0)
    if device == "meta-torch":     # the torch fold (what a GPU runs), forced on the CPU
        st = LayerExtremes(x.shape[1], K, E, slack=SLACK)
        for a, idx in batches(x):
            st._add_torch(a, idx)
        check_exact(st, x)
    else:
        check_exact(run(x, device), x, tol=1e-10)


def test_cpu_fold_with_sampled_compactions_equals_a_full_sort():
    """Rows long enough for the CPU fold's sampled cut (and its fall-back on ties and on the dead neuron)."""
    x = data(3, t=4000, n=9)
    st = LayerExtremes(x.shape[1], 300, 7, slack=120)
    for a, idx in batches(x, sizes=(250, 1, 999, 64)):
        st.add(a, idx)
    full = torch.sort(x.T, dim=1, descending=True).values
    assert torch.equal(st.sorted_top(), full[:, :300])
    assert torch.equal(st.sorted_bottom(), full.flip(1)[:, :300])
    assert torch.equal(sort_keys_desc(st.ex_top), exact_keys(x, 7))


def test_cpu_compaction_sampled_cut_and_exact_fallback():
    import numpy as np
    from neuronscope.stats.fold_cpu import _compact
    k, cap = 1000, 1500
    rng = np.random.default_rng(0)
    buf = np.stack([rng.standard_normal(cap).astype(np.float32),      # distinct values: the sampled cut
                    np.round(rng.standard_normal(cap)).astype(np.float32),  # heavy ties: the exact partition
                    np.zeros(cap, np.float32)])                       # all equal
    orig = buf.copy()
    fill = np.full(3, cap, np.int64)
    thr = np.full(3, -np.inf, np.float32)
    for r in range(3):
        _compact(buf, fill, thr, r, k)
        kept = buf[r, :fill[r]]
        assert k <= fill[r] <= k + (cap - k) // 2
        assert np.isneginf(buf[r, fill[r]:]).all()
        assert (kept >= thr[r]).all() and (orig[r] >= thr[r]).sum() >= k
        assert np.array_equal(np.sort(kept)[::-1][:k], np.sort(orig[r])[::-1][:k])
    assert fill[0] > k                  # the sampled cut ran (it keeps about k + slack/4)
    assert fill[1] == k and fill[2] == k    # ties: the exact partition keeps exactly k


def test_fewer_values_than_k_pad_and_exemplars_point_at_tokens():
    x = data(1, t=20)
    st = run(x, "cpu")
    top = st.sorted_top()
    assert torch.equal(top[:, :20], torch.sort(x.T, dim=1, descending=True).values)
    assert torch.isneginf(top[:, 20:]).all()
    vals, index = split_keys(sort_keys_desc(st.ex_top))
    assert torch.equal(vals, x[index, torch.arange(x.shape[1]).unsqueeze(1)])


def test_checkpoint_moves_between_folds_and_views_and_merge():
    x = data(2)
    half = 450
    cpu = LayerExtremes(x.shape[1], K, E, slack=SLACK)
    cpu.add(x[:half], torch.arange(half))
    # continue the CPU state with the torch fold, and a torch state with the CPU fold
    tor = LayerExtremes(x.shape[1], K, E, slack=SLACK)
    tor.load_state(cpu.state("p."), "p.")
    tor._add_torch(x[half:], torch.arange(half, x.shape[0]))
    check_exact(tor, x)
    back = LayerExtremes(x.shape[1], K, E, slack=SLACK)
    t2 = LayerExtremes(x.shape[1], K, E, slack=SLACK)
    t2._add_torch(x[:half], torch.arange(half))
    back.load_state(t2.state(""), "")
    back.add(x[half:], torch.arange(half, x.shape[0]))
    check_exact(back, x)
    # a state saved with another slack (GPU) continues exactly
    wide_slack = LayerExtremes(x.shape[1], K, E, slack=3 * K)
    wide_slack._add_torch(x[:half], torch.arange(half))
    narrow = LayerExtremes(x.shape[1], K, E, slack=SLACK)
    narrow.load_state(wide_slack.state(""), "")
    narrow.add(x[half:], torch.arange(half, x.shape[0]))
    check_exact(narrow, x)
    # row views share memory and split the state per layer
    parts = back.split(1)
    assert parts[0].ex_top.data_ptr() == back.ex_top.data_ptr()
    wide = LayerExtremes(2 * x.shape[1], K, E, slack=SLACK)
    for a, idx in batches(x):
        wide.add(torch.cat([a, -a], 1), idx)
    left, right = wide.split(2)
    check_exact(left, x)
    check_exact(right, -x)
    # merging two halves of the tokens gives the single run
    a = run(x[:half], "cpu")
    b = LayerExtremes(x.shape[1], K, E, slack=SLACK)
    for v, idx in batches(x[half:]):
        b.add(v, idx + half)
    a.merge(b)
    check_exact(a, x)
    a.add(x[:0], torch.arange(0))         # an empty batch is a no-op
    check_exact(a, x)


def test_bad_shapes_are_refused():
    st = LayerExtremes(4, 3, 2)
    with pytest.raises(ValueError):
        st.add(torch.zeros(5, 3), torch.arange(5))
    with pytest.raises(ValueError):
        st.add(torch.zeros(5, 4), torch.arange(4))
    assert (st.ex_top == PAD_KEY).all()
