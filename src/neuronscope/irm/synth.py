"""Synthetic alignment data, the way the paper made it: an instruct model answers each question in a given tone.

    synthesize(subject, questions, "angry", "anger.jsonl", batch_size=8, max_new_tokens=96)

Batched greedy (or sampled) generation with left padding, a progress bar, a cap on new tokens, and resume: rows
are appended per batch (the JSONL file is rewritten atomically), and questions already answered are skipped.
Each row: {"prompt": question, "response": answer, "tone": tone}. The prompt holds the bare question (the tone
instruction is only in the system message used to generate), so an IRM trained on it must supply the tone itself.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import NeuronscopeError

if TYPE_CHECKING:
    from ..subject import Subject
from ..store import write_text
from .generation import encode_batch

SYSTEM = ("You are a helpful assistant who always answers in a very {tone} tone. Every sentence must sound {tone}. "
          "Keep the answer short.")


def read_questions(path: str | Path) -> list[str]:
    """Questions from a text file (one a line; '#' comments and blank lines skipped) or a table's prompt/question
    or text column."""
    path = Path(path)
    if not path.is_file():
        raise NeuronscopeError(f"No questions file at '{path}'.")
    if path.suffix.lower() in (".csv", ".jsonl", ".json", ".parquet"):
        from .data import read_table
        rows = read_table(path)
        col = next((c for c in ("question", "prompt", "text") if c in rows[0]), None)
        if col is None:
            raise NeuronscopeError(f"'{path}' needs a 'question', 'prompt' or 'text' column.")
        qs = [str(r[col]).strip() for r in rows]
    else:
        qs = [l.strip() for l in path.read_text(encoding="utf-8").splitlines()]
        qs = [q for q in qs if q and not q.startswith("#")]
    qs = list(dict.fromkeys(q for q in qs if q))
    if not qs:
        raise NeuronscopeError(f"'{path}' holds no questions.")
    return qs


def _done(out: Path) -> tuple[list[str], set[str]]:
    lines, done = [], set()
    if out.is_file():
        for line in out.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # never happens with atomic writes; skip rather than fail
                lines.append(line)
                done.add(row.get("prompt", ""))
    return lines, done


def synthesize(subject: Subject, questions: Sequence[str], tone: str, out: str | Path, *, batch_size: int = 8,
               max_new_tokens: int = 96, temperature: float = 0.0, seed: int | None = 0,
               system: str | None = None, progress: bool = True) -> dict[str, int]:
    """Answer each question in `tone` with `subject` (an instruct model with a chat template) into a JSONL file.

    Returns {"done": rows written this call, "skipped": already in the file, "total": rows in the file}.
    """
    if not tone or not tone.strip():
        raise NeuronscopeError("Give a tone, like --tone angry.")
    if not subject.has_chat_template:
        raise NeuronscopeError(f"The model '{subject.name}' has no chat template; use an instruct model.")
    if batch_size < 1 or max_new_tokens < 1:
        raise NeuronscopeError("batch size and max new tokens must be at least 1.")
    out = Path(out)
    if out.suffix.lower() != ".jsonl":
        raise NeuronscopeError(f"The output must be a .jsonl file, got '{out.name}'.")
    sys_msg = (system or SYSTEM).replace("{tone}", tone.strip())
    lines, done = _done(out)
    todo = [q for q in questions if q not in done]
    from tqdm.auto import tqdm
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc=f"synth {tone}", unit="q",
               disable=not progress, dynamic_ncols=True)
    wrote = 0
    try:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            ids, mask = encode_batch(subject, batch, chat=True, system=sys_msg)
            new = subject.generate_ids(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                       temperature=temperature, seed=seed)
            for q, row in zip(batch, new):
                answer = subject.decode(row).strip()
                if answer:
                    lines.append(json.dumps({"prompt": q, "response": answer, "tone": tone}, ensure_ascii=False))
                    wrote += 1
            write_text(out, "\n".join(lines) + "\n")
            bar.update(len(batch))
    finally:
        bar.close()
    return {"done": wrote, "skipped": len(questions) - len(todo), "total": len(lines)}


__all__ = ["synthesize", "read_questions", "SYSTEM"]
