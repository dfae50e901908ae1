"""The neuron atlas: decodes equal a direct computation, every family builds, resume, compare, search, CLI."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from neuronscope.atlas import Atlas, build_atlas, compare_atlases, decode, naive_decode
from neuronscope.atlas import build as build_mod
from neuronscope.atlas.decode import shuffled_unembedding
from neuronscope.errors import NeuronscopeError
from neuronscope.subject import Subject
from tiny import FAMILIES, tiny_model, tiny_subject


def direct(subject, layer, site, apply_norm=True):
    """W_U (g * v) for every neuron of a layer, computed the obvious way in float64: [N, V]."""
    spec, m = subject.spec, subject.model
    v = spec.write_vectors(m, layer) if site.startswith("down") else spec.read_vectors(m, layer)[site]
    v = v.double()
    if apply_norm:
        v = v * spec.final_norm_gain(m).double()
    z = v @ spec.unembedding(m).double().T
    return -z if site == "down.neg" else z


def assert_site_matches(atlas, subject, layer, site, neurons, apply_norm=True):
    z = direct(subject, layer, site, apply_norm)
    k = atlas.top_k
    for i in neurons:
        vals, ids = z[i].topk(k)
        got = atlas.top_ids(site)[layer, i]
        # the same tokens in the same order, up to float32 near-ties: the exact logits of the ids returned are
        # the exact top-k values, and the stored logits and probabilities are those of the ids returned
        assert len(set(got.tolist())) == k
        torch.testing.assert_close(z[i][got], vals, atol=1e-5, rtol=1e-5)
        assert (got == ids).float().mean() > 0.8, (site, layer, i)
        torch.testing.assert_close(atlas.top_logits(site)[layer, i].double(), z[i][got], atol=1e-4, rtol=1e-4)
        probs = torch.softmax(z[i], 0)[got]
        torch.testing.assert_close(atlas.top_probs(site)[layer, i].double(), probs, atol=1e-6, rtol=1e-4)


# ---- the decode kernel ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 60.0])
def test_decode_methods_equal_plain(scale):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(3000, 24, generator=g)
    U = torch.randn(70, 24, generator=g) * scale / 5
    ref = decode(U, W, k=7, sides=("pos", "neg"), method="plain")
    Ws, perm = shuffled_unembedding(W)
    runs = {
        "fused": decode(U, W, k=7, sides=("pos", "neg"), method="fused", vocab_block=256, chunk=32),
        "fused-shuffled": decode(U, Ws, k=7, sides=("pos", "neg"), method="fused", vocab_block=100,
                                 permutation=perm),
        "twopass-64": decode(U, W, k=7, sides=("pos", "neg"), method="twopass", approx_dtype=torch.float32,
                             exact_dtype=torch.float64),
        "twopass-bf16": decode(U, W, k=7, sides=("pos", "neg"), method="twopass", approx_dtype=torch.bfloat16,
                               exact_dtype=torch.float32),
        "twopass-tf32": decode(U, W, k=7, sides=("pos", "neg"), method="twopass", approx_dtype="tf32",
                               exact_dtype=torch.float32),
    }
    for name, got in runs.items():
        for side in ("pos", "neg"):
            assert torch.equal(got[side].ids, ref[side].ids), (name, side)
            torch.testing.assert_close(got[side].logits, ref[side].logits, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(got[side].lse, ref[side].lse, atol=1e-4 if "bf16" not in name else 0.5,
                                       rtol=1e-5 if "bf16" not in name else 0.05)
    if scale == 1.0:     # (at large scale the softmax saturates and the naive loop's ranking by prob ties)
        nv = naive_decode(U, W, k=7)
        assert torch.equal(nv.ids, ref["pos"].ids)
        torch.testing.assert_close(nv.probs, ref["pos"].probs, atol=1e-6, rtol=1e-4)
    else:   # logits far above the first block's maximum: the overflow guard must kick in
        assert torch.isfinite(runs["fused-shuffled"]["pos"].lse).all()


def test_decode_rejects_bad_input():
    W = torch.randn(50, 8)
    with pytest.raises(NeuronscopeError, match="top_k"):
        decode(torch.randn(3, 8), W, k=51)
    with pytest.raises(NeuronscopeError, match="dimensions"):
        decode(torch.randn(3, 9), W, k=5)
    with pytest.raises(NeuronscopeError, match="side"):
        decode(torch.randn(3, 8), W, k=5, sides=("up",))


# ---- building on real and tiny models --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stories_atlas(stories, tmp_path_factory):
    return build_atlas(stories, tmp_path_factory.mktemp("atlas") / "stories", progress=False)


def test_stories_decodes_equal_direct_computation(stories, stories_atlas):
    a = stories_atlas
    assert a.sites == ["up", "gate", "down.pos", "down.neg"]
    assert a.top_ids("up").shape == (5, 172, 20) and a.top_ids("up").dtype == torch.int64
    g = torch.Generator().manual_seed(0)
    for layer in (0, 2, 4):
        neurons = torch.randint(0, 172, (6,), generator=g).tolist()
        for site in a.sites:
            assert_site_matches(a, stories, layer, site, neurons)
    d = a.neuron(3, 17)
    assert set(d) == set(a.sites) and len(d["up"]) == 20
    first = d["down.pos"][0]
    assert first.token == stories.tokenizer.decode([first.id]) and 0 < first.prob <= 1
    assert a.top_tokens(3, 17, "down.pos", k=3) == [r.token for r in d["down.pos"][:3]]
    m = a.manifest
    assert m["model"]["fingerprint"] == stories.fingerprint and m["atlas"]["apply_norm"] is True
    assert m["model"]["n_neurons"] == 172 and m["model"]["tied"] == stories.tied


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_and_matches(family, stories_tokenizer, tmp_path):
    subject = tiny_subject(family, stories_tokenizer, seed=3)
    atlas = build_atlas(subject, tmp_path / family, top_k=5, progress=False)
    want = ["up", "gate", "down.pos", "down.neg"] if subject.spec.gated else ["up", "down.pos", "down.neg"]
    assert atlas.sites == want
    for site in atlas.sites:
        assert_site_matches(atlas, subject, 1, site, [0, 11, 47])


def test_untied_head_and_no_norm_option(stories_tokenizer, tmp_path):
    subject = tiny_subject("llama", stories_tokenizer, seed=5, tie_word_embeddings=False)
    assert not subject.tied
    with_g = build_atlas(subject, tmp_path / "g", top_k=6, progress=False)
    without = build_atlas(subject, tmp_path / "nog", top_k=6, apply_norm=False, progress=False)
    assert without.manifest["atlas"]["apply_norm"] is False
    for site in ("up", "down.neg"):
        assert_site_matches(without, subject, 2, site, [1, 2, 30], apply_norm=False)
    assert not torch.equal(with_g.top_ids("up"), without.top_ids("up"))


def test_resume_after_interruption_equals_uninterrupted(stories, tmp_path, monkeypatch):
    full = build_atlas(stories, tmp_path / "full", progress=False)
    real = build_mod._decode_layer
    calls = []

    def dying(subject, layer, *a, **kw):
        if layer == 3:
            raise KeyboardInterrupt
        calls.append(layer)
        return real(subject, layer, *a, **kw)

    monkeypatch.setattr(build_mod, "_decode_layer", dying)
    with pytest.raises(KeyboardInterrupt):
        build_atlas(stories, tmp_path / "resumed", progress=False)
    assert calls == [0, 1, 2]
    with pytest.raises(NeuronscopeError, match="incomplete"):
        Atlas.open(tmp_path / "resumed")

    def counting(subject, layer, *a, **kw):
        calls.append(layer)
        return real(subject, layer, *a, **kw)

    calls.clear()
    monkeypatch.setattr(build_mod, "_decode_layer", counting)
    resumed = build_atlas(stories, tmp_path / "resumed", progress=False)
    assert calls == [3, 4]                       # only the missing layers were decoded
    for site in full.sites:
        for f in ("top_ids", "top_logits", "top_probs"):
            assert torch.equal(getattr(full, f)(site), getattr(resumed, f)(site)), (site, f)
    assert not (tmp_path / "resumed" / "parts").exists()


def test_rebuild_rules_and_open_errors(stories, stories_atlas, tmp_path):
    again = build_atlas(stories, stories_atlas.folder, progress=False)      # same options: nothing to do
    assert torch.equal(again.top_ids("up"), stories_atlas.top_ids("up"))
    with pytest.raises(NeuronscopeError, match="other\\s+options"):
        build_atlas(stories, stories_atlas.folder, top_k=3, progress=False)
    with pytest.raises(NeuronscopeError, match="another model"):
        build_atlas(tiny_subject("llama", stories.tokenizer), stories_atlas.folder, progress=False)
    with pytest.raises(NeuronscopeError, match="No atlas folder"):
        Atlas.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NeuronscopeError, match="holds no atlas"):
        Atlas.open(tmp_path / "empty")
    with pytest.raises(NeuronscopeError, match="not gated"):
        build_atlas(tiny_subject("gpt2"), tmp_path / "g2", sites=["gate"], progress=False)
    with pytest.raises(NeuronscopeError, match="out of range"):
        stories_atlas.neuron(5, 0)
    with pytest.raises(NeuronscopeError, match="no site"):
        stories_atlas.top_ids("down")


# ---- compare ---------------------------------------------------------------------------------------------------
def test_compare_self_is_total_and_a_perturbed_layer_drops_there(stories_tokenizer, tmp_path):
    base = tiny_model("llama", seed=7, num_hidden_layers=4, intermediate_size=64)
    pert = copy.deepcopy(base)
    with torch.no_grad():
        w = pert.model.layers[2].mlp.up_proj.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(9)) * w.std())
    a = build_atlas(Subject.from_model(base, stories_tokenizer, name="base"), tmp_path / "a", progress=False)
    b = build_atlas(Subject.from_model(pert, stories_tokenizer, name="pert"), tmp_path / "b", progress=False)
    same = compare_atlases(a, a)
    assert same.top1_agreement == 1.0 and same.topk_overlap == 1.0 and same.changed_most == []
    s = compare_atlases(a, tmp_path / "b", out_dir=tmp_path / "cmp")
    per = {r.layer: r for r in s.per_layer}
    assert all(per[l].top1_agreement == 1.0 for l in (0, 1, 3))
    assert per[2].top1_agreement < 0.2 and per[2].topk_overlap < 0.3
    assert all(c.layer == 2 for c in s.changed_most)
    assert s.top1_agreement == pytest.approx(sum(r.top1_agreement for r in s.per_layer) / 4)
    assert (tmp_path / "cmp" / "agreement.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["top1_agreement"] == s.top1_agreement
    # the down sites stayed the same
    assert compare_atlases(a, b, site="down.pos").top1_agreement == 1.0


def test_compare_names_the_mismatch(stories_tokenizer, stories_atlas, tmp_path):
    other = build_atlas(tiny_subject("llama", stories_tokenizer), tmp_path / "o", progress=False)
    with pytest.raises(NeuronscopeError, match="layer count is 5 .* but 3"):
        compare_atlases(stories_atlas, other)
    few = build_atlas(tiny_subject("llama", stories_tokenizer), tmp_path / "few", top_k=4, progress=False)
    with pytest.raises(NeuronscopeError, match="top_k"):
        compare_atlases(other, few)


# ---- search ----------------------------------------------------------------------------------------------------
def test_search_finds_a_planted_neuron(stories_tokenizer, tmp_path):
    subject = tiny_subject("llama", stories_tokenizer, seed=11, intermediate_size=96)
    m, spec = subject.model, subject.spec
    happy = stories_tokenizer.convert_tokens_to_ids("▁happy")
    assert stories_tokenizer.decode([happy]) == "happy"
    with torch.no_grad():
        g = spec.final_norm_gain(m)
        spec.read_vectors(m, 1)["up"][40] = spec.unembedding(m)[happy] / g * 3
    atlas = build_atlas(subject, tmp_path / "planted", progress=False)
    assert atlas.top_tokens(1, 40, "up", 1) == ["happy"]
    top = atlas.search("happy", k=5)
    assert (top[0].layer, top[0].neuron, top[0].site) == (1, 40, "up")
    assert top[0].tokens[0] == "happy" and top[0].score >= 1.0
    top = atlas.search("Happy", k=5, subject=subject)        # with vector similarity: cosine ~1 on top
    assert (top[0].layer, top[0].neuron, top[0].site) == (1, 40, "up") and top[0].score > 1.9
    hits = atlas.top_neurons_for("happy", site="up")
    assert (hits[0].layer, hits[0].neuron) == (1, 40)
    with pytest.raises(NeuronscopeError, match="No token"):
        atlas.search("zebrafish")
    with pytest.raises(NeuronscopeError, match="not the one"):
        atlas.search("happy", subject=tiny_subject("llama", stories_tokenizer, seed=12))


# ---- CLI -------------------------------------------------------------------------------------------------------
def test_cli_build_show_search_compare(stories_atlas, tmp_path):
    from neuronscope.cli import app
    from conftest import STORIES
    r = CliRunner()
    out = tmp_path / "cli"
    res = r.invoke(app, ["atlas", "build", str(STORIES), "-o", str(out), "--top-k", "8", "--sites", "up,down",
                         "--quiet"])
    assert res.exit_code == 0, res.output
    a = Atlas.open(out)
    assert a.sites == ["up", "down.pos", "down.neg"] and a.top_k == 8
    res = r.invoke(app, ["atlas", "show", str(out), "2:23", "-k", "3"])
    assert res.exit_code == 0 and "down.pos" in res.output and a.top_tokens(2, 23, "down.pos", 1)[0] in res.output
    assert "no exemplars" in res.output
    res = r.invoke(app, ["atlas", "show", str(out), "2:23", "--json"])
    assert json.loads(res.output)["decodes"]["up"][0]["id"] == int(a.top_ids("up")[2, 23, 0])
    res = r.invoke(app, ["atlas", "search", str(out), "happy", "--tokens-only", "--json", "-k", "3"])
    assert res.exit_code == 0 and json.loads(res.output) == [h.to_json() for h in a.search("happy", k=3)]
    res = r.invoke(app, ["atlas", "compare", str(stories_atlas.folder), str(stories_atlas.folder), "-o",
                         str(tmp_path / "c")])
    assert res.exit_code == 0 and "100.0%" in res.output
    res = r.invoke(app, ["atlas", "show", str(out), "9:1"])
    assert isinstance(res.exception, NeuronscopeError)
    proc = subprocess.run([sys.executable, "-m", "neuronscope", "atlas", "show", str(out), "two:3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: Cannot read the neuron 'two:3'")


def test_build_methods_agree(stories, stories_atlas, tmp_path):
    """The plain path and the GPU two-pass path (forced on CPU, bf16 proposal + float32 re-score) give the atlas
    the fused CPU path gives (ids up to float32 near-ties, logits and probabilities to float32 precision)."""
    for method, approx in (("plain", None), ("twopass", torch.bfloat16)):
        other = build_atlas(stories, tmp_path / method, method=method, approx_dtype=approx, progress=False)
        for site in stories_atlas.sites:
            same = (other.top_ids(site) == stories_atlas.top_ids(site)).float().mean()
            assert same > 0.995, (method, site, same)
            torch.testing.assert_close(other.top_logits(site), stories_atlas.top_logits(site), atol=1e-4, rtol=1e-4)
            if method == "plain":
                torch.testing.assert_close(other.top_probs(site), stories_atlas.top_probs(site), atol=1e-6,
                                           rtol=1e-4)


def test_show_prints_exemplars_when_the_atlas_has_stats(stories, stories_atlas, tmp_path):
    import shutil
    from conftest import CORPORA
    from neuronscope.cli import app
    from neuronscope.stats import NeuronStats, compute_stats
    corpus = CORPORA / "tinystories-sample" / "tinystories_sample.txt"
    if not corpus.is_file():
        corpus = tmp_path / "tiny.txt"
        corpus.write_text("Once upon a time there was a little girl named Lily. She liked to play. " * 80)
    folder = tmp_path / "with-stats"
    shutil.copytree(stories_atlas.folder, folder)
    compute_stats(stories, corpus, folder, tokens=1024, window=32, k=64, n_exemplars=8, progress=False)
    stats = NeuronStats.open(folder)
    top = stats.exemplars(2, 23, "pos", n=2)[0]
    res = CliRunner().invoke(app, ["atlas", "show", str(folder), "2:23", "-e", "2"])
    assert res.exit_code == 0, res.output
    assert "top exemplars" in res.output and "bottom exemplars" in res.output
    q = float(stats.quantile(1 - 1e-5)[2, 23])
    assert f"{top.activation / q:+.2f}" in res.output          # normalised activation of the top exemplar
    assert f"[{top.tokens[top.position]}]" in res.output     # its firing token, marked
