"""Concept search: the neurons of a concept, best first. With concept evidence (statistics and the window embeddings
of `neuronscope describe`): `concepts.search.concept_search`, each row's `source` saying its side ("reads" /
"writes"), and steering by concept takes the *writers* (`writers`); with only the describe index: by description
meaning (`concepts.semantic.semantic_search`); else by the decode + description text search of `Knowledge.search`.
Results are cached (a steering by concept and the concept list ask the same question)."""
from __future__ import annotations

from typing import Any

from ..errors import NeuronscopeError
from . import schemas as S
from .annotate import ViewCache
from .knowledge import Knowledge
from .limits import Limits


def concept_row(r: dict[str, Any]) -> S.ConceptRowOut:
    """A row of `Knowledge.search` as the view's row type (the same keys)."""
    return {"layer": r["layer"], "neuron": r["neuron"], "polarity": r["polarity"], "score": r["score"],
            "tokens": r["tokens"], "source": r["source"], "description": r["description"]}


class Concepts:
    """Finds a concept's neurons in one atlas."""

    def __init__(self, knowledge: Knowledge, limits: Limits, cache: ViewCache) -> None:
        self.knowledge, self.limits, self.cache = knowledge, limits, cache
        self._index_ok: bool | None = None
        self._evidence_ok: bool | None = None

    def concepts(self, query: str, k: int = 50) -> S.ConceptsOut:
        """Neurons for a concept, best first, with the notes on what the atlas lacks."""
        if not 1 <= k <= self.limits.max_steer_neurons:
            raise NeuronscopeError(f"k must be between 1 and {self.limits.max_steer_neurons}.")
        if len(query) > self.limits.max_concept_chars:
            raise NeuronscopeError(f"The concept has {len(query)} characters; the limit is "
                                   f"{self.limits.max_concept_chars}.")
        from ..concepts.search import NoConceptText
        try:
            return {"query": query, "results": self.search(query, k), "notes": list(self.knowledge.notes)}
        except NoConceptText as exc:        # says so instead of listing noise
            return {"query": query, "results": [], "notes": [str(exc)] + list(self.knowledge.notes)}

    def search(self, query: str, k: int) -> list[S.ConceptRowOut]:
        """The rows of `concepts` (copies: a caller may change them)."""
        key = ("search", query.strip().lower(), int(k))
        hit: list[S.ConceptRowOut] | None = self.cache.get(key)
        if hit is not None:
            return [r.copy() for r in hit]
        rows = self._search_uncached(query, k)
        self.cache.put(key, [r.copy() for r in rows])
        return rows

    def writers(self, query: str, k: int) -> list[S.ConceptRowOut]:
        """The neurons a steering by concept clamps: the concept's writers where there is concept evidence (they
        promote its words), else the best rows of `search`."""
        if not self.has_evidence():
            return self.search(query, k)
        key = ("writers", query.strip().lower(), int(k))
        hit: list[S.ConceptRowOut] | None = self.cache.get(key)
        if hit is not None:
            return [r.copy() for r in hit]
        from ..concepts.steer import MIN_WRITES
        rows = [r for r in self._grounded(query, k, "writes") if r["score"] >= MIN_WRITES]
        self.cache.put(key, [r.copy() for r in rows])
        return rows

    def _grounded(self, query: str, k: int, side: str) -> list[S.ConceptRowOut]:
        from ..concepts.search import concept_search
        folder = self.knowledge.atlas_dir
        if folder is None:
            return []
        res = concept_search(folder, query, side=side, k=k)
        return [{"layer": h.layer, "neuron": h.neuron, "polarity": h.polarity,
                 "score": h.writes if side == "writes" else h.score,
                 "tokens": h.read_words if h.side == "reads" else h.write_words, "source": h.side,
                 "description": h.description} for h in res.hits]

    def has_evidence(self) -> bool:
        """Whether concept evidence can be used here (built or buildable; looked up once)."""
        if self._evidence_ok is None:
            folder = self.knowledge.atlas_dir
            ok = False
            if folder:
                from ..concepts.evidence import has_concept_evidence
                ok = has_concept_evidence(folder)
            self._evidence_ok = ok
        return bool(self._evidence_ok)

    def _search_uncached(self, query: str, k: int) -> list[S.ConceptRowOut]:
        folder = self.knowledge.atlas_dir
        if folder and self.has_evidence():
            return self._grounded(query, k, "both")
        if folder and self.has_index():
            from ..concepts.semantic import semantic_search
            try:
                hits = semantic_search(folder, query, k=k)
            except NeuronscopeError:
                hits = None
            if hits is not None:
                return [{"layer": int(h["layer"]), "neuron": int(h["neuron"]), "polarity": str(h["polarity"]),
                         "score": float(h["score"]), "tokens": list(h.get("tokens") or []), "source": "semantic",
                         "description": h.get("description")} for h in hits]
        return [concept_row(r) for r in self.knowledge.search(query, k=k)]

    def has_index(self) -> bool:
        """Whether the atlas has the describe step's embedding index (looked up once)."""
        if self._index_ok is None:
            try:
                from ..describe.index import load_index
                self._index_ok = load_index(self.knowledge.atlas_dir) is not None
            except (ImportError, NeuronscopeError, OSError):
                self._index_ok = False
        return self._index_ok
