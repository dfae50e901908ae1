"""Scored descriptions on a tiny llama with planted neurons (real atlas decodes, real corpus statistics, the real
all-MiniLM-L6-v2 embedder), and the label rules on a small vocabulary."""
from __future__ import annotations

import json
import random
import re
import sqlite3
import subprocess
import sys
from collections import Counter

import httpx
import pytest
import torch

from conftest import SHARED
from neuronscope.errors import NeuronscopeError
from tiny import tiny_subject

MINILM = SHARED / "models" / "all-minilm-l6-v2"
HAPPY_GROUP = (5, 9, 11)          # layer 0 neurons that read and write 'happy'
MOM_GROUP = (20, 21, 22)          # layer 0 neurons that read and write 'mom'
PLANTED, RANDOM = 5, 40


@pytest.fixture(scope="module")
def embedder():
    from neuronscope.embed import Embedder
    return Embedder(MINILM)


@pytest.fixture(scope="module")
def planted(stories_tokenizer, tmp_path_factory, embedder):
    """A tiny llama (stories260k's tokenizer) whose layer-0 neurons HAPPY_GROUP fire on and promote 'happy' and
    MOM_GROUP on 'mom'; an atlas, statistics over a corpus of random story words, and descriptions of all neurons."""
    tok = stories_tokenizer
    happy = tok("happy", add_special_tokens=False)["input_ids"][-1]
    mom = tok("mom", add_special_tokens=False)["input_ids"][-1]
    subject = tiny_subject("llama", tokenizer=tok, seed=3)
    m = subject.model
    with torch.no_grad():
        emb = m.model.embed_tokens.weight
        scale = 3.0 * emb.norm(dim=1).mean()
        mlp = m.model.layers[0].mlp
        wu = m.lm_head.weight if not subject.tied else m.model.embed_tokens.weight
        for t, group in ((happy, HAPPY_GROUP), (mom, MOM_GROUP)):
            emb[t] = emb[t] / emb[t].norm() * scale
            d = emb[t] / emb[t].norm()
            for n in group:
                mlp.gate_proj.weight[n] = 2.0 * d
                mlp.up_proj.weight[n] = 2.0 * d
                mlp.down_proj.weight[:, n] = wu[t] / wu[t].norm() * 2.0
    rng = random.Random(1)
    words = ["Tom", "Lily", "was", "very", "happy", "the", "dog", "ran", "to", "park", "and", "played", "with",
             "a", "big", "ball", "she", "said", "at", "mom", "friend", "little", "day", "time", "saw", "named"]
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(40)) + "." for _ in range(150))
    folder = tmp_path_factory.mktemp("planted")
    (folder.parent / "corpus.txt").write_text(text)
    from neuronscope.atlas import build_atlas
    from neuronscope.describe import describe_atlas
    from neuronscope.stats import compute_stats
    build_atlas(subject, folder, top_k=10, progress=False)
    compute_stats(subject, folder.parent / "corpus.txt", folder, window=32, k=64, n_exemplars=60, progress=False)
    describe_atlas(folder, subject=subject, embedder=embedder, progress=False)
    return subject, folder, tok.decode([happy]).strip(), tok.decode([mom]).strip()


def test_planted_neuron_label_names_its_token_and_scores_high(planted):
    from neuronscope.describe import Descriptions
    _, folder, happy, mom = planted
    D = Descriptions.open(folder)
    d = D.get(0, PLANTED, "pos")
    assert d.source == "label"
    assert d.text.startswith(f"fires on '{happy}'") and f"promotes '{happy}'" in d.text
    assert d.score > 0.9 and d.interpretable
    assert D.get(0, MOM_GROUP[0], "pos").text.startswith(f"fires on '{mom}'")
    assert D.count_rows(folder) == 3 * 48 * 2                         # every neuron and polarity, each scored
    assert all(r.score is not None and -1 <= r.score <= 1 for r in D.all())
    sec = json.loads((folder / "manifest.json").read_text())["descriptions"]
    assert sec["threshold"] == 0.5 and sec["scores_label"]["n"] == 3 * 48 * 2
    assert {tuple(x) for x in [(0, PLANTED, "pos")]} <= D.interpretable()
    assert all(r.interpretable for r in D.all(interpretable=True))
    with pytest.raises(NeuronscopeError, match="Polarity"):
        D.get(0, 0, "both")


