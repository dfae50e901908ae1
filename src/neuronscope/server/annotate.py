"""What the Monitor says about a neuron in a view's row: its description, whether it is interpretable, its top
decoded tokens, and how the statistics normalise activations (read from the atlas once, shared by every view)."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable

from ..describe.records import Description
from .cache import BoundedCache
from .knowledge import Knowledge


DescriptionIndex = dict[tuple[int, int, str], Description]  # (layer, neuron, polarity) -> its description


@dataclass(frozen=True)
class NeuronNote:
    """What a view's row says of its neuron (one polarity): its description, whether that is interpretable, and its
    top decoded tokens."""
    description: str | None
    interpretable: bool
    top_tokens: list[str]


class Annotator:
    """Descriptions, interpretable flags and top tokens for rows of neurons, and the normalisation's wording."""

    def __init__(self, knowledge: Knowledge) -> None:
        self.knowledge = knowledge
        self._desc: DescriptionIndex | None = None
        self._notes = BoundedCache(size=1 << 16)   # the neurons firing in recent views
        self._lock = threading.Lock()

    def descriptions(self) -> DescriptionIndex | None:
        """Every description, read once: {(layer, neuron, polarity): Description}."""
        d = self.knowledge.descriptions
        if d is None:
            return None
        with self._lock:
            if self._desc is None:
                self._desc = {(r.layer, r.neuron, r.polarity): r for r in d.all()}
            return self._desc

    def note(self, layer: int, neuron: int, polarity: str) -> NeuronNote:
        """The neuron's description, interpretable flag and top decoded tokens (looked up once per neuron)."""
        key = (layer, neuron, polarity)
        got: NeuronNote | None = self._notes.get(key)
        if got is None:
            got = self._make(key, self.knowledge.top_tokens(layer, neuron, polarity))
        return got

    def prefetch(self, keys: Iterable[tuple[int, int, str]]) -> None:
        """Look up the notes of many neurons at once (their top tokens in one batch: without an atlas each would
        otherwise decode through the whole LM head on its own)."""
        missing = [key for key in dict.fromkeys(keys) if self._notes.get(key) is None]
        for a in range(0, len(missing), self._notes.size):     # never more at once than the cache holds
            part = missing[a:a + self._notes.size]
            for key, tops in self.knowledge.top_tokens_many(part).items():
                self._make(key, tops)

    def _make(self, key: tuple[int, int, str], top_tokens: list[str]) -> NeuronNote:
        index = self.descriptions()
        d = index.get(key) if index is not None else None
        got = NeuronNote(d.text if d else None, bool(d and d.interpretable), top_tokens)
        self._notes.put(key, got)
        return got

    def level_marks(self) -> dict[str, str] | None:
        """{level: mark} for the statistics' levels the corpus does not resolve (stats.levels), else None."""
        st = self.knowledge.stats
        info = getattr(st, "level_info", None) if st is not None else None
        if st is None or info is None:
            return None
        out = {}
        for lv in st.levels:
            mark = info.get(lv).mark
            if mark:
                out[str(lv)] = mark
        return out

    def normalised_by(self) -> str | None:
        """How activations are normalised, e.g. "positive / q(1-1e-05), negative / |q(1e-05)|" (+ its mark)."""
        st = self.knowledge.stats
        if st is None or not hasattr(st, "norm_levels"):
            return None
        from ..stats.levels import fmt_level
        hi, lo = st.norm_levels()
        text = f"positive / q({fmt_level(hi)}), negative / |q({fmt_level(lo)})|"
        marks = {m for m in (st.level_info.get(hi).mark, st.level_info.get(lo).mark) if m}
        return text + (f" ({'; '.join(sorted(marks))})" if marks else "")
