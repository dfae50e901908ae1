"""The intervention core on real models: captures are exact, clamps equal weight edits, hooks always go away."""
import copy

import pytest
import torch
from torch import nn

from neuronscope.errors import NeuronscopeError
from neuronscope.interventions import (Ablate, AddToResidual, Capture, Clamp, ResidualFunction, Scale, capture,
                                       intervene)
from tiny import tiny_subject

PROMPT = "Once upon a time, there was a little dog named Max. He"


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_equals_computation_from_weights(stories):
    """Captured activations = silu(gate . x) * (up . x) with x the RMS-normed mid stream, computed by hand."""
    ids = stories.encode(PROMPT)
    with intervene(stories, Capture(sites=("neurons", "resid.mid", "resid.post"))) as (cap,):
        stories.logits(ids)
    assert cap.activations.shape == (stories.n_layers, 1, ids.shape[1], stories.n_neurons)
    for layer in range(stories.n_layers):
        h = cap.get("resid.mid", layer)
        norm = stories.spec.layer_part(stories.model, layer, "post_attention_layernorm")
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight
        reads = stories.spec.read_vectors(stories.model, layer)
        gate = x @ reads["gate"].T
        expected = gate * torch.sigmoid(gate) * (x @ reads["up"].T)
        torch.testing.assert_close(cap.get("neurons", layer), expected, atol=1e-5, rtol=1e-5)
        # the block output is the mid stream plus what the neurons write
        post = h + expected @ stories.spec.write_vectors(stories.model, layer)
        torch.testing.assert_close(cap.get("resid.post", layer), post, atol=1e-5, rtol=1e-5)


def test_capture_leaves_outputs_bit_identical(stories):
    ids = stories.encode(PROMPT)
    before = stories.logits(ids)
    logits, cap = capture(stories, ids, sites=("neurons", "resid.mid", "resid.post"))
    assert torch.equal(before, logits)
    assert torch.equal(before, stories.logits(ids))


def _with_down_bias(subject, layer, neuron, value):
    """A copy of the model whose down projection gives neuron `neuron` the constant activation `value` (by weights)."""
    model = copy.deepcopy(subject.model)
    mlp = subject.spec.decoder_layers(model)[layer].mlp
    old = mlp.down_proj
    new = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.copy_(old.weight[:, neuron] * value)
        new.weight[:, neuron] = 0
    mlp.down_proj = new
    return model


@pytest.mark.parametrize("value", [0.0, 3.5, -2.0])
def test_clamp_equals_weight_edit(stories, value):
    layer, neuron = 2, 17
    ids = stories.encode(PROMPT)
    edited = _with_down_bias(stories, layer, neuron, value)
    with torch.no_grad():
        expected = edited(input_ids=ids).logits
    with intervene(stories, Clamp(layer=layer, neurons=[neuron], value=value)):
        got = stories.logits(ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, stories.logits(ids), atol=1e-4)


