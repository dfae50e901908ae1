"""Every supported family, on a tiny random config built here: the spec finds every part, and the parts are right."""
import pytest
import torch

from neuronscope.arch import SUPPORTED_MODEL_TYPES, spec_for_model_type
from neuronscope.errors import NeuronscopeError
from neuronscope.interventions import Capture, intervene
from tiny import FAMILIES, tiny_subject


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_parts(model_type):
    s = tiny_subject(model_type)
    assert s.n_layers == 3 and s.n_neurons == 48 and s.hidden_size == 32 and s.vocab_size == 512
    reads = s.spec.read_vectors(s.model, 1)
    assert reads["up"].shape == (48, 32)
    assert ("gate" in reads) == s.spec.gated
    if s.spec.gated:
        assert reads["gate"].shape == (48, 32)
    assert s.spec.write_vectors(s.model, 1).shape == (48, 32)
    assert s.spec.final_norm_gain(s.model).shape == (32,)
    assert s.spec.unembedding(s.model).shape == (512, 32)
    info = s.info()
    assert info.family == s.family and info.neurons_total == 3 * 48
    assert "neurons" in info.sites and "resid.post" in info.sites
    assert info.to_json()["class"] == type(s.model).__name__


@pytest.mark.parametrize("model_type", FAMILIES)
def test_write_vectors_are_what_the_mlp_adds(model_type):
    """Neuron activations a (captured at the down projection's input) times the write vectors give the MLP output."""
    s = tiny_subject(model_type)
    ids = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(1))
    layer = 1
    mlp_out = {}
    mod = s.spec.layer_part(s.model, layer, "mlp")
    h = mod.register_forward_hook(lambda m, a, o: mlp_out.setdefault("y", o[0] if isinstance(o, tuple) else o))
    try:
        with intervene(s, Capture(layers=[layer])) as (cap,):
            s.logits(ids)
    finally:
        h.remove()
    acts = cap.activations[0]
    bias = getattr(s.spec.layer_part(s.model, layer, s.spec.down), "bias", None)
    y = acts @ s.spec.write_vectors(s.model, layer)
    if bias is not None:
        y = y + bias
    torch.testing.assert_close(y, mlp_out["y"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_read_vectors_compute_the_activation(model_type):
    """The activation equals act(gate . x) * (up . x) (gated) or act(up . x + b) (ungated), x = normed mid stream."""
    s = tiny_subject(model_type)
    ids = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(2))
    layer = 2
    if s.has_mid_site:
        with intervene(s, Capture(layers=[layer], sites=("neurons", "resid.mid"))) as (cap,):
            s.logits(ids)
        h = cap.get("resid.mid", layer)
    else:  # parallel block: the MLP reads the block's input (the previous block's output)
        with intervene(s, Capture(layers=[layer]), Capture(layers=[layer - 1], sites=("resid.post",))) as (cap, prev):
            s.logits(ids)
        h = prev.get("resid.post", layer - 1)
    norm = s.spec.layer_part(s.model, layer, s.spec.mlp_in_norm)
    x = norm(h)  # the model's own norm module, applied to the captured stream
    reads = s.spec.read_vectors(s.model, layer)
    mlp = s.spec.layer_part(s.model, layer, "mlp")
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None) or mlp.act
    if s.spec.gated:
        expected = act(x @ reads["gate"].T) * (x @ reads["up"].T)
    else:
        up_mod = s.spec.layer_part(s.model, layer, s.spec.up)
        expected = act(x @ reads["up"].T + up_mod.bias)
    torch.testing.assert_close(cap.get("neurons", layer), expected, atol=1e-5, rtol=1e-4)


def test_unsupported_model_type_is_one_sentence():
    with pytest.raises(NeuronscopeError) as e:
        spec_for_model_type("bert")
    msg = str(e.value)
    assert "bert" in msg and "llama" in msg and "\n" not in msg
    assert set(SUPPORTED_MODEL_TYPES) >= {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                                          "phi3", "gpt2", "gpt_neox"}


def test_gemma_gain_includes_the_one():
    s = tiny_subject("gemma")
    w = s.spec.get(s.model, s.spec.final_norm).weight
    torch.testing.assert_close(s.spec.final_norm_gain(s.model), w.float() + 1.0)
