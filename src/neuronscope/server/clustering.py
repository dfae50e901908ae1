"""The active concepts of a token range: the neurons firing there grouped into named clusters of related neurons
(`Knowledge.clusters`), each with its size, its summed activation and, for a chosen token, its attribution to it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import NeuronscopeError
from . import schemas as S
from .knowledge import Knowledge
from .limits import Limits
from .sessions import Session
from .views import Views

CLUSTER_SORTS: dict[str, Callable[[S.ClusterOut], Any]] = {
    "activation": lambda c: -c.activation, "size": lambda c: (-c.size, -c.activation),
    "attribution": lambda c: -(c.attribution or 0.0)}


@dataclass
class Grouped:
    """The clusters of one token range and filters, before a token's attribution and the sort (cached)."""
    method: str
    n_neurons: int
    clusters: list[S.ClusterOut]


class Clusters:
    """Clusters of the firing neurons of sessions' conversations (cached per range and filters)."""

    def __init__(self, views: Views, knowledge: Knowledge, limits: Limits) -> None:
        self.views, self.knowledge, self.limits = views, knowledge, limits

    def _grouped(self, view: S.ActivationsOut, strings: list[str]) -> Grouped:
        """The clusters of an activations view's rows, with each cluster's summed activation in the view's range;
        `strings`: the conversation's token strings (what each neuron fires on here)."""
        lo, hi = view.start, view.end
        neurons = [(r.layer, r.neuron, r.polarity) for r in view.rows]
        # a token the next one continues without a space ('ass' of 'assistant') is a piece, not the word it spells
        piece = [t + 1 < len(strings) and strings[t + 1][:1].isalpha() for t in range(len(strings))]
        context = {(r.layer, r.neuron, r.polarity):
                   [strings[f.position] for f in r.fires if lo <= f.position < min(hi, len(strings))
                    and not piece[f.position]]
                   for r in view.rows}
        try:
            found, method = self.knowledge.clusters(neurons, context=context)
        except NeuronscopeError as exc:  # e.g. no embedding index and no embedder: say so, show no clusters
            found, method = [], "unavailable"
            view.notes.insert(0, f"No clusters: {exc}")
        act: dict[tuple[int, int, str], float] = {
            (r.layer, r.neuron, r.polarity): sum(abs(f.value) for f in r.fires if lo <= f.position < hi)
            for r in view.rows}
        out: list[S.ClusterOut] = []
        for c in found:
            members: list[list[Any]] = [[int(m[0]), int(m[1]), str(m[2]) if len(m) > 2 else "pos"]
                                        for m in c.members]
            total = sum(act.get((m[0], m[1], m[2]), 0.0) for m in members)
            kind = c.kind if c.kind in ("concept", "context", "form", "unclear") else "concept"  # by description or
            topic = (c.writes or c.reads) if kind in ("concept", "context") else None          # token: as before
            out.append(S.ClusterOut(name=c.name, kind=kind, topic=topic, members=members, tokens=list(c.tokens),
                                    size=len(members), activation=float(total), attribution=None))
        return Grouped(method, len(neurons), out)

    def _attribution(self, s: Session, position: int, clusters: list[S.ClusterOut]) -> None:
        """Set each cluster's attribution to the token at `position`: its members' summed |a * dp/da| scores."""
        rows = self.views.attribution_result(s, position, None).rows
        score: dict[tuple[int, int], float] = {}
        for r in rows:
            score[(r.layer, r.neuron)] = score.get((r.layer, r.neuron), 0.0) + abs(r.score)
        for c in clusters:
            c.attribution = float(sum(score.get((m[0], m[1]), 0.0) for m in c.members))

    def clusters(self, s: Session, start: int | None = None, end: int | None = None, *, max_neurons: int = 300,
                 content_only: bool = False, interpretable: bool = False, sort: str = "activation",
                 position: int | None = None) -> S.ClustersOut:
        """The active concepts: neurons firing in [start, end) grouped into named clusters of related neurons.

        Each cluster has its size, its summed activation (sum over members of |normalised activation| at their
        firing tokens in the range) and, with `position`, its attribution to that token (sum of the members'
        |a * dp/da| scores, any position); `sort` orders by "activation" or "attribution" (needs `position`).
        """
        if sort not in CLUSTER_SORTS:
            raise NeuronscopeError(f"Unknown cluster sort '{sort}'; use activation, attribution or size.")
        if sort == "attribution" and position is None:
            raise NeuronscopeError("Sorting clusters by attribution needs a token: give its position.")
        view = self.views.activations(s, start=start, end=end, page_size=min(max_neurons, self.limits.max_page_size),
                                      content_only=content_only, interpretable=interpretable)
        key = ("clusters", view.start, view.end, content_only, interpretable, max_neurons)
        with s.lock:
            base: Grouped | None = s.cache.get(key)
        if base is None:
            base = self._grouped(view, self.views.token_strings(s))
            with s.lock:
                s.cache[key] = base
        clusters = [c.model_copy() for c in base.clusters]
        if position is not None:
            self._attribution(s, position, clusters)
        clusters.sort(key=CLUSTER_SORTS[sort])
        return S.ClustersOut(version=s.version, method=base.method, n_neurons=base.n_neurons, sort=sort,
                             position=position, clusters=clusters, notes=view.notes)
