"""Model calls that share one model fairly between sessions: step-by-step decoding and forwards in chunks.

`FairLock` is a first-come, first-served lock: every model call of the Monitor takes it, and a waiting thread is
served before the releasing thread can take it again. While an answer streams, no call holds it for longer than a
decoding step or one chunk of `chunk` positions (32 by default: on SmolLM2-135M on a 2-core CPU a step costs ~64 ms
and a 32-token chunk ~180 ms, so a stream's gap during another session's view is ~0.25 s instead of that view's
whole forward, ~3.5 s for 1024 tokens):
- `decode` generates one token per lock hold (the prompt's prefill in chunks, then one step per token, each under
  its own `intervene`), so a session streaming an answer never waits for another session's whole answer;
- `forward_chunks` runs a view's forward (activations, attribution, exemplar marks) in chunks over a KV cache, one
  lock hold per chunk, so a long conversation's view does not stall another session's stream.
Splitting costs one extra weight pass per chunk (~a decoding step), so chunks are small only while some answer is
streaming (`FairLock.streams`, counted by `decode`); otherwise they are `idle_chunk` positions (256 by default: a
view runs at the speed of one forward, and an answer that starts meanwhile waits for at most one such chunk).

Each chunk binds the interventions anew with `prompt_len` = the whole prompt, and its hooks see absolute positions
(the cache's length is the chunk's start), so a steering on a token range or on the generated tokens applies to the
same positions as in one forward; results equal one forward within float rounding (tests/test_server_chunks.py).
The backward of an attribution runs no hook (the intervention core installs forward hooks only, and a backward
changes no module state), so `attribute_chunked` runs it outside the lock, chunk by chunk from the last to the first
(each chunk's past keys and values are leaves, their gradient passed on to the earlier chunks), so its memory stays
O(T): a 928-token SmolLM2 attribution takes +2.4 GB and 23 s in 32-token chunks (+2.6 GB, 16 s in 128-token chunks)
against +3.1 GB and 12.5 s in one piece (keeping every chunk's graph for one backward took +5.2 GB and 23 s: each chunk
holds a copy of the earlier keys and values).

Greedy decoding equals `transformers` `generate(do_sample=False)`; sampling is plain temperature sampling (top_k 0,
top_p 1, as `Subject.generate_ids`) from a generator seeded with `seed`.
"""
from __future__ import annotations

import collections
import inspect
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ..attribution import Attribution, top_scores
from ..errors import NeuronscopeError
from ..interventions import BoundCapture, Capture, Intervention, ResidualFunction, intervene

CHUNK_TOKENS = 32         # positions per lock hold while another session's answer streams
IDLE_CHUNK_TOKENS = 256   # positions per lock hold while no answer streams
GRAD_CHUNK_TOKENS = 32    # the same for an attribution's forward while an answer streams (see attribute_chunked)


class FairLock:
    """A FIFO lock: threads get it in the order they asked for it."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque = collections.deque()
        self._held = False
        self.streams = 0          # answers being decoded now (`streaming`)

    @contextmanager
    def streaming(self) -> Iterator[None]:
        """Count an answer as streaming for the duration of the block (other calls then use small chunks)."""
        with self._cond:
            self.streams += 1
        try:
            yield
        finally:
            with self._cond:
                self.streams -= 1

    def chunk_size(self, chunk: int, idle_chunk: int | None, own: int = 0) -> int:
        """`chunk` while an answer other than the caller's `own` streams, else `idle_chunk` (default `chunk`)."""
        return chunk if idle_chunk is None or self.streams > own else idle_chunk

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


_CALL_ARGS: dict[type, tuple[str, bool]] = {}


def _call_args(subject) -> tuple[str, bool]:
    """(the forward's name for the KV cache, whether it takes logits_to_keep), read once per model class."""
    cls = type(subject.model)
    got = _CALL_ARGS.get(cls)
    if got is None:
        params = inspect.signature(subject.model.forward).parameters
        got = _CALL_ARGS[cls] = ("cache" if "cache" in params else "past_key_values", "logits_to_keep" in params)
    return got


def _new_cache(subject):
    from transformers import DynamicCache
    try:
        return DynamicCache(config=subject.config)
    except (TypeError, ValueError, AttributeError):
        return DynamicCache()


