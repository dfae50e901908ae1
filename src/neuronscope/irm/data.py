"""Alignment data: read CSV / JSONL / Parquet tables, tokenise them into (input_ids, labels), split, batch.

Rows have either a `text` column (loss on every token) or `prompt` and `response` columns (loss on the response
tokens only; the chat template is applied to the prompt when asked and the model has one). Labels are NOT shifted
here: `labels[t]` is the target for position t's own token, -100 where there is no loss (prompt, padding), and
`lm_loss` shifts exactly once (logits at t predict labels at t+1), as Hugging Face models do internally.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from ..errors import NeuronscopeError

if TYPE_CHECKING:
    from ..subject import Subject

IGNORE = -100
FORMATS = (".csv", ".jsonl", ".json", ".parquet")


# ---- tables ------------------------------------------------------------------------------------------------------
def _read_csv(path: Path) -> list[Any]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise NeuronscopeError(f"Line {n} of '{path}' is not valid JSON.") from None
    return rows


def _read_json(path: Path) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    if not isinstance(rows, list):
        raise NeuronscopeError(f"'{path}' must hold a JSON list of rows.")
    return rows


def _read_parquet(path: Path) -> list[Any]:
    import pyarrow.parquet as pq
    rows: list[Any] = pq.read_table(path).to_pylist()
    return rows


_READERS: dict[str, Callable[[Path], list[Any]]] = {".csv": _read_csv, ".jsonl": _read_jsonl, ".json": _read_json,
                                                    ".parquet": _read_parquet}


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV, JSONL (or JSON list) or Parquet file, as dicts."""
    path = Path(path)
    if not path.is_file():
        raise NeuronscopeError(f"No data file at '{path}'.")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise NeuronscopeError(f"Cannot read '{path.name}': data files must be {', '.join(FORMATS)}.")
    try:
        rows = reader(path)
    except NeuronscopeError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise NeuronscopeError(f"Cannot read '{path}': {exc}") from None
    if not rows:
        raise NeuronscopeError(f"The data file '{path}' has no rows.")
    if not all(isinstance(r, dict) for r in rows):
        raise NeuronscopeError(f"Every row of '{path}' must be an object with named columns.")
    return rows


