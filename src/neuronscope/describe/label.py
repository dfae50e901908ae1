"""Offline labels: what fires a neuron (polarity), from its training exemplars, ranked by specificity, and what it
promotes (write-vector decode).

    vocab = LabelVocab.build(subject, atlas_vocab, windows)         # keys, exclusions, corpus frequencies
    lab = make_label(vocab, fire_ids, prev_ids, promote_ids)         # {"text", "fires", "promotes"}

- Tokens are compared by **key**: space markers stripped and lower case (" Dog", "dog", "DOG" are one key), so case
  and space variants merge; a newline token's key is "⏎", a space's "␣".
- Left out: special tokens, chat-template tokens (those the model's template adds around an empty message) and
  byte fragments (tokens that decode to an incomplete UTF-8 sequence).
- A firing key is kept when it fires in at least `min_share` of the training exemplars (and at least 2 of them) and
  its share there is at least `min_lift` times its share of corpus tokens; keys are ranked by count x log(lift)
  (how much of the neuron's exemplars they explain beyond chance), not by raw count.
- Context: the key before a firing key is named ("'ma' after 'grand'") when at least 60% of that key's exemplars
  have it and that is at least 3x its rate before the same key in the corpus.
- With no kept key the label says "nothing specific".
- "promotes": the write vector's top decoded tokens, filtered the same way and limited to tokens that occur in the
  corpus (the decode's tail of rare word pieces like 'uncture' or 'pathlib' says little to a reader).
Text form: `fires on 'ma' after 'grand', 'pa' | promotes 'mother', 'father'` (items in '...', or "..." when they
hold a quote). `forms.parse_label_items` reads the items back; the token simulator (simulate.py) uses them.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    from ..subject import Subject

_MARKERS = re.compile(r"[\u2581\u0120\u010a\s]+")
NOTHING = "nothing specific"


def token_key(text: str) -> str:
    """How tokens are compared: markers, spaces and control characters stripped, lower case; '⏎' for newlines,
    '␣' for spaces; "" (left out) for a token of control characters only, such as a raw byte."""
    k = "".join(ch for ch in _MARKERS.sub("", text).lower() if ch.isprintable())
    if k:
        return k
    if "\n" in text or "\u010a" in text:
        return "\u23ce"
    return "\u2423" if any(c in text for c in " \t\u0120\u2581") else ""


def quote(s: str) -> str:
    return f'"{s}"' if "'" in s else f"'{s}'"


@dataclass
class LabelVocab:
    """Per vocabulary id: its key (an int code), whether it is excluded; per key: shown form and corpus count."""
    key_of: list[int]                   # vocab id -> key code (-1: excluded)
    keys: list[str]                     # key code -> key text
    shown: list[str]                    # key code -> how it is shown (commonest variant, stripped)
    freq: list[int]                     # key code -> count over the corpus windows
    total: int                          # corpus tokens counted
    bigram: Counter[tuple[int, int]] = field(default_factory=Counter)   # (prev code, code) -> count
    excluded_ids: set[int] = field(default_factory=set)

    @classmethod
    def build(cls, vocab: Sequence[str], windows: Iterable[Sequence[int]], excluded_ids: set[int]) -> "LabelVocab":
        codes: dict[str, int] = {}
        key_of = []
        for i, t in enumerate(vocab):
            k = token_key(t)
            if i in excluded_ids or not k:
                key_of.append(-1)
                continue
            key_of.append(codes.setdefault(k, len(codes)))
        keys = [""] * len(codes)
        for k, c in codes.items():
            keys[c] = k
        freq = [0] * len(codes)
        variants: list[Counter[int]] = [Counter() for _ in codes]
        bigram: Counter[tuple[int, int]] = Counter()
        total = 0
        for ids in windows:
            prev = -1
            for i in ids:
                c = key_of[i] if 0 <= i < len(key_of) else -1
                if c >= 0:
                    freq[c] += 1
                    variants[c][i] += 1
                    if prev >= 0:
                        bigram[(prev, c)] += 1
                total += 1
                prev = c
        shown = []
        for c, k in enumerate(keys):
            best = variants[c].most_common(1)
            s = vocab[best[0][0]].strip() if best else k
            shown.append(s or k)
        return cls(key_of, keys, shown, freq, total, bigram, set(excluded_ids))

    def code(self, token_id: int) -> int:
        return self.key_of[token_id] if 0 <= token_id < len(self.key_of) else -1


def excluded_token_ids(subject: Subject) -> set[int]:
    """Special tokens, chat-template tokens and byte fragments of the subject's tokenizer."""
    tok = subject.tokenizer
    out: set[int] = set(int(i) for i in (getattr(tok, "all_special_ids", None) or []))
    for t in getattr(tok, "added_tokens_decoder", {}) or {}:
        out.add(int(t))
    if getattr(subject, "has_chat_template", False):
        try:
            marker = "zqxj"
            ids = subject.encode_chat([{"role": "system", "content": marker}, {"role": "user", "content": marker}],
                                      add_generation_prompt=True)[0].tolist()
            inner = set(tok(marker, add_special_tokens=False)["input_ids"]) | \
                set(tok(" " + marker, add_special_tokens=False)["input_ids"])
            out |= {int(i) for i in ids if int(i) not in inner}
        except Exception:       # a template that needs other roles: keep the special tokens only
            pass
    for i in range(len(tok)):
        if "\ufffd" in tok.decode([i]):
            out.add(i)
    return out


