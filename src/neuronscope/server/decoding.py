"""Model calls that share one model fairly between sessions: step-by-step decoding and forwards in chunks.

`FairLock` schedules every model call of the Monitor, first come first served: `slots` calls at once (one per core
the torch threads leave), each in its caller's thread, with interventions scoped to that thread; the decoding steps
that wait at the same time run as one packed forward (`packing.run_packed`: each sequence over its own KV cache, with
its own interventions), and other work never takes the last slot while an answer streams:
- `decode` generates one token per call (the prompt's prefill in chunks, then one step per token), so a session
  streaming an answer never waits for another session's whole answer, and several sessions' steps share a forward;
- `forward_chunks` runs a view's forward (activations, exemplar marks, an attribution's first pass) in chunks over a
  KV cache, one call per chunk: `chunk` positions (32) while an answer streams, `idle_chunk` (256) otherwise.
Measured on SmolLM2-135M on this 2-core CPU (bench/RESULTS.md): a view of 932 tokens beside a streaming answer adds at
most ~0.9 of a decoding step (55 ms) to any of its gaps. With one slot a view's chunk rides along in the streams'
packed forward instead, with as many tokens as add at most `stall_steps` decoding steps (2-3 tokens here: views then
run ~4x slower while an answer streams). Models whose forward cannot pack (a sliding-window cache, a failed
self-check) run the waiting steps one after another.

Each chunk binds the interventions anew with `prompt_len` = the whole prompt, and its hooks see absolute positions
(the cache's length is the chunk's start), so a steering on a token range or on the generated tokens applies to the
same positions as in one forward; results equal one forward within float rounding (tests/test_server_chunks.py).
The backward of an attribution runs no hook (the intervention core installs forward hooks only, and a backward changes
no module state), so `attribute_chunked` runs it in a slot apart from its forward's, chunk by chunk from the last to the
first (each chunk's past keys and values are leaves, their gradient passed on to the earlier chunks), so its memory
stays O(T): a 928-token SmolLM2 attribution takes +2.4 GB and 23 s in 32-token chunks (+2.6 GB, 16 s in 128-token
chunks) against +3.1 GB and 12.5 s in one piece (keeping every chunk's graph for one backward took +5.2 GB and 23 s:
each chunk holds a copy of the earlier keys and values).

Greedy decoding equals `transformers` `generate(do_sample=False)`; sampling is plain temperature sampling (top_k 0,
top_p 1, as `Subject.generate_ids`) from a generator seeded with `seed`.
"""
from __future__ import annotations

import collections
import os
import statistics
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ..attribution import Attribution, top_scores
from ..errors import NeuronscopeError
from ..interventions import BoundCapture, Capture, Intervention, ResidualFunction, intervene
from ..subject import Subject
from .packing import Step, call_args, new_cache, packs, plain_cache, run_one, run_packed

CHUNK_TOKENS = 32         # positions per model call while another session's answer streams
PACK_TOKENS = 24          # tokens of one packed forward beyond its 1-token steps (FairLock.run)
MAX_PACK = 32             # steps in one packed forward
STALL_STEPS = 1.0         # decoding steps another session's work may add to a streaming answer's step
GATHER_S = 0.003          # how long a packed forward waits for the next call of a thread in a run of calls
IDLE_CHUNK_TOKENS = 256   # positions per lock hold while no answer streams
GRAD_CHUNK_TOKENS = 32    # the same for an attribution's forward while an answer streams (see attribute_chunked)
GRAD_LEAST_TOKENS = 8     # the fewest positions of an attribution's backward chunk


class _Ticket:
    __slots__ = ("step", "done", "taken", "error", "thread", "is_step")

    def __init__(self, step: Step | None) -> None:
        self.step = step
        self.thread = threading.get_ident()
        self.is_step = step is not None and step.tokens == 1 and not step.grad   # a decoding step
        self.done = False
        self.taken = False        # out of the queue, in another thread's packed forward (done when it ends)
        self.error: BaseException | None = None


