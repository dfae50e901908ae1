"""IRM on real models: exact hooks (off = bit-identical, injection = manual residual additions, KV-cache generation),
labels shifted once, training that makes a chosen word dominate, exact resume, and the analysis report."""
from __future__ import annotations

import json
import random
from contextlib import nullcontext

import pytest
import torch

from neuronscope.errors import NeuronscopeError
from neuronscope.interventions import AddToResidual, Capture, intervene
from neuronscope.irm import (IRM, TrainConfig, analyze_runs, collate, evaluate_irm, lm_loss, read_table, split,
                             striation, tokenize_rows, train_irm)
from neuronscope.irm.data import IGNORE
from tests.conftest import CORPORA

WORD = [410, 393]          # " happy" in the stories260k tokenizer: "▁" then "happy"
WORD2 = [410, 296, 418]    # " sad"


def _sentences(n: int) -> list[str]:
    path = CORPORA / "tinystories-sample" / "tinystories_sample.txt"
    out: list[str] = []
    if path.is_file():
        for story in path.read_text(encoding="utf-8").split("<|endoftext|>"):
            first = story.strip().split(". ")[0].strip()
            if 20 < len(first) < 120 and first + "." not in out:
                out.append(first + ".")
            if len(out) >= n:
                break
    while len(out) < n:  # fallback fixtures when the corpus is missing
        i = len(out)
        out.append(f"Once upon a time there was a {['cat', 'dog', 'bird', 'girl', 'boy'][i % 5]} number {i}.")
    return out


SENTS = _sentences(260)


def _rows(word: str, n: int = 160, offset: int = 0):
    ends = ["and glad.", "day!", "smile.", "and they played."]
    return [{"prompt": p, "response": f" {word} " + random.Random(i).choice(ends)}
            for i, p in enumerate(SENTS[offset:offset + n])]


def _word_prob(subject, irm, prompts, word=WORD) -> float:
    """P(next word == word | prompt), averaged over prompts."""
    ps = []
    for p in prompts:
        ids = torch.cat([subject.encode(p), torch.tensor([word[:-1]])], 1)
        with (irm.attached(subject) if irm is not None else nullcontext()), torch.no_grad():
            lp = subject.model(input_ids=ids).logits.log_softmax(-1)[0]
        T = ids.shape[1]
        s = sum(lp[T - len(word) + k, word[k]] for k in range(len(word)))
        ps.append(float(s.exp()))
    return sum(ps) / len(ps)


@pytest.fixture(scope="module")
def happy_run(stories, tmp_path_factory):
    d = tmp_path_factory.mktemp("irm") / "happy"
    res = train_irm(stories, _rows("happy"), d, inject_layers="all",
                    config=TrainConfig(steps=100, batch_size=8, eval_every=50, lr=1e-3, seed=0), progress=False,
                    alignment="happy")
    return res


@pytest.fixture(scope="module")
def sad_run(stories, tmp_path_factory):
    d = tmp_path_factory.mktemp("irm") / "sad"
    return train_irm(stories, _rows("sad"), d, inject_layers="1-4",
                     config=TrainConfig(steps=60, batch_size=8, eval_every=30, lr=1e-3, seed=1), progress=False,
                     alignment="sad")


# ---- data -----------------------------------------------------------------------------------------------------
def test_labels_are_shifted_exactly_once(stories):
    ex = tokenize_rows(stories, [{"text": s} for s in SENTS[:4]])
    b = collate(ex, pad_id=0)
    with torch.no_grad():
        logits = stories.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        hf = stories.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    ours = lm_loss(logits, b["labels"])
    assert torch.allclose(ours, hf, atol=1e-5)
    # by hand: position t predicts token t+1
    lp = logits.log_softmax(-1)
    ids, lab = b["input_ids"], b["labels"]
    terms = [-lp[i, t, ids[i, t + 1]] for i in range(ids.shape[0]) for t in range(ids.shape[1] - 1)
             if lab[i, t + 1] != IGNORE]
    assert torch.allclose(ours, torch.stack(terms).mean(), atol=1e-5)
    # the original code's bug (shifting twice: predicting t+2) gives a different, worse number
    twice = lm_loss(logits[:, :-1], lab[:, 1:])
    assert twice > ours + 1.0