def test_scale_equals_weight_edit(stories):
    layer, neurons, factor = 1, [3, 40], 4.0
    ids = stories.encode(PROMPT)
    model = copy.deepcopy(stories.model)
    with torch.no_grad():
        stories.spec.decoder_layers(model)[layer].mlp.down_proj.weight[:, neurons] *= factor
        expected = model(input_ids=ids).logits
    with intervene(stories, Scale(layer=layer, neurons=neurons, factor=factor)):
        got = stories.logits(ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_ablate_is_clamp_to_zero(stories):
    ids = stories.encode(PROMPT)
    with intervene(stories, Ablate(layer=3, neurons=[5, 6, 7])):
        a = stories.logits(ids)
    with intervene(stories, Clamp(layer=3, neurons=[5, 6, 7], value=0.0)):
        b = stories.logits(ids)
    assert torch.equal(a, b)


def test_clamp_at_positions_leaves_earlier_positions_alone(stories):
    ids = stories.encode(PROMPT)
    base = stories.logits(ids)
    with intervene(stories, Clamp(layer=1, neurons=[10, 11], value=8.0, positions=[4, 6])):
        got = stories.logits(ids)
    assert torch.equal(got[:, :4], base[:, :4])
    assert not torch.allclose(got[:, 4], base[:, 4])


def test_hooks_removed_after_exception_and_outputs_identical(stories):
    ids = stories.encode(PROMPT)
    before = stories.logits(ids)
    n = _hook_count(stories.model)
    with pytest.raises(RuntimeError):
        with intervene(stories, Clamp(layer=0, neurons=[1], value=5.0), Capture(),
                       AddToResidual(layers=[1], vector=torch.ones(stories.hidden_size), site="resid.mid")):
            stories.logits(ids)
            raise RuntimeError("boom")
    assert _hook_count(stories.model) == n
    assert torch.equal(before, stories.logits(ids))


def test_generate_capture_matches_full_forward(stories):
    """Through generate's KV cache, captured activations equal a single forward over the whole sequence."""
    ids = stories.encode("Once upon a time")
    with intervene(stories, Capture(layers=[0, 4])) as (cap,):
        new = stories.generate_ids(ids, max_new_tokens=12)
    full = torch.cat([ids, new], dim=1)
    _, ref = capture(stories, full[:, :-1], layers=[0, 4])
    assert cap.activations.shape == ref.activations.shape
    torch.testing.assert_close(cap.activations, ref.activations, atol=1e-5, rtol=1e-4)


def test_clamp_on_generated_positions_changes_text_and_matches_forward(stories):
    ids = stories.encode("Once upon a time")
    p = ids.shape[1]
    plain = stories.generate_ids(ids, max_new_tokens=16)
    clamp = Clamp(layer=3, neurons=[5, 6], value=10.0, positions="generated")
    with intervene(stories, clamp):
        steered = stories.generate_ids(ids, max_new_tokens=16)
    assert stories.decode(plain[0]) != stories.decode(steered[0])
    # the first generated token comes from the prefill, which a "generated" clamp does not touch
    assert plain[0, 0] == steered[0, 0]
    # replaying the steered sequence in one forward with the clamp at the same absolute positions gives the same
    # greedy choices: positions are tracked correctly through the cache
    full = torch.cat([ids, steered], dim=1)
    with intervene(stories, Clamp(layer=3, neurons=[5, 6], value=10.0, positions=list(range(p, full.shape[1])))):
        logits = stories.logits(full[:, :-1])
    assert torch.equal(logits[0, p - 1:].argmax(-1), steered[0])


def test_prompt_clamp_in_generate(stories):
    ids = stories.encode("Once upon a time")
    with intervene(stories, Capture(layers=[2]), Clamp(layer=2, neurons=[0], value=7.0, positions="prompt")) as \
            (cap, _):
        stories.generate_ids(ids, max_new_tokens=5)
    acts = cap.activations[0, 0, :, 0]
    p = ids.shape[1]
    assert torch.all(acts[:p] == 7.0)
    assert torch.all(acts[p:] != 7.0)


def test_add_to_residual_post_equals_manual(stories):
    """Adding v after block l equals running the rest of the model on (stream + v) by hand."""
    ids = stories.encode(PROMPT)
    v = torch.randn(stories.hidden_size, generator=torch.Generator().manual_seed(0))
    with intervene(stories, AddToResidual(layers=[2], vector=v), Capture(layers=[2, 3], sites=("resid.post",))) \
            as (_, cap):
        stories.logits(ids)
    ref_cap = Capture(layers=[2], sites=("resid.post",))
    with intervene(stories, ref_cap):
        stories.logits(ids)
    torch.testing.assert_close(cap.get("resid.post", 2), ref_cap.get("resid.post", 2) + v, atol=1e-6, rtol=0)


def test_add_to_residual_mid_reaches_stream_and_mlp(stories):
    ids = stories.encode(PROMPT)
    layer = 1
    v = torch.randn(stories.hidden_size, generator=torch.Generator().manual_seed(3))
    with intervene(stories, Capture(layers=[layer], sites=("resid.mid", "resid.post", "neurons"))) as (ref,):
        stories.logits(ids)
    with intervene(stories, AddToResidual(layers=[layer], vector=v, site="resid.mid"),
                   Capture(layers=[layer], sites=("resid.mid", "resid.post", "neurons"))) as (_, cap):
        stories.logits(ids)
    h = ref.get("resid.mid", layer) + v
    torch.testing.assert_close(cap.get("resid.mid", layer), h, atol=1e-6, rtol=0)
    post = h + cap.get("neurons", layer) @ stories.spec.write_vectors(stories.model, layer)
    torch.testing.assert_close(cap.get("resid.post", layer), post, atol=1e-5, rtol=1e-5)


def test_per_position_vector_in_generate(stories):
    ids = stories.encode("Once upon a time")
    p = ids.shape[1]
    vec = torch.zeros(p + 3, stories.hidden_size)
    vec[p + 1] = 1.0  # only the second generated position gets anything
    with intervene(stories, Capture(layers=[0], sites=("resid.post",)), ) as (ref,):
        base = stories.generate_ids(ids, max_new_tokens=6)
    with intervene(stories, AddToResidual(layers=[0], vector=vec), Capture(layers=[0], sites=("resid.post",))) \
            as (_, cap):
        new = stories.generate_ids(ids, max_new_tokens=6)
    assert torch.equal(base[0, :2], new[0, :2])
    diff = (cap.get("resid.post", 0) - ref.get("resid.post", 0))[0]
    torch.testing.assert_close(diff[: p + 1], torch.zeros(p + 1, stories.hidden_size))
    torch.testing.assert_close(diff[p + 1], torch.ones(stories.hidden_size), atol=1e-6, rtol=0)


def test_composition_order_and_residual_function(stories):
    ids = stories.encode(PROMPT)
    seen = []

    def fn(layer, x, ctx):
        seen.append((layer, ctx.start, ctx.length))
        return None

    with intervene(stories, Clamp(layer=0, neurons=[1], value=2.0), Scale(layer=0, neurons=[1], factor=3.0),
                   Capture(layers=[0]), ResidualFunction([0, 2], "resid.mid", fn)) as (_, _, cap, _):
        stories.logits(ids)
    assert torch.all(cap.activations[0, 0, :, 1] == 6.0)  # clamp then scale, captured after both
    assert seen == [(0, 0, ids.shape[1]), (2, 0, ids.shape[1])]


def test_capture_with_grad_gives_gradients(stories):
    ids = stories.encode(PROMPT)
    cap = Capture(layers=[1, 3], grad=True)
    with intervene(stories, cap):
        logits = stories.model(input_ids=ids).logits
    logits[0, -1].softmax(-1)[42].backward()
    leaves = cap.leaves()
    assert len(leaves) == 2 and all(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves)
    assert all(p.grad is None for p in stories.model.parameters())
    # total derivatives: layer 1's gradient is the same whether or not layer 3 is captured too
    alone = Capture(layers=[1], grad=True)
    with intervene(stories, alone):
        stories.model(input_ids=ids).logits[0, -1].softmax(-1)[42].backward()
    torch.testing.assert_close(alone.grads()[0], cap.grads()[0], atol=1e-9, rtol=1e-6)
    # and it matches a finite difference of the probability
    layer, t, i, eps = 1, 3, 7, 1e-3
    base = cap.get("neurons", layer)[0, t, i].item()

    def prob(value):
        with intervene(stories, Clamp(layer=layer, neurons=[i], value=value, positions=[t])):
            return stories.logits(ids)[0, -1].double().softmax(-1)[42].item()
    fd = (prob(base + eps) - prob(base - eps)) / (2 * eps)
    assert abs(fd - cap.grads()[0, 0, t, i].item()) < 1e-3 * max(1.0, abs(fd)) + 1e-6


@pytest.mark.parametrize("bad", [
    lambda s: Clamp(layer=99, neurons=[0], value=1.0),
    lambda s: Clamp(layer=0, neurons=[10_000], value=1.0),
    lambda s: Clamp(layer=0, neurons=[0], value=float("nan")),
    lambda s: Scale(layer=0, neurons=[0], factor=float("inf")),
    lambda s: Clamp(layer=0, neurons=[0], value=1.0, positions="later"),
    lambda s: Clamp(layer=0, neurons=[0], value=1.0, positions=[-1]),
    lambda s: AddToResidual(layers=[0], vector=torch.ones(3)),
    lambda s: AddToResidual(layers=[0], vector=torch.full((s.hidden_size,), float("nan"))),
    lambda s: Capture(sites=("attn",)),
])
def test_bad_interventions_are_refused_before_running(stories, bad):
    ids = stories.encode(PROMPT)
    n = _hook_count(stories.model)
    with pytest.raises(NeuronscopeError):
        with intervene(stories, bad(stories)):
            stories.logits(ids)
    assert _hook_count(stories.model) == n


def test_parallel_block_has_no_mid_site():
    s = tiny_subject("gpt_neox")
    with pytest.raises(NeuronscopeError, match="parallel"):
        with intervene(s, AddToResidual(layers=[0], vector=torch.ones(s.hidden_size), site="resid.mid")):
            pass
