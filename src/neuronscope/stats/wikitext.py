"""WikiText read as the text it stands for: markup undone, headings as plain lines, one document per article.

WikiText (Merity et al. 2016; `wiki.*.raw`, `wiki.*.tokens`, or the Hugging Face rows, one line each) is stored
tokenised: ` @-@ `, ` @,@ `, ` @.@ ` for a hyphen, thousands comma and decimal point inside a word or number; a
space before punctuation and inside brackets and quotes (`lobster red " on cooking .`); contractions split
(`don 't`, `Lobster 's`); headings written `= Title =` (an article), `= = Section = =`, `= = = Subsection = = =`.

`clean_line` undoes that spacing line by line: the joiners (any `@x@`, also at a line's end), the space before
`. , ; : ! ? %`, after `$` before a digit, before `°` and around `–` between digits, the spaces inside `( )`, `[ ]`
and pairs of double or single quotes (`' Sorry '`), an elided decade (`' 70s`), the split contractions and the
plural possessive `s '`. A lone single quote is left alone: in this text it is as often an apostrophe (`K 'awiil`)
as a quotation mark. `<unk>` (the `.tokens` variant's rare words) cannot be undone and is kept.

Headings are kept, as plain lines holding their title (`= = Description = =` -> `Description`): a reader of the
article sees its title and section names, as on the page. A top-level heading (`= Title =`, one `=` a side) starts
a new document, so each article is one document (text before the first heading is a document of its own); within
an article the non-blank lines (paragraphs and headings) are joined with a newline.

`looks_like_wikitext` decides `--corpus-format auto`: a file named `wiki.<split>.raw` or `wiki.<split>.tokens`,
or one whose first 200 non-blank lines hold a heading in WikiText's spaced form and at least one line with its
tokenised punctuation (a space before `.` or `,`, or an `@-@`-style joiner). Either alone is not enough for the
content rule: a Markdown or AsciiDoc title has no spaced punctuation, and ordinary text has no spaced headings.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator

SNIFF_LINES = 200
_NAME = re.compile(r"^wiki\.[^.]+\.(raw|tokens)$", re.IGNORECASE)
_HEADING = re.compile(r"^((?:= )+)(\S.*?)((?: =)+)$")
_JOINER = re.compile(r"(?:^| )@(\S)@(?: |$)")      # also at a line's end: "born in 1932 @,@" (wiki.valid)
_ARTEFACT = re.compile(r" @\S@ | [.,] | [.,]$")
_SPACE_BEFORE = re.compile(r" ([.,;:!?%])(?= |$)")
_CURRENCY = re.compile(r"([$£€]) (?=\d)")
_DEGREE = re.compile(r"(?<=\d) °")
_OPEN = re.compile(r"([(\[]) ")
_CLOSE = re.compile(r" ([)\]])")
_QUOTED = re.compile(r'" ([^"]*?) "')
_CONTRACTION = re.compile(r"(?<=\w) ('(?:s|t|m|d|ve|re|ll)|n't)(?![\w'])", re.IGNORECASE)
_PLURAL_POSSESSIVE = re.compile(r"(?<=s) '(?= )")
_ELIDED = re.compile(r"(?:^|(?<= ))' (?=\d\d(?:s)?\b)")
_SINGLE_QUOTED = re.compile(r"(?:^|(?<= ))' (.+?) '(?=[ .,;:!?)\]\"]|$)")
_RANGE = re.compile(r"(?<=\d) – (?=\d)")


def heading(line: str) -> tuple[int, str] | None:
    """(level, title) when the line is a WikiText heading (`= = Title = =` is level 2), else None."""
    m = _HEADING.match(line.strip())
    if m is None or m.group(1).count("=") != m.group(3).count("="):
        return None
    return m.group(1).count("="), m.group(2).strip()


def clean_line(line: str) -> str:
    """One line of WikiText as ordinary text (see the module's docstring for what is undone)."""
    s = line.strip()
    s = _JOINER.sub(r"\1", s)
    s = _CONTRACTION.sub(r"\1", s)
    s = _ELIDED.sub("'", s)
    s = _SPACE_BEFORE.sub(r"\1", s)
    s = _QUOTED.sub(r'"\1"', s)
    s = _SINGLE_QUOTED.sub(r"'\1'", s)
    s = _PLURAL_POSSESSIVE.sub("'", s)
    s = _OPEN.sub(r"\1", s)
    s = _CLOSE.sub(r"\1", s)
    s = _CURRENCY.sub(r"\1", s)
    s = _RANGE.sub("–", s)
    return _DEGREE.sub("°", s)


def documents(lines: Iterable[str]) -> Iterator[str]:
    """The articles of a stream of WikiText lines, cleaned: a top-level heading starts a new document; headings
    become lines holding their title; blank lines are dropped."""
    buf: list[str] = []
    for raw in lines:
        if not raw.strip():
            continue
        h = heading(raw)
        if h is not None and h[0] == 1 and buf:
            yield "\n".join(buf)
            buf = []
        text = clean_line(h[1] if h is not None else raw)
        if text:
            buf.append(text)
    if buf:
        yield "\n".join(buf)


def named_like_wikitext(path: Path) -> bool:
    """Whether the file has a WikiText file name: wiki.<split>.raw or wiki.<split>.tokens."""
    return _NAME.match(path.name) is not None


def looks_like_wikitext(lines: Iterable[str]) -> bool:
    """Whether the first SNIFF_LINES non-blank lines read as WikiText: a spaced heading (`= Title =`) and a line
    with WikiText's tokenised punctuation."""
    seen = 0
    has_heading = has_artefact = False
    for line in lines:
        s = line.strip()
        if not s:
            continue
        has_heading = has_heading or heading(s) is not None
        has_artefact = has_artefact or _ARTEFACT.search(s) is not None
        if has_heading and has_artefact:
            return True
        seen += 1
        if seen >= SNIFF_LINES:
            break
    return False
