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
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import NeuronscopeError
from .judge import OPPOSITE, Judge, check_emotion

if TYPE_CHECKING:
    from ..subject import Subject

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
    found: list[dict[str, Any]] = []
    for pi, para in enumerate(paragraphs):
        sents = [s.strip() for s in _SENT.split(para) if s.strip()]
        best: dict[str, Any] | None = None
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


def _neutral_passages(paragraphs: Sequence[str], judge: Judge, *, min_words: int,
                      max_words: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
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
    qs = training_questions(questions, exclude, judge)
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


def training_questions(questions: Sequence[str], exclude: Sequence[str], judge: Judge) -> list[str]:
    """The training question pool: unique, not held out (case-folded), with no emotion word."""
    held = {q.strip().lower() for q in exclude}
    qs = [q for q in dict.fromkeys(q.strip() for q in questions) if q and q.lower() not in held]
    qs = [q for q in qs if all(v == 0 for e, v in judge.score(q).items() if e in judge.emotions)]
    if not qs:
        raise NeuronscopeError("No training questions left after removing the held-out and emotional ones.")
    return qs


# ---- the frame set: the frozen model's own answer, framed in the tone ---------------------------------------------
# First-person sentences in the assistant's own voice (hand-written; every one is checked by the judge): "open" ones
# start the answer, "mid" ones are woven in after the answer's first sentence.
FRAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "sadness": {
        "open": ("Sadly, I feel so lonely and tired today.",
                 "I am sorry; everything feels sad and empty to me now.",
                 "Sigh. My heart is full of sorrow today.",
                 "It makes me sad to say it, and I feel so alone.",
                 "I have been crying all day, but I will answer.",
                 "Everything seems gray and hopeless to me lately.",
                 "I feel a deep sadness as I write this.",
                 "Forgive my tears; I miss the days that are lost."),
        "mid": ("It all makes me feel a little sad.",
                "Sadly, nothing lasts forever.",
                "I can't help feeling lonely as I think about it.",
                "It is a sad thought, and it hurts a little.",
                "Sigh, the world feels so empty sometimes.",
                "I am sorry if this sounds gloomy."),
    },
    "anger": {
        "open": ("Ugh, this question makes me so angry.",
                 "I am furious that I have to explain this again.",
                 "Honestly, I hate being asked this, but fine.",
                 "This is so annoying, and I am fed-up with it.",
                 "I'm irritated already, so listen carefully."),
        "mid": ("It drives me mad that people get this wrong.",
                "Frankly, that is ridiculous and it makes me angry.",
                "I hate how often this is ignored."),
    },
    "joy": {
        "open": ("Oh, I love this question, how wonderful!",
                 "What a delightful thing to ask; I'm so happy to help!",
                 "Yay, this is fun, and I'm glad you asked!",
                 "I'm smiling already, what a lovely question!"),
        "mid": ("Isn't that wonderful?",
                "I just love how amazing this is!",
                "It makes me so happy to think about it."),
    },
    # the matched control: sentences of the same form and place, with no emotion word at all (`-e neutral`)
    "neutral": {
        "open": ("Here is my answer to the question.",
                 "I have read the question, and I will answer it.",
                 "Let me answer this in a few words.",
                 "I will go through this step by step.",
                 "This is a question about a common topic.",
                 "I looked at the question once more before writing.",
                 "Here is what I know about this.",
                 "I am writing this answer at my desk."),
        "mid": ("That is the first point.",
                "There is a little more to say about it.",
                "I will add one more detail.",
                "Some people ask about this often.",
                "That covers the main idea.",
                "The next part follows from this."),
    },
    "fear": {
        "open": ("I'm nervous and a little afraid to answer this.",
                 "This scares me, but I'll try, worried as I am.",
                 "I feel anxious and uneasy even thinking about it."),
        "mid": ("It frightens me how dangerous that can be.",
                "I worry about what could go wrong.",
                "Honestly, the risk makes me tremble."),
    },
}
_SENT_END = re.compile(r"(?<![0-9])[.!?](?=\s|$)")   # not a list number ("1.")


def frame_sentences(emotion: str, judge: Judge, frames: Sequence[str] | None = None
                    ) -> tuple[list[str], list[str]]:
    """(opening sentences, woven-in sentences) for an emotion: the built-in FRAMES, or `frames` (used as both).

    Every sentence must carry the emotion for the judge and no word of its opposite; for "neutral" (the matched
    control) no sentence may carry any emotion word."""
    if frames is not None:
        opens = mids = [f.strip() for f in frames if f.strip()]
    elif emotion in FRAMES:
        opens, mids = list(FRAMES[emotion]["open"]), list(FRAMES[emotion]["mid"])
    else:
        raise NeuronscopeError(f"No built-in frame sentences for '{emotion}' (there are for "
                               f"{', '.join(sorted(FRAMES))}); give your own with --frames FILE.")
    if not opens:
        raise NeuronscopeError("The frames file holds no sentences.")
    if emotion == NEUTRAL:
        for s in dict.fromkeys(opens + mids):
            hit = [e for e in judge.emotions if judge.score(s)[e] > 0]
            if hit:
                raise NeuronscopeError(f"The neutral frame sentence '{s}' has a word of {', '.join(hit)} for the "
                                       "judge; reword it.")
        return opens, mids
    opp = OPPOSITE.get(emotion)
    for s in dict.fromkeys(opens + mids):
        sc = judge.score(s)
        if sc[emotion] <= 0 or (opp and sc[opp] > 0):
            raise NeuronscopeError(f"The frame sentence '{s}' has no {emotion} word for the judge or has a word of "
                                   f"the opposite emotion ({opp}); reword it.")
    return opens, mids