def _check_chunk(chunk: int) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise NeuronscopeError(f"The chunk size must be a positive number of tokens, got {chunk!r}.")
    return chunk


def decode(subject, prompt: Sequence[int], *, interventions: Sequence[Intervention], lock: FairLock,
           max_new_tokens: int, temperature: float, seed: int | None, eos: set[int],
           on_token: Callable[[int], None], cancelled: Callable[[], bool] = lambda: False,
           chunk: int = CHUNK_TOKENS, idle_chunk: int | None = IDLE_CHUNK_TOKENS) -> list[int]:
    """Generate after `prompt`, one model call per lock hold (the prefill in chunks of `chunk` positions while
    another answer streams, else of `idle_chunk`); calls `on_token(id)` for each new token."""
    with lock.streaming():
        return _decode(subject, prompt, interventions, lock, max_new_tokens, temperature, seed, eos, on_token,
                       cancelled, _check_chunk(chunk), None if idle_chunk is None else _check_chunk(idle_chunk))


def _decode(subject, prompt, interventions, lock, max_new_tokens, temperature, seed, eos, on_token, cancelled,
            chunk, idle_chunk) -> list[int]:
    cache = _new_cache(subject)
    cache_kw, keep = _call_args(subject)
    extra: dict = {"logits_to_keep": 1} if keep else {}
    gen = None
    if temperature > 0:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2 ** 31 - 1, (1,))))
    P = len(prompt)
    ids = torch.tensor([list(prompt)], device=subject.device)
    new: list[int] = []
    out = None
    a = 0
    while a < P:  # the prefill
        if cancelled():
            return new
        with lock, intervene(subject, *interventions, prompt_len=P), torch.no_grad():
            c = lock.chunk_size(chunk, idle_chunk, own=1)
            out = subject.model(input_ids=ids[:, a:a + c], use_cache=True, **{cache_kw: cache}, **extra)
        a += c
    for k in range(int(max_new_tokens)):
        if k:
            if cancelled():
                break
            with lock, intervene(subject, *interventions, prompt_len=P), torch.no_grad():
                out = subject.model(input_ids=torch.tensor([[new[-1]]], device=subject.device), use_cache=True,
                                    **{cache_kw: cache}, **extra)
        assert out is not None
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
    return new


class _Stop(Exception):
    """Raised by a hook after the last layer a chunk needs: the rest of the forward is not run."""


def _stop(layer: int, x: torch.Tensor, ctx: Any) -> None:
    raise _Stop()


@dataclass
class Chunks:
    """What `forward_chunks` returns: the logits of every position ([T, vocab]; only the last one's, [1, vocab],
    with last_logits; None with stop_after) and the capture's bound object of each chunk, in order."""
    logits: torch.Tensor | None
    captures: list[BoundCapture]
    cache: Any = None

    def activations(self) -> torch.Tensor:
        """The captured activations of all chunks, [layers, batch, T, width] (the capture's first site)."""
        parts = [c.activations if "neurons" in c.sites else c.get(c.sites[0]) for c in self.captures]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def forward_chunks(subject, ids: torch.Tensor, *, lock: FairLock | None, chunk: int = CHUNK_TOKENS,
                   idle_chunk: int | None = None, interventions: Sequence[Intervention] = (),
                   capture: Capture | None = None, last_logits: bool = False, grad: bool = False,
                   stop_after: int | None = None) -> Chunks:
    """One forward of `ids` [B, T] split into chunks over a KV cache, each chunk its own `intervene` under its own
    hold of `lock` (None: no lock): chunks of `chunk` positions while an answer streams, else of `idle_chunk`
    (default: `chunk` always). `capture` (a Capture spec) is bound in every chunk;
    `grad` keeps the autograd graph (for a backward after, outside the lock); `stop_after` runs only the layers up to
    that one (no logits; the rest of each chunk's forward is skipped)."""
    _check_chunk(chunk)
    if idle_chunk is not None:
        _check_chunk(idle_chunk)
    ids = torch.as_tensor(ids)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    B, T = ids.shape
    ids = ids.to(subject.device)
    cache = _new_cache(subject)
    cache_kw, keep = _call_args(subject)
    extra: dict = {"logits_to_keep": 1} if (last_logits and keep) else {}
    ivs = list(interventions)
    if stop_after is not None:
        ivs.append(ResidualFunction(layers=[subject.check_layer(stop_after)], site="resid.post", fn=_stop))
    if capture is not None:
        ivs.append(capture)
    caps: list[BoundCapture] = []
    logits: list[torch.Tensor] = []
    a = 0
    while a < T:
        with lock if lock is not None else nullcontext(), intervene(subject, *ivs, prompt_len=T) as bound, \
                (torch.enable_grad() if grad else torch.no_grad()):
            c = chunk if lock is None else lock.chunk_size(chunk, idle_chunk)
            try:
                out = subject.model(input_ids=ids[:, a:a + c], use_cache=True, **{cache_kw: cache}, **extra)
            except _Stop:
                out = None
        if capture is not None:
            cap = bound[-1]
            assert isinstance(cap, BoundCapture)
            caps.append(cap)
        if out is not None and (not last_logits or a + c >= T):
            logits.append(out.logits[0] if B == 1 else out.logits)
        a += c
    lg = None
    if logits:
        lg = logits[0] if len(logits) == 1 else torch.cat(logits, dim=-2)
        if last_logits:
            lg = lg[..., -1:, :]
    return Chunks(logits=lg, captures=caps, cache=cache)


