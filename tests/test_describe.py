"""Descriptions and clusters on a tiny llama with planted neurons (real atlas decodes + real corpus statistics)."""
from __future__ import annotations

import json
import random
import re
from collections import Counter

import httpx
import pytest
import torch

from neuronscope.errors import NeuronscopeError
from tiny import tiny_subject

LAYER, PLANTED, TWIN, OTHER = 0, 5, 9, 20


@pytest.fixture(scope="module")
def planted(stories_tokenizer, tmp_path_factory):
    """A tiny llama whose neuron 0:5 fires on 'happy' and writes 'happy'; 0:9 also writes 'happy'; 0:20 writes
    'ball'. Returns (subject, atlas folder with decodes and stats, token strings)."""
    tok = stories_tokenizer
    happy = tok("happy", add_special_tokens=False)["input_ids"][-1]
    ball = tok(" ball", add_special_tokens=False)["input_ids"][-1]
    subject = tiny_subject("llama", tokenizer=tok, seed=3)
    m = subject.model
    with torch.no_grad():
        emb = m.model.embed_tokens.weight
        emb[happy] = emb[happy] / emb[happy].norm() * 3.0 * emb.norm(dim=1).mean()
        d = emb[happy] / emb[happy].norm()
        mlp = m.model.layers[LAYER].mlp
        mlp.gate_proj.weight[PLANTED] = 2.0 * d
        mlp.up_proj.weight[PLANTED] = 2.0 * d
        wu = m.lm_head.weight if not subject.tied else m.model.embed_tokens.weight
        for n, t in ((PLANTED, happy), (TWIN, happy), (OTHER, ball)):
            mlp.down_proj.weight[:, n] = wu[t] / wu[t].norm() * 2.0
    rng = random.Random(1)
    words = ["Tom", "Lily", "was", "very", "happy", "sad", "the", "dog", "ran", "to", "park", "and", "played",
             "with", "a", "red", "ball", "she", "smiled", "at", "mom"]
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(40)) + "." for _ in range(60))
    folder = tmp_path_factory.mktemp("planted")
    (folder.parent / "corpus.txt").write_text(text)
    from neuronscope.atlas import build_atlas
    from neuronscope.stats import compute_stats
    build_atlas(subject, folder, top_k=10, progress=False)
    compute_stats(subject, folder.parent / "corpus.txt", folder, window=32, k=64, n_exemplars=30, progress=False)
    return subject, folder, tok.decode([happy]).strip(), tok.decode([ball]).strip()


def test_label_names_the_planted_token_and_scores_it(planted):
    from neuronscope.describe import Descriptions, describe_atlas
    subject, folder, happy, _ = planted
    descs = describe_atlas(folder, subject=subject, neurons=[(LAYER, PLANTED), (LAYER, OTHER, "pos")],
                           progress=False)
    d = descs.get(LAYER, PLANTED, "pos")
    assert d["source"] == "label"
    assert d["text"].startswith(f"fires on '{happy}'")       # the exemplars' firing token, first
    assert f"promotes '{happy}'" in d["text"]                 # and the decoded write vector
    assert d["score"] > 0.8                                    # token-match simulation on held-out exemplars
    assert descs.get(LAYER, PLANTED, "neg") is not None
    assert descs.get(LAYER, 1, "pos") is None                  # not asked for
    hits = Descriptions.open(folder).search(happy)
    assert (hits[0]["layer"], hits[0]["neuron"]) in {(LAYER, PLANTED), (LAYER, OTHER)}
    assert any((h["layer"], h["neuron"], h["polarity"]) == (LAYER, PLANTED, "pos") for h in hits)
    with pytest.raises(NeuronscopeError, match="Polarity"):
        descs.get(0, 0, "both")


def fake_llm(request: httpx.Request) -> httpx.Response:
    """An OpenAI-compatible endpoint that answers from the request: explanations name the token marked most often;
    simulations return the numbers of the tokens the quoted description names."""
    body = json.loads(request.content)
    text = body["messages"][-1]["content"]
    if "Numbered tokens:" in text:
        quoted = {q.strip().lower() for q in re.findall(r"'([^']+)'", text.split("Numbered tokens:")[0])}
        listing = re.findall(r"(\d+):'((?:[^'\\]|\\.)*)'", text.split("Numbered tokens:")[1])
        nums = [i for i, t in listing if t.strip().lower() in quoted]
        reply = ", ".join(nums) or "none"
    else:
        marked = Counter(re.findall(r"<<(.+?)>>", text))
        reply = f"the token '{marked.most_common(1)[0][0].strip()}'" if marked else "nothing"
        if body.get("temperature", 0) > 0:
            reply = f"Description: words near '{marked.most_common(2)[-1][0].strip()}'"
    return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": reply}}]})