def test_default_embedder_missing_skips_the_index_with_a_note(planted, monkeypatch):
    from neuronscope.describe import Descriptions, describe_atlas
    subject, folder, _, _ = planted
    monkeypatch.delenv("NEURONSCOPE_EMBEDDER", raising=False)
    with pytest.warns(UserWarning, match="No semantic search index"):
        describe_atlas(folder, subject=subject, neurons=[(0, 1)], progress=False, overwrite=True)
    sec = json.loads((folder / "manifest.json").read_text())["descriptions"]
    assert "models pull all-minilm-l6-v2" in sec["index"]["skipped"]
    assert Descriptions.open(folder).get(0, 1, "neg").score is not None
    with pytest.raises(NeuronscopeError, match="No embedding model folder"):
        describe_atlas(folder, subject=subject, neurons=[(0, 1)], embedder="/nonexistent/emb", progress=False,
                       overwrite=True)


def test_wrong_descriptions_score_near_zero(planted):
    """The planted neuron's data scored against other neurons' labels (and a random token): near 0."""
    from neuronscope.describe import Descriptions, EvalSplit, token_match_predict
    from neuronscope.stats import NeuronStats
    subject, folder, happy, mom = planted
    split = EvalSplit(NeuronStats.open(folder))
    D = Descriptions.open(folder)
    acts: dict = {}
    assert abs(split.score(subject, 0, PLANTED, "pos", f"fires on '{mom}'", token_match_predict, acts)) < 0.15
    assert abs(split.score(subject, 0, PLANTED, "pos", "fires on 'park'", token_match_predict, acts)) < 0.15
    others = [D.get(l, n, "pos").text for l, n in ((2, 7), (1, 30), (2, 44), (1, 3))]
    rs = [split.score(subject, 0, PLANTED, "pos", t, token_match_predict, acts) for t in others
          if happy not in t]
    assert rs and max(abs(r) for r in rs) < 0.2
    assert split.score(subject, 0, PLANTED, "pos", "nothing specific fires it", token_match_predict, acts) == 0.0


def test_scores_use_held_out_windows_only(planted):
    from neuronscope.describe import EvalSplit
    from neuronscope.stats import NeuronStats
    _, folder, _, _ = planted
    split = EvalSplit(NeuronStats.open(folder))
    assert split.random and all(split.is_held(w) for w in split.random)
    for l, n, p in [(0, PLANTED, "pos"), (0, PLANTED, "neg"), (1, 17, "pos"), (2, 47, "neg")]:
        train = {w for w, _ in split.train_exemplars(l, n, p, 1000)}
        ev = split.eval_windows(l, n, p)
        assert train and ev and not train & set(ev)
        assert all(split.is_held(w) for w in ev) and not any(split.is_held(w) for w in train)
    ev = split.eval_windows(0, PLANTED, "pos")
    assert len(ev) > len(split.random)                  # its own top held-out windows, then random ones


def test_batched_scores_equal_one_neuron_scoring(planted):
    """score_token_labels (all neurons in one pass) gives the one-neuron path's Pearson r."""
    from neuronscope.describe import Descriptions, EvalSplit, token_match_predict
    from neuronscope.stats import NeuronStats
    subject, folder, _, _ = planted
    split = EvalSplit(NeuronStats.open(folder))
    D = Descriptions.open(folder)
    for l, n, p in [(0, PLANTED, "pos"), (0, MOM_GROUP[1], "neg"), (1, 17, "pos"), (2, 40, "neg"), (2, 3, "pos")]:
        d = D.get(l, n, p)
        one = split.score(subject, l, n, p, d.text, token_match_predict)
        assert abs(one - d.score) < 1e-4, (l, n, p, d.text)


