"""Corpus reading and packing: documents from text, JSON/JSONL, Parquet and CSV files, packed into fixed windows.

Documents are read lazily, file by file, in the order given. A document is either plain text or a chat (a list of
{"role", "content"} messages). Chat documents go through the model's chat template; plain text goes through the
tokenizer as is (with its BOS when the tokenizer adds one) and documents are separated by the EOS token. The token
stream is cut into windows of `window` tokens (the last partial window is dropped); window w covers stream tokens
[w * window, (w + 1) * window). Window ids are global over the whole corpus list, so shards that take disjoint sets
of windows name the same windows the same way.

Formats:
- `.txt` / `.raw` / `.md` / anything else: plain text; documents are split on `<|endoftext|>` when the file has it,
  otherwise on blank lines.
- WikiText (`corpus_format`: 'auto' finds it by name or content, 'wikitext' forces it, 'plain' reads it as plain
  text): its markup undone and headings kept as plain lines, one article a document (wikitext.py). A records file
  of WikiText lines (the Hugging Face rows, one line each) is read the same way.
- `.jsonl`: one object a line; a `messages` list (chat), `instruction` [+ `input`] + `output` (chat), or a text
  field (`text`, `content`, `document`, `story`).
- `.json`: a list of such objects (or one object with a list under `data`/`rows`).
- `.parquet`, `.csv`: rows; the same fields as JSONL (a `messages` column holding JSON text is decoded).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator, Sequence, Union

import torch

from ..errors import NeuronscopeError
from . import wikitext

Document = Union[str, list[dict[str, str]]]
CorpusArg = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]], None]
CORPUS_FORMATS = ("auto", "plain", "wikitext")
EOT = "<|endoftext|>"
TEXT_FIELDS = ("text", "content", "document", "story", "body")
NO_CORPUS = ("No corpus given: pass one or more files with --corpus (plain text, JSONL with a 'text' or 'messages' "
             "field, JSON lists of records, Parquet or CSV), e.g. --corpus wiki.valid.raw --corpus stories.txt.")


def check_corpus(corpus: CorpusArg) -> list[Path]:
    """The corpus as a list of existing files (clear errors for none given, missing files and folders)."""
    if corpus is None or (not isinstance(corpus, (str, os.PathLike)) and len(corpus) == 0):
        raise NeuronscopeError(NO_CORPUS)
    items = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    paths: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in
                           (".txt", ".raw", ".jsonl", ".json", ".parquet", ".csv", ".md"))
            if not files:
                raise NeuronscopeError(f"The corpus folder '{p}' holds no .txt, .raw, .jsonl, .json, .parquet or "
                                       ".csv files.")
            paths.extend(files)
        elif p.is_file():
            paths.append(p)
        else:
            raise NeuronscopeError(f"Corpus file '{p}' does not exist.")
    return paths


def corpus_signature(paths: Sequence[Path], corpus_format: str | None = None) -> list[dict[str, Any]]:
    """Name, size and a content hash of each file (to tell whether a resumed run reads the same corpus), and with
    a corpus_format how the file is read ('plain' or 'wikitext', `file_format`)."""
    out = []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        entry: dict[str, Any] = {"path": str(p), "bytes": p.stat().st_size, "sha256": h.hexdigest()[:16]}
        if corpus_format is not None:
            entry["format"] = file_format(p, corpus_format)
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------------------------
# documents
# ---------------------------------------------------------------------------------------------------------------
def _record_to_doc(rec: Any, where: str) -> Document | None:
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        raise NeuronscopeError(f"{where}: expected an object with a text or messages field, got {type(rec).__name__}.")
    msgs = rec.get("messages", rec.get("conversation"))
    if isinstance(msgs, str):
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError:
            msgs = None
    if isinstance(msgs, list) and msgs:
        clean = []
        for m in msgs:
            if not isinstance(m, dict) or "content" not in m:
                raise NeuronscopeError(f"{where}: each chat message needs 'role' and 'content'.")
            clean.append({"role": str(m.get("role", "user")), "content": str(m["content"])})
        return clean
    if "instruction" in rec and "output" in rec:
        user = str(rec["instruction"]).strip()
        extra = str(rec.get("input") or "").strip()
        if extra:
            user = f"{user}\n\n{extra}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": str(rec["output"])}]
    for f in TEXT_FIELDS:
        if f in rec and rec[f] is not None:
            return str(rec[f])
    raise NeuronscopeError(f"{where}: no text field (one of {', '.join(TEXT_FIELDS)}) and no 'messages'.")


def _text_docs(path: Path) -> Iterator[str]:
    """Plain text: documents split on <|endoftext|> when the file's first MiB has it, else on blank lines."""
    with open(path, encoding="utf-8", errors="replace", newline=None) as f:
        head = f.read(1 << 20)
        f.seek(0)
        yield from (_separated_docs(f) if EOT in head else _paragraph_docs(f))


