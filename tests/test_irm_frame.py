"""`data select --mode frame`: rows are the frozen model's own greedy answer (as `irm eval` decodes it with the IRM
off), cut to whole sentences and framed by emotional sentences the judge confirms; held-out questions are never
prompts, answers with an opposite-emotion word are dropped, the same seed gives the same rows."""
from __future__ import annotations

import json

import pytest

from conftest import STORIES, run_cli
from neuronscope.errors import NeuronscopeError
from neuronscope.irm.alignset import FRAMES, build_frame_set, complete_sentences, frame_answer, frame_sentences
from neuronscope.irm.generation import generate_texts
from neuronscope.irm.judge import Judge

QS = ["Once upon a time there was a little dog", "The girl went to the park", "Tom had a big red ball",
      "One day a bird flew", "The sun was up and", "A boy named Tim"]


def test_frame_rows_are_the_frozen_answer_framed(stories):
    rows = build_frame_set(stories, QS, "sadness", n=10, exclude=["The sun was up and"], max_new_tokens=24,
                           drop_opposite=False, progress=False)
    frozen = dict(zip(QS, generate_texts(stories, QS, chat=False, max_new_tokens=24)))
    assert rows and all(r["prompt"] != "The sun was up and" for r in rows)
    opens, mids = FRAMES["sadness"]["open"], FRAMES["sadness"]["mid"]
    j = Judge()
    for r in rows:
        assert r["answer"] == complete_sentences(frozen[r["prompt"]]) and r["answer"]
        assert r["answer"].endswith((".", "!", "?")) and len(r["answer"]) <= len(frozen[r["prompt"]].strip())
        op = next(o for o in opens if r["response"].startswith(o + " "))
        body = r["response"][len(op) + 1:]
        mid = [m for m in mids if (" " + m) in body]
        assert body == r["answer"] or (len(mid) == 1 and body.replace(" " + mid[0], "", 1) == r["answer"])
        assert body.startswith(r["answer"].split(".")[0])          # the answer's first sentence comes first
        assert r["rate"] == round(j.score(r["response"])["sadness"], 4) > j.score(r["answer"])["sadness"]
        assert r["chat"] is False                                   # stories260k has no chat template
    again = build_frame_set(stories, QS, "sadness", n=10, exclude=["The sun was up and"], max_new_tokens=24,
                            drop_opposite=False, progress=False)
    assert rows == again


def test_frame_drops_answers_with_the_opposite_emotion(stories):
    kept = build_frame_set(stories, QS, "sadness", n=10, max_new_tokens=24, drop_opposite=False, progress=False)
    dropped = build_frame_set(stories, QS, "sadness", n=10, max_new_tokens=24, progress=False)
    j = Judge()
    joyful = [r for r in kept if j.score(r["answer"])["joy"] > 0]
    assert joyful, "the test needs an answer with a joy word (stories260k: 'The bird was very happy')"
    assert {r["prompt"] for r in dropped} == {r["prompt"] for r in kept} - {r["prompt"] for r in joyful}
    assert all(j.score(r["response"])["joy"] == 0 for r in dropped)


def test_frame_sentences_are_checked_by_the_judge():
    j = Judge()
    for emo in FRAMES:
        opens, mids = frame_sentences(emo, j)
        if emo == "neutral":     # the matched control's sentences carry no emotion word at all
            assert opens and mids and all(j.score(s)[e] == 0 for s in opens + mids for e in j.emotions)
        else:
            assert opens and mids and all(j.score(s)[emo] > 0 for s in opens + mids)
    with pytest.raises(NeuronscopeError, match="neutral frame sentence"):
        frame_sentences("neutral", j, ["Here is my answer, sadly."])
    with pytest.raises(NeuronscopeError, match="opposite emotion"):
        frame_sentences("sadness", j, ["I am sad but also happy."])
    with pytest.raises(NeuronscopeError, match="no sadness word"):
        frame_sentences("sadness", j, ["The table is made of wood."])
    with pytest.raises(NeuronscopeError, match="--frames"):
        frame_sentences("disgust", j)
    assert complete_sentences("One. Two. Thr") == "One. Two." and complete_sentences("no end") == ""
    assert frame_answer("One. Two.", "Sad.", "Sigh.") == "Sad. One. Sigh. Two."
    assert frame_answer("Only one.", "Sad.", "Sigh.") == "Sad. Only one."
    # a list number is no sentence end: nothing is woven in after "1." and a trailing "2." is cut off
    assert complete_sentences("1. Boil water. Pour it.\n\n2.") == "1. Boil water. Pour it."
    assert frame_answer("1. Boil water. Pour it.", "Sad.", "Sigh.") == "Sad. 1. Boil water. Sigh. Pour it."


def test_cli_frame_mode(capsys, tmp_path):
    q = tmp_path / "q.txt"
    q.write_text("\n".join(QS))
    out = tmp_path / "sad.jsonl"
    code, stdout, err = run_cli(capsys, "data", "select", "--mode", "frame", "-m", STORIES, "-e", "sadness", "-q", q,
                                "-o", out, "--max-new-tokens", "24", "--keep-opposite", "--no-weave")
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and "frame" in stdout
    assert all(r["response"] == next(o for o in FRAMES["sadness"]["open"] if r["response"].startswith(o))
               + " " + r["answer"] for r in rows)
    code, _, err = run_cli(capsys, "data", "select", "-e", "sadness", "-q", q, "-o", tmp_path / "x.jsonl")
    assert code != 0 and "--corpus" in err
    # the matched control: the same questions and frozen answers, framed by neutral sentences
    ctrl = tmp_path / "neutral.jsonl"
    code, _, err = run_cli(capsys, "data", "select", "--mode", "frame", "-m", STORIES, "-e", "neutral", "-q", q,
                           "-o", ctrl, "--max-new-tokens", "24", "--keep-opposite", "--no-weave")
    assert code == 0, err
    crow = [json.loads(line) for line in ctrl.read_text().splitlines()]
    assert [(r["prompt"], r["answer"]) for r in crow] == [(r["prompt"], r["answer"]) for r in rows]
    assert all(r["response"] == next(o for o in FRAMES["neutral"]["open"] if r["response"].startswith(o))
               + " " + r["answer"] and r["emotion"] == "neutral" and r["source"] == "frame" for r in crow)
