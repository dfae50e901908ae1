"""The vocabulary's token strings in atlas.sqlite (table `vocab(id INTEGER PRIMARY KEY, token TEXT)`), so that an
atlas can be read, shown and searched without loading the model."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .. import store

if TYPE_CHECKING:
    from ..subject import Subject



def token_texts(subject: Subject) -> list[str]:
    """Each token id as readable text (the decoded string; `<id>` when the subject has no tokenizer)."""
    tok = subject.tokenizer
    V = subject.vocab_size
    if tok is None:
        return [f"<{i}>" for i in range(V)]
    out = []
    n_tok = len(tok)
    for i in range(V):
        if i >= n_tok:
            out.append(f"<{i}>")
            continue
        text = tok.decode([i])
        if not text or "\ufffd" in text:          # partial UTF-8 byte or special token: show the piece
            piece = tok.convert_ids_to_tokens(i)
            text = piece if isinstance(piece, str) and piece else f"<{i}>"
        out.append(text)
    return out


def write_vocab(folder: str | os.PathLike[str], subject: Subject) -> None:
    """(Re)write the vocab table in one transaction."""
    texts = token_texts(subject)
    con = store.open_db(folder)
    try:
        with con:
            con.execute("CREATE TABLE IF NOT EXISTS vocab(id INTEGER PRIMARY KEY, token TEXT)")
            con.execute("DELETE FROM vocab")
            con.executemany("INSERT INTO vocab(id, token) VALUES (?, ?)", enumerate(texts))
    finally:
        con.close()


def read_vocab(folder: str | os.PathLike[str]) -> list[str] | None:
    """The token strings by id, or None when the folder has no vocab table."""
    if not (Path(folder) / store.DB).is_file():
        return None
    con = store.connect(Path(folder) / store.DB)
    try:
        rows = con.execute("SELECT id, token FROM vocab ORDER BY id").fetchall()
    except Exception:
        return None
    finally:
        con.close()
    if not rows:
        return None
    out = [""] * (rows[-1][0] + 1)
    for i, t in rows:
        out[i] = t
    return out


_MARKERS = re.compile(r"^[\s\u0120\u2581\u010a]+|[\s\u0120\u2581\u010a]+$")


def normalise(text: str) -> str:
    """A token or query word as compared by search: byte-level/sentencepiece space markers and spaces stripped,
    lower case."""
    return _MARKERS.sub("", text).lower()


def word_forms(word: str) -> set[str]:
    """A query word and its simple English inflections (dog -> dog, dogs; puppies -> puppy)."""
    w = normalise(word)
    if not w:
        return set()
    forms = {w, w + "s", w + "es"}
    if w.endswith("ies") and len(w) > 4:
        forms.add(w[:-3] + "y")
    if w.endswith("es") and len(w) > 3:
        forms.add(w[:-2])
    if w.endswith("s") and len(w) > 2:
        forms.add(w[:-1])
    if w.endswith("y") and len(w) > 2:
        forms.add(w[:-1] + "ies")
    return forms
