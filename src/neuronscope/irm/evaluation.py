"""How strongly an alignment took, as numbers: held-out loss of the aligned text with the IRM on vs off, and the
same on neutral text (which the IRM should move little).

    report = evaluate_irm(subject, irm, aligned_rows, neutral_texts=[...])
    report["aligned"]["delta"]   # loss(on) - loss(off): strongly negative when the alignment took
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from ..errors import NeuronscopeError
from .data import read_table, tokenize_rows
from .model import IRM
from .training import _pad_id, validation_loss


def _pair(subject, irm, examples, batch_size: int) -> dict[str, float]:
    pad = _pad_id(subject)
    off = validation_loss(subject, None, examples, batch_size, pad)
    on = validation_loss(subject, irm, examples, batch_size, pad)
    return {"off": off, "on": on, "delta": on - off, "ppl_off": math.exp(min(off, 50)),
            "ppl_on": math.exp(min(on, 50)), "examples": len(examples),
            "tokens": sum(e.n_target for e in examples)}


def evaluate_irm(subject, irm: IRM, aligned_rows: Sequence[dict[str, Any]] | None = None, *,
                 neutral_texts: Sequence[str] | None = None, chat: bool = False, max_len: int = 256,
                 batch_size: int = 8) -> dict[str, Any]:
    """Next-token loss (mean over target tokens) with the IRM off and on, on aligned rows and on neutral text."""
    irm.check_subject(subject)
    if not aligned_rows and not neutral_texts:
        raise NeuronscopeError("Give aligned rows and/or neutral text to evaluate on.")
    report: dict[str, Any] = {}
    if aligned_rows:
        report["aligned"] = _pair(subject, irm, tokenize_rows(subject, aligned_rows, chat=chat, max_len=max_len),
                                  batch_size)
    if neutral_texts:
        rows = [{"text": t} for t in neutral_texts if t.strip()]
        report["neutral"] = _pair(subject, irm, tokenize_rows(subject, rows, chat=False, max_len=max_len),
                                  batch_size)
    if "aligned" in report and "neutral" in report:
        a, n = report["aligned"]["delta"], report["neutral"]["delta"]
        report["selectivity"] = a - n  # negative: the IRM helps the aligned text more than neutral text
    return report


def held_out_rows(run: dict[str, Any], run_dir: str | Path) -> list[dict[str, Any]]:
    """The validation rows of a run's own training file (re-split with the recorded seed)."""
    from ..store import read_json
    data = run.get("data", {})
    path = data.get("path")
    if not path or not Path(path).is_file():
        raise NeuronscopeError("The run's training file is not available; pass --data with aligned rows.")
    rows = read_table(path)
    sp = read_json(Path(run_dir) / "split.json")
    if len(rows) != data.get("rows"):
        raise NeuronscopeError(f"'{path}' changed since training; pass --data with held-out aligned rows.")
    return [rows[i] for i in sp["val_rows"]]


__all__ = ["evaluate_irm", "held_out_rows"]