def test_label_rules_on_a_small_vocabulary():
    from neuronscope.describe import LabelVocab, make_label, parse_label_items
    vocab = ["<s>", " the", "the", " The", " grand", "ma", " dog", " Dog", "dog", "\ufffd", " cat", ",", "\n"]
    # 'the' is very common, 'dog' rare, 'ma' mostly after other tokens than 'grand'
    windows = [[1, 2, 3, 11, 1, 2, 1, 12] * 40 + [1, 6] * 4 + [1, 5] * 10 + [4, 5, 8, 10]]
    v = LabelVocab.build(vocab, windows, excluded_ids={0, 9})
    # 'ma' fires mostly after 'grand'; dog variants merge; 'the' is frequent in exemplars but common in the corpus
    fire = [5] * 8 + [6, 7, 8, 6, 8, 7] + [1, 2, 3, 1] + [0, 0, 9, 9]
    prev = [4] * 7 + [1] + [1] * 6 + [-1] * 4 + [-1] * 4
    lab = make_label(v, fire, prev, [7, 6, 0, 9, 10])
    assert lab["text"] == "fires on 'ma' after 'grand', 'dog' | promotes 'dog', 'cat'"
    assert parse_label_items(lab["text"]) == [("ma", "grand"), ("dog", None)]
    assert "<s>" not in lab["text"] and "\ufffd" not in lab["text"] and "the" not in lab["text"]
    nothing = make_label(v, [1, 2, 3, 1, 11, 12], [-1] * 6, [])
    assert nothing["text"] == "nothing specific fires it" and parse_label_items(nothing["text"]) == []
    assert parse_label_items("the token 'it''s' and more") is not None
    assert parse_label_items("words about animals") is None


def test_token_simulator_reads_contexts():
    from neuronscope.describe import token_match_predict
    toks = [" grand", "ma", " and", "ma", " Dog", " the"]
    assert token_match_predict("fires on 'ma' after 'grand', 'dog' | promotes 'the'", toks) == \
        [0.0, 1.0, 0.0, 0.5, 1.0, 0.0]
    assert token_match_predict("mentions of dogs and the moon", [" dogs", " the", " moon"]) == [1.0, 0.0, 1.0]


def test_semantic_search_finds_planted_neurons_by_synonym(planted, embedder):
    from neuronscope.concepts import semantic_search
    _, folder, _, _ = planted
    top = semantic_search(folder, "joyful", k=5, embedder=embedder)
    assert (top[0].layer, top[0].neuron) in {(0, n) for n in HAPPY_GROUP}
    assert top[0].similarity > 0.4 and top[0].token_score == 0.0      # no token spells "joyful"
    top = semantic_search(folder, "mother", k=3, embedder=embedder, interpretable=True)
    assert {(r.layer, r.neuron, r.polarity) for r in top} == {(0, n, "pos") for n in MOM_GROUP}
    assert all(r.interpretable and "mom" in r.description for r in top)
    exact = semantic_search(folder, "happy", k=3, embedder=embedder)
    assert exact[0].token_score > 0 and exact[0].score > exact[0].similarity
    with pytest.raises(NeuronscopeError, match="empty"):
        semantic_search(folder, "  ", embedder=embedder)


