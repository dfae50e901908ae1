"""Corpus statistics on the real stories260k model: exact extremes and quantiles, shards, resume, exemplars."""
from __future__ import annotations

import json
import random

import pytest
import torch

from neuronscope.errors import NeuronscopeError
from neuronscope.interventions import capture
from neuronscope.stats import NeuronStats, compute_stats, merge_shards, quantiles_from_extremes
from neuronscope.stats import checkpoint
from neuronscope.stats import compute as compute_mod
from neuronscope.stats.corpus import iter_documents, iter_windows
from neuronscope.stats.results import with_window_acts

WINDOW = 32
K = 300
E = 12

NAMES = ["Lily", "Tom", "Ben", "Sue", "Max", "Mia"]
THINGS = ["a red ball", "a big dog", "a little cat", "a shiny rock", "a blue kite", "an old box", "a tree"]
VERBS = ["found", "saw", "wanted", "liked", "lost", "shared", "painted"]
ENDS = ["She was very happy.", "He said thank you.", "They played all day.", "The sun was warm.",
        "Mom smiled at them.", "It was a good day."]


def story(rng: random.Random) -> str:
    out = ["Once upon a time, there was a kid named " + rng.choice(NAMES) + "."]
    for _ in range(rng.randint(3, 7)):
        out.append(f"{rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(THINGS)} in the park.")
        out.append(rng.choice(ENDS))
    return " ".join(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus of our own: a plain-text file with <|endoftext|> separators and a JSONL file."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(5)
    stories = [story(rng) for _ in range(70)]
    (d / "a.txt").write_text("\n<|endoftext|>\n".join(stories[:40]) + "\n<|endoftext|>\nCut off", encoding="utf-8")
    with open(d / "b.jsonl", "w", encoding="utf-8") as f:
        for s in stories[40:]:
            f.write(json.dumps({"text": s}) + "\n")
    return [d / "a.txt", d / "b.jsonl"]


@pytest.fixture(scope="module")
def single(stories, corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    return compute_stats(stories, corpus, folder, window=WINDOW, k=K, n_exemplars=E, batch=5, progress=False,
                         keep_extremes=True)


@pytest.fixture(scope="module")
def all_acts(stories, corpus):
    """Every activation of the corpus, computed directly: [L, n_tokens, N], and the windows."""
    wins = list(iter_windows(stories.tokenizer, corpus, WINDOW))
    ids = torch.tensor([w.token_ids for w in wins])
    _, cap = capture(stories, ids)
    acts = cap.activations  # [L, B, T, N]
    return acts.reshape(acts.shape[0], -1, acts.shape[-1]), wins


def test_extremes_and_quantiles_equal_exact_computation(single, all_acts):
    acts, wins = all_acts
    n = acts.shape[1]
    assert n == len(wins) * WINDOW and n > 4 * K  # enough tokens that the top-K really discards values
    assert single.tokens == n and int(single.count[0, 0]) == n
    full = torch.sort(acts, dim=1).values  # ascending [L, n, N]
    for l in range(acts.shape[0]):
        top, bottom = single.extremes(l)
        assert torch.equal(top, full[l].flip(0)[:K].T)
        assert torch.equal(bottom, full[l][:K].T)
    # every stored level is resolvable here (ranks are 1): min and max
    assert torch.equal(single.quantile(1e-7), full[:, 0])
    assert torch.equal(single.quantile(1 - 1e-7), full[:, -1])
    # the definition at levels with larger ranks, against a sort and numpy's inverted-CDF quantile
    l = 2
    top, bottom = single.extremes(l)
    levels = (0.01, 0.03, 0.97, 0.99)
    with pytest.warns(UserWarning, match="not resolvable"):
        q = quantiles_from_extremes(top, bottom, n, levels + (0.2,))
    for j, p in enumerate(levels):
        r = -(-int(round(min(p, 1 - p) * n * 1e6)) // 1_000_000)  # ceil without float noise
        assert r <= K
        expect = full[l, r - 1] if p < 0.5 else full[l, n - r]
        assert torch.equal(q[j], expect)
    np = pytest.importorskip("numpy")
    want = torch.from_numpy(np.quantile(acts[l].numpy(), 0.01, axis=0, method="inverted_cdf"))
    assert torch.equal(q[0], want.float())
    assert torch.isnan(q[4]).all()  # rank 0.2 * n > K
    assert torch.allclose(single.mean, acts.double().mean(1), rtol=1e-5, atol=1e-6)
    assert torch.allclose(single.var, acts.double().var(1, unbiased=False), rtol=1e-5, atol=1e-6)


def test_exemplars_point_at_the_recorded_tokens(single, all_acts, stories):
    acts, wins = all_acts
    for layer, neuron in ((0, 3), (4, 100)):
        for pol in ("pos", "neg"):
            ex = with_window_acts(stories, single.exemplars(layer, neuron, pol, n=E), layer, neuron)
            assert len(ex) == E
            vals = [e.activation for e in ex]
            assert vals == sorted(vals, reverse=(pol == "pos"))
            col = acts[layer, :, neuron]
            best = torch.sort(col, descending=(pol == "pos")).values[:E]
            assert torch.equal(torch.tensor(vals), best)
            for e in ex:
                gi = e.window * WINDOW + e.position
                assert col[gi].item() == e.activation
                assert e.token_ids == wins[e.window].token_ids
                assert e.tokens == stories.token_strings(e.token_ids)
                assert abs(e.acts[e.position] - e.activation) < 1e-5
    with pytest.raises(NeuronscopeError, match="Polarity"):
        single.exemplars(0, 0, "up")
    with pytest.raises(NeuronscopeError, match="out of range"):
        single.exemplars(0, 10_000)


def test_normalise_is_signed_by_the_extreme_quantiles(single, all_acts):
    acts, _ = all_acts
    a = acts[:, :50]                      # [L, T, N]
    z = single.normalise(a)
    lv_hi, lv_lo = single.norm_levels()       # ~10K tokens resolve no stored level: the least extreme, 1e-4
    assert (lv_hi, lv_lo) == (1 - 1e-4, 1e-4) and single.level_info.get(1e-4).mark.startswith("sample extreme")
    hi, lo = single.quantile(lv_hi), single.quantile(lv_lo)
    assert z.shape == a.shape
    assert torch.equal(torch.sign(z), torch.sign(a))
    pos = a > 0
    assert torch.allclose(z[pos], (a / hi.unsqueeze(1).expand_as(a))[pos])
    assert torch.allclose(z[~pos], (a / lo.abs().unsqueeze(1).expand_as(a))[~pos])
    assert z.abs().max() <= 1.0 + 1e-6   # q(1 - 1e-5) is the max here: nothing in the corpus goes beyond
    assert single.normalise(a.unsqueeze(0)).shape == (1,) + a.shape
    with pytest.raises(NeuronscopeError, match="shape"):
        single.normalise(a[:2])


def assert_same_stats(st: NeuronStats, ref: NeuronStats, n_layers: int, tol: float) -> None:
    """Quantiles, exemplars, counts and extremes identical; mean and variance equal up to `tol` (relative)."""
    for name in ("quantiles", "ex_pos_value", "ex_pos_index", "ex_neg_value", "ex_neg_index", "count"):
        assert torch.equal(st._a[name], ref._a[name]), name
    for l in range(n_layers):
        assert all(torch.equal(a, b) for a, b in zip(st.extremes(l), ref.extremes(l)))
    assert torch.allclose(st.mean, ref.mean, rtol=tol, atol=tol / 10)
    assert torch.allclose(st.var, ref.var, rtol=tol, atol=tol / 10)


def test_shards_merge_to_the_single_run(single, stories, corpus, tmp_path):
    dirs = []
    for i in range(3):
        d = tmp_path / f"shard{i}"
        compute_stats(stories, corpus, d, window=WINDOW, k=K, n_exemplars=E, batch=4, shard=f"{i}/3",
                      progress=False)
        dirs.append(d)
    merged = merge_shards(dirs, tmp_path / "merged", keep_extremes=True)
    assert_same_stats(merged, single, stories.n_layers, tol=1e-6)
    e1, e2 = merged.exemplars(1, 7, "neg", n=5), single.exemplars(1, 7, "neg", n=5)
    assert e1 == e2
    with pytest.raises(NeuronscopeError, match="given twice"):
        merge_shards([dirs[0], dirs[0]], tmp_path / "bad")
    with pytest.raises(NeuronscopeError, match="no finished"):
        merge_shards([dirs[0], tmp_path / "nothing"], tmp_path / "bad")


def interrupted_run(monkeypatch, stories, corpus, folder, at: int, **kw) -> None:
    """A run stopped by a KeyboardInterrupt after batch `at` (checkpointing after every batch)."""
    def stop(batch_no):
        if batch_no == at:
            raise KeyboardInterrupt

    monkeypatch.setattr(compute_mod, "_after_batch", stop)
    with pytest.raises(KeyboardInterrupt):
        compute_stats(stories, corpus, folder, window=WINDOW, k=K, n_exemplars=E, batch=5, progress=False,
                      checkpoint_every=0, **kw)


def test_resume_equals_an_uninterrupted_run(single, stories, corpus, tmp_path, monkeypatch):
    folder = tmp_path / "resume"
    interrupted_run(monkeypatch, stories, corpus, folder, at=3)
    state = checkpoint.load(folder)[1]
    assert state["batches"] == 3 and state["windows"] == 15
    with pytest.raises(NeuronscopeError):
        NeuronStats.open(folder)  # not finished: no stats yet
    with pytest.raises(NeuronscopeError, match="other settings"):
        compute_stats(stories, corpus, folder, window=WINDOW, k=K + 1, n_exemplars=E, batch=5, progress=False)
    calls = []
    monkeypatch.setattr(compute_mod, "_after_batch", calls.append)
    resumed = compute_stats(stories, corpus, folder, window=WINDOW, k=K, n_exemplars=E, batch=5, progress=False)
    assert calls and calls[0] == 4  # batches 1-3 were not recomputed
    for name in ("quantiles", "mean", "var", "ex_pos_value", "ex_pos_index", "ex_neg_index", "count"):
        assert torch.equal(resumed._a[name], single._a[name]), name
    assert not checkpoint.exists(folder)


def test_torch_fold_of_all_layers_at_once_and_its_checkpoint_equal_the_single_run(single, stories, corpus, tmp_path,
                                                                                   monkeypatch):
    """The fold a GPU runs (torch, all layers in one state), here on the CPU; interrupted, then resumed by the
    default (numba, layer by layer) fold from the same per-layer checkpoint."""
    folder = tmp_path / "torch"
    interrupted_run(monkeypatch, stories, corpus, folder, at=2, fold="torch")
    monkeypatch.setattr(compute_mod, "_after_batch", lambda b: None)
    resumed = compute_stats(stories, corpus, folder, window=WINDOW, k=K, n_exemplars=E, batch=5, progress=False,
                            keep_extremes=True)
    full = compute_stats(stories, corpus, tmp_path / "torch-full", window=WINDOW, k=K, n_exemplars=E, batch=5,
                         progress=False, fold="torch", keep_extremes=True)
    for st in (resumed, full):     # the torch fold's batch moments are float32: a looser tolerance on them
        assert_same_stats(st, single, stories.n_layers, tol=1e-5)
    with pytest.raises(NeuronscopeError, match="fold"):
        compute_stats(stories, corpus, tmp_path / "bad", window=WINDOW, k=K, fold="fast", progress=False)


def test_formats_and_bad_input(stories, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    texts = ["The cat sat on the mat.", "Tom had a big red ball."]
    (tmp_path / "c.csv").write_text("id,text\n1,The cat sat on the mat.\n2,Tom had a big red ball.\n")
    pq.write_table(pa.table({"text": texts}), tmp_path / "p.parquet")
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                                  {"role": "assistant", "content": "Hello!"}]}) + "\n")
    (tmp_path / "alp.json").write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "Hi!"}]))
    assert list(iter_documents(tmp_path / "c.csv")) == texts
    assert list(iter_documents(tmp_path / "p.parquet")) == texts
    assert list(iter_documents(tmp_path / "alp.json")) == [[{"role": "user", "content": "Say hi"},
                                                             {"role": "assistant", "content": "Hi!"}]]
    # chat documents go through the chat template when the tokenizer has one
    tok = stories.tokenizer
    old = getattr(tok, "chat_template", None)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    try:
        wins = list(iter_windows(tok, [tmp_path / "chat.jsonl"], 4))
        flat = [i for w in wins for i in w.token_ids]
        want = tok("<user>Hi\n<assistant>Hello!\n", add_special_tokens=False)["input_ids"]
        assert flat[:len(want) - 2] == want[:len(want) - 2]
    finally:
        tok.chat_template = old
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(NeuronscopeError, match="bad.jsonl:2 is not valid JSON"):
        list(iter_documents(tmp_path / "bad.jsonl"))
    with pytest.raises(NeuronscopeError, match="--corpus"):
        compute_stats(stories, [], tmp_path / "x", progress=False)
    with pytest.raises(NeuronscopeError, match="does not exist"):
        compute_stats(stories, tmp_path / "missing.txt", tmp_path / "x", progress=False)
    with pytest.raises(NeuronscopeError, match="Shard 3/3 is out of range"):
        compute_stats(stories, tmp_path / "c.csv", tmp_path / "x", shard="3/3", progress=False)
    with pytest.raises(NeuronscopeError, match="no complete window"):
        compute_stats(stories, tmp_path / "c.csv", tmp_path / "x", window=512, progress=False)
    with pytest.raises(NeuronscopeError, match="no corpus statistics"):
        NeuronStats.open(tmp_path)