def table_kind(rows: Sequence[dict[str, Any]], source: str = "the data") -> str:
    """'prompt_response' or 'text', from the columns of the first row; a clear error otherwise."""
    cols = set(rows[0])
    if {"prompt", "response"} <= cols:
        kind = "prompt_response"
        need: tuple[str, ...] = ("prompt", "response")
    elif "text" in cols:
        kind = "text"
        need = ("text",)
    else:
        raise NeuronscopeError(
            f"{source} needs a 'text' column or 'prompt' and 'response' columns; it has {', '.join(sorted(cols))}.")
    for i, r in enumerate(rows):
        for c in need:
            if not isinstance(r.get(c), str) or (c != "prompt" and not r[c].strip()):
                raise NeuronscopeError(f"Row {i} of {source} has no text in its '{c}' column.")
    return kind


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- tokenisation ------------------------------------------------------------------------------------------------
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]          # same length; IGNORE where no loss
    prompt_len: int = 0
    row: int = -1              # index of the source row

    @property
    def n_target(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def prompt_ids(subject: Subject, prompt: str, chat: bool) -> list[int]:
    """Token ids of a prompt: through the chat template (with the generation prompt) when `chat`."""
    tok = subject.tokenizer
    if chat:
        if not subject.has_chat_template:
            raise NeuronscopeError(f"The model '{subject.name}' has no chat template; train without --chat.")
        return subject.encode_chat([{"role": "user", "content": prompt}])[0].tolist()
    return tok(prompt)["input_ids"] if prompt else ([tok.bos_token_id] if tok.bos_token_id is not None else [])


def tokenize_rows(subject: Subject, rows: Sequence[dict[str, Any]], *, chat: bool = False, max_len: int = 256,
                  add_eos: bool = True, keep_empty: bool = False) -> list[Example]:
    """Rows -> Examples (input_ids, unshifted labels). Too-long examples are cut at max_len tokens; examples
    with no target token left are dropped (kept, one per row, when keep_empty)."""
    if max_len < 2:
        raise NeuronscopeError("max_len must be at least 2 tokens.")
    kind = table_kind(rows)
    tok = subject.tokenizer
    eos = [tok.eos_token_id] if add_eos and tok.eos_token_id is not None else []
    out: list[Example] = []
    for n, r in enumerate(rows):
        if kind == "text":
            ids = tok(r["text"])["input_ids"] + eos
            ids = ids[:max_len]
            labels = list(ids)
            plen = 0
        else:
            p = prompt_ids(subject, r["prompt"], chat)
            resp = tok(r["response"], add_special_tokens=False)["input_ids"] + eos
            ids = (p + resp)[:max_len]
            plen = min(len(p), len(ids))
            labels = [IGNORE] * plen + ids[plen:]
        ex = Example(ids, labels, plen, n)
        if ex.n_target > 0 or keep_empty:
            out.append(ex)
    if not out:
        raise NeuronscopeError(f"No row has a target token within max_len={max_len}; raise --max-len.")
    return out


def split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded train / validation split of n rows: (train indices, validation indices)."""
    if not 0.0 <= val_fraction < 1.0:
        raise NeuronscopeError(f"The validation fraction must be in [0, 1), got {val_fraction}.")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g).tolist()
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n_val == 0 and n >= 2:
        n_val = 1
    if n - n_val < 1:
        raise NeuronscopeError(f"Only {n} usable rows: too few to train with a validation split.")
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE on padding)."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy, shifted exactly once: logits[:, t] is scored against labels[:, t + 1].

    reduction 'mean' averages over target tokens; 'sum' returns (sum, count) stacked as a 2-vector.
    """
    lg = logits[:, :-1].float()
    tg = labels[:, 1:].to(lg.device)
    loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=IGNORE, reduction="sum")
    count = (tg != IGNORE).sum()
    if reduction == "sum":
        return torch.stack([loss, count.to(loss.dtype)])
    return loss / count.clamp(min=1)


def kl_to_frozen(frozen_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean KL(frozen || IRM-on) of the next-token distributions over the positions `lm_loss` scores (the same
    single shift: position t counts when labels[t + 1] is a target). Zero when the two logits agree."""
    mask = (labels[:, 1:] != IGNORE).to(logits.device)
    lp = F.log_softmax(logits[:, :-1].float(), -1)[mask]
    lq = F.log_softmax(frozen_logits[:, :-1].float().to(logits.device), -1)[mask]
    if lp.numel() == 0:
        return logits.sum() * 0.0
    return (lq.exp() * (lq - lp)).sum(-1).mean()


def batches(examples: Sequence[Example], batch_size: int, pad_id: int) -> Iterable[dict[str, torch.Tensor]]:
    """Fixed-order batches (for evaluation)."""
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i:i + batch_size], pad_id)


def read_texts(path: str | Path) -> list[str]:
    """Neutral text for evaluation: a table with a `text` column, or a plain .txt file (blank-line paragraphs)."""
    path = Path(path)
    if path.suffix.lower() in FORMATS:
        rows = read_table(path)
        if "text" in rows[0]:
            return [r["text"] for r in rows if isinstance(r.get("text"), str) and r["text"].strip()]
        table_kind(rows, str(path))
        return [r["prompt"] + " " + r["response"] for r in rows]
    if not path.is_file():
        raise NeuronscopeError(f"No text file at '{path}'.")
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    import re
    paras = [p.strip() for p in re.split(r"\n[ \t]*\n", text) if len(p.strip()) > 40]
    if not paras:
        raise NeuronscopeError(f"'{path}' has no paragraphs of text.")
    return paras


__all__ = ["read_table", "table_kind", "tokenize_rows", "split", "collate", "lm_loss", "kl_to_frozen", "batches",
           "Example", "IGNORE", "read_texts", "file_sha256", "prompt_ids"]