def test_search_overhead_is_small(planted, embedder):
    """Everything but the query's embedding (index, token match, rows) is fast; the bench times the whole search
    on SmolLM2 (the embedding forward itself depends on the machine's load)."""
    import time
    from neuronscope.concepts import semantic_search
    _, folder, _, _ = planted
    queries = ("animals", "family", "a happy day", "sports")
    cached = dict(zip(queries, embedder(list(queries))))
    fixed = lambda texts: torch.stack([cached[t] for t in texts])        # noqa: E731
    semantic_search(folder, "animals", k=20, embedder=fixed)
    t = []
    for q in queries:
        t0 = time.perf_counter()
        semantic_search(folder, q, k=20, embedder=fixed)
        t.append(time.perf_counter() - t0)
    assert sorted(t)[len(t) // 2] < 0.3


def test_planted_groups_cluster_whole_and_named(planted, embedder):
    from neuronscope.concepts import cluster_neurons
    _, folder, happy, mom = planted
    rng = random.Random(0)
    others = [(l, n, "pos") for l, n in {(rng.randrange(1, 3), rng.randrange(48)) for _ in range(12)}]
    items = [(0, n, "pos") for n in HAPPY_GROUP + MOM_GROUP] + others
    groups = cluster_neurons(folder, items, embedder=embedder)
    named = {g.name: sorted(m[1] for m in g.members if m[0] == 0) for g in groups}
    assert named.get(happy) == sorted(HAPPY_GROUP) and named.get(mom) == sorted(MOM_GROUP)
    from neuronscope.describe import Descriptions
    D = Descriptions.open(folder)
    for g in groups:
        if g.name in (happy, mom):       # whole; any other member names the same token (a real neighbour)
            assert g.coherence > 0.8
            assert all(f"'{g.name}'" in D.get(*m).text for m in g.members)
            assert g.steer.startswith(",".join(f"0:{n}+" for n in sorted(HAPPY_GROUP if g.name == happy
                                                                         else MOM_GROUP)))
    assert all(g.size >= 3 for g in groups)
    with pytest.raises(NeuronscopeError, match="Polarity"):
        cluster_neurons(folder, [(0, 1, "up")])
    with pytest.raises(NeuronscopeError, match="out of range"):
        cluster_neurons(folder, [(0, 999, "pos")])


def test_steer_sweep_rows_equal_separate_runs(planted, embedder):
    """One batched generate with per-row clamps (strengths 0.25, 0.5, 1 and none) gives the separate runs' text."""
    from neuronscope.concepts import steer_generate, steer_interventions, steer_sweep
    from neuronscope.interventions import intervene
    from neuronscope.stats import NeuronStats
    subject, folder, happy, _ = planted
    stats = NeuronStats.open(folder)
    neurons = [(0, n, "pos") for n in HAPPY_GROUP]
    prompt = "Tom and Lily"
    rows = steer_sweep(subject, prompt, neurons, [0.25, 0.5, 1.0], stats, max_new_tokens=12)
    assert [r.strength for r in rows] == [None, 0.25, 0.5, 1.0]
    ids = subject.encode(prompt)
    for r in rows:
        edits = [] if r.strength is None else steer_interventions(stats, neurons, r.strength)
        with intervene(subject, *edits):
            alone = subject.generate_ids(ids, max_new_tokens=12, temperature=0.0)[0]
        from neuronscope.concepts.steer import _text
        assert _text(subject, alone) == r.text
    assert rows[-1].text != rows[0].text                  # the clamps change the answer
    q = float(stats.quantile(stats.level_info.strong_levels()[0])[0, HAPPY_GROUP[0]])
    clamp = steer_interventions(stats, neurons, 0.5)[0]
    assert clamp.neurons == list(HAPPY_GROUP) and abs(clamp.value[0] - 0.5 * q) < 1e-5
    res = steer_generate(subject, folder, prompt, "joyful", [1.0], k=3, embedder=embedder, max_new_tokens=8)
    assert {tuple(n) for n in res.neurons} == {(0, n, "pos") for n in HAPPY_GROUP}
    res = steer_generate(subject, folder, prompt, f"0:{HAPPY_GROUP[0]}+,0:{MOM_GROUP[0]}+", [0.5], max_new_tokens=4)
    assert res.neurons == [(0, HAPPY_GROUP[0], "pos"), (0, MOM_GROUP[0], "pos")]
    from neuronscope.concepts.steer import parse_strengths
    with pytest.raises(NeuronscopeError, match="strengths"):
        parse_strengths("0.5,lots")


def test_clusters_without_any_embedder_use_shared_tokens(planted, tmp_path, monkeypatch):
    import shutil
    from neuronscope.concepts import cluster_neurons
    _, folder, happy, mom = planted
    copy = tmp_path / "atlas"
    shutil.copytree(folder, copy)
    (copy / "neuron_emb.safetensors").unlink()
    monkeypatch.delenv("NEURONSCOPE_EMBEDDER", raising=False)
    groups = cluster_neurons(copy, [(0, n, "pos") for n in HAPPY_GROUP + MOM_GROUP])
    assert sorted((g.name, g.size) for g in groups) == sorted([(happy, 3), (mom, 3)])


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
    elif "Name the concept" in text:
        reply = "Happiness"
    else:
        marked = Counter(re.findall(r"<<(.+?)>>", text))
        reply = f"the token '{marked.most_common(1)[0][0].strip()}'" if marked else "nothing"
        if body.get("temperature", 0) > 0:
            reply = "Description: words near 'park'"
    return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": reply}}]})


@pytest.mark.parametrize("simulator", ["tokens", "llm"])
def test_explainer_endpoint_candidates_scored_on_held_out_windows(planted, simulator):
    from neuronscope.concepts import cluster_neurons
    from neuronscope.describe import Descriptions, OpenAIExplainer, describe_atlas
    subject, folder, happy, _ = planted
    ex = OpenAIExplainer("http://127.0.0.1:9/v1", model="fake",
                         client=httpx.Client(transport=httpx.MockTransport(fake_llm)))
    describe_atlas(folder, explainer=ex, subject=subject, neurons=[(0, HAPPY_GROUP[1], "pos")], n_candidates=3,
                   simulator=simulator, embedder=None, progress=False, overwrite=True)
    con = sqlite3.connect(folder / "atlas.sqlite")
    text, score, source, cands = con.execute("SELECT text, score, source, candidates FROM descriptions WHERE "
                                             "layer=0 AND neuron=? AND polarity='pos'", (HAPPY_GROUP[1],)).fetchone()
    con.close()
    cands = [c for c in json.loads(cands) if c["score"] is not None]   # input-side kinds (output parts: no Pearson)
    assert {c["source"] for c in cands} == {"label", "explainer"} and len(cands) == 3
    by = {c["text"]: c["score"] for c in cands}
    assert by[f"the token '{happy}'"] > 0.9 and by["words near 'park'"] < 0.2
    from neuronscope.describe.forms import split_parts
    assert score == pytest.approx(max(by.values()), abs=1e-6) and split_parts(text)[0].strip() in by
    assert Descriptions.open(folder).get(0, HAPPY_GROUP[1], "pos").source == source
    groups = cluster_neurons(folder, [(0, n, "pos") for n in HAPPY_GROUP], explainer=ex)
    assert groups[0].name == "Happiness"
    bad = OpenAIExplainer("http://127.0.0.1:9/v1", client=httpx.Client(
        transport=httpx.MockTransport(lambda r: httpx.Response(500, text="boom"))))
    with pytest.raises(NeuronscopeError, match="answered 500"):
        describe_atlas(folder, explainer=bad, subject=subject, neurons=[(0, 3, "pos")], embedder=None,
                       progress=False)


def _cli(*args, env_extra=None):
    import os
    env = dict(os.environ, NEURONSCOPE_EMBEDDER=str(MINILM), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "neuronscope", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_cli_describe_search_cluster(planted):
    _, folder, happy, mom = planted
    r = _cli("describe", str(folder), "--show", f"0:{PLANTED}+,0:{RANDOM}", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows[0]["neuron"] == PLANTED and happy in rows[0]["text"] and rows[0]["score"] > 0.9
    r = _cli("describe", str(folder), "--search", mom, "--interpretable", "--json")
    assert r.returncode == 0 and all(x["interpretable"] for x in json.loads(r.stdout))
    r = _cli("atlas", "search", str(folder), "mother", "--json", "-k", "3")
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)["hits"]                      # grounded in activations: each hit says its side
    assert {x["neuron"] for x in hits} == set(MOM_GROUP) and {x["side"] for x in hits} <= {"reads", "writes"}
    r = _cli("atlas", "search", str(folder), "mother", "--json", "-k", "3", "--side", "description")
    assert r.returncode == 0, r.stderr
    assert {x["neuron"] for x in json.loads(r.stdout)} == set(MOM_GROUP)
    r = _cli("atlas", "search", str(folder), "mother", "-k", "3")
    assert r.returncode == 0 and "score" in r.stdout
    both = ",".join(f"0:{n}+" for n in HAPPY_GROUP + MOM_GROUP)
    for by in ("auto", "description"):          # auto: by meaning (statistics + window embeddings are here)
        r = _cli("cluster", str(folder), "--neurons", both, "--json", "--by", by)
        assert r.returncode == 0, r.stderr
        groups = json.loads(r.stdout)
        assert sorted(sorted(m[1] for m in g["members"]) for g in groups) == \
            sorted([sorted(HAPPY_GROUP), sorted(MOM_GROUP)])
        assert all(g["kind"] == ("concept" if by == "auto" else "description") for g in groups)
    r = _cli("cluster", str(folder), "--neurons", "0:x")
    assert r.returncode == 2 and "error:" in r.stderr
    r = _cli("atlas", "search", str(folder), "mother", "--embedder", "/nonexistent/emb")
    assert r.returncode == 2 and "error:" in r.stderr


def test_cli_generate_steer(planted, tmp_path):
    subject, folder, _, _ = planted
    mdir = tmp_path / "tiny"
    subject.model.save_pretrained(mdir)
    subject.tokenizer.save_pretrained(mdir)
    r = _cli("generate", str(mdir), "-p", "Tom and Lily", "-n", "6", "--steer", "joyful", "--strengths", "0.5,1",
             "--atlas", str(folder), "--steer-k", "3")
    assert r.returncode == 0, r.stderr
    assert "no steering" in r.stdout and "strength 0.5" in r.stdout and "strength 1" in r.stdout
    assert all(f"0:{n}+" in r.stdout for n in HAPPY_GROUP)
    r = _cli("generate", str(mdir), "-p", "Tom", "--steer", "joyful")
    assert r.returncode == 2 and "--atlas" in r.stderr
    r = _cli("generate", str(mdir), "-p", "Tom", "--steer", "joyful", "--atlas", str(folder), "--strengths", "a")
    assert r.returncode == 2 and "strengths" in r.stderr


@pytest.mark.slow
def test_local_explainer_smollm(planted, smollm):
    from neuronscope.describe import Descriptions, LocalExplainer, describe_atlas
    subject, folder, happy, _ = planted
    describe_atlas(folder, explainer=LocalExplainer(smollm), subject=subject, neurons=[(0, PLANTED, "pos")],
                   n_candidates=2, n_exemplars=8, embedder=None, progress=False, overwrite=True)
    con = sqlite3.connect(folder / "atlas.sqlite")
    cands = json.loads(con.execute("SELECT candidates FROM descriptions WHERE layer=0 AND neuron=? AND "
                                   "polarity='pos'", (PLANTED,)).fetchone()[0])
    con.close()
    assert any(c["source"] == "explainer" and c["text"] for c in cands)
    assert all(isinstance(c["score"], float) for c in cands if c["source"] in ("label", "explainer"))
    d = Descriptions.open(folder).get(0, PLANTED, "pos")
    assert d.score == pytest.approx(max(c["score"] for c in cands if c["score"] is not None), abs=1e-6)


def test_damaged_index_or_database_is_one_sentence_from_describe_and_search(planted, tmp_path):
    """A truncated neuron_emb.safetensors or a garbled atlas.sqlite: `atlas search` / `describe` say so in one
    `error:` line naming the file (exit 2), through AtlasFolder's checks; the library raises NeuronscopeError."""
    import shutil
    from neuronscope.concepts import semantic_search
    from neuronscope.describe import Descriptions
    _, folder, _, mom = planted
    bad_index = tmp_path / "bad-index"
    shutil.copytree(folder, bad_index)
    f = bad_index / "neuron_emb.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(NeuronscopeError, match="neuron_emb.safetensors' is damaged"):
        semantic_search(bad_index, "mother", embedder=MINILM)
    r = _cli("atlas", "search", str(bad_index), "mother", "-k", "3")
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("error:") and "neuron_emb.safetensors" in lines[-1] and "describe" in lines[-1]
    assert "Traceback" not in r.stderr
    bad_db = tmp_path / "bad-db"
    shutil.copytree(folder, bad_db)
    db = bad_db / "atlas.sqlite"
    data = bytearray(db.read_bytes())
    data[:100] = b"not a database" * 7 + b"xx"
    db.write_bytes(bytes(data))
    with pytest.raises(NeuronscopeError, match="atlas.sqlite"):
        Descriptions.open(bad_db)
    r = _cli("describe", str(bad_db), "--show", f"0:{PLANTED}+")
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("error:") and "atlas.sqlite" in lines[-1] and "damaged" in lines[-1]
    assert "Traceback" not in r.stderr
    r = _cli("atlas", "search", str(bad_db), "mother", "-k", "3")
    assert r.returncode == 2 and "atlas.sqlite" in r.stderr and "Traceback" not in r.stderr