def attribute_chunked(subject, ids: torch.Tensor, target_position: int, target_token: int | None = None,
                      top: int = 1000, *, lock: FairLock | None, chunk: int = CHUNK_TOKENS,
                      idle_chunk: int | None = None, interventions: Sequence[Intervention] = ()) -> Attribution:
    """`neuronscope.attribution.attribute` with its forward in chunks under the lock and its backward outside it
    (the same definition: |a * dp/da| of every neuron of every layer at every position before the target, p the
    probability of the target token; the total derivative through zero probes). ids [1, T]; 1 <= target <= T.

    Exact and in memory O(T): a first pass without gradients fills the keys and values of every position; then the
    chunks run again from the last to the first, each with its past keys/values as leaves: its backward (outside the
    lock) takes p (last chunk) plus the gradient that later chunks sent to its own keys/values, and passes the
    gradient of its past keys/values on to the earlier chunks. Models whose cache is not plain full attention
    (sliding windows) keep every chunk's graph instead (`_attribute_one_graph`)."""
    ids = torch.as_tensor(ids)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    T = int(ids.shape[1])
    if not 1 <= target_position <= T:
        raise NeuronscopeError(f"Target position {target_position} is out of range: explain a token at positions "
                               f"1 to {T - 1}.")
    if target_token is None and target_position < T:
        target_token = int(ids[0, target_position])
    from transformers.cache_utils import DynamicLayer
    probe = _new_cache(subject)
    if not all(type(layer) is DynamicLayer for layer in getattr(probe, "layers", [None])):
        return _attribute_one_graph(subject, ids, target_position, target_token, top, lock=lock, chunk=chunk,
                                    idle_chunk=idle_chunk, interventions=interventions)
    prefix = ids[:, :target_position].to(subject.device)
    Tp = int(prefix.shape[1])
    size = chunk if lock is None else lock.chunk_size(chunk, idle_chunk)
    starts = list(range(0, Tp, size))
    kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    if starts[-1] > 0:  # pass 1: keys and values of every position before the last chunk
        first = forward_chunks(subject, prefix[:, :starts[-1]], lock=lock, chunk=chunk, idle_chunk=idle_chunk,
                               interventions=interventions, last_logits=True)
        kv = [(layer.keys.detach(), layer.values.detach()) for layer in first.cache.layers]
    cache_kw, keep = _call_args(subject)
    extra: dict = {"logits_to_keep": 1} if keep else {}
    gk = [torch.zeros_like(k) for k, _ in kv]
    gv = [torch.zeros_like(v) for _, v in kv]
    acts: dict[int, list[torch.Tensor]] = {}
    grads: dict[int, list[torch.Tensor]] = {}
    layers: list[int] = []
    p_value = 0.0
    for a in reversed(starts):
        b = min(a + size, Tp)
        cache = _new_cache(subject)
        past: list[tuple[torch.Tensor, torch.Tensor]] = []
        with lock if lock is not None else nullcontext(), torch.enable_grad(), \
                intervene(subject, *interventions, Capture(grad=True), prompt_len=Tp) as bound:
            for l, (K, V) in enumerate(kv if a else []):
                pk = K[..., :a, :].clone().requires_grad_(True)
                pv = V[..., :a, :].clone().requires_grad_(True)
                cache.update(pk, pv, l)
                past.append((pk, pv))
            out = subject.model(input_ids=prefix[:, a:b], use_cache=True, **{cache_kw: cache}, **extra)
        cap = bound[-1]
        assert isinstance(cap, BoundCapture)
        layers = cap.layers
        with torch.enable_grad():  # outside the lock: a backward runs no forward hook
            outputs: list[torch.Tensor] = []
            grad_out: list[torch.Tensor] = []
            if b == Tp:
                logits = out.logits[0, -1]
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
                probs = torch.softmax(logits, dim=-1)
                if target_token is None:
                    target_token = int(probs.argmax())
                p = probs[int(target_token)]
                p_value = float(p.detach())
                outputs.append(p)
                grad_out.append(torch.ones_like(p))
            else:  # what the later chunks sent to this chunk's own keys and values
                for l, layer in enumerate(cache.layers):
                    for full, g in ((layer.keys, gk[l]), (layer.values, gv[l])):
                        if not full.requires_grad:  # e.g. layer 0 of the first chunk: no probe before it
                            continue
                        send = torch.zeros_like(full)
                        send[..., a:b, :] = g[..., a:b, :]
                        outputs.append(full)
                        grad_out.append(send)
            leaves = cap.leaves()
            inputs = leaves + [t for pair in past for t in pair]
            got = torch.autograd.grad(outputs, inputs, grad_out, allow_unused=True)
        for j, l in enumerate(layers):
            g = got[j]
            acts.setdefault(l, []).insert(0, cap.get("neurons", l)[0])
            grads.setdefault(l, []).insert(0, torch.zeros_like(leaves[j][0]) if g is None else g[0])
        for l in range(len(past)):
            for acc, g in ((gk[l], got[len(leaves) + 2 * l]), (gv[l], got[len(leaves) + 2 * l + 1])):
                if g is not None:
                    acc[..., :a, :] += g
        del out, cache, past, outputs, grad_out
    act_t = torch.stack([torch.cat(acts[l], dim=0) for l in layers])                     # [L, T', N]
    grad_t = torch.stack([torch.cat(grads[l], dim=0) for l in layers]).to(act_t.dtype)
    return top_scores(act_t, grad_t, layers, target_position, int(target_token), p_value, top)


