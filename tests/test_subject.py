"""Loading models: folders, GGUF files, hub ids (resolution only: the hub is offline here) and clear errors."""
import json

import pytest
import torch

from neuronscope.errors import NeuronscopeError
from neuronscope.subject import Subject, parse_index_set, resolve_source
from conftest import SMOLLM_DIR, SMOLLM_GGUF, STORIES


def test_load_folder(stories):
    assert stories.family == "llama" and stories.n_layers == 5 and stories.n_neurons == 172
    assert stories.vocab_size == 512 and stories.hidden_size == 64 and stories.tied
    text = stories.generate("Once upon a time", max_new_tokens=12)
    assert text.startswith(", there was a little girl named Lily")


def test_fingerprint_is_stable_and_sensitive(stories):
    a = stories.fingerprint
    assert a == Subject.load(STORIES).fingerprint
    other = Subject.load(STORIES)
    with torch.no_grad():
        other.spec.layer_part(other.model, 2, "mlp.up_proj").weight[5, 5] += 1.0
    other._fingerprint = None
    assert other.fingerprint != a


@pytest.mark.slow
def test_gguf_chat_answers(smollm):
    assert smollm.family == "llama" and smollm.n_layers == 30 and smollm.n_neurons == 1536
    assert smollm.vocab_size == 49152 and smollm.tied and smollm.has_chat_template
    answer = smollm.generate("What is the capital of France?", chat=True, max_new_tokens=12)
    assert "Paris" in answer


@pytest.mark.slow
def test_gguf_conversion_cache_gives_the_same_model(smollm, tmp_path, monkeypatch):
    from neuronscope.subject import converted_gguf_dir, resolve_source
    cached = converted_gguf_dir(resolve_source(SMOLLM_GGUF))
    assert (cached / "model.safetensors").is_file()  # the fixture's load wrote it (or found it)
    monkeypatch.setenv("NEURONSCOPE_GGUF_CACHE", "0")
    direct = Subject.load(SMOLLM_GGUF)
    assert direct.fingerprint == smollm.fingerprint
    ids = smollm.encode("What is the capital of France?", chat=True)
    assert torch.equal(ids, direct.encode("What is the capital of France?", chat=True))
    assert torch.equal(smollm.logits(ids), direct.logits(ids))
    assert direct.name == smollm.name == str(SMOLLM_GGUF)


@pytest.mark.slow
def test_temperature_zero_is_greedy_and_sampling_honours_seed(smollm):
    ids = smollm.encode("Tell me about cats.", chat=True)
    a = smollm.generate_ids(ids, max_new_tokens=8, temperature=0)
    b = smollm.generate_ids(ids, max_new_tokens=8, temperature=0.0)
    assert torch.equal(a, b)
    logits = smollm.logits(ids)
    assert a[0, 0] == logits[0, -1].argmax()
    s1 = smollm.generate_ids(ids, max_new_tokens=8, temperature=1.5, seed=3)
    s2 = smollm.generate_ids(ids, max_new_tokens=8, temperature=1.5, seed=3)
    assert torch.equal(s1, s2)


def test_resolve_sources(tmp_path):
    assert resolve_source(SMOLLM_GGUF).gguf_file == SMOLLM_GGUF.name
    assert resolve_source(SMOLLM_DIR).gguf_file == SMOLLM_GGUF.name  # a folder with one .gguf
    assert resolve_source(STORIES).gguf_file is None
    hub = resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not hub.is_local and hub.location == "HuggingFaceTB/SmolLM2-135M-Instruct"


def _empty_dir(t):
    (t / "empty").mkdir()
    return t / "empty"


def _junk_file(t):
    (t / "x.bin").write_bytes(b"junk")
    return t / "x.bin"


@pytest.mark.parametrize("make,needle", [
    (lambda t: t / "missing", "No model at"),
    (_empty_dir, "no config.json"),
    (_junk_file, "not a .gguf"),
    (lambda t: "./not/here", "No model at"),
])
def test_bad_paths_are_one_sentence(tmp_path, make, needle):
    with pytest.raises(NeuronscopeError) as e:
        Subject.load(make(tmp_path))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(NeuronscopeError, match="not supported.*llama"):
        Subject.load(tmp_path)


def test_broken_weights(tmp_path):
    cfg = json.loads((STORIES / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(NeuronscopeError, match="Could not load"):
        Subject.load(tmp_path)


def test_bad_gguf(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF but not really")
    with pytest.raises(NeuronscopeError):
        Subject.load(tmp_path / "m.gguf")


def test_default_model_missing_says_pull(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONSCOPE_HOME", str(tmp_path))
    with pytest.raises(NeuronscopeError, match="models pull"):
        Subject.load(None)


def test_bad_inputs(stories):
    with pytest.raises(NeuronscopeError, match="empty"):
        stories.encode("   ")
    with pytest.raises(NeuronscopeError, match="chat template"):
        stories.encode("hi", chat=True)
    with pytest.raises(NeuronscopeError):
        stories.generate_ids(stories.encode("hi"), temperature=float("nan"))
    with pytest.raises(NeuronscopeError, match="dtype"):
        Subject.load(STORIES, dtype="int3")
    with pytest.raises(NeuronscopeError, match="out of range"):
        stories.check_layer(5)


def test_layer_sets():
    assert parse_index_set("all", 4) == [0, 1, 2, 3]
    assert parse_index_set("0-2,7", 8) == [0, 1, 2, 7]
    assert parse_index_set("3, 1", 8) == [1, 3]
    for bad in ("9", "2-1", "a", "1-x", ""):
        with pytest.raises(NeuronscopeError):
            parse_index_set(bad, 8)
