"""`data synth` on a real model (stories260k given a small chat template): batched, capped, resumable JSONL."""
from __future__ import annotations

import copy
import json

import pytest

from neuronscope.errors import NeuronscopeError
from neuronscope.irm.synth import read_questions, synthesize
from neuronscope.subject import Subject

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def chatty(stories):
    tok = copy.deepcopy(stories.tokenizer)
    tok.chat_template = TEMPLATE
    return Subject.from_model(stories.model, tok, name="stories-chat")


def test_synth_batches_caps_and_resumes(chatty, tmp_path):
    qs_file = tmp_path / "q.txt"
    qs_file.write_text("# comment\nWhere is the cat?\n\nWhat did Tom see?\nWhy was Lily sad?\nWhere is the cat?\n"
                       "Who is your friend?\nWhat is in the box?\n")
    qs = read_questions(qs_file)
    assert qs == ["Where is the cat?", "What did Tom see?", "Why was Lily sad?", "Who is your friend?",
                  "What is in the box?"]
    out = tmp_path / "happy.jsonl"
    first = synthesize(chatty, qs[:3], "happy", out, batch_size=2, max_new_tokens=6, progress=False)
    assert first == {"done": 3, "skipped": 0, "total": 3}
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == qs[:3] and all(r["tone"] == "happy" for r in rows)
    for r in rows:  # the cap on new tokens holds
        assert len(chatty.tokenizer(r["response"], add_special_tokens=False)["input_ids"]) <= 7
    before = out.read_text()
    again = synthesize(chatty, qs, "happy", out, batch_size=2, max_new_tokens=6, progress=False)
    assert again == {"done": 2, "skipped": 3, "total": 5}
    assert out.read_text().startswith(before)
    # batched with left padding gives the same greedy answers as one at a time
    single = tmp_path / "single.jsonl"
    synthesize(chatty, qs, "happy", single, batch_size=1, max_new_tokens=6, progress=False)
    assert [json.loads(l)["response"] for l in single.read_text().splitlines()] == \
        [json.loads(l)["response"] for l in out.read_text().splitlines()]
    # the system message names the tone
    ids = chatty.encode_chat([{"role": "system", "content": "x happy y"}])
    assert "happy" in chatty.decode(ids[0])


def test_synth_bad_input(stories, chatty, tmp_path):
    with pytest.raises(NeuronscopeError, match="no chat template"):
        synthesize(stories, ["Hi?"], "angry", tmp_path / "a.jsonl", progress=False)
    with pytest.raises(NeuronscopeError, match="must be a .jsonl"):
        synthesize(chatty, ["Hi?"], "angry", tmp_path / "a.csv", progress=False)
    with pytest.raises(NeuronscopeError, match="Give a tone"):
        synthesize(chatty, ["Hi?"], " ", tmp_path / "a.jsonl", progress=False)
    with pytest.raises(NeuronscopeError, match="No questions file"):
        read_questions(tmp_path / "none.txt")
