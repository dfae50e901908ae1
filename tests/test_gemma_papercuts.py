"""Papercuts found on a held-out family (Gemma-3, 262K vocabulary), each on a tiny Gemma3 model saved to disk:
small probabilities are shown, `atlas build --layers`, `--chat` on a base model fails before the weights load, a
GGUF load says what it does after de-quantising, a relative model path in the manifest is found from elsewhere."""
from __future__ import annotations

import re

import pytest
import torch

from neuronscope.atlas import Atlas
from neuronscope.atlas.folder import AtlasFolder
from neuronscope.cli.common import fmt_prob
from neuronscope.errors import NeuronscopeError
from neuronscope.subject import Subject
from conftest import SMOLLM_GGUF, run_cli as run
from tiny import tiny_model

VOCAB = 32768   # big enough that every decoded probability is ~1/V (the 262K-vocabulary case in small)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory, stories_tokenizer):
    """A tiny random Gemma3 (text) model folder with a base-model tokenizer (no chat template)."""
    folder = tmp_path_factory.mktemp("gemma") / "tiny-gemma3"
    tiny_model("gemma3_text", seed=7, vocab_size=VOCAB).save_pretrained(folder)
    stories_tokenizer.save_pretrained(folder)
    return folder


def test_small_probabilities_are_shown(gemma_dir, tmp_path, capsys):
    atlas_dir = tmp_path / "atlas"
    code, out, err = run(capsys, "atlas", "build", gemma_dir, "-o", atlas_dir, "--layers", "0,2", "-q")
    assert code == 0, err
    atlas = Atlas.open(atlas_dir)
    assert atlas.layers == [0, 2] and atlas.n_layers == 3
    top = float(atlas.top_probs("up")[2, 5, 0])
    assert 0 < top < 1e-3                                             # ~1/V: 0.000 at three decimals
    code, out, err = run(capsys, "atlas", "show", atlas_dir, "2:5", "-e", "0")
    assert code == 0, err
    shown = re.findall(r"\d\.\d\de-0\d", out)
    assert len(shown) >= 10 and "0.000" not in out
    assert fmt_prob(top) in out
    assert fmt_prob(0.25) == "0.250" and fmt_prob(4.9e-5) == "4.90e-05" and fmt_prob(0.0) == "0.000"
    code, out, err = run(capsys, "atlas", "show", atlas_dir, "1:5")
    assert code == 2 and "not in this atlas" in err


def test_chat_on_a_base_model_fails_before_the_weights_load(gemma_dir, capsys, monkeypatch):
    import transformers

    def no_weights(*a, **kw):
        raise AssertionError("the weights were loaded")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    code, out, err = run(capsys, "generate", gemma_dir, "-p", "hi", "--chat")
    assert code == 2 and err.startswith("error:") and "no chat template" in err
    with pytest.raises(NeuronscopeError, match="no chat template"):
        Subject.load(gemma_dir, require_chat_template=True)


def test_relative_model_path_in_the_manifest_is_found_from_elsewhere(gemma_dir, tmp_path, monkeypatch, capsys):
    import shutil
    work = tmp_path / "work"
    shutil.copytree(gemma_dir, work / "models" / "g3")
    monkeypatch.chdir(work)
    subject = Subject.load("models/g3")                         # a relative path, as a user types it
    from neuronscope.atlas import build_atlas
    build_atlas(subject, "atlases/g3", top_k=3, layers=[1], progress=False)
    monkeypatch.chdir(tmp_path)                                 # run the next command elsewhere
    af = AtlasFolder.open(work / "atlases" / "g3")
    assert af.model["name"] == "models/g3"
    assert af.model_path() == (work / "models" / "g3").resolve()
    # an older manifest with only the relative name: resolved against the atlas folder
    man = dict(af.manifest)
    man["model"] = {k: v for k, v in man["model"].items() if k != "path"}
    man["model"]["name"] = "../../models/g3"
    assert AtlasFolder(af.path, man).model_path() == af.path / "../../models/g3"
    man["model"]["name"] = "nowhere/g3"
    assert AtlasFolder(af.path, man).model_path() is None
    # `atlas search` from elsewhere uses the model side; when the model is nowhere on disk it says so
    code, out, err = run(capsys, "atlas", "search", af.path, "the", "-k", "2")
    assert code == 0, err
    assert "without the model side" not in " ".join(out.split())
    import json
    (af.path / "manifest.json").write_text(json.dumps(man))
    code, out, err = run(capsys, "atlas", "search", af.path, "the", "-k", "2")
    assert code == 0, err
    assert "without the model side" in " ".join(out.split())


@pytest.mark.slow
def test_gguf_load_says_what_it_does_after_dequantising(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONSCOPE_CONVERTED_DIR", str(tmp_path / "converted"))
    said: list[str] = []
    s = Subject.load(SMOLLM_GGUF, status=said.append)
    steps = " | ".join(said)
    assert said[0].startswith("Loading the weights") and "de-quantizing" in said[0]
    assert "Loading the tokenizer" in steps and "Saving the de-quantized model" in steps, steps
    saving = next(i for i, m in enumerate(said) if m.startswith("Saving the de-quantized model"))
    assert any(m.startswith("Loading the de-quantized copy") for m in said[saving:])
    said.clear()
    again = Subject.load(SMOLLM_GGUF, status=said.append)       # cached: no de-quantising, says so
    assert said and said[0].startswith("Loading the de-quantized copy") and "de-quantizing" not in " ".join(said)
    assert again.fingerprint == s.fingerprint
    assert torch.equal(again.logits(again.encode("Hi")), s.logits(s.encode("Hi")))
