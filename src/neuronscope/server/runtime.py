"""The one model every part of the Monitor shares: the subject, its scheduler (`scheduler.FairLock`) and the chunk
sizes of a view's forward, with the two calls the views make through them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import NeuronscopeError
from ..interventions import Capture, Intervention
from ..subject import Subject
from .chunked import CHUNK_TOKENS, GRAD_CHUNK_TOKENS, IDLE_CHUNK_TOKENS, Chunks, forward_chunks
from .scheduler import STALL_STEPS, FairLock


def end_tokens(subject: Subject) -> set[int]:
    """The ids that end an answer: the tokenizer's and the config's end tokens (one id or a list each)."""
    eos: set[int] = set()
    for e in (getattr(subject.tokenizer, "eos_token_id", None), getattr(subject.config, "eos_token_id", None)):
        eos.update(e if isinstance(e, (list, tuple)) else ([] if e is None else [e]))
    return eos


@dataclass
class Runtime:
    """`chunk_tokens`: the most positions of a view's forward (or a prefill) per model call while an answer streams
    (`grad_chunk_tokens` for an attribution's forward); `idle_chunk_tokens`: the same while none does; `lock` decides
    who runs (its `stall_steps`: how many decoding steps other work may add to a streaming answer's step)."""
    subject: Subject
    chunk_tokens: int = CHUNK_TOKENS
    idle_chunk_tokens: int = IDLE_CHUNK_TOKENS
    grad_chunk_tokens: int = GRAD_CHUNK_TOKENS
    stall_steps: float = STALL_STEPS
    lock: FairLock = field(init=False)
    eos: set[int] = field(init=False)

    def __post_init__(self) -> None:
        for name, v in (("chunk_tokens", self.chunk_tokens), ("idle_chunk_tokens", self.idle_chunk_tokens),
                        ("grad_chunk_tokens", self.grad_chunk_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise NeuronscopeError(f"{name} must be a positive number of tokens, got {v!r}.")
        self.lock = FairLock(stall_steps=self.stall_steps)
        self.eos = end_tokens(self.subject)

    def forward(self, ids: torch.Tensor, *, interventions: Sequence[Intervention] = (),
                capture: Capture | None = None) -> Chunks:
        """One forward of `ids` in chunks through the lock (`chunked.forward_chunks`) with a view's chunk sizes."""
        return forward_chunks(self.subject, ids, lock=self.lock, chunk=self.chunk_tokens,
                              idle_chunk=self.idle_chunk_tokens, interventions=interventions, capture=capture)
