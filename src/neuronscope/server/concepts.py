"""Concept search: the neurons of a concept, best first. With concept evidence (statistics and the window embeddings
of `neuronscope describe`): `concepts.search.concept_search`, each row's `source` saying its side ("reads" /
"writes"), and steering by concept takes the *writers* (`writers`); with only the describe index: by description
meaning (`concepts.semantic.semantic_search`); else by the decode + description text search of `Knowledge.search`.
Results are cached (a steering by concept and the concept list ask the same question)."""
from __future__ import annotations

from dataclasses import replace

from ..concepts.records import NeuronMatch
from ..errors import NeuronscopeError
from . import schemas as S
from .cache import BoundedCache
from .knowledge import Knowledge
from .limits import Limits


class Concepts:
    """Finds a concept's neurons in one atlas."""

    def __init__(self, knowledge: Knowledge, limits: Limits, cache: BoundedCache) -> None:
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
            return S.ConceptsOut(query=query, results=self.search(query, k), notes=list(self.knowledge.notes))
        except NoConceptText as exc:        # says so instead of listing noise
            return S.ConceptsOut(query=query, results=[], notes=[str(exc)] + list(self.knowledge.notes))

    def search(self, query: str, k: int) -> list[NeuronMatch]:
        """The rows of `concepts` (copies: a caller may change them)."""
        key = ("search", query.strip().lower(), int(k))
        hit: list[NeuronMatch] | None = self.cache.get(key)
        if hit is not None:
            return _copies(hit)
        rows = self._search_uncached(query, k)
        self.cache.put(key, _copies(rows))
        return rows

    def writers(self, query: str, k: int) -> list[NeuronMatch]:
        """The neurons a steering by concept clamps: the concept's writers where there is concept evidence (they
        promote its words), else the best rows of `search`."""
        if not self.has_evidence():
            return self.search(query, k)
        key = ("writers", query.strip().lower(), int(k))
        hit: list[NeuronMatch] | None = self.cache.get(key)
        if hit is not None:
            return _copies(hit)
        from ..concepts.steer import MIN_WRITES
        rows = [r for r in self._grounded(query, k, "writes") if r.score >= MIN_WRITES]
        self.cache.put(key, _copies(rows))
        return rows

    def _grounded(self, query: str, k: int, side: str) -> list[NeuronMatch]:
        from ..concepts.search import concept_search
        folder = self.knowledge.atlas_dir
        if folder is None:
            return []
        return [h.match(side) for h in concept_search(folder, query, side=side, k=k).hits]

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

    def _search_uncached(self, query: str, k: int) -> list[NeuronMatch]:
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
                return [h.match() for h in hits]
        return self.knowledge.search(query, k=k)

    def has_index(self) -> bool:
        """Whether the atlas has the describe step's embedding index (looked up once)."""
        if self._index_ok is None:
            try:
                from ..describe.index import load_index
                self._index_ok = load_index(self.knowledge.atlas_dir) is not None
            except (ImportError, NeuronscopeError, OSError):
                self._index_ok = False
        return self._index_ok


def _copies(rows: list[NeuronMatch]) -> list[NeuronMatch]:
    return [replace(r, tokens=list(r.tokens)) for r in rows]