def test_prompt_and_padding_never_count(stories):
    rows = [{"prompt": "Once upon a time", "response": " there was a cat."},
            {"prompt": "The dog ran to the park and saw a big red ball", "response": " happy"}]
    ex = tokenize_rows(stories, rows)
    b = collate(ex, pad_id=stories.tokenizer.pad_token_id)
    p0 = len(stories.tokenizer("Once upon a time")["input_ids"])
    assert (b["labels"][0, :p0] == IGNORE).all() and (b["labels"][0, p0:len(ex[0].input_ids)] != IGNORE).all()
    assert (b["labels"][0, len(ex[0].input_ids):] == IGNORE).all()        # padding
    assert b["attention_mask"][0].sum() == len(ex[0].input_ids)
    # the batch loss is the token-weighted mean of each example's loss alone: padding changes nothing
    with torch.no_grad():
        lb = lm_loss(stories.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                     b["labels"], reduction="sum")
        singles = [lm_loss(stories.model(input_ids=torch.tensor([e.input_ids])).logits,
                           torch.tensor([e.labels]), reduction="sum") for e in ex]
    total = sum(s[0] for s in singles) / sum(s[1] for s in singles)
    assert torch.allclose(lb[0] / lb[1], total, atol=1e-5)
    assert int(lb[1]) == sum(e.n_target for e in ex)


