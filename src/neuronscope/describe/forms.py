"""The text forms of neuron descriptions, and how a simulator reads them back.

Every description has an input part (where the neuron fires) and may have an output part after ' | ':

    fires on 'ma' after 'grand', 'pa' | promotes 'mother'            token label (label.py); promotes = the
                                                                    write vector's direct decode
    in text about cooking, fires on 'the', 'a'                      context: a topic gates the token items
    fires throughout text about the sea                             context: the whole window, gated by the topic
    fires on words about animals                                    context: a semantic field of tokens
    ... | makes the model say 'February', 'March'; less 'the'       output: the causal effect (effects.py)

`parse` returns what a simulator needs: the quoted token items (with 'after' contexts), the topic, the field and
whether it fires throughout; and the output part's promoted / suppressed tokens. Topics and fields are free text
(a context description takes them from the topic vocabulary, windows.py; an explainer may write any).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from dataclasses import field as dc_field

from .label import NOTHING, quote, token_key

_OUT = re.compile(r"\|\s*(?:promotes|makes the model say)\b")
_FIRE_ITEM = re.compile(r"(?:'([^']+)'|\"([^\"]+)\")(?:\s+after\s+(?:'([^']+)'|\"([^\"]+)\"))?")
_ITEM = re.compile(r"'([^']+)'|\"([^\"]+)\"")
_TOPIC = re.compile(r"\btext about ([^,|']+?)(?=\s*(?:,|\||$))")
_FIELD = re.compile(r"\bfires on words about ([^,|']+?)(?=\s*(?:,|\||$|\bin text\b))")
THROUGHOUT = "fires throughout text about"
SAYS = "makes the model say"


@dataclass
class Parsed:
    """What a description says, as simulators and indexes use it."""
    items: list[tuple[str, str | None]] | None      # firing token keys (+ 'after' key); [] nothing; None free text
    topic: str | None = None                          # "in text about X" / "throughout text about X"
    field: str | None = None                          # "fires on words about X"
    whole: bool = False                               # fires on every token of its topic's windows
    says: list[str] = dc_field(default_factory=list)     # output part: promoted token strings (or decode's promotes)
    less: list[str] = dc_field(default_factory=list)     # output part: suppressed token strings


def split_parts(text: str) -> tuple[str, str]:
    """(input part, output part) of a description: the output part starts at ' | promotes' or ' | makes the model
    say' ('' when there is none)."""
    m = _OUT.search(text)
    return (text, "") if m is None else (text[:m.start()], text[m.start():])


def _quoted(part: str) -> list[str]:
    return [s for s in ((m.group(1) if m.group(1) is not None else m.group(2)).strip() for m in _ITEM.finditer(part))
            if s]


def parse(text: str) -> Parsed:
    """Read a description back (see the module docstring)."""
    head, tail = split_parts(text)
    topic_m = _TOPIC.search(head)
    field_m = _FIELD.search(head)
    whole = THROUGHOUT in head
    body = head
    if topic_m is not None:
        body = body.replace(topic_m.group(0), " ")
    if field_m is not None:
        body = body.replace(field_m.group(0), " ")
    items: list[tuple[str, str | None]] | None = []
    if body.strip().startswith(NOTHING) or head.strip().startswith(NOTHING):
        items = []
    else:
        for m in _FIRE_ITEM.finditer(body):
            tok = m.group(1) if m.group(1) is not None else m.group(2)
            ctx = m.group(3) if m.group(3) is not None else m.group(4)
            assert items is not None
            items.append((token_key(tok), None if ctx is None else token_key(ctx)))
        if not items and topic_m is None and field_m is None:
            items = None                              # free text: the simulator uses its content words
    says: list[str] = []
    less: list[str] = []
    if tail:
        main, _, neg = tail.partition("; less")
        says = _quoted(main)
        less = _quoted(neg)
    return Parsed(items=items, topic=topic_m.group(1).strip() if topic_m else None,
                  field=field_m.group(1).strip() if field_m else None, whole=whole, says=says, less=less)


def parse_label_items(text: str) -> list[tuple[str, str | None]] | None:
    """The (key, context key or None) items of a description's input part, with their 'after' contexts. [] for
    'nothing specific' and for a topic/field description without quoted tokens; None when the text quotes nothing
    and names no topic (free text: the simulator falls back to its content words)."""
    return parse(text).items


def context_text(fires_head: str, topic: str | None, field_: str | None) -> str:
    """The input part of a context description from a label's input part ('fires on ...' or 'nothing specific
    fires it'), a topic and a field (either may be None)."""
    if field_ is not None:
        head = f"fires on words about {field_}"
        return head if topic is None or topic == field_ else f"in text about {topic}, {head}"
    if topic is None:
        return fires_head
    if fires_head.startswith("fires on "):
        return f"in text about {topic}, {fires_head}"
    return f"{THROUGHOUT} {topic}"


def output_text(says: list[str], less: list[str]) -> str:
    """The output part: ' | makes the model say 'a', 'b'; less 'c', 'd''."""
    if not says and not less:
        return ""
    out = f" | {SAYS} " + (", ".join(quote(s) for s in says) if says else "nothing specific")
    if less:
        out += "; less " + ", ".join(quote(s) for s in less)
    return out
