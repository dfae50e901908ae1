"""Step-by-step decoding that shares one model fairly between sessions.

`FairLock` is a first-come, first-served lock: every model call of the Monitor (a decoding step, a view's forward,
an attribution) takes it, and a waiting thread is served before the releasing thread can take it again. `decode`
generates one token per lock hold (prefill, then one step per token, each under its own `intervene`), so a session
streaming an answer waits at most for one model call of another session, never for its whole answer.

Greedy decoding equals `transformers` `generate(do_sample=False)`; sampling is plain temperature sampling (top_k 0,
top_p 1, as `Subject.generate_ids`) from a generator seeded with `seed`.
"""
from __future__ import annotations

import collections
import threading
from typing import Callable, Sequence

import torch

from ..interventions import Intervention, intervene


class FairLock:
    """A FIFO lock: threads get it in the order they asked for it."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque = collections.deque()
        self._held = False

    def acquire(self) -> None:
        me = object()
        with self._cond:
            self._queue.append(me)
            while self._held or self._queue[0] is not me:
                self._cond.wait()
            self._queue.popleft()
            self._held = True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def decode(subject, prompt: Sequence[int], *, interventions: Sequence[Intervention], lock: FairLock,
           max_new_tokens: int, temperature: float, seed: int | None, eos: set[int],
           on_token: Callable[[int], None], cancelled: Callable[[], bool] = lambda: False) -> list[int]:
    """Generate after `prompt`, one model call per lock hold; calls `on_token(id)` for each new token."""
    import inspect

    from transformers import DynamicCache
    cache = DynamicCache()
    params = inspect.signature(subject.model.forward).parameters
    extra: dict = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    gen = None
    if temperature > 0:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2 ** 31 - 1, (1,))))
    inp = torch.tensor([list(prompt)], device=subject.device)
    new: list[int] = []
    for _ in range(int(max_new_tokens)):
        if cancelled():
            break
        with lock, intervene(subject, *interventions), torch.no_grad():
            extra["cache" if "cache" in params else "past_key_values"] = cache
            out = subject.model(input_ids=inp, use_cache=True, **extra)
        logits = out.logits[0, -1].float()
        if temperature > 0:
            probs = torch.softmax(logits.cpu() / float(temperature), -1)
            t = int(torch.multinomial(probs, 1, generator=gen))
        else:
            t = int(logits.argmax())
        new.append(t)
        on_token(t)
        if t in eos:
            break
        inp = torch.tensor([[t]], device=subject.device)
    return new