def test_explainer_endpoint_candidates_scored_by_llm_simulator(planted):
    from neuronscope.describe import OpenAIExplainer, describe_atlas
    subject, folder, happy, _ = planted
    client = httpx.Client(transport=httpx.MockTransport(fake_llm))
    ex = OpenAIExplainer("http://127.0.0.1:9/v1", model="fake", client=client)
    descs = describe_atlas(folder, explainer=ex, subject=subject, neurons=[(LAYER, PLANTED, "pos")],
                           n_candidates=3, progress=False, overwrite=True)
    d = descs.get(LAYER, PLANTED, "pos")
    assert d["source"] == "explainer"
    assert d["text"] == f"the token '{happy}'"
    assert d["score"] > 0.8
    import sqlite3
    con = sqlite3.connect(folder / "atlas.sqlite")
    cands = json.loads(con.execute("SELECT candidates FROM descriptions WHERE layer=? AND neuron=? AND polarity=?",
                                   (LAYER, PLANTED, "pos")).fetchone()[0])
    con.close()
    assert len(cands) >= 2 and max(c["score"] for c in cands) == d["score"]
    bad = OpenAIExplainer("http://127.0.0.1:9/v1", client=httpx.Client(
        transport=httpx.MockTransport(lambda r: httpx.Response(500, text="boom"))))
    with pytest.raises(NeuronscopeError, match="answered 500"):
        describe_atlas(folder, explainer=bad, neurons=[(LAYER, 3, "pos")], progress=False)


def words_embedder(texts):
    """A real (if simple) embedder: hashed bag of lower-case words, 64 dims."""
    out = torch.zeros(len(texts), 64)
    for i, t in enumerate(texts):
        for w in re.findall(r"\w+", t.lower()):
            out[i, hash(w) % 64] += 1.0
    return out


def test_embeddings_search_and_clusters(planted):
    from neuronscope.describe import Descriptions, cluster_neurons, describe_atlas
    subject, folder, happy, ball = planted
    describe_atlas(folder, subject=subject, neurons=[(LAYER, n) for n in (PLANTED, TWIN, OTHER, 30)],
                   embedder=words_embedder, progress=False)
    descs = Descriptions.open(folder, embedder=words_embedder)
    assert len(descs.embeddings()) >= 8
    query = descs.get(LAYER, OTHER, "pos")["text"]
    top = descs.search(query, k=3)           # cosine similarity of embeddings: the same text scores 1
    assert (top[0]["layer"], top[0]["neuron"], top[0]["polarity"]) == (LAYER, OTHER, "pos")
    assert top[0]["score"] > 0.999 and top[1]["score"] < top[0]["score"]
    groups = cluster_neurons(folder, [(LAYER, PLANTED, "pos"), (LAYER, TWIN, "pos"), (LAYER, OTHER, "pos")])
    assert len(groups) == 1
    assert sorted(m[1] for m in groups[0]["members"]) == [PLANTED, TWIN]
    assert happy in groups[0]["name"]
    alone = cluster_neurons(folder, [(LAYER, PLANTED, "pos"), (LAYER, OTHER, "pos")], min_size=1)
    assert len(alone) == 2
    with pytest.raises(NeuronscopeError, match="Polarity"):
        cluster_neurons(folder, [(0, 1, "up")])
    with pytest.raises(NeuronscopeError, match="out of range"):
        cluster_neurons(folder, [(0, 999, "pos")])


def test_average_linkage_matches_definition():
    from neuronscope.describe import average_linkage
    pts = torch.tensor([0.0, 0.1, 0.25, 5.0, 5.2, 9.0])
    dist = (pts[:, None] - pts[None, :]).abs()
    groups = average_linkage(dist, threshold=1.0)
    assert sorted(groups) == [[0, 1, 2], [3, 4], [5]]
    # average linkage, neither single nor complete: {0, 0.3} then 0.75 is at mean distance (0.75 + 0.45) / 2 = 0.6
    line = torch.tensor([0.0, 0.3, 0.75])
    d2 = (line[:, None] - line[None, :]).abs()
    assert sorted(average_linkage(d2, threshold=0.5)) == [[0, 1], [2]]     # single linkage would join (0.45)
    assert sorted(average_linkage(d2, threshold=0.65)) == [[0, 1, 2]]      # complete linkage would not (0.75)


def test_cli_describe_search_cluster(planted):
    from neuronscope.cli import main
    _, folder, happy, _ = planted
    import subprocess
    import sys
    run = lambda *a: subprocess.run([sys.executable, "-m", "neuronscope", *a], capture_output=True, text=True,
                                    timeout=300)
    r = run("describe", str(folder), "--neurons", f"{LAYER}:{PLANTED}+,{LAYER}:{TWIN}+", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows[0]["neuron"] == PLANTED and happy in rows[0]["text"]
    r = run("describe", str(folder), "--search", happy, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)
    r = run("cluster", str(folder), "--neurons", f"{LAYER}:{PLANTED}+,{LAYER}:{TWIN}+,{LAYER}:{OTHER}+", "--json")
    assert r.returncode == 0, r.stderr
    assert sorted(m[1] for m in json.loads(r.stdout)[0]["members"]) == [PLANTED, TWIN]
    r = run("cluster", str(folder), "--neurons", "0:x")
    assert r.returncode == 2 and "error:" in r.stderr


@pytest.mark.slow
def test_local_explainer_smollm(planted, smollm):
    from neuronscope.describe import LocalExplainer, describe_atlas
    subject, folder, happy, _ = planted
    descs = describe_atlas(folder, explainer=LocalExplainer(smollm), subject=subject, simulator="tokens",
                           neurons=[(LAYER, PLANTED, "pos")], n_candidates=2, n_exemplars=8, progress=False,
                           overwrite=True)
    d = descs.get(LAYER, PLANTED, "pos")
    assert d["text"] and isinstance(d["score"], float)
