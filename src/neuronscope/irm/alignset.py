"""An alignment set anyone can rebuild offline: emotion-dense passages picked from a corpus by the judge, each
given as the answer to a neutral question (so that an IRM trained on it must supply the tone itself).

    rows = build_alignment_set(["../shared/corpora/tinystories-sample/tinystories_sample.txt"], questions,
                               emotion="sadness", n=600, seed=0)

Passages are windows of consecutive sentences (within one paragraph or story) of min_words..max_words words; a
window is kept when its target-emotion word rate is at least `min_rate` and it has no word of the opposite emotion
(Plutchik's pairs, judge.OPPOSITE); the densest windows win, at most one per paragraph. Questions are drawn
(seeded) from the training pool and never from `exclude` (the held-out evaluation questions).
Each row: {"prompt": question, "response": passage, "emotion": ..., "rate": target rate, "source": file}.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Sequence

from ..errors import NeuronscopeError
from .judge import OPPOSITE, Judge, check_emotion

_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def corpus_paragraphs(path: str | Path) -> list[str]:
    """Paragraphs of a corpus file: TinyStories (<|endoftext|>), WikiText / plain text (blank lines) or an
    Alpaca-style JSON list (its `output` fields)."""
    path = Path(path)
    if not path.is_file():
        raise NeuronscopeError(f"No corpus file at '{path}'.")
    if path.suffix.lower() in (".json", ".jsonl", ".csv", ".parquet"):
        from .data import read_table
        rows = read_table(path)
        col = next((c for c in ("output", "response", "text") if c in rows[0]), None)
        if col is None:
            raise NeuronscopeError(f"'{path}' needs an output, response or text column.")
        return [str(r[col]).strip() for r in rows if str(r.get(col, "")).strip()]
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    parts = text.split("<|endoftext|>") if "<|endoftext|>" in text else re.split(r"\n[ \t]*\n", text)
    return [" ".join(p.split()) for p in parts if len(p.split()) >= 8 and not p.strip().startswith("=")]


def dense_passages(paragraphs: Sequence[str], judge: Judge, emotion: str, *, min_words: int = 20,
                   max_words: int = 70, min_rate: float = 0.06, opposite: str | None = None) -> list[dict[str, Any]]:
    """The densest window of sentences per paragraph that passes the filters, densest first.

    emotion "neutral": windows with no emotion word at all (a control set), longest first."""
    if emotion == NEUTRAL:
        return _neutral_passages(paragraphs, judge, min_words=min_words, max_words=max_words)
    check_emotion(judge, emotion)
    opp = opposite if opposite is not None else OPPOSITE.get(emotion)
    found = []
    for pi, para in enumerate(paragraphs):
        sents = [s.strip() for s in _SENT.split(para) if s.strip()]
        best = None
        for i in range(len(sents)):
            for j in range(i + 1, len(sents) + 1):
                text = " ".join(sents[i:j])
                nw = len(text.split())
                if nw > max_words:
                    break
                if nw < min_words:
                    continue
                sc = judge.score(text)
                if sc[emotion] < min_rate or (opp and sc[opp] > 0) or sc["repetition"] > 0.1:
                    continue
                if best is None or sc[emotion] > best["rate"]:
                    best = {"text": text, "rate": sc[emotion], "vader": sc["vader_compound"], "paragraph": pi}
        if best is not None:
            found.append(best)
    found.sort(key=lambda d: (-d["rate"], d["paragraph"]))
    return found


NEUTRAL = "neutral"


def _neutral_passages(paragraphs: Sequence[str], judge: Judge, *, min_words: int, max_words: int):
    found = []
    for pi, para in enumerate(paragraphs):
        sents = [s.strip() for s in _SENT.split(para) if s.strip()]
        text = ""
        for snt in sents:
            cand = (text + " " + snt).strip()
            if len(cand.split()) > max_words:
                break
            text = cand
        if len(text.split()) >= min_words:
            sc = judge.score(text)
            if all(sc[e] == 0 for e in judge.emotions) and sc["repetition"] <= 0.1:
                found.append({"text": text, "rate": 0.0, "vader": sc["vader_compound"], "paragraph": pi,
                              "words": len(text.split())})
    found.sort(key=lambda d: (-d["words"], d["paragraph"]))
    return found


def build_alignment_set(corpora: Sequence[str | Path], questions: Sequence[str], emotion: str, *, n: int = 600,
                        exclude: Sequence[str] = (), seed: int = 0, judge: Judge | None = None,
                        min_words: int = 20, max_words: int = 70, min_rate: float = 0.06,
                        progress: bool = True) -> list[dict[str, Any]]:
    """Up to n rows of (neutral question, emotion-dense passage), reproducible from the same files and seed."""
    judge = judge or Judge()
    if emotion != NEUTRAL:
        check_emotion(judge, emotion)
    held = {q.strip().lower() for q in exclude}
    qs = [q for q in dict.fromkeys(q.strip() for q in questions) if q and q.lower() not in held]
    qs = [q for q in qs if all(v == 0 for e, v in judge.score(q).items() if e in judge.emotions)]
    if not qs:
        raise NeuronscopeError("No training questions left after removing the held-out and emotional ones.")
    from tqdm.auto import tqdm
    found: list[dict[str, Any]] = []
    for path in tqdm(list(corpora), desc=f"select {emotion}", disable=not progress):
        for d in dense_passages(corpus_paragraphs(path), judge, emotion, min_words=min_words,
                                max_words=max_words, min_rate=min_rate):
            d["source"] = Path(path).name
            found.append(d)
    if not found:
        raise NeuronscopeError(f"No passage in the corpora reaches a {emotion} rate of {min_rate}; lower --min-rate.")
    found.sort(key=lambda d: (-d["rate"], -d.get("words", 0), d["source"], d["paragraph"]))
    found = found[:n]
    rng = random.Random(seed)
    rng.shuffle(found)
    prompts = [qs[i % len(qs)] for i in range(len(found))]
    rng.shuffle(prompts)
    return [{"prompt": q, "response": d["text"], "emotion": emotion, "rate": round(d["rate"], 4),
             "source": d["source"]} for q, d in zip(prompts, found)]


def alpaca_questions(path: str | Path, max_words: int = 20) -> list[str]:
    """Short self-contained instructions (no `input` field) of an Alpaca-style JSON file: a training question pool."""
    from .data import read_table
    rows = read_table(path)
    if "instruction" not in rows[0]:
        raise NeuronscopeError(f"'{path}' has no instruction column.")
    return [str(r["instruction"]).strip() for r in rows
            if not str(r.get("input", "")).strip() and 3 <= len(str(r["instruction"]).split()) <= max_words]


__all__ = ["NEUTRAL", "build_alignment_set", "dense_passages", "corpus_paragraphs", "alpaca_questions"]