class FairLock:
    """The one model's scheduler: `slots` model calls run at once, each in its caller's thread (by default one per
    core the torch threads leave: 2 on a 2-core CPU with one torch thread; the intervention core scopes every
    context's hooks to its own thread, so concurrent calls never see each other's interventions). As a lock
    (`with lock:`, one slot) it is first-come, first-served: a waiting thread is served before the releasing thread
    can take a slot again. `run(subject, step)` waits the same way for one model call, and the thread whose turn it
    is runs, in the same forward, the steps that other threads wait with
    (`packing.run_packed`): every waiting 1-token step (a decoding step) and longer ones while the pack stays within
    `pack_tokens` tokens beyond its first step. When it takes the last free slot, it first waits up to `gather_s`
    for the threads that are in the middle of a run of calls (`client()`: a decoding loop, a view in chunks) and
    not running one now to queue their next call, so that their steps ride along instead of taking turns.

    It also times its forwards: `step_s`, the median of the last 32 forwards of 1-token steps, and from each pack
    that carried a longer step along with decoding steps, how many tokens ride along for one more step's time.
    `chunk_size` uses them so that a chunk that rides along with a decoding step costs at most `stall_steps` more
    decoding steps (1 by default: a stream then waits for another session's work for at most about one step per
    token; more makes views faster while an answer streams, at that cost)."""

    def __init__(self, pack_tokens: int = PACK_TOKENS, gather_s: float = GATHER_S,
                 stall_steps: float = STALL_STEPS, slots: int | None = None) -> None:
        if slots is None:
            slots = max(1, (os.cpu_count() or 1) // max(1, torch.get_num_threads()))
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise NeuronscopeError(f"slots must be a positive number of concurrent model calls, got {slots!r}.")
        self.slots = slots
        if isinstance(stall_steps, bool) or not isinstance(stall_steps, (int, float)) or not stall_steps > 0 \
                or not stall_steps < float("inf"):
            raise NeuronscopeError(f"stall_steps must be a positive number of decoding steps, got {stall_steps!r}.")
        self.stall_steps = float(stall_steps)
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[_Ticket] = collections.deque()
        self._active = 0          # slots taken
        self._work_active = 0     # of them, by work other than decoding steps
        self._held: dict[int, list[_Ticket]] = {}   # thread -> the tickets of the slots it holds
        self._client_threads: collections.Counter[int] = collections.Counter()
        self._stream_threads: collections.Counter[int] = collections.Counter()
        self.pack_tokens = int(pack_tokens)
        self.gather_s = float(gather_s)
        self.packed = 0           # forwards that ran more than one step (for tests and figures)
        self._step_times: collections.deque[float] = collections.deque(maxlen=32)
        self._ride: float | None = None   # tokens that ride along with a decoding step for one more step's time

    @contextmanager
    def _counted(self, threads: collections.Counter[int]) -> Iterator[None]:
        """Count the calling thread in `threads` for the duration of the block."""
        me = threading.get_ident()
        with self._cond:
            threads[me] += 1
        try:
            yield
        finally:
            with self._cond:
                threads[me] -= 1
                if not threads[me]:
                    del threads[me]
                self._cond.notify_all()

    @property
    def clients(self) -> int:
        """Runs of calls going on now (`client`)."""
        return sum(self._client_threads.values())

    @property
    def streams(self) -> int:
        """Answers being decoded now (`streaming`)."""
        return sum(self._stream_threads.values())

    @contextmanager
    def client(self) -> Iterator[None]:
        """Count the block as a run of calls whose next call comes soon (see `gather_s`)."""
        with self._counted(self._client_threads):
            yield

    @contextmanager
    def streaming(self) -> Iterator[None]:
        """Count an answer as streaming for the duration of the block (other calls then use small chunks)."""
        with self._counted(self._stream_threads), self.client():
            yield

    @property
    def step_s(self) -> float | None:
        """The median time of the last 32 forwards of 1-token steps (decoding steps)."""
        return statistics.median(self._step_times) if self._step_times else None

    def chunk_size(self, chunk: int, idle_chunk: int | None, own: int = 0, least: int = 2) -> int:
        """While an answer other than the caller's `own` streams: `chunk` with two slots or more (a view's chunk then
        runs beside the decoding steps, in a slot of its own); with one, fewer tokens (not under `least`) where the
        timings say that more would cost over `stall_steps` decoding steps on top of the steps they ride along with
        in a packed forward; while none streams: `idle_chunk` (default `chunk`)."""
        if idle_chunk is not None and self.streams <= own:
            return idle_chunk
        if self._ride is None or self.slots > 1:
            return chunk
        return max(min(least, chunk), min(chunk, int(self._ride)))

    def _fits(self, t: _Ticket) -> bool:
        """Whether `t` may take a slot now: one is free, and while an answer streams on a model with two slots or
        more, work (a view's chunk, a backward, a `with lock:` block) never takes the last one, which stays for the
        decoding steps. Called with the condition held."""
        if self._active >= self.slots:
            return False
        if t.is_step or self.slots == 1 or not self.streams:
            return True
        return self._work_active < self.slots - 1

    def _wait(self, me: _Ticket) -> bool:
        """Queue `me` and wait for its turn (True: holding a slot now) or for another thread to run its step
        (False): first come first served among the tickets that may take a slot now (`_fits`). Called with the
        condition held."""
        self._queue.append(me)
        while not me.done:
            if not me.taken and self._fits(me) and next(t for t in self._queue if self._fits(t)) is me:
                break
            self._cond.wait()
        if me.done:
            return False
        self._queue.remove(me)
        self._active += 1
        self._work_active += not me.is_step
        self._held.setdefault(threading.get_ident(), []).append(me)
        if self._queue:
            self._cond.notify_all()  # a free slot left: the next in line may take it
        return True

    def _free(self) -> None:
        """Give back the caller's last slot. Called with the condition held."""
        me = threading.get_ident()
        t = self._held[me].pop()
        if not self._held[me]:
            del self._held[me]
        self._active -= 1
        self._work_active -= not t.is_step
        self._cond.notify_all()

    def acquire(self) -> None:
        with self._cond:
            self._wait(_Ticket(None))

    def release(self) -> None:
        with self._cond:
            self._free()

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _gather(self, subject: Subject, me: _Ticket) -> list[_Ticket]:
        """With a slot held: the steps to run with `me` (taken out of the queue). With one slot, every waiting step
        rides along (1-token steps, and longer ones within `pack_tokens`); with more, decoding steps run with
        decoding steps and longer steps in slots of their own. Before it takes them, a decoding step (with one slot:
        any step) waits up to `gather_s` for the streams (clients) that are neither running nor queued to queue
        their next step. Called with the condition held."""
        assert me.step is not None
        one = self.slots == 1
        if (one or me.is_step) and self.gather_s > 0 and packs(subject):
            pool = self._client_threads if one else self._stream_threads
            me_id = threading.get_ident()
            deadline = time.perf_counter() + self.gather_s
            while True:
                queued = {t.thread for t in self._queue}
                if not [c for c in pool if c != me_id and c not in self._held and c not in queued]:
                    break
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
        if not (one or me.is_step):
            return [me]
        batch = [me]
        budget = max(me.step.tokens, self.pack_tokens) - me.step.tokens
        grad = me.step.grad
        for t in list(self._queue):
            if t.step is None or len(batch) >= MAX_PACK or (grad and t.step.grad):
                continue  # one graph per pack: each backward frees its own
            if t.is_step or (one and t.step.tokens <= budget):
                budget -= 0 if t.is_step else t.step.tokens
                grad = grad or t.step.grad
                t.taken = True
                batch.append(t)
                self._queue.remove(t)
        return batch

    def run(self, subject: Subject, step: Step) -> Step:
        """Run one model call in its turn, packed with the steps waiting behind it when the model packs; returns
        `step` with its results (or raises its own error)."""
        me = _Ticket(step)
        with self._cond:
            if not self._wait(me):
                if me.error is not None:
                    raise me.error
                return step
            batch = self._gather(subject, me)
        try:
            steps = [t.step for t in batch if t.step is not None]
            t0 = time.perf_counter()
            together = len(batch) == 1
            if len(batch) > 1 and packs(subject):
                try:
                    run_packed(subject, steps)
                    self.packed += 1
                    together = True
                except Exception:  # one step's bad intervention: run them one by one, each with its own error
                    self._run_each(subject, batch)
            else:
                self._run_each(subject, batch)
            if together and me.error is None:
                self._time(steps, time.perf_counter() - t0)
        finally:
            with self._cond:
                for t in batch[1:]:
                    t.done = True
                self._free()
        if me.error is not None:
            raise me.error
        return step

    def _time(self, steps: list[Step], seconds: float) -> None:
        """Record one forward's time (not of a forward that keeps a graph: it costs more)."""
        if any(st.grad for st in steps):
            return
        ride = sum(st.tokens for st in steps if st.tokens > 1)
        if not ride:
            self._step_times.append(seconds)
            return
        step = self.step_s
        if step is None or ride == sum(st.tokens for st in steps):
            return  # no decoding step rode along
        # proportional: the tokens whose extra time would be one step, estimated from this pack; smoothed
        est = ride * self.stall_steps * step / max(seconds - step, 1e-3)
        self._ride = est if self._ride is None else 0.5 * self._ride + 0.5 * est

    @staticmethod
    def _run_each(subject: Subject, batch: list[_Ticket]) -> None:
        for t in batch:
            assert t.step is not None
            try:
                run_one(subject, t.step)
            except Exception as e:
                t.error = e


def _check_chunk(chunk: int) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise NeuronscopeError(f"The chunk size must be a positive number of tokens, got {chunk!r}.")
    return chunk


def decode(subject: Subject, prompt: Sequence[int], *, interventions: Sequence[Intervention], lock: FairLock,
           max_new_tokens: int, temperature: float, seed: int | None, eos: set[int],
           on_token: Callable[[int], None], cancelled: Callable[[], bool] = lambda: False,
           chunk: int = CHUNK_TOKENS, idle_chunk: int | None = IDLE_CHUNK_TOKENS) -> list[int]:
    """Generate after `prompt`, one model call per token (the prefill in chunks of `chunk` positions while
    another answer streams, else of `idle_chunk`); calls `on_token(id)` for each new token. The answer counts as
    streaming (`FairLock.streams`) from its prefill's end."""
    with lock.client():
        return _decode(subject, prompt, interventions, lock, max_new_tokens, temperature, seed, eos, on_token,
                       cancelled, _check_chunk(chunk), None if idle_chunk is None else _check_chunk(idle_chunk))


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


def forward_chunks(subject: Subject, ids: torch.Tensor, *, lock: FairLock | None, chunk: int = CHUNK_TOKENS,
                   idle_chunk: int | None = None, interventions: Sequence[Intervention] = (),
                   capture: Capture | None = None, last_logits: bool = False, grad: bool = False,
                   stop_after: int | None = None) -> Chunks:
    """One forward of `ids` [B, T] split into chunks over a KV cache, each chunk its own `intervene` under its own
    model call through `lock` (None: no lock): chunks of `chunk` positions while an answer streams, else of
    `idle_chunk` (default: `chunk` always). `capture` (a Capture spec) is bound in every chunk; `grad` keeps the
    autograd graph (for a backward after, in a slot of its own); `stop_after` runs only the layers up to that one
    (no logits; the rest of each chunk's forward is skipped)."""
    _check_chunk(chunk)
    if idle_chunk is not None:
        _check_chunk(idle_chunk)
    ids = torch.as_tensor(ids)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    B, T = ids.shape
    ids = ids.to(subject.device)
    cache = new_cache(subject)
    cache_kw, keep = call_args(subject)
    extra: dict[str, Any] = {"logits_to_keep": 1} if (last_logits and keep) else {}
    ivs = list(interventions)
    if stop_after is not None:
        ivs.append(ResidualFunction(layers=[subject.check_layer(stop_after)], site="resid.post", fn=_stop))
    if capture is not None:
        ivs.append(capture)
    caps: list[BoundCapture] = []
    logits: list[torch.Tensor] = []
    if lock is not None and B == 1 and not grad and stop_after is None and plain_cache(cache):
        # one model call per chunk through FairLock.run: beside other sessions' steps, or (one slot) packed with them
        a = 0
        with lock.client():
            while a < T:
                c = lock.chunk_size(chunk, idle_chunk)
                end = a + c >= T
                st = lock.run(subject, Step(cache, ids[0, a:a + c], list(interventions), prompt_len=T,
                                            capture=capture, logits=("last" if end else "none") if last_logits
                                            else "all"))
                if st.captured is not None:
                    caps.append(st.captured)
                if st.out is not None:
                    logits.append(st.out)
                a += c
        lg = None if not logits else logits[0] if len(logits) == 1 else torch.cat(logits, dim=0)
        return Chunks(logits=lg, captures=caps, cache=cache)
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


def attribute_chunked(subject: Subject, ids: torch.Tensor, target_position: int, target_token: int | None = None,
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
    if not plain_cache(new_cache(subject)):
        return _attribute_one_graph(subject, ids, target_position, target_token, top, lock=lock, chunk=chunk,
                                    idle_chunk=idle_chunk, interventions=interventions)
    prefix = ids[:, :target_position].to(subject.device)
    Tp = int(prefix.shape[1])
    # the backward chunks: not under GRAD_LEAST_TOKENS (each chunk's backward has a cost of its own, O(T))
    size = chunk if lock is None else lock.chunk_size(chunk, idle_chunk, least=GRAD_LEAST_TOKENS)
    starts = list(range(0, Tp, size))
    kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    if starts[-1] > 0:  # pass 1: keys and values of every position before the last chunk
        first = forward_chunks(subject, prefix[:, :starts[-1]], lock=lock, chunk=chunk, idle_chunk=idle_chunk,
                               interventions=interventions, last_logits=True)
        kv = [(layer.keys.detach(), layer.values.detach()) for layer in first.cache.layers]
    back = _Backward(subject, prefix, kv, lock, interventions, target_token)
    for a in reversed(starts):
        back.chunk(a, min(a + size, Tp))
    return back.result(target_position, top)


def _target_probability(logits: torch.Tensor, target_token: int | None) -> tuple[torch.Tensor, int]:
    """p(target) from one position's logits (in at least fp32), and the target (the argmax when None)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = torch.softmax(logits, dim=-1)
    if target_token is None:
        target_token = int(probs.argmax())
    return probs[int(target_token)], int(target_token)


class _Backward:
    """The second pass of `attribute_chunked`: chunks run again from the last to the first, each with its past
    keys/values as leaves; each chunk's backward takes p (last chunk) or the gradient the later chunks sent to its
    own keys/values, and adds the gradient of its past keys/values to what the earlier chunks will send."""

    def __init__(self, subject: Subject, prefix: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]],
                 lock: FairLock | None, interventions: Sequence[Intervention], target_token: int | None) -> None:
        self.subject, self.prefix, self.kv, self.lock = subject, prefix, kv, lock
        self.interventions, self.target_token = list(interventions), target_token
        self.Tp = int(prefix.shape[1])
        self.gk = [torch.zeros_like(k) for k, _ in kv]
        self.gv = [torch.zeros_like(v) for _, v in kv]
        self.acts: dict[int, list[torch.Tensor]] = {}
        self.grads: dict[int, list[torch.Tensor]] = {}
        self.layers: list[int] = []
        self.p_value = 0.0

    def _past(self, a: int) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor]]]:
        """A cache holding positions 0..a-1 as leaves that require grad (and the leaves, per layer)."""
        cache = new_cache(self.subject)
        past: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.enable_grad():
            for l, (K, V) in enumerate(self.kv if a else []):
                pk = K[..., :a, :].clone().requires_grad_(True)
                pv = V[..., :a, :].clone().requires_grad_(True)
                cache.update(pk, pv, l)
                past.append((pk, pv))
        return cache, past

    def _outputs(self, step: Step, cache: Any, a: int, b: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """What this chunk's backward starts from: p for the last chunk, else the gradients sent to its own
        keys/values by the later chunks."""
        if b == self.Tp:
            assert step.out is not None
            p, self.target_token = _target_probability(step.out[-1], self.target_token)
            self.p_value = float(p.detach())
            return [p], [torch.ones_like(p)]
        outputs: list[torch.Tensor] = []
        grad_out: list[torch.Tensor] = []
        for l, layer in enumerate(cache.layers):
            for full, g in ((layer.keys, self.gk[l]), (layer.values, self.gv[l])):
                if not full.requires_grad:  # e.g. layer 0 of the first chunk: no probe before it
                    continue
                send = torch.zeros_like(full)
                send[..., a:b, :] = g[..., a:b, :]
                outputs.append(full)
                grad_out.append(send)
        return outputs, grad_out

    def chunk(self, a: int, b: int) -> None:
        """Positions a..b-1: forward (through the lock, maybe packed with other sessions' steps), then backward."""
        cache, past = self._past(a)
        step = Step(cache, self.prefix[0, a:b], list(self.interventions), prompt_len=self.Tp,
                    capture=Capture(grad=True), logits="last" if b == self.Tp else "none", grad=True)
        if self.lock is None:
            run_one(self.subject, step)
        else:  # may share its forward with other sessions' steps
            self.lock.run(self.subject, step)
        cap = step.captured
        assert isinstance(cap, BoundCapture)
        self.layers = cap.layers
        # a slot of its own (it is compute like a forward), apart from the forward's: a backward runs no forward
        # hook, so the forward's slot is free for other sessions' steps meanwhile
        with self.lock if self.lock is not None else nullcontext(), torch.enable_grad():
            outputs, grad_out = self._outputs(step, cache, a, b)
            leaves = cap.leaves()
            inputs = leaves + [t for pair in past for t in pair]
            got = torch.autograd.grad(outputs, inputs, grad_out, allow_unused=True)
        for j, l in enumerate(self.layers):
            g = got[j]
            self.acts.setdefault(l, []).insert(0, cap.get("neurons", l)[0])
            self.grads.setdefault(l, []).insert(0, torch.zeros_like(leaves[j][0]) if g is None else g[0])
        for l in range(len(past)):
            for acc, g in ((self.gk[l], got[len(leaves) + 2 * l]), (self.gv[l], got[len(leaves) + 2 * l + 1])):
                if g is not None:
                    acc[..., :a, :] += g

    def result(self, target_position: int, top: int) -> Attribution:
        act_t = torch.stack([torch.cat(self.acts[l], dim=0) for l in self.layers])               # [L, T', N]
        grad_t = torch.stack([torch.cat(self.grads[l], dim=0) for l in self.layers]).to(act_t.dtype)
        assert self.target_token is not None  # set by the last chunk
        return top_scores(act_t, grad_t, self.layers, target_position, int(self.target_token), self.p_value, top)


def _attribute_one_graph(subject: Subject, ids: torch.Tensor, target_position: int, target_token: int | None,
                         top: int, *, lock: FairLock | None, chunk: int, idle_chunk: int | None,
                         interventions: Sequence[Intervention]) -> Attribution:
    """The attribution with its forward in chunks that keep their graphs for one backward (memory and time grow with
    T^2 / chunk: each chunk keeps a copy of the earlier keys/values); for caches with sliding-window layers."""
    run = forward_chunks(subject, ids[:, :target_position], lock=lock, chunk=chunk, idle_chunk=idle_chunk,
                         interventions=interventions, capture=Capture(grad=True), last_logits=True, grad=True)
    assert run.logits is not None
    with lock if lock is not None else nullcontext(), torch.enable_grad():  # a slot apart from the forward's
        p, target_token = _target_probability(run.logits[-1], target_token)
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