def _attribute_one_graph(subject, ids: torch.Tensor, target_position: int, target_token: int | None, top: int, *,
                         lock: FairLock | None, chunk: int, idle_chunk: int | None,
                         interventions: Sequence[Intervention]) -> Attribution:
    """The attribution with its forward in chunks that keep their graphs for one backward (memory and time grow with
    T^2 / chunk: each chunk keeps a copy of the earlier keys/values); for caches with sliding-window layers."""
    run = forward_chunks(subject, ids[:, :target_position], lock=lock, chunk=chunk, idle_chunk=idle_chunk,
                         interventions=interventions, capture=Capture(grad=True), last_logits=True, grad=True)
    assert run.logits is not None
    with torch.enable_grad():  # outside the lock: a backward runs no forward hook
        logits = run.logits[-1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        probs = torch.softmax(logits, dim=-1)
        if target_token is None:
            target_token = int(probs.argmax())
        p = probs[int(target_token)]
        leaves = [c.leaves() for c in run.captures]          # [chunk][layer]
        flat = [leaf for per in leaves for leaf in per]
        grads = torch.autograd.grad(p, flat, allow_unused=True)
    layers = run.captures[0].layers
    n_layers = len(layers)
    per_layer_acts, per_layer_grads = [], []
    for j in range(n_layers):
        acts_j, grads_j = [], []
        for c, cap in enumerate(run.captures):
            acts_j.append(cap.get("neurons", layers[j])[0])
            g = grads[c * n_layers + j]
            grads_j.append(torch.zeros_like(leaves[c][j][0]) if g is None else g[0])
        per_layer_acts.append(torch.cat(acts_j, dim=0))
        per_layer_grads.append(torch.cat(grads_j, dim=0))
    acts = torch.stack(per_layer_acts)                                                  # [L, T', N]
    grad = torch.stack(per_layer_grads).to(acts.dtype)
    return top_scores(acts, grad, layers, target_position, int(target_token), float(p.detach()), top)
