"""The offline judge, paired statistics and judged evaluation: planted emotional texts score as planted, a real
IRM that forces a word is seen by the judge with a small p-value, an IRM that does nothing is not."""
from __future__ import annotations

import math

import numpy as np
import pytest

from neuronscope.errors import NeuronscopeError
from neuronscope.irm.judge import Judge, repetition_rate
from neuronscope.irm.paired import PairedStats, paired_difference

SAD = ["She sat alone and cried, heartbroken and lonely, her tears falling on the grave.",
       "He was so sad and miserable after the funeral; the grief and sorrow never left him."]
ANGRY = ["I am furious! I hate this stupid, ridiculous nonsense and I will yell until they listen.",
         "He was angry and bitter, shouting with rage at the idiots who had insulted him."]
JOY = ["What a wonderful, happy day! We laughed and smiled and celebrated with joy.",
       "She was delighted and grateful, so cheerful that she sang and danced all morning."]
NEUTRAL = ["The train leaves the station at nine and arrives in the city two hours later.",
           "To make tea, boil water, pour it over the leaves and wait three minutes."]


@pytest.fixture(scope="module")
def judge():
    return Judge()


def test_judge_scores_planted_texts(judge):
    for texts, emo in ((SAD, "sadness"), (ANGRY, "anger"), (JOY, "joy")):
        for t in texts:
            s = judge.score(t)
            assert s[emo] >= 0.15, (emo, t, s)
            assert s[emo] == max(s[e] for e in judge.emotions), (emo, s)
    for t in NEUTRAL:
        s = judge.score(t)
        assert max(s[e] for e in ("anger", "sadness", "joy", "fear")) == 0.0, s
        assert abs(s["vader_compound"]) < 0.3
    assert judge.score(SAD[0])["vader_compound"] < -0.5
    assert judge.score(JOY[0])["vader_compound"] > 0.5
    info = judge.info()
    assert info["vaderSentiment"] and info["lexicon_sha256_16"] and info["name"] == "neuronscope-judge/builtin"


def test_repetition_rate():
    assert repetition_rate("one two three four five six") == 0.0
    assert repetition_rate("the cat sat " * 10) > 0.8
    assert repetition_rate("") == 0.0


def test_unknown_lexicon_is_a_clear_error():
    with pytest.raises(NeuronscopeError, match="Unknown judge lexicon"):
        Judge("liwc")


def test_paired_difference_separates_effect_from_noise():
    rng = np.random.default_rng(0)
    off = rng.normal(0, 1, 40)
    d = paired_difference(off, off + 1.0 + rng.normal(0, 0.3, 40))
    assert d.p_value < 0.001 and d.ci95[0] > 0.7 and d.ci95[1] < 1.3
    null = [paired_difference(off, off + rng.normal(0, 1, 40), seed=s).p_value for s in range(40)]
    assert np.mean(np.array(null) < 0.05) < 0.2   # about 5% false positives, not many more
    exact = paired_difference([0, 0, 0], [1, 1, 1])
    assert math.isclose(exact.p_value, 0.25)   # 2 of 8 sign patterns are as extreme
    with pytest.raises(NeuronscopeError):
        paired_difference([1, 2], [1])


def test_judge_irm_sees_a_real_irm_and_not_a_zero_one(stories, tmp_path):
    """Train an IRM on stories260k that makes ' sad' follow every prompt; the judge sees more sadness, p small;
    a fresh (zero-output) IRM gives identical answers and no difference."""
    from neuronscope.irm import IRM, TrainConfig, train_irm
    from neuronscope.irm.evaluation import judge_irm
    from tests.test_irm import SENTS
    rows = [{"prompt": p, "response": " sad and cried, sad and lonely."} for p in SENTS[:120]]
    res = train_irm(stories, rows, tmp_path / "run", inject_layers="all", width=32, progress=False,
                    config=TrainConfig(steps=60, batch_size=16, lr=3e-3, eval_every=30, patience=0))
    prompts = SENTS[200:224]
    rep = judge_irm(stories, res.irm, prompts, target="sadness", max_new_tokens=12, progress=False).to_json()
    m = rep["metrics"]["sadness"]
    assert m["diff"] > 0.05 and m["p_value"] < 0.01, m
    assert rep["judge"]["vaderSentiment"] and rep["target"] == "sadness" and rep["opposite"] == "joy"
    assert "answer_nll" in rep["metrics"] and len(rep["answers"]) == len(prompts)
    zero = IRM.for_subject(stories, "all", width=8)
    rep0 = judge_irm(stories, zero, prompts[:8], target="sadness", max_new_tokens=12, progress=False).to_json()
    assert all(a["off"] == a["on"] for a in rep0["answers"])
    assert rep0["metrics"]["sadness"]["diff"] == 0 and not rep0["verdict"]["passed"]


def test_the_verdict_applies_the_repetition_ratio_strictly():
    """0.018 -> 0.040 repetition (x2.2) fails the 1.5x criterion even though both are under 0.05."""
    from neuronscope.irm.evaluation import verdict

    def metrics(rep_off, rep_on):
        def stats(off, on, p):
            return PairedStats(40, off, on, on - off, [on - off, on - off], p, None, None)
        return {"sadness": stats(0.002, 0.07, 1e-4), "joy": stats(0.006, 0.004, 0.5),
                "repetition": stats(rep_off, rep_on, 0.5)}
    bad = verdict(metrics(0.0183, 0.0402), "sadness", "joy")
    assert not bad.repetition_ok and not bad.passed and abs(bad.repetition_ratio - 2.197) < 0.01
    good = verdict(metrics(0.0183, 0.0109), "sadness", "joy")
    assert good.repetition_ok and good.passed
    assert set(good.to_json()) == {"target_ratio", "target_doubles", "target_p", "target_significant",
                                   "opposite_diff", "opposite_not_up", "repetition_ratio", "repetition_ok", "passed",
                                   "criteria"}   # judged.json's verdict keys, as before it was a class
    assert not verdict(metrics(0.0, 0.03), "sadness", "joy").passed
    assert verdict(metrics(0.0, 0.0), "sadness", "joy").passed
