"""A view's forward in chunks over a KV cache, one model call per chunk through the scheduler, and the attribution
of a token computed the same way.

`forward_chunks` runs a view's forward (activations, exemplar marks, an attribution's first pass) in chunks: `chunk`
positions (32) while an answer streams, `idle_chunk` (256) otherwise. Each chunk binds the interventions anew with
`prompt_len` = the whole prompt, and its hooks see absolute positions (the cache's length is the chunk's start), so a
steering on a token range or on the generated tokens applies to the same positions as in one forward; results equal
one forward within float rounding (tests/test_server_chunks.py).
The backward of an attribution runs no hook (the intervention core installs forward hooks only, and a backward changes
no module state), so `attribute_chunked` runs it in a slot apart from its forward's, chunk by chunk from the last to the
first (each chunk's past keys and values are leaves, their gradient passed on to the earlier chunks), so its memory
stays O(T): a 928-token SmolLM2 attribution takes +2.4 GB and 23 s in 32-token chunks (+2.6 GB, 16 s in 128-token
chunks) against +3.1 GB and 12.5 s in one piece (keeping every chunk's graph for one backward took +5.2 GB and 23 s:
each chunk holds a copy of the earlier keys and values).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..attribution import Attribution, top_scores
from ..errors import NeuronscopeError
from ..interventions import BoundCapture, Capture, Intervention, ResidualFunction, intervene
from ..subject import Subject
from ..subject import call_args
from .packing import Step, new_cache, plain_cache, run_one
from .scheduler import FairLock

CHUNK_TOKENS = 32         # positions per model call while another session's answer streams
IDLE_CHUNK_TOKENS = 256   # positions per lock hold while no answer streams
GRAD_CHUNK_TOKENS = 32    # the same for an attribution's forward while an answer streams (see attribute_chunked)
GRAD_LEAST_TOKENS = 8     # the fewest positions of an attribution's backward chunk


def check_chunk(chunk: int) -> int:
    """`chunk` when it is a positive number of tokens, else one sentence."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise NeuronscopeError(f"The chunk size must be a positive number of tokens, got {chunk!r}.")
    return chunk


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
    check_chunk(chunk)
    if idle_chunk is not None:
        check_chunk(idle_chunk)
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
