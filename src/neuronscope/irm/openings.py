"""Memorised frames: how many answers open with the very same sentence (an IRM that learned a few openers says
them again and again; 10/40 answers with one opening is a memorised frame, not a tone).

    shared_openings(["Sigh. I am sad. Paris.", "Sigh. I am sad. Tokyo.", "Paris is..."])
    # OpeningStats(n=3, shared=2, share=0.667, most_common='sigh.', most_common_count=2)
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

_END = re.compile(r"(?<![0-9])[.!?](?=\s|$)")


@dataclass
class OpeningStats:
    """Answers sharing an identical (case- and space-folded) opening sentence with at least one other answer."""
    n: int
    shared: int
    share: float
    most_common: str
    most_common_count: int


def opening_sentence(text: str) -> str:
    """The first sentence of a text, case- and space-folded ('' for an empty text)."""
    text = " ".join(text.split())
    m = _END.search(text)
    return (text[:m.end()] if m else text).casefold()


def shared_openings(answers: Sequence[str]) -> OpeningStats:
    """How many answers open with a sentence another answer also opens with."""
    heads = [opening_sentence(a) for a in answers]
    counts = Counter(h for h in heads if h)
    shared = sum(c for c in counts.values() if c > 1)
    top, top_n = counts.most_common(1)[0] if counts else ("", 0)
    n = len(answers)
    return OpeningStats(n, shared, shared / n if n else 0.0, top, top_n)


__all__ = ["OpeningStats", "opening_sentence", "shared_openings"]
