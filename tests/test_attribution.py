"""Attribution: |a * dp/da| from one backward, checked against per-layer autograd and finite differences."""
from __future__ import annotations

import pytest
import torch

from neuronscope.attribution import attribute
from neuronscope.errors import NeuronscopeError
from neuronscope.interventions import Clamp, intervene
from tests.tiny import tiny_subject


@pytest.fixture(scope="module")
def tiny64():
    s = tiny_subject("llama", seed=3)
    s.model.double()
    return s


def _prob(subject, ids, s, y, *ivs):
    with intervene(subject, *ivs), torch.no_grad():
        logits = subject.model(input_ids=ids[:, :s]).logits[0, -1]
    return float(torch.softmax(logits.double(), -1)[y])


def _layer_grad(subject, ids, s, y, layer):
    """Independent: replace layer `layer`'s down_proj input by a leaf and differentiate p by plain autograd."""
    down = subject.spec.layer_part(subject.model, layer, subject.spec.down)
    box = {}

    def pre(module, args):
        leaf = args[0].detach().clone().requires_grad_(True)
        box["a"] = leaf
        return (leaf,) + tuple(args[1:])
    h = down.register_forward_pre_hook(pre)
    try:
        with torch.enable_grad():
            p = torch.softmax(subject.model(input_ids=ids[:, :s]).logits[0, -1], -1)[y]
            (g,) = torch.autograd.grad(p, box["a"])
    finally:
        h.remove()
    return box["a"].detach()[0], g[0]


def test_matches_independent_autograd_per_layer(tiny64):
    torch.manual_seed(0)
    ids = torch.randint(3, 512, (1, 12))
    s = 9
    res = attribute(tiny64, ids, s, top=10 ** 6)
    L, N = tiny64.n_layers, tiny64.n_neurons
    assert len(res) == L * s * N  # top larger than everything: all entries, each once
    assert res.target_token == int(ids[0, s])
    assert abs(res.probability - _prob(tiny64, ids, s, res.target_token)) < 1e-12
    assert torch.all(res.score[:-1] >= res.score[1:])
    full_a = torch.zeros(L, s, N, dtype=torch.float64)
    full_g = torch.zeros_like(full_a)
    full_a[res.layer, res.position, res.neuron] = res.activation.double()
    full_g[res.layer, res.position, res.neuron] = res.gradient.double()
    for layer in range(L):
        a, g = _layer_grad(tiny64, ids, s, res.target_token, layer)
        torch.testing.assert_close(full_a[layer], a.double(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(full_g[layer], g.double(), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(res.score.double(), (res.activation * res.gradient).abs().double())


def test_gradients_match_finite_differences(tiny64):
    torch.manual_seed(1)
    ids = torch.randint(3, 512, (1, 10))
    s = 10  # one past the end: the model's own next-token choice
    res = attribute(tiny64, ids, s, top=8)
    assert res.target_token == int(tiny64.logits(ids)[0, -1].argmax())
    eps = 1e-3
    checked = 0
    for row in res.rows():
        l, t, i, a = row.layer, row.position, row.neuron, row.activation
        up = _prob(tiny64, ids, s, res.target_token, Clamp(l, [i], positions=[t], value=a + eps))
        dn = _prob(tiny64, ids, s, res.target_token, Clamp(l, [i], positions=[t], value=a - eps))
        fd = (up - dn) / (2 * eps)
        assert fd == pytest.approx(row.gradient, rel=1e-3, abs=1e-8)
        checked += 1
    assert checked == 8
    # the top entry really matters: zeroing it moves p by a visible amount
    top = res.rows()[0]
    assert top.score > 0


def test_explicit_target_token_and_bad_inputs(tiny64):
    ids = torch.randint(3, 512, (1, 6))
    res = attribute(tiny64, ids, 4, target_token=7, top=5)
    assert res.target_token == 7 and len(res) == 5
    assert res.position.max() < 4
    for bad in (0, 7, -1):
        with pytest.raises(NeuronscopeError):
            attribute(tiny64, ids, bad)
    with pytest.raises(NeuronscopeError):
        attribute(tiny64, ids, 3, target_token=512)
    with pytest.raises(NeuronscopeError):
        attribute(tiny64, ids, 3, top=0)


def test_on_stories_weights_stay_frozen(stories):
    ids = stories.encode("Once upon a time, there was a little dog")
    before = [p.clone() for p in stories.model.parameters()][:3]
    res = attribute(stories, ids, ids.shape[1] - 1, top=1000)
    assert len(res) == 1000 and res.probability > 0
    assert all(p.grad is None and not p.requires_grad for p in stories.model.parameters())
    for b, p in zip(before, stories.model.parameters()):
        assert torch.equal(b, p)
    assert 0 <= int(res.layer.min()) and int(res.layer.max()) < stories.n_layers


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "phi3", "qwen3"])
def test_other_families(family):
    s = tiny_subject(family, seed=5)
    ids = torch.randint(3, 500, (1, 8))
    res = attribute(s, ids, 6, top=20)
    assert len(res) == 20 and res.target_token == int(ids[0, 6])
    p = float(torch.softmax(s.logits(ids[:, :6])[0, -1].float(), -1)[res.target_token])
    assert res.probability == pytest.approx(p, rel=1e-5)
    assert torch.all(res.score[:-1] >= res.score[1:]) and float(res.score[0]) > 0