def test_tables_csv_jsonl_parquet(tmp_path):
    import csv
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"prompt": "a b", "response": "c, d"}, {"prompt": "e", "response": "f \"g\""}]
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "response"])
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for ext in ("csv", "jsonl", "parquet"):
        assert read_table(tmp_path / f"d.{ext}") == rows
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(NeuronscopeError, match="'text' column or 'prompt' and 'response'"):
        tokenize_rows(None, read_table(tmp_path / "bad.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(NeuronscopeError, match="must be"):
        read_table(tmp_path / "d.txt")
    with pytest.raises(NeuronscopeError, match="No data file"):
        read_table(tmp_path / "missing.csv")


def test_split_is_seeded_and_disjoint():
    a, b = split(50, 0.2, seed=3)
    assert split(50, 0.2, seed=3) == (a, b) and split(50, 0.2, seed=4) != (a, b)
    assert len(b) == 10 and not set(a) & set(b) and sorted(a + b) == list(range(50))


# ---- hooks ----------------------------------------------------------------------------------------------------
def _random_irm(subject, layers, **kw):
    irm = IRM.for_subject(subject, layers, **kw)
    with torch.no_grad():
        for p in irm.parameters():
            p.normal_(0, 0.3)
    return irm


def test_irm_off_is_bit_identical_and_zero_init_is_a_no_op(stories):
    ids = stories.encode("Once upon a time there was a little girl")
    base = stories.logits(ids)
    irm = IRM.for_subject(stories, "all")
    with irm.attached(stories):
        fresh = stories.logits(ids)
    assert torch.allclose(fresh, base, atol=1e-6)
    rnd = _random_irm(stories, "all")
    with rnd.attached(stories):
        on = stories.logits(ids)
    assert (on - base).abs().max() > 1e-2
    assert torch.equal(stories.logits(ids), base)    # after the block: no hooks, same bits


@pytest.mark.parametrize("read_site,inject_site,layers", [("resid.mid", "resid.mid", [0, 2, 4]),
                                                          ("resid.mid", "resid.post", [0, 3]),
                                                          ("resid.post", "resid.post", [1, 4])])
def test_injection_equals_manual_residual_additions(stories, read_site, inject_site, layers):
    """Read the residual first (before the IRM's own add at that layer), add out[..., j, :] at injected layer j."""
    read_layer = 1 if read_site == "resid.post" else 0
    irm = _random_irm(stories, layers, read_layer=read_layer, read_site=read_site, inject_site=inject_site)
    ids = stories.encode("The little dog ran to the park")
    cap = Capture(layers=[read_layer], sites=(read_site,))
    with intervene(stories, cap), torch.no_grad():
        stories.model(input_ids=ids)
    with torch.no_grad():
        out = irm(cap.get(read_site, read_layer))[0]          # [T, n, H]
    adds = [AddToResidual(l, out[:, j, :], site=inject_site) for j, l in enumerate(layers)]
    with intervene(stories, *adds):
        manual = stories.logits(ids)
    with irm.attached(stories):
        hooked = stories.logits(ids)
    assert torch.allclose(hooked, manual, atol=1e-5)


def test_irm_in_generation_matches_full_forward(stories):
    """With the KV cache each decode step is one call; greedy tokens equal the argmax of full forwards."""
    irm = _random_irm(stories, "all")
    irm.net[-1].weight.data.mul_(0.1)
    ids = stories.encode("Once upon a time")
    with irm.attached(stories):
        new = stories.generate_ids(ids, max_new_tokens=8)
        seq = ids
        for k in range(8):
            nxt = stories.logits(seq)[0, -1].argmax()
            assert int(nxt) == int(new[0, k])
            seq = torch.cat([seq, nxt.view(1, 1)], 1)


def test_bad_configurations(stories):
    with pytest.raises(NeuronscopeError, match="inject at or after"):
        IRM.for_subject(stories, "0-2", read_layer=2)
    with pytest.raises(NeuronscopeError, match="inject at or after"):
        IRM.for_subject(stories, "1", read_layer=1, read_site="resid.post", inject_site="resid.mid")
    with pytest.raises(NeuronscopeError, match="out of range"):
        IRM.for_subject(stories, "0-9")
    with pytest.raises(NeuronscopeError, match="Unknown IRM site"):
        IRM.for_subject(stories, "all", inject_site="resid.pre")


# ---- training ---------------------------------------------------------------------------------------------------
def test_training_makes_the_word_dominate_and_the_llm_stays_frozen(stories, happy_run):
    held = SENTS[200:240]
    off = _word_prob(stories, None, held)
    on = _word_prob(stories, happy_run.irm, held)
    assert off < 1e-3 and on > 0.3 and on > 100 * off, (off, on)
    assert all(not p.requires_grad and p.grad is None for p in stories.model.parameters())
    hist = [h["val_loss"] for h in happy_run.history if "val_loss" in h]
    assert hist[0] > 3 * happy_run.best_val
    run = json.loads((happy_run.run_dir / "run.json").read_text())
    assert run["status"] in ("done", "stopped early") and run["fingerprint"] == stories.fingerprint
    assert run["n_val"] == 16 and (happy_run.run_dir / "split.json").is_file()
    saved = IRM.load(happy_run.run_dir)
    assert saved.config.model_fingerprint == stories.fingerprint and saved.config.inject_layers == [0, 1, 2, 3, 4]
    # only the IRM in the checkpoint: its tensors are the IRM's parameters
    from safetensors.torch import load_file
    assert set(load_file(str(happy_run.run_dir / "irm.safetensors"))) == set(saved.state_dict())
    # eval: aligned loss falls a lot with the IRM, neutral text moves less
    rep = evaluate_irm(stories, happy_run.irm, _rows("happy", 30, offset=200),
                       neutral_texts=SENTS[240:260])
    assert rep.aligned is not None and rep.neutral is not None
    assert rep.aligned.delta < -1.0 and rep.aligned.delta < rep.neutral.delta


def test_resume_gives_the_same_result_as_one_run(stories, tmp_path):
    rows = _rows("happy", 60)
    cfg = dict(batch_size=4, eval_every=5, lr=1e-3, seed=7, patience=0)
    a = train_irm(stories, rows, tmp_path / "a", inject_layers="2-4", width=32,
                  config=TrainConfig(steps=20, **cfg), progress=False)
    train_irm(stories, rows, tmp_path / "b", inject_layers="2-4", width=32,
              config=TrainConfig(steps=10, **cfg), progress=False)
    b = train_irm(stories, rows, tmp_path / "b", inject_layers="2-4", width=32,
                  config=TrainConfig(steps=20, **cfg), resume=True, progress=False)
    assert b.step == a.step == 20
    for (k, va), (_, vb) in zip(a.irm.state_dict().items(), b.irm.state_dict().items()):
        assert torch.equal(va, vb), k
    assert a.history == b.history
    # and an uninterrupted run is deterministic with its seed
    from neuronscope.store import load_tensors
    ca = load_tensors(tmp_path / "a" / "checkpoints" / "step-000020" / "irm.safetensors")
    cb = load_tensors(tmp_path / "b" / "checkpoints" / "step-000020" / "irm.safetensors")
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    # a run folder is never overwritten by accident, and resume refuses changed options
    with pytest.raises(NeuronscopeError, match="already holds a run"):
        train_irm(stories, rows, tmp_path / "a", inject_layers="2-4", width=32,
                  config=TrainConfig(steps=20, **cfg), progress=False)
    with pytest.raises(NeuronscopeError, match="Cannot resume"):
        train_irm(stories, rows, tmp_path / "a", inject_layers="2-4", width=64,
                  config=TrainConfig(steps=30, **cfg), resume=True, progress=False)


def test_l1_penalty_shrinks_outputs(stories, tmp_path):
    rows = _rows("happy", 40)
    ids = stories.encode(SENTS[250])
    mags = []
    for l1 in (0.0, 100.0):
        r = train_irm(stories, rows, tmp_path / f"l1-{l1}", inject_layers="all", width=32,
                      config=TrainConfig(steps=40, batch_size=8, eval_every=40, l1=l1, val_fraction=0.0),
                      progress=False)
        seen: list = []
        with r.irm.attached(stories, on_output=lambda o, ctx, seen=seen: seen.append(o.abs().mean())), \
                torch.no_grad():
            stories.model(input_ids=ids)
        mags.append(float(seen[0]))
    assert mags[1] < 0.3 * mags[0], mags


# ---- analysis -----------------------------------------------------------------------------------------------------
def test_striation_score():
    H = 40
    col = torch.randn(H)
    stripes = col.repeat(6, 1) + 0.01 * torch.randn(6, H)
    rows_only = torch.randn(6, 1).repeat(1, H)
    assert striation(stripes)["index_share"] > 0.99
    assert striation(rows_only)["layer_share"] > 0.99 and striation(rows_only)["index_share"] < 0.01


def test_analyze_two_alignments_writes_the_report(stories, happy_run, sad_run, tmp_path):
    out = tmp_path / "report"
    analysis = analyze_runs([happy_run.run_dir, sad_run.run_dir], out, subject=stories, max_new_tokens=8, top_k=5,
                            prompts=SENTS[240:244], controls=[sad_run.run_dir], n_random=5, n_permutations=200,
                            progress=False)
    res = analysis.to_json()                      # the dataclass's JSON form is analysis.json
    saved = json.loads((out / "analysis.json").read_text())
    assert set(saved) == set(res) and saved["findings"] == res["findings"] == analysis.findings
    assert [r["name"] for r in saved["runs"]] == [r.name for r in analysis.runs] and "matched" not in saved
    for f in res["figures"] + ["report.md", "analysis.json"]:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert len(res["figures"]) == 5
    md = (out / "report.md").read_text()
    for png in res["figures"]:
        assert f"]({png})" in md
    assert "Findings" in md and "massive activations" in md and "survive" in md
    r0, r1 = res["runs"]
    assert r0["alignment"] != r1["alignment"] and len(r0["top_indices"]) == 5
    # every prompt token and each frozen continuation token is an input
    n_prompt = sum(len(stories.encode(p)[0]) for p in SENTS[240:244])
    assert n_prompt < r0["tokens"] <= n_prompt + 4 * 8
    assert 0 <= r0["striation"]["index_share"] <= 1
    perm = r0["striation_tests"][0]
    assert perm["null"].startswith("permutation") and 0 < perm["p_value"] <= 1 and perm["n"] == 200
    assert {t["null"].split(" ")[0] for t in r0["striation_tests"]} == {"permutation", "random-init"}
    ctl = {t["null"].split(" ")[0] for t in r1["striation_tests"]}
    assert "control" in ctl          # the control run has the same layers as the sad run
    c = torch.tensor(res["correlation"]["matrix"])
    assert c.shape == (2, 2) and torch.allclose(c.diagonal(), torch.ones(2, dtype=c.dtype))
    assert res["correlation"]["kind"].startswith("per-index")      # different layer sets
    ranks = {r["index"] for r in res["recurrence"]}
    assert ranks == set(r0["top_indices"]) | set(r1["top_indices"])
    assert res["recurrence_test"]["null_mean"] > 0
    o = res["outliers"]["rankings"]
    g = stories.spec.final_norm_gain(stories.model).abs()
    assert o["final_norm_gain"]["indices"][0] == int(g.argmax())
    for cz in r0["coincidences"].values():
        assert cz["tests"][0]["null"].startswith("hypergeometric") and 0 < cz["tests"][0]["p_value"] <= 1
    assert res["findings"] and any("striation share" in f for f in res["findings"])


def test_analyze_never_uses_training_rows_by_default(stories, tmp_path):
    from neuronscope.irm.analysis import held_out_prompts
    from neuronscope.store import read_json
    data = tmp_path / "happy.jsonl"
    rows = _rows("happy", 60)
    rows[5]["prompt"] = rows[50]["prompt"]      # a prompt used twice: excluded if any copy is a training row
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run_dir = tmp_path / "run"
    train_irm(stories, data, run_dir, inject_layers="1-2", width=8, progress=False,
              config=TrainConfig(steps=2, batch_size=4, eval_every=2, val_fraction=0.3))
    run = read_json(run_dir / "run.json")
    prompts, source = held_out_prompts([(run, run_dir)])
    res = analyze_runs([run_dir], tmp_path / "rep", subject=stories, max_new_tokens=2, top_k=3, n_random=2,
                       n_permutations=20, progress=False)
    assert res.prompts == prompts
    rows = read_table(data)
    sp = read_json(run_dir / "split.json")
    train_prompts = {rows[i]["prompt"] for i in sp["train"]}
    assert prompts and "held-out" in source
    assert not set(prompts) & train_prompts
    assert set(prompts) <= {rows[i]["prompt"] for i in sp["val_rows"]}


def test_analyze_refuses_runs_of_different_models(stories, happy_run, tmp_path):
    import shutil
    other = tmp_path / "other"
    shutil.copytree(happy_run.run_dir, other)
    run = json.loads((other / "run.json").read_text())
    run["fingerprint"] = "0000"
    (other / "run.json").write_text(json.dumps(run))
    with pytest.raises(NeuronscopeError, match="different models"):
        analyze_runs([happy_run.run_dir, other], tmp_path / "r", subject=stories)
