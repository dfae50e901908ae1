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
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..atlas.decode import decode, decode_neuron, token_text
from ..atlas.folder import AtlasFolder
from ..concepts.clusters import ConceptCluster
from ..concepts.records import NeuronMatch
from ..errors import NeuronscopeError
from ..parts import open_parts
from ..refs import check_polarity
from .cache import BoundedCache

if TYPE_CHECKING:
    from ..atlas import Atlas
    from ..atlas.records import DecodedToken
    from ..describe.describe import Descriptions
    from ..describe.records import DescriptionKind
    from ..stats.results import Exemplar, NeuronStats
    from ..subject import Subject

DECODE_SITE = {"pos": "down.pos", "neg": "down.neg"}   # a negative activation promotes the down.neg tokens
Key = tuple[int, int, str]                              # (layer, neuron, polarity)


@dataclass
class Knowledge:
    subject: Subject
    atlas: Atlas | None = None
    stats: NeuronStats | None = None
    descriptions: Descriptions | None = None
    atlas_dir: str | None = None
    folder: AtlasFolder | None = None
    notes: list[str] = field(default_factory=list)
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)
    _tops: BoundedCache = field(default_factory=lambda: BoundedCache(1 << 17), repr=False)  # top tokens, no atlas
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ---- opening ------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, subject: Subject, atlas_dir: str | Path | None) -> Knowledge:
        """Open what the folder holds (through AtlasFolder). A damaged manifest, or a folder made for other
        weights, is refused with one sentence; a missing or damaged part is left out with one note saying why."""
        k = cls(subject=subject, atlas_dir=str(atlas_dir) if atlas_dir else None)
        if atlas_dir is None:
            k.notes.append("No atlas folder was given: decodes are computed from the weights; no corpus statistics "
                           "(activations are raw, not normalised; strengthen steering is off) and no descriptions.")
            return k
        af = AtlasFolder.open(atlas_dir)
        af.check_model(subject)
        parts = open_parts(af)
        k.folder, k.atlas, k.stats, k.descriptions = af, parts.atlas, parts.stats, parts.descriptions
        k.notes.extend(parts.notes)
        return k

    @property
    def capabilities(self) -> dict[str, bool]:
        return {"atlas": self.atlas is not None, "stats": self.stats is not None,
                "descriptions": self.descriptions is not None}

    # ---- quantiles and normalisation (their one home is stats/levels.py, through NeuronStats) ---------------
    def _scales(self) -> dict[str, torch.Tensor] | None:
        """The normalisation divisors and the strengthen quantiles as [L, N] tensors, or None without statistics."""
        if self.stats is None:
            return None
        with self._lock:
            if "q" not in self._cache:
                s = self.stats
                hi, lo = s.norm_scale()
                strong_hi, strong_lo = s.level_info.strong_levels()
                self._cache["q"] = {"hi": hi, "lo": lo, "strong_pos": s.quantile(strong_hi).float(),
                                    "strong_neg": s.quantile(strong_lo).float()}
            q: dict[str, torch.Tensor] = self._cache["q"]
            return q

    def normalise(self, acts: torch.Tensor) -> torch.Tensor | None:
        """Signed normalised activations [L, T, N] (DESIGN.md section 2), or None without statistics."""
        if self.stats is None:
            return None
        return self.stats.normalise(acts)

    def normalise_one(self, layer: int, neuron: int, value: float) -> float | None:
        q = self._scales()
        if q is None:
            return None
        return float(value / (q["hi"][layer, neuron] if value >= 0 else q["lo"][layer, neuron]))

    def strengthen_value(self, layer: int, neuron: int, polarity: str, strength: float) -> float:
        q = self._scales()
        if q is None:
            raise NeuronscopeError("Strengthen needs corpus statistics (quantiles), which this atlas lacks; use "
                                   "suppress, or a clamp with an explicit value, or run `neuronscope stats`.")
        v = q["strong_pos"][layer, neuron] if check_polarity(polarity) == "pos" else q["strong_neg"][layer, neuron]
        return float(v) * float(strength)

    def quantiles_of(self, layer: int, neuron: int) -> dict[str, float] | None:
        if self.stats is None:
            return None
        return {str(lv): float(self.stats.quantile(lv)[layer, neuron]) for lv in self.stats.levels}

    # ---- decodes -----------------------------------------------------------------------------------------
    def _vocab(self) -> list[str]:
        with self._lock:
            if "vocab" not in self._cache:
                if self.atlas is not None:
                    self._cache["vocab"] = self.atlas.vocab
                else:
                    from ..atlas.vocab import token_texts
                    self._cache["vocab"] = token_texts(self.subject)
            vocab: list[str] = self._cache["vocab"]
            return vocab

    def _unembedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM head and the final norm's gain as float32 (copied once)."""
        with self._lock:
            if "W_U" not in self._cache:
                s = self.subject
                self._cache["W_U"] = (s.spec.unembedding(s.model).detach().float(),
                                      s.spec.final_norm_gain(s.model).detach().float())
            got: tuple[torch.Tensor, torch.Tensor] = self._cache["W_U"]
            return got

    def _model_decodes(self, layer: int, neuron: int) -> dict[str, list[DecodedToken]]:
        """Top-5 decodes of one neuron from the weights (when there is no atlas), by atlas.decode.decode_neuron."""
        key = ("dec", layer, neuron)
        with self._lock:
            if key in self._cache:
                hit: dict[str, list[DecodedToken]] = self._cache[key]
                return hit
        W_U, g = self._unembedding()
        out = decode_neuron(self.subject, layer, neuron, k=5, unembedding=W_U, gain=g, vocab=self._vocab())
        with self._lock:
            self._cache[key] = out
        return out

    def top_tokens(self, layer: int, neuron: int, polarity: str = "pos", k: int = 5) -> list[str]:
        """The tokens the neuron promotes firing with this polarity (its down.pos / down.neg decode), best first."""
        if self.atlas is not None:
            return self.atlas.top_tokens(layer, neuron, DECODE_SITE.get(polarity, "down.pos"), k)
        key = (layer, neuron, polarity)
        return self.top_tokens_many([key], k)[key]

    def top_tokens_many(self, keys: Sequence[Key], k: int = 5) -> dict[Key, list[str]]:
        """`top_tokens` of many neurons: from the atlas, or without one their write vectors decoded together, one
        batch per layer (`atlas.decode.decode`; on SmolLM2 ~40x faster than one neuron at a time, whose matrix-vector
        product reads the whole LM head for each)."""
        if self.atlas is not None:
            return {key: self.top_tokens(*key, k=k) for key in keys}
        out: dict[Key, list[str]] = {key: self._tops.get((key, k)) for key in keys}
        by_layer: dict[int, list[Key]] = {}
        for key, got in out.items():
            if got is None:
                by_layer.setdefault(self.subject.check_layer(key[0]), []).append(key)
        if by_layer:
            self._decode_tops(by_layer, k, out)
        return out

    def _decode_tops(self, by_layer: dict[int, list[Key]], k: int, out: dict[Key, list[str]]) -> None:
        """Fill `out` with the top tokens of the neurons of `by_layer` (and cache them): a batch per layer."""
        W_U, g = self._unembedding()
        vocab, tokenizer = self._vocab(), self.subject.tokenizer
        for layer, group in by_layer.items():
            rows = torch.tensor(self.subject.check_neurons([n for _, n, _ in group]))
            with torch.no_grad():
                vecs = self.subject.spec.write_vectors(self.subject.model, layer)[rows].detach().float() * g
                found = decode(vecs, W_U, k=k, sides=("pos", "neg"), method="plain")
            for j, key in enumerate(group):
                ids = found["neg" if DECODE_SITE.get(key[2]) == "down.neg" else "pos"].ids[j].tolist()
                out[key] = [token_text(i, vocab, tokenizer) for i in ids]
                self._tops.put((key, k), out[key])

    def decodes(self, layer: int, neuron: int) -> tuple[dict[str, list[DecodedToken]], str]:
        """(decodes per site, source) from the atlas, or from the weights without one."""
        if self.atlas is not None:
            return self.atlas.neuron(layer, neuron), "atlas"
        return self._model_decodes(layer, neuron), "model"

    # ---- descriptions, exemplars, search, clusters -------------------------------------------------------
    def description(self, layer: int, neuron: int, polarity: str) -> str | None:
        if self.descriptions is None:
            return None
        d = self.descriptions.get(layer, neuron, polarity)
        return d.text if d else None

    def description_kinds(self, layer: int, neuron: int, polarity: str) -> list[DescriptionKind]:
        """Every kind of stored description of one polarity with its scores ([] without descriptions)."""
        if self.descriptions is None:
            return []
        d = self.descriptions.get(layer, neuron, polarity, candidates=True)
        return list(d.candidates or []) if d else []

    def exemplars(self, layer: int, neuron: int, polarity: str, n: int) -> list[Exemplar]:
        """The stored exemplars, read from the folder (the reader never runs the model; the Monitor fills in each
        window's activations itself, `Monitor._window_acts`: a forward in chunks under the model lock)."""
        if self.stats is None:
            return []
        return self.stats.exemplars(layer, neuron, polarity=polarity, n=n)

    def search(self, query: str, k: int = 50) -> list[NeuronMatch]:
        """Neurons for a concept by decoded tokens and description text (the fallback of the Monitor's concept
        search without concept evidence or a describe index): the atlas search plus the descriptions' text search,
        merged, best first."""
        if not query.strip():
            raise NeuronscopeError("The concept is empty; type a word or phrase to search for.")
        if self.atlas is None and self.descriptions is None:
            raise NeuronscopeError("Concept search needs an atlas or descriptions; start the server with --atlas.")
        found: dict[tuple[int, int, str], NeuronMatch] = {}
        atlas_error = None
        hits = []
        if self.atlas is not None:
            try:
                hits = self.atlas.search(query, k=3 * k)  # several sites can name the same neuron
            except NeuronscopeError as exc:  # e.g. no vocabulary token matches: the descriptions may still match
                atlas_error = exc
            for r in hits:
                pol = "neg" if r.site == "down.neg" else "pos"
                key = (r.layer, r.neuron, pol)
                if key not in found or found[key].score < r.score:
                    found[key] = NeuronMatch(*key, r.score, list(r.tokens), f"atlas:{r.site}")
        if self.descriptions is not None:
            matches = self.descriptions.search(query, k=2 * k)
            keys = [(m.description.layer, m.description.neuron, m.description.polarity) for m in matches]
            tops = self.top_tokens_many(keys)
            for m, key in zip(matches, keys):
                score = float(m.match)
                if key not in found or found[key].score < score:
                    found[key] = NeuronMatch(*key, score, tops[key], "description")
        if not found and atlas_error is not None:
            raise atlas_error
        rows = sorted(found.values(), key=lambda m: -m.score)[:k]
        for row in rows:
            row.description = self.description(*row.key)
        return rows

    def clusters(self, neurons: list[tuple[int, int, str]], min_size: int = 2,
                 context: dict[tuple[int, int, str], list[str]] | None = None) -> tuple[list[ConceptCluster], str]:
        """Clusters of related neurons: by meaning (what they read and write, concepts.clusters) where the atlas
        has concept evidence; else the describe package's clustering of descriptions; else shared top decoded
        tokens. Each cluster has a "kind": "concept", "context" (its members fire here on a topic's words), "form"
        (syntax and formatting groups) or "unclear". `context`: the token strings each neuron fires on here."""
        if not neurons:
            return [], "none"
        if self.atlas_dir:
            from ..concepts.evidence import has_concept_evidence
            if has_concept_evidence(self.atlas_dir):
                from ..concepts.clusters import concept_clusters
                return concept_clusters(self.atlas_dir, neurons, min_size=min_size, context=context), "meaning"
        if self.atlas is not None:
            try:
                from ..concepts.by_description import cluster_neurons
            except ImportError:
                pass
            else:
                return cluster_neurons(self.atlas, neurons, min_size=min_size), "describe"
        from ..concepts.clusters import steer_form
        groups: dict[str, list[list[Any]]] = {}
        tops = self.top_tokens_many(neurons, k=1)
        for l, i, pol in neurons:  # fallback: neurons whose top decoded token is the same word
            tok = tops[(l, i, pol)][0].strip().lower()
            if tok:
                groups.setdefault(tok, []).append([l, i, pol])
        out = [ConceptCluster(name, "token", m, len(m), 1.0, [name], steer=steer_form(m))
               for name, m in groups.items() if len(m) >= min_size]
        return sorted(out, key=lambda c: -c.size), "shared top token"
