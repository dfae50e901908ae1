"""The scheduler of every model call of the Monitor: `FairLock`, first come first served.

`slots` calls run at once (one per core the torch threads leave), each in its caller's thread, with interventions
scoped to that thread; the decoding steps that wait at the same time run as one packed forward (`packing.run_packed`:
each sequence over its own KV cache, with its own interventions), and other work never takes the last slot while an
answer streams. Measured on SmolLM2-135M on this 2-core CPU (bench/RESULTS.md): a view of 932 tokens beside a
streaming answer adds at most ~0.9 of a decoding step (55 ms) to any of its gaps. With one slot a view's chunk rides
along in the streams' packed forward instead, with as many tokens as add at most `stall_steps` decoding steps (2-3
tokens here: views then run ~4x slower while an answer streams). Models whose forward cannot pack (a sliding-window
cache, a failed self-check) run the waiting steps one after another.
"""
from __future__ import annotations

import collections
import os
import statistics
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import torch

from ..errors import NeuronscopeError
from ..subject import Subject
from .packing import Step, packs, run_one, run_packed

PACK_TOKENS = 24          # tokens of one packed forward beyond its 1-token steps (FairLock.run)
MAX_PACK = 32             # steps in one packed forward
STALL_STEPS = 1.0         # decoding steps another session's work may add to a streaming answer's step
GATHER_S = 0.003          # how long a packed forward waits for the next call of a thread in a run of calls


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
