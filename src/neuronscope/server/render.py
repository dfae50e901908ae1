"""A conversation as the model reads it: its token ids, each message's span, each token's role and text.

Models with a chat template render through it; models without one chat by plain continuation: the conversation is
the text of its turns, the model continues it, and a separator (`PLAIN_SEPARATOR`, shown on the page) goes before
each new user turn. A session's rendering is cached in the session until its conversation changes.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..subject import Subject
from .sessions import Message, Session

PLAIN_SEPARATOR = "\n\n"                   # between turns of a plain-continuation chat (no chat template)



@dataclass
class Rendering:
    """A conversation as token ids, with each message's span [start, end) and, per token, its role ("user",
    "assistant", "template" or "separator"), its message's index (-1: none) and its text as it reads in context."""
    ids: list[int]
    spans: list[tuple[int, int]]
    roles: list[str]
    message: list[int]
    strings: list[str]


class Renderer:
    """Renders sessions' conversations for one subject."""

    def __init__(self, subject: Subject) -> None:
        self.subject = subject
        self.chat_template = subject.has_chat_template
        self._sep: list[int] | None = None

    def _encode_chat(self, msgs: list[Message], gen: bool) -> list[int]:
        if not msgs:
            return []
        ids = self.subject.encode_chat([{"role": m.role, "content": m.content} for m in msgs],
                                       add_generation_prompt=gen)
        out: list[int] = ids[0].tolist()
        return out

    def _plain_ids(self, msgs: list[Message]) -> tuple[list[int], list[tuple[int, int]]]:
        tok = self.subject.tokenizer
        if not msgs:
            return [], []
        ids: list[int] = [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None else []
        spans = []
        sep = self.separator_ids()
        for k, m in enumerate(msgs):
            if k and m.role == "user":
                ids += sep
            part = m.ids if m.ids is not None else tok(m.content, add_special_tokens=False)["input_ids"]
            spans.append((len(ids), len(ids) + len(part)))
            ids += list(part)
        return ids, spans

    def separator_ids(self) -> list[int]:
        """The ids of `PLAIN_SEPARATOR`, tokenized once."""
        if self._sep is None:
            self._sep = list(self.subject.tokenizer(PLAIN_SEPARATOR, add_special_tokens=False)["input_ids"])
        return self._sep

    def render(self, s: Session) -> Rendering:
        """The conversation's token ids, with the span [start, end) of each message (cached per version)."""
        r: Rendering | None = s.cache.get("render")
        if r is not None:
            return r
        if self.chat_template:
            spans = []
            for k, m in enumerate(s.messages):
                start = len(self._encode_chat(s.messages[:k], gen=(m.role == "assistant"))) if k else 0
                spans.append((start, len(self._encode_chat(s.messages[: k + 1], gen=False))))
            ids = self._encode_chat(s.messages, gen=False)
        else:
            ids, spans = self._plain_ids(s.messages)
        roles = ["template"] * len(ids)
        msg_of = [-1] * len(ids)
        strs = self.display_tokens(ids)
        for k, (a, b) in enumerate(spans):
            b = min(b, len(ids))
            content = content_positions(strs, a, b, s.messages[k].content)
            for t in range(a, b):
                msg_of[t] = k
                if t in content:
                    roles[t] = s.messages[k].role
        if not self.chat_template:
            for t in range(len(ids)):
                if msg_of[t] < 0 and t > 0:
                    roles[t] = "separator"
        r = s.cache["render"] = Rendering(ids, spans, roles, msg_of, strs)
        return r

    def prompt_ids(self, s: Session) -> list[int]:
        """The ids the model continues to answer the conversation (with the template's generation prompt)."""
        if self.chat_template:
            return self._encode_chat(s.messages, gen=True)
        return self._plain_ids(s.messages)[0]

    def display_tokens(self, ids: list[int]) -> list[str]:
        """Each token as it reads in context (with its leading space, special tokens shown)."""
        tok = self.subject.tokenizer
        out = []
        for t in range(len(ids)):
            one = tok.decode(ids[t:t + 1], skip_special_tokens=False)
            if t:
                prev = tok.decode(ids[t - 1:t], skip_special_tokens=False)
                two = tok.decode(ids[t - 1:t + 1], skip_special_tokens=False)
                if two.startswith(prev) and len(two) > len(prev):
                    one = two[len(prev):]
            out.append(one)
        return out

    def next_strings(self, prev: int, alts: list[int]) -> list[str]:
        """How each candidate next token reads after `prev` (keeps its leading space)."""
        tok = self.subject.tokenizer
        p = tok.decode([prev], skip_special_tokens=False)
        out = []
        for a in alts:
            two = tok.decode([prev, a], skip_special_tokens=False)
            out.append(two[len(p):] if two.startswith(p) and len(two) > len(p) else tok.decode([a]))
        return out


def content_positions(strs: list[str], a: int, b: int, content: str) -> set[int]:
    """Positions in [a, b) whose text is part of the message's own text (not its template or system prompt)."""
    offsets, text = [], ""
    for t in range(a, b):
        offsets.append(len(text))
        text += strs[t]
    needle = content.strip()
    at = text.rfind(needle) if needle else -1
    if at < 0:
        return set(range(a, b))
    lo, hi = at, at + len(needle)
    return {a + k for k, o in enumerate(offsets) if o < hi and o + len(strs[a + k]) > lo}
