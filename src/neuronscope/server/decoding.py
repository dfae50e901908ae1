"""Answers decoded one token per model call, so sessions share the one model fairly while they stream.

`decode` runs the prompt's prefill in chunks (`chunked.CHUNK_TOKENS` positions while another answer streams, else
`IDLE_CHUNK_TOKENS`), then one step per token, each through the scheduler (`scheduler.FairLock.run`): a session
streaming an answer never waits for another session's whole answer, and several sessions' steps share a packed
forward. Greedy decoding equals `transformers` `generate(do_sample=False)`; sampling is plain temperature sampling
(top_k 0, top_p 1, as `Subject.generate_ids`) from a generator seeded with `seed`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..interventions import Intervention
from ..subject import Subject
from .chunked import CHUNK_TOKENS, IDLE_CHUNK_TOKENS, check_chunk
from .packing import Step, new_cache
from .scheduler import FairLock

__all__ = ["decode", "FairLock"]  # FairLock: the lock `decode` takes, importable from here as before


def decode(subject: Subject, prompt: Sequence[int], *, interventions: Sequence[Intervention], lock: FairLock,
           max_new_tokens: int, temperature: float, seed: int | None, eos: set[int],
           on_token: Callable[[int], None], cancelled: Callable[[], bool] = lambda: False,
           chunk: int = CHUNK_TOKENS, idle_chunk: int | None = IDLE_CHUNK_TOKENS) -> list[int]:
    """Generate after `prompt`, one model call per token (the prefill in chunks of `chunk` positions while
    another answer streams, else of `idle_chunk`); calls `on_token(id)` for each new token. The answer counts as
    streaming (`FairLock.streams`) from its prefill's end."""
    with lock.client():
        return _decode(subject, prompt, interventions, lock, max_new_tokens, temperature, seed, eos, on_token,
                       cancelled, check_chunk(chunk), None if idle_chunk is None else check_chunk(idle_chunk))


def _decode(subject: Subject, prompt: Sequence[int], interventions: Sequence[Intervention], lock: FairLock,
            max_new_tokens: int, temperature: float, seed: int | None, eos: set[int], on_token: Callable[[int], None],
            cancelled: Callable[[], bool], chunk: int, idle_chunk: int | None) -> list[int]:
    cache = new_cache(subject)
    gen = None
    if temperature > 0:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2 ** 31 - 1, (1,))))
    P = len(prompt)
    ids = torch.tensor(list(prompt), dtype=torch.long)
    ivs = list(interventions)
    new: list[int] = []
    step: Step | None = None
    a = 0
    while a < P:  # the prefill
        if cancelled():
            return new
        c = lock.chunk_size(chunk, idle_chunk)
        step = lock.run(subject, Step(cache, ids[a:a + c], ivs, prompt_len=P, logits="last" if a + c >= P else "none"))
        a += c
    with lock.streaming():
        _generate(subject, lock, cache, ivs, P, step, int(max_new_tokens), temperature, gen, eos, on_token, cancelled,
                  new)
    return new


def _generate(subject: Subject, lock: FairLock, cache: Any, ivs: list[Intervention], P: int, step: Step | None,
              max_new_tokens: int, temperature: float, gen: torch.Generator | None, eos: set[int],
              on_token: Callable[[int], None], cancelled: Callable[[], bool], new: list[int]) -> None:
    for k in range(max_new_tokens):
        if k:
            if cancelled():
                break
            step = lock.run(subject, Step(cache, torch.tensor([new[-1]]), ivs, prompt_len=P))
        assert step is not None and step.out is not None
        logits = step.out[-1].float()
        if temperature > 0:
            probs = torch.softmax(logits.cpu() / float(temperature), -1)
            t = int(torch.multinomial(probs, 1, generator=gen))
        else:
            t = int(logits.argmax())
        new.append(t)
        on_token(t)
        if t in eos:
            break
