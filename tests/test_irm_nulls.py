"""The chance levels of the IRM analysis: striated outputs get small p-values, noise gets large ones, under each
null (within-layer permutation, random top-k recurrence, hypergeometric coincidence)."""
from __future__ import annotations

import numpy as np
import torch

from neuronscope.irm.analysis import striation
from neuronscope.irm.nulls import (NullTest, coincidence_test, index_shares, random_init_irm, recurrence_test,
                                   striation_test, summarize, survives)


def _striated(L=12, H=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    col = torch.zeros(H)
    col[[7, 30]] = torch.tensor([5.0, -4.0])
    return col.repeat(L, 1) + 0.3 * torch.randn(L, H, generator=g)


def _noise(L=12, H=64, seed=0):
    return torch.randn(L, H, generator=torch.Generator().manual_seed(seed))


def test_vectorised_share_matches_striation():
    Ms = torch.stack([_noise(seed=s) for s in range(3)] + [_striated()])
    ref = torch.tensor([striation(M)["index_share"] for M in Ms], dtype=torch.float64)
    assert torch.allclose(index_shares(Ms), ref)


def test_striation_null_small_p_on_stripes_large_on_noise():
    s = striation_test(_striated(), n=500)
    assert s.p_value < 0.01 and s.value > s.null_p95 and abs(s.chance_level - 1 / 12) < 1e-9
    ps = [striation_test(_noise(seed=i), n=200, seed=i).p_value for i in range(20)]
    assert np.median(ps) > 0.2 and np.mean(np.array(ps) < 0.05) <= 0.2
    n = striation_test(_noise(), n=500)
    assert abs(n.null_mean - 1 / 12) < 0.03          # the permutation null sits at the chance level 1/layers


def test_recurrence_null():
    H, k = 64, 10
    g = torch.Generator().manual_seed(0)
    planted = []
    for _ in range(6):
        s = torch.rand(H, generator=g)
        s[42] = 10.0
        planted.append(s)
    r = recurrence_test(planted, k)
    assert r.indices[0].index == 42 and r.indices[0].runs == 6 and r.p_value < 0.01
    noise = recurrence_test([torch.rand(H, generator=g) for _ in range(6)], k)
    assert noise.p_value > 0.05
    assert abs(noise.expected_per_index - 6 * 10 / 64) < 1e-9


def test_coincidence_null():
    hit = coincidence_test(range(10), range(10), 576)
    assert hit.value == 10 and hit.p_value < 1e-10
    miss = coincidence_test(range(10), range(10, 20), 576)
    assert miss.value == 0 and miss.p_value == 1.0
    one = coincidence_test(range(10), [3] + list(range(100, 109)), 64)
    assert one.value == 1 and one.p_value > 0.5     # one overlap of 10 in 64 is what chance gives


def test_summarize_and_survives():
    s = summarize(5.0, list(range(100)), "x")
    assert s.n == 100 and abs(s.p_value - 96 / 101) < 1e-12
    def t(p):
        return NullTest("x", 1.0, 10, 0.0, 0.5, p)
    assert survives([t(0.01), t(0.03)]) is True
    assert survives([t(0.01), t(0.3)]) is False
    assert survives([t(None)]) is None


def test_random_init_irm_is_random_and_leaves_the_global_rng(stories):
    from neuronscope.irm import IRM
    base = IRM.for_subject(stories, "all", width=8)
    state = torch.random.get_rng_state()
    a, b = random_init_irm(base.config, 1), random_init_irm(base.config, 2)
    assert torch.equal(state, torch.random.get_rng_state())
    assert a.net[-1].weight.abs().sum() > 0 and not torch.equal(a.net[-1].weight, b.net[-1].weight)