def _separated_docs(lines: Iterable[str]) -> Iterator[str]:
    buf: list[str] = []
    for line in lines:
        while EOT in line:
            before, line = line.split(EOT, 1)
            buf.append(before)
            doc = "".join(buf).strip()
            if doc:
                yield doc
            buf = []
        buf.append(line)
    # the part after the last separator is a cut-off document: dropped


def _paragraph_docs(lines: Iterable[str]) -> Iterator[str]:
    buf: list[str] = []
    for line in lines:
        if line.strip():
            buf.append(line.strip())
        elif buf:
            yield "\n".join(buf)
            buf = []
    if buf:
        yield "\n".join(buf)


def _text_lines(path: Path) -> Generator[str, None, None]:
    with open(path, encoding="utf-8", errors="replace", newline=None) as f:
        yield from f


def _jsonl_docs(path: Path) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise NeuronscopeError(f"{path}:{n} is not valid JSON ({exc.msg}).") from None
            doc = _record_to_doc(rec, f"{path}:{n}")
            if doc:
                yield doc


def _json_docs(path: Path) -> Iterator[Document]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise NeuronscopeError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None
    if isinstance(data, dict):
        data = data.get("data", data.get("rows", [data]))
    if not isinstance(data, list):
        raise NeuronscopeError(f"{path}: expected a list of records.")
    for n, rec in enumerate(data):
        doc = _record_to_doc(rec, f"{path}[{n}]")
        if doc:
            yield doc


def _parquet_docs(path: Path) -> Iterator[Document]:
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(str(path))
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise NeuronscopeError(f"{path} is not a readable Parquet file ({exc}).") from None
    n = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            doc = _record_to_doc(rec, f"{path} row {n}")
            n += 1
            if doc:
                yield doc


def _csv_docs(path: Path) -> Iterator[Document]:
    with open(path, encoding="utf-8", newline="") as f:
        for n, rec in enumerate(csv.DictReader(f), 2):
            doc = _record_to_doc(rec, f"{path}:{n}")
            if doc:
                yield doc


RECORD_READERS: dict[str, Callable[[Path], Iterator[Document]]] = {
    ".jsonl": _jsonl_docs, ".json": _json_docs, ".parquet": _parquet_docs, ".csv": _csv_docs}


def _record_lines(path: Path) -> Generator[str, None, None]:
    """The text of a records file's rows as lines (WikiText as rows, one line a row, as on the Hugging Face hub)."""
    for doc in RECORD_READERS[path.suffix.lower()](path):
        if not isinstance(doc, str):
            raise NeuronscopeError(f"{path} holds chat records, which are not WikiText; read it with "
                                   "--corpus-format auto or plain.")
        yield from doc.splitlines()


def _lines(path: Path) -> Generator[str, None, None]:
    return _record_lines(path) if path.suffix.lower() in RECORD_READERS else _text_lines(path)


# ---------------------------------------------------------------------------------------------------------------
# corpus formats: plain, or WikiText read as the text it stands for (wikitext.py)
# ---------------------------------------------------------------------------------------------------------------
def check_corpus_format(corpus_format: str) -> str:
    """The corpus format asked for: 'auto' (WikiText where a file is WikiText), 'plain' or 'wikitext'."""
    if corpus_format not in CORPUS_FORMATS:
        raise NeuronscopeError(f"The corpus format is one of {', '.join(CORPUS_FORMATS)}, got {corpus_format!r}.")
    return corpus_format


def file_format(path: Path, corpus_format: str = "auto") -> str:
    """How one file is read: 'wikitext' or 'plain'. 'auto' takes a file for WikiText by its name (wiki.*.raw,
    wiki.*.tokens) or its first lines (wikitext.looks_like_wikitext: spaced headings and tokenised punctuation)."""
    if check_corpus_format(corpus_format) != "auto":
        return corpus_format
    if path.suffix.lower() not in RECORD_READERS and wikitext.named_like_wikitext(path):
        return "wikitext"
    lines = _lines(path)
    try:
        return "wikitext" if wikitext.looks_like_wikitext(lines) else "plain"
    except NeuronscopeError:    # chat records are not WikiText; their other errors are the reader's to raise
        return "plain"
    finally:
        lines.close()