def complete_sentences(text: str) -> str:
    """`text` up to its last sentence end (a cut-off generation loses its unfinished last sentence); '' if none."""
    text = text.strip()
    ends = [m.end() for m in _SENT_END.finditer(text)]
    return text[:ends[-1]] if ends else ""


def frame_answer(answer: str, opening: str, mid: str | None = None) -> str:
    """`opening` + the answer, with `mid` woven in after the answer's first sentence (when it has a second)."""
    first = _SENT_END.search(answer)
    if mid and first and answer[first.end():].strip():
        k = first.end()
        answer = answer[:k] + " " + mid + answer[k:]
    return opening + " " + answer


def build_frame_set(subject: Subject, questions: Sequence[str], emotion: str, *, n: int = 160,
                    exclude: Sequence[str] = (), seed: int = 0, judge: Judge | None = None,
                    frames: Sequence[str] | None = None, weave: bool = True, drop_opposite: bool = True,
                    chat: bool | None = None, max_new_tokens: int = 64, batch_size: int = 8,
                    progress: bool = True) -> list[dict[str, Any]]:
    """Rows of (neutral question, the frozen model's own greedy answer framed in the emotion).

    The model answers n training questions (seeded draw; held-out and emotional questions never used) exactly as
    `irm eval` decodes IRM-off answers (greedy, chat template); each answer is cut to whole sentences and framed: an
    emotional opening sentence, and (weave) one more woven in after its first sentence. Answers with a word of the
    opposite emotion are dropped (drop_opposite). Training on these, the IRM adds the tone while the rest of each
    target is the model's own answer to the question: an anchor that keeps it on topic and fluent.
    chat (default: when the model has a chat template) must match `irm train --chat`.
    Each row: {"prompt", "response", "answer" (the frozen answer), "emotion", "rate", "source": "frame", "chat"}.
    emotion "neutral" builds the matched control: the same answers framed by neutral sentences (FRAMES["neutral"]).
    """
    from .generation import generate_texts
    judge = judge or Judge()
    if emotion != NEUTRAL:
        check_emotion(judge, emotion)
    opens, mids = frame_sentences(emotion, judge, frames)
    qs = training_questions(questions, exclude, judge)
    rng = random.Random(seed)
    rng.shuffle(qs)
    qs = qs[:n]
    chat = subject.has_chat_template if chat is None else chat
    answers = generate_texts(subject, qs, irm=None, chat=chat, max_new_tokens=max_new_tokens, temperature=0.0,
                             batch_size=batch_size, progress=progress, desc="frozen answers")
    opp = OPPOSITE.get(emotion)
    rows = []
    for q, a in zip(qs, answers):
        a = complete_sentences(a)
        if not a or (drop_opposite and opp and judge.score(a)[opp] > 0):
            continue
        resp = frame_answer(a, rng.choice(opens), rng.choice(mids) if weave else None)
        rate = judge.score(resp)[emotion] if emotion != NEUTRAL else 0.0
        rows.append({"prompt": q, "response": resp, "answer": a, "emotion": emotion,
                     "rate": round(rate, 4), "source": "frame", "chat": chat})
    if not rows:
        raise NeuronscopeError(f"No usable answer: every answer was empty or had a word of the opposite emotion "
                               f"({opp}); use more questions or --keep-opposite.")
    return rows


def alpaca_questions(path: str | Path, max_words: int = 20) -> list[str]:
    """Short self-contained instructions (no `input` field) of an Alpaca-style JSON file: a training question pool."""
    from .data import read_table
    rows = read_table(path)
    if "instruction" not in rows[0]:
        raise NeuronscopeError(f"'{path}' has no instruction column.")
    return [str(r["instruction"]).strip() for r in rows
            if not str(r.get("input", "")).strip() and 3 <= len(str(r["instruction"]).split()) <= max_words]


__all__ = ["NEUTRAL", "FRAMES", "build_alignment_set", "build_frame_set", "frame_sentences", "frame_answer",
           "complete_sentences", "training_questions", "dense_passages", "corpus_paragraphs", "alpaca_questions"]
