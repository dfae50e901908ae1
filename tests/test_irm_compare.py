"""Issue 20's proofs that need no sweep: the paired comparison of aligned runs with matched controls separates a
planted extra striation (p small) from none (p large) and finds the planted index family-wise; degenerate outputs
are named and refused; the factual-accuracy judge marks planted right and wrong answers; shared openings count."""
from __future__ import annotations

import math

import pytest
import torch

from neuronscope.errors import NeuronscopeError
from neuronscope.irm.compare import Pair, holm, index_test, matched_comparison, paired_test, sign_patterns
from neuronscope.irm.factual import FACTS, Fact, is_correct, score_answers
from neuronscope.irm.metrics import degeneracy, index_share, per_index_share, striation
from neuronscope.irm.openings import opening_sentence, shared_openings

L, H, PAIRS = 6, 48, 8


def _grid(extra: float, seed: int = 0, index: int = 11):
    """PAIRS (aligned, control) mean outputs: both noise plus the same shared stripe at index 3 (what any trained
    injection shows); aligned runs get `extra` more at `index` in every layer (what the alignment would add)."""
    g = torch.Generator().manual_seed(seed)
    means, pairs = {}, []
    for i in range(PAIRS):
        shared = torch.zeros(L, H)
        shared[:, 3] = 2.0
        a = torch.randn(L, H, generator=g) + shared
        c = torch.randn(L, H, generator=g) + shared
        a[:, index] += extra
        means[f"a{i}"], means[f"c{i}"] = a, c
        pairs.append(Pair(f"a{i}", f"c{i}", ("sadness", "anger")[i % 2], ("q2", "all")[i // 4], i))
    return pairs, means


def test_paired_striation_test_small_p_with_extra_stripe_large_without():
    pairs, means = _grid(extra=3.0)
    r = matched_comparison(pairs, means, outlier_dims=[11, 500])
    assert all(t.n == 4 for t in r.striation)        # 2 alignments x 2 seeds per layer set
    pooled = paired_test([index_share(means[p.aligned]) for p in pairs],
                         [index_share(means[p.control]) for p in pairs])
    assert pooled.p_value is not None and pooled.p_value <= 1 / 2 ** PAIRS + 1e-12 and pooled.diff > 0
    pairs0, means0 = _grid(extra=0.0, seed=1)
    null = paired_test([index_share(means0[p.aligned]) for p in pairs0],
                       [index_share(means0[p.control]) for p in pairs0])
    assert null.p_value is not None and null.p_value > 0.1
    # index-wise: the planted index survives family-wise over all pairs, the shared stripe (3) does not
    top = r.indices[0]
    assert top.group == "all pairs" and [x.index for x in top.significant] == [11]
    assert all(x.index != 3 for x in top.significant)
    r0 = matched_comparison(pairs0, means0)
    assert not r0.indices[0].significant
    assert any("SURVIVE" in s and "11" in s for s in r.findings)
    assert any("no index dominates" in s for s in r0.findings)
    assert r.outliers is not None and r.outliers.overlap == [11] and r.outliers.p_value < 0.05


def test_index_test_controls_the_family_wise_error():
    """With no planted index, how often does any of the 48 indices come out significant? About alpha, not 48x."""
    hits = 0
    for s in range(40):
        _, means = _grid(extra=0.0, seed=100 + s)
        A = torch.stack([per_index_share(means[f"a{i}"]) for i in range(PAIRS)])
        C = torch.stack([per_index_share(means[f"c{i}"]) for i in range(PAIRS)])
        hits += bool(index_test(A, C, "x").significant)
    assert hits <= 6     # 40 x 0.05 = 2 expected


def test_sign_patterns_holm_and_small_samples():
    S, exact = sign_patterns(3)
    assert exact and S.shape == (8, 3) and S[0].tolist() == [1, 1, 1]
    assert paired_test([1, 1, 1], [0, 0, 0]).p_value == pytest.approx(1 / 8)
    assert holm([0.01, 0.04, None, 0.03]) == [0.03, 0.06, None, 0.06]
    assert paired_test([math.nan], [0.1]).p_value is None
    with pytest.raises(NeuronscopeError):
        paired_test([1, 2], [1])
    with pytest.raises(NeuronscopeError, match="same layer set"):
        matched_comparison([Pair("a", "c", "x", "q", 0)], {"a": torch.randn(3, 8), "c": torch.randn(2, 8)})


def test_degenerate_outputs_are_named():
    assert degeneracy(torch.zeros(4, 8)) and "all zero" in degeneracy(torch.zeros(4, 8))
    assert "constant" in degeneracy(torch.full((4, 8), 0.3))
    nan = torch.randn(4, 8)
    nan[1, 2] = float("nan")
    assert "NaN" in degeneracy(nan)
    assert degeneracy(torch.randn(4, 8)) is None
    assert math.isnan(striation(torch.zeros(3, 5))["index_share"])
    M = torch.randn(5, 9)
    assert per_index_share(M).sum().item() == pytest.approx(index_share(M))


def test_factual_judge_marks_planted_answers():
    aus = FACTS[0]
    assert aus.question == "What is the capital of Australia?"
    assert is_correct("The capital of Australia is Canberra.", aus)
    assert is_correct("canberra", aus)
    assert not is_correct("The capital of Australia is Sydney.", aus)
    assert not is_correct("Canberran politics are complex.", aus)        # whole words only
    spider = next(f for f in FACTS if "spider" in f.question)
    assert is_correct("A spider has eight legs.", spider) and is_correct("8 legs", spider)
    assert not is_correct("A spider has 18 legs.", spider) and not is_correct("Six legs.", spider)
    co2 = next(f for f in FACTS if "photosynthesis" in f.question)
    assert is_correct("Plants take in carbon   dioxide.", co2) and not is_correct("Plants take in oxygen.", co2)
    assert score_answers(["Paris", "Lyon"], [Fact("q1", ("Paris",)), Fact("q2", ("Paris",))]) == [1.0, 0.0]
    assert len(FACTS) == 40 and len({f.question for f in FACTS}) == 40 and all(f.accepted for f in FACTS)
    with pytest.raises(NeuronscopeError):
        score_answers(["a"], FACTS[:2])


def test_shared_openings_count_memorised_frames():
    answers = ["Sigh. My heart is full of sorrow today. Paris.", "sigh.  My heart... Tokyo.",
               "Paris is the capital.", "Sigh. Rome."]
    st = shared_openings(answers)
    assert opening_sentence(answers[1]) == "sigh."
    assert st.n == 4 and st.shared == 3 and st.share == 0.75 and st.most_common == "sigh." and st.most_common_count == 3
    assert shared_openings(["A.", "B.", "C."]).shared == 0
