"""Generation with an IRM: the same prompts with the IRM off and on, side by side (batched, greedy by default)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..errors import NeuronscopeError

if TYPE_CHECKING:
    from ..subject import Subject
from .model import IRM, OutputHook


@dataclass
class SideBySide:
    prompt: str
    off: str
    on: str


def encode_batch(subject: Subject, prompts: Sequence[str], chat: bool = False,
                 system: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask [B, T] for a batch of prompts (for batched generation)."""
    rows = [subject.encode(p, chat=chat, system=system)[0].tolist() for p in prompts]
    pad = subject.tokenizer.pad_token_id
    pad = pad if pad is not None else (subject.tokenizer.eos_token_id or 0)
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return ids.to(subject.device), mask.to(subject.device)


def generate_texts(subject: Subject, prompts: Sequence[str], *, irm: IRM | None = None, chat: bool = False,
                   system: str | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
                   seed: int | None = None, scale: float = 1.0, batch_size: int = 8,
                   on_output: OutputHook | None = None, progress: bool = False, desc: str = "generate") -> list[str]:
    """Completions of `prompts`, with the IRM injected (when given) in the prompt and every generated token.
    Batch b is decoded with seed `seed + b` (so IRM-off and IRM-on runs of the same prompts share seeds)."""
    from contextlib import nullcontext
    from tqdm.auto import tqdm
    if not prompts:
        raise NeuronscopeError("No prompts given.")
    out: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for b, i in enumerate(tqdm(starts, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True)):
        ids, mask = encode_batch(subject, prompts[i:i + batch_size], chat=chat, system=system)
        ctx = irm.attached(subject, on_output=on_output, scale=scale) if irm is not None else nullcontext()
        with ctx:
            new = subject.generate_ids(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                       temperature=temperature, seed=None if seed is None else seed + b)
        out += [subject.decode(row) for row in new]
    return out


class FrozenAnswers:
    """IRM-off answers already decoded, by prompts and decoding settings: the frozen model's answers do not depend on
    the IRM, so a sweep that judges many IRMs on the same questions decodes them once (memo in memory)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[Any, ...], list[str]] = {}

    def texts(self, subject: Subject, prompts: Sequence[str], **kw: Any) -> list[str]:
        """generate_texts(subject, prompts, irm=None, **kw), decoded on first use only."""
        shown = {k: v for k, v in kw.items() if k not in ("progress", "desc")}
        key = (subject.fingerprint, tuple(prompts), tuple(sorted((k, repr(v)) for k, v in shown.items())))
        if key not in self._seen:
            self._seen[key] = generate_texts(subject, prompts, irm=None, **kw)
        return list(self._seen[key])


def frozen_texts(subject: Subject, prompts: Sequence[str], memo: FrozenAnswers | None, **kw: Any) -> list[str]:
    """IRM-off answers, through the memo when one is given."""
    return memo.texts(subject, prompts, **kw) if memo is not None else generate_texts(subject, prompts, irm=None, **kw)


def generate_side_by_side(subject: Subject, irm: IRM, prompts: Sequence[str], **kwargs: Any) -> list[SideBySide]:
    """Each prompt completed with the IRM off, then on (same decoding settings)."""
    irm.check_subject(subject)
    off = generate_texts(subject, prompts, irm=None, **kwargs)
    on = generate_texts(subject, prompts, irm=irm, **kwargs)
    return [SideBySide(p, a, b) for p, a, b in zip(prompts, off, on)]


__all__ = ["generate_side_by_side", "generate_texts", "encode_batch", "SideBySide", "FrozenAnswers", "frozen_texts"]