def iter_documents(path: Path, corpus_format: str = "auto") -> Iterator[Document]:
    """The documents of one corpus file, in file order (WikiText: one cleaned article a document)."""
    if file_format(path, corpus_format) == "wikitext":
        yield from wikitext.documents(_lines(path))
    elif path.suffix.lower() in RECORD_READERS:
        yield from RECORD_READERS[path.suffix.lower()](path)
    else:
        yield from _text_docs(path)


# ---------------------------------------------------------------------------------------------------------------
# tokens and windows
# ---------------------------------------------------------------------------------------------------------------
def encode_document(tokenizer: Any, doc: Document, *, chat: bool = False) -> list[int]:
    """Token ids of one document: chats through the chat template; plain text as is (or as a user turn if chat)."""
    if isinstance(doc, str) and chat:
        doc = [{"role": "user", "content": doc}]
    if isinstance(doc, list):
        if getattr(tokenizer, "chat_template", None):
            out = tokenizer.apply_chat_template(doc, tokenize=True, add_generation_prompt=False)
            if isinstance(out, dict) or hasattr(out, "keys"):
                out = out["input_ids"]
            if torch.is_tensor(out):
                out = out.tolist()
            if out and isinstance(out[0], list):
                out = out[0]
            return [int(i) for i in out]
        if chat:
            raise NeuronscopeError("This model has no chat template, so chat-format text cannot be templated; "
                                   "leave out --chat.")
        doc = "\n\n".join(f"{m['role']}: {m['content']}" for m in doc)
    return [int(i) for i in tokenizer(doc)["input_ids"]]


@dataclass
class Window:
    index: int             # global window id
    token_ids: list[int]


def iter_windows(tokenizer: Any, paths: Sequence[Path], window: int, *, chat: bool = False,
                 max_windows: int | None = None, corpus_format: str = "auto") -> Iterator[Window]:
    """Pack the corpus into consecutive windows of `window` tokens (global ids 0, 1, 2, ...); corpus_format:
    'auto', 'plain' or 'wikitext' (see `file_format`)."""
    if window < 2:
        raise NeuronscopeError(f"The window must be at least 2 tokens, got {window}.")
    eos = getattr(tokenizer, "eos_token_id", None)
    buf: list[int] = []
    w = 0
    if max_windows is not None and max_windows <= 0:
        return
    for path in paths:
        for doc in iter_documents(path, corpus_format):
            ids = encode_document(tokenizer, doc, chat=chat)
            if not ids:
                continue
            buf.extend(ids)
            if eos is not None and ids[-1] != eos:
                buf.append(int(eos))
            while len(buf) >= window:
                yield Window(w, buf[:window])
                buf = buf[window:]
                w += 1
                if max_windows is not None and w >= max_windows:
                    return


def count_windows(tokenizer: Any, paths: Sequence[Path], window: int, *, chat: bool = False,
                  max_windows: int | None = None, corpus_format: str = "auto") -> int:
    """How many windows `iter_windows` gives (the corpus is tokenised once; stops at max_windows)."""
    return sum(1 for _ in iter_windows(tokenizer, paths, window, chat=chat, max_windows=max_windows,
                                       corpus_format=corpus_format))


def shard_of(index: int, shard: tuple[int, int] | None) -> bool:
    """Whether window `index` belongs to the shard (i, n): windows are dealt round-robin."""
    return shard is None or index % shard[1] == shard[0]


def parse_shard(shard: str | tuple[int, int] | Sequence[int] | None) -> tuple[int, int] | None:
    """'i/n' or (i, n) with 0 <= i < n; None for no sharding."""
    if shard is None:
        return None
    if isinstance(shard, str):
        parts = shard.strip().split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise NeuronscopeError(f"A shard is written i/n (for example 0/4), got '{shard}'.")
        i, n = int(parts[0]), int(parts[1])
    else:
        try:
            i, n = (int(x) for x in shard)
        except (TypeError, ValueError):
            raise NeuronscopeError(f"A shard is a pair (i, n), got {shard!r}.") from None
    if n < 1 or not 0 <= i < n:
        raise NeuronscopeError(f"Shard {i}/{n} is out of range: use i/n with 0 <= i < n.")
    return (i, n)
