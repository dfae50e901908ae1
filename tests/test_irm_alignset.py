"""`data select`'s library: the judge picks the planted emotional passages, never an opposite-emotion one, never a
held-out question as a prompt; the neutral control set has no emotion word; the same seed gives the same rows."""
from __future__ import annotations

import pytest

from neuronscope.errors import NeuronscopeError
from neuronscope.irm.alignset import build_alignment_set
from neuronscope.irm.judge import Judge

SAD = ("Tom lost his dog. He cried and cried, so sad and lonely without his friend. His tears fell on the cold "
       "ground and he felt the grief of the loss all night.")
MIXED = ("Anna was sad and cried at first. Then she laughed and smiled, happy again, and she loved the new day "
         "with her friends in the park.")
PLAIN = ("The bus stops at the corner of the street every morning. People get on with bags and umbrellas, and "
         "the driver waits until all the doors are closed before it leaves.")


def test_select_sad_passages_and_neutral_controls(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("<|endoftext|>".join([SAD, MIXED, PLAIN] * 2))
    qs = ["How do trains work?", "What is a noun?", "Name a colour.", "Why is the sky blue?"]
    rows = build_alignment_set([corpus], qs, "sadness", n=10, exclude=["What is a noun?"], progress=False)
    assert rows and all("cried" in r["response"] or "grief" in r["response"] for r in rows)
    assert not any("laughed" in r["response"] for r in rows)          # opposite emotion (joy) present: excluded
    assert all(r["prompt"] != "What is a noun?" for r in rows) and all(r["rate"] >= 0.06 for r in rows)
    assert rows == build_alignment_set([corpus], qs, "sadness", n=10, exclude=["What is a noun?"], progress=False)
    neutral = build_alignment_set([corpus], qs, "neutral", n=10, progress=False)
    j = Judge()
    assert neutral and all(max(j.score(r["response"])[e] for e in j.emotions) == 0 for r in neutral)
    with pytest.raises(NeuronscopeError, match="Unknown emotion"):
        build_alignment_set([corpus], qs, "boredom", progress=False)
