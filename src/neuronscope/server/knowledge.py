"""What the Monitor knows about neurons besides the model: the atlas, corpus statistics and descriptions.

Each part is optional. `Knowledge.load(subject, atlas_dir)` opens what exists and records one sentence per missing
part in `.notes`, so the page and the JSON can say what is degraded instead of failing:
- no atlas: decodes are computed from the model's weights on the fly, concept search by decodes is unavailable;
- no statistics: activations cannot be normalised (the view shows the strongest raw activations per token and says
  so) and "strengthen" steering (which clamps to a high quantile) is refused with a clear message;
- no descriptions: neurons show no description and concept search uses the atlas decodes only.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import NeuronscopeError

DECODE_SITE = {"pos": "down.pos", "neg": "down.neg"}   # a negative activation promotes the down.neg tokens
Q_FIRE, Q_STRONG = 1e-5, 1e-7                          # "firing" and "strengthen" quantile levels (DESIGN.md)


@dataclass
class Knowledge:
    subject: Any
    atlas: Any = None
    stats: Any = None
    descriptions: Any = None
    atlas_dir: str | None = None
    notes: list[str] = field(default_factory=list)
    _cache: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ---- opening ------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, subject, atlas_dir: str | Path | None) -> "Knowledge":
        k = cls(subject=subject, atlas_dir=str(atlas_dir) if atlas_dir else None)
        if atlas_dir is None:
            k.notes.append("No atlas folder was given: decodes are computed from the weights; no corpus statistics "
                           "(activations are raw, not normalised; strengthen steering is off) and no descriptions.")
            return k
        folder = Path(atlas_dir)
        if not folder.is_dir():
            raise NeuronscopeError(f"No atlas folder at '{folder}'; build one with `neuronscope atlas build`.")
        k.atlas = _try_open("neuronscope.atlas", "Atlas", folder, k.notes,
                            "No atlas decodes in '{f}' ({e}): decodes are computed from the weights on the fly.")
        if k.atlas is not None:
            fp = getattr(k.atlas, "fingerprint", None)
            if fp and fp != subject.fingerprint:
                raise NeuronscopeError(f"The atlas in '{folder}' was built for other weights (fingerprint {fp}, "
                                       f"the model has {subject.fingerprint}); build an atlas for this model.")
        k.stats = _try_open("neuronscope.stats", "NeuronStats", folder, k.notes,
                            "No corpus statistics in '{f}' ({e}): activations are shown raw, not normalised, and "
                            "strengthen steering is off; run `neuronscope stats` to add them.")
        k.descriptions = _try_open("neuronscope.describe", "Descriptions", folder, k.notes,
                                   "No neuron descriptions in '{f}' ({e}); run `neuronscope describe` to add them.")
        return k

    @property
    def capabilities(self) -> dict[str, bool]:
        return {"atlas": self.atlas is not None, "stats": self.stats is not None,
                "descriptions": self.descriptions is not None}

    # ---- quantiles and normalisation ---------------------------------------------------------------------
    def _quantiles(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(q(1-1e-5), |q(1e-5)|, q(1-1e-7), q(1e-7)) as [L, N] float tensors, or None without statistics."""
        if self.stats is None:
            return None
        with self._lock:
            if "q" not in self._cache:
                s = self.stats
                hi = s.quantile(1 - Q_FIRE).float()
                lo = s.quantile(Q_FIRE).float().abs()
                self._cache["q"] = (hi.clamp_min(1e-12), lo.clamp_min(1e-12),
                                    s.quantile(1 - Q_STRONG).float(), s.quantile(Q_STRONG).float())
            return self._cache["q"]

    def normalise(self, acts: torch.Tensor) -> torch.Tensor | None:
        """Signed normalised activations [L, T, N] (DESIGN.md section 2), or None without statistics."""
        q = self._quantiles()
        if q is None:
            return None
        hi, lo = q[0].unsqueeze(1), q[1].unsqueeze(1)  # [L, 1, N]
        acts = acts.float()
        return torch.where(acts >= 0, acts / hi, acts / lo)

    def normalise_one(self, layer: int, neuron: int, value: float) -> float | None:
        q = self._quantiles()
        if q is None:
            return None
        return float(value / (q[0][layer, neuron] if value >= 0 else q[1][layer, neuron]))

    def strengthen_value(self, layer: int, neuron: int, polarity: str, strength: float) -> float:
        q = self._quantiles()
        if q is None:
            raise NeuronscopeError("Strengthen needs corpus statistics (quantiles), which this atlas lacks; use "
                                   "suppress, or a clamp with an explicit value, or run `neuronscope stats`.")
        v = q[2][layer, neuron] if polarity == "pos" else q[3][layer, neuron]
        return float(v) * float(strength)

    def quantiles_of(self, layer: int, neuron: int) -> dict[str, float] | None:
        if self.stats is None:
            return None
        return {str(lv): float(self.stats.quantile(lv)[layer, neuron]) for lv in self.stats.levels}

    # ---- decodes -----------------------------------------------------------------------------------------
    def _vocab(self) -> list[str]:
        with self._lock:
            if "vocab" not in self._cache:
                from ..atlas.vocab import token_texts
                self._cache["vocab"] = token_texts(self.subject)
            return self._cache["vocab"]

    def _model_decodes(self, layer: int, neuron: int) -> dict[str, list[int]]:
        """Top-5 decoded token ids of one neuron, from the weights (when there is no atlas): W_U (g * v)."""
        key = ("dec", layer, neuron)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        s = self.subject
        with torch.no_grad():
            if "W_U" not in self._cache:
                self._cache["W_U"] = (s.spec.unembedding(s.model).float(), s.spec.final_norm_gain(s.model).float())
            W_U, g = self._cache["W_U"]
            write = s.spec.write_vectors(s.model, layer)[neuron].float() * g
            logits = W_U @ write
            out = {"down.pos": logits.topk(5).indices.tolist(), "down.neg": (-logits).topk(5).indices.tolist()}
            for site, m in s.spec.read_vectors(s.model, layer).items():
                out[site] = (W_U @ (m[neuron].float() * g)).topk(5).indices.tolist()
        with self._lock:
            self._cache[key] = out
        return out

    def top_tokens(self, layer: int, neuron: int, polarity: str = "pos", k: int = 5) -> list[str]:
        site = DECODE_SITE.get(polarity, "down.pos")
        vocab = self._vocab()
        if self.atlas is not None:
            key = ("top", site)
            with self._lock:
                if key not in self._cache:
                    self._cache[key] = self.atlas.top_ids(site)
                ids = self._cache[key]
            return [vocab[int(i)] if 0 <= int(i) < len(vocab) else "?" for i in ids[layer, neuron, :k].tolist()]
        return [vocab[int(i)] for i in self._model_decodes(layer, neuron)[site][:k]]

    def decodes(self, layer: int, neuron: int) -> tuple[dict[str, list[dict]], str]:
        """(decodes per site, source) from the atlas, or from the weights without one."""
        if self.atlas is not None:
            return self.atlas.neuron(layer, neuron), "atlas"
        vocab = self._vocab()
        d = self._model_decodes(layer, neuron)
        return ({site: [{"token": vocab[int(i)], "id": int(i), "logit": None, "prob": None}
                        for i in ids] for site, ids in d.items()}, "model")

    # ---- descriptions, exemplars, search, clusters -------------------------------------------------------
    def description(self, layer: int, neuron: int, polarity: str) -> str | None:
        if self.descriptions is None:
            return None
        d = self.descriptions.get(layer, neuron, polarity)
        return d.get("text") if d else None

    def exemplars(self, layer: int, neuron: int, polarity: str, n: int, subject=None) -> list[dict]:
        if self.stats is None:
            return []
        return self.stats.exemplars(layer, neuron, polarity=polarity, n=n, subject=subject)

    def search(self, query: str, k: int = 50) -> list[dict]:
        """Neurons for a concept: the atlas search plus the descriptions' text search, merged, best first."""
        if not query.strip():
            raise NeuronscopeError("The concept is empty; type a word or phrase to search for.")
        if self.atlas is None and self.descriptions is None:
            raise NeuronscopeError("Concept search needs an atlas or descriptions; start the server with --atlas.")
        found: dict[tuple[int, int, str], dict] = {}
        atlas_error = None
        hits = []
        if self.atlas is not None:
            try:
                hits = self.atlas.search(query, k=3 * k)  # several sites can name the same neuron
            except NeuronscopeError as exc:  # e.g. no vocabulary token matches: the descriptions may still match
                atlas_error = exc
            for r in hits:
                pol = "neg" if r.get("site") == "down.neg" else "pos"
                key = (int(r["layer"]), int(r["neuron"]), pol)
                if key not in found or found[key]["score"] < float(r["score"]):
                    found[key] = {"layer": key[0], "neuron": key[1], "polarity": pol, "score": float(r["score"]),
                                  "tokens": list(r.get("tokens") or []), "source": f"atlas:{r.get('site')}"}
        if self.descriptions is not None:
            for r in self.descriptions.search(query, k=2 * k):
                key = (int(r["layer"]), int(r["neuron"]), str(r["polarity"]))
                score = float(r["score"]) if r.get("score") is not None else 0.0
                if key not in found or found[key]["score"] < score:
                    found[key] = {"layer": key[0], "neuron": key[1], "polarity": key[2], "score": score,
                                  "tokens": self.top_tokens(key[0], key[1], key[2]), "source": "description"}
        if not found and atlas_error is not None:
            raise atlas_error
        rows = sorted(found.values(), key=lambda r: -r["score"])[:k]
        for r in rows:
            r["description"] = self.description(r["layer"], r["neuron"], r["polarity"])
        return rows

    def clusters(self, neurons: list[tuple[int, int, str]], min_size: int = 2) -> tuple[list[dict], str]:
        """Clusters of related neurons (the describe package's clustering, or shared top decoded tokens)."""
        if not neurons:
            return [], "none"
        if self.atlas is not None:
            try:
                from ..describe import cluster_neurons
            except ImportError:
                cluster_neurons = None
            if cluster_neurons is not None:
                return cluster_neurons(self.atlas, neurons, min_size=min_size), "describe"
        groups: dict[str, list] = {}
        for l, i, pol in neurons:  # fallback: neurons whose top decoded token is the same word
            tok = self.top_tokens(l, i, pol, k=1)[0].strip().lower()
            if tok:
                groups.setdefault(tok, []).append([l, i, pol])
        out = [{"name": name, "members": m, "tokens": [name]} for name, m in groups.items() if len(m) >= min_size]
        return sorted(out, key=lambda c: -len(c["members"])), "shared top token"


def _try_open(module: str, cls_name: str, folder: Path, notes: list[str], note: str):
    try:
        mod = __import__(module, fromlist=[cls_name])
        cls = getattr(mod, cls_name)
    except (ImportError, AttributeError):
        notes.append(note.format(f=folder, e=f"{module} is not installed"))
        return None
    try:
        return cls.open(folder)
    except (NeuronscopeError, FileNotFoundError, OSError, KeyError) as exc:
        notes.append(note.format(f=folder, e=str(exc).rstrip(".")))
        return None