def _ranked_fires(vocab: LabelVocab, fire: Sequence[int], prev: Sequence[int], min_share: float, min_lift: float,
                  k: int) -> list[tuple[int, int | None]]:
    n = len(fire)
    codes = [vocab.code(i) for i in fire]
    pcodes = [vocab.code(i) if i >= 0 else -1 for i in prev]
    counts = Counter(c for c in codes if c >= 0)
    if not counts:
        return []
    V = max(1, len(vocab.keys))
    need = max(2, math.ceil(min_share * n))
    scored = []
    for c, cnt in counts.items():
        if cnt < need:
            continue
        p_ex = cnt / n
        p_corp = (vocab.freq[c] + 0.5) / (vocab.total + 0.5 * V)
        lift = p_ex / p_corp
        if lift < min_lift:
            continue
        scored.append((cnt * math.log(lift), c))
    scored.sort(key=lambda x: (-x[0], vocab.keys[x[1]]))
    out: list[tuple[int, int | None]] = []
    for _, c in scored[:k]:
        before = Counter(p for cc, p in zip(codes, pcodes) if cc == c and p >= 0)
        ctx = None
        if before:
            p, pc = before.most_common(1)[0]
            share = pc / counts[c]
            corp = (vocab.bigram.get((p, c), 0) + 0.5) / (vocab.freq[c] + 1.0)
            if pc >= 2 and share >= 0.6 and share / corp >= 3.0:
                ctx = p
        out.append((c, ctx))
    return out


def make_label(vocab: LabelVocab, fire_ids: Sequence[int], prev_ids: Sequence[int], promote_ids: Sequence[int], *,
               min_share: float = 0.1, min_lift: float = 3.0, k: int = 4, k_promote: int = 4) -> dict[str, Any]:
    """The label of one neuron polarity from its training exemplars' firing token ids (and the ids before them,
    -1 at a window start) and its decoded top token ids."""
    fires = _ranked_fires(vocab, fire_ids, prev_ids, min_share, min_lift, k)
    promotes: list[int] = []
    for i in promote_ids:
        c = vocab.code(int(i))
        if c >= 0 and c not in promotes and vocab.freq[c] > 0:
            promotes.append(c)
        if len(promotes) >= k_promote:
            break
    if fires:
        head = "fires on " + ", ".join(quote(vocab.shown[c]) + (f" after {quote(vocab.shown[p])}" if p is not None
                                                                 else "") for c, p in fires)
    else:
        head = f"{NOTHING} fires it"
    text = head + (" | promotes " + ", ".join(quote(vocab.shown[c]) for c in promotes) if promotes else "")
    return {"text": text, "fires": [(vocab.keys[c], None if p is None else vocab.keys[p]) for c, p in fires],
            "promotes": [vocab.keys[c] for c in promotes]}
