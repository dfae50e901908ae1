"""One forward for several sequences' steps, so that the Monitor's sessions share the model's weight pass.

A decoding step reads all the weights for one token: SmolLM2-135M reads its ~0.5 GB once per forward (~55 ms with one
thread on this 2-core machine), and a forward of a few tokens costs far less than that many steps (2 tokens ~1.2x,
8 tokens ~2.3x one token's). `run_packed` runs the steps of several sequences (sessions' decoding steps; with one
model slot also another's chunk of a view or of a prefill), each over its own KV cache and with its own
interventions, as one forward of one row:
- their new tokens side by side, at their own absolute positions (position ids);
- a 4D mask lets each token see only its own sequence's past and, causally, its own step's earlier tokens;
- the keys and values the attention sees are the pasts of all steps then the new ones (`_PackedCache`, one
  concatenation per layer), and each sequence's own cache gets only its own new keys and values after the forward;
- each step's interventions are bound to its own columns (`intervene(segment=...)`), so a steering of one session
  never touches another's tokens, and a capture records its own columns only.
Results equal the separate forwards within float rounding (tests/test_packing.py). A pack runs only on models whose
cache is plain full attention (every layer a `DynamicLayer`) and on which `packs(subject)` confirmed once, on the model
itself, that a packed forward gives the separate forwards' logits; otherwise, and for a pack whose forward fails,
the steps run one after another (each then gets its own result or its own error).
"""
from __future__ import annotations

import weakref
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from transformers import DynamicCache

from ..interventions import Bound, BoundCapture, Capture, Intervention, intervene
from ..subject import call_args

if TYPE_CHECKING:
    from ..subject import Subject

_PACKS: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def new_cache(subject: Subject) -> Any:
    """An empty KV cache of the subject's kind (its config's layer types where the cache takes a config)."""
    try:
        return DynamicCache(config=subject.config)
    except (TypeError, ValueError, AttributeError):
        return DynamicCache()


def plain_cache(cache: Any) -> bool:
    """Whether every layer of `cache` is plain full attention (a DynamicLayer: no sliding window, no quantisation;
    a cache built without a config has no layers yet and makes DynamicLayers as it goes)."""
    from transformers.cache_utils import DynamicLayer
    layers = getattr(cache, "layers", None)
    return layers is not None and all(type(layer) is DynamicLayer for layer in layers)


@dataclass(eq=False)
class Step:
    """One forward call of one sequence: new tokens `ids` [n] after what `cache` holds, with `interventions` (bound
    with `prompt_len`); `capture` is bound too and its bound object lands in `captured`; `logits` "last" keeps the
    last position's logits ([1, vocab] in `out`), "all" every position's ([n, vocab]), "none" none. `grad` keeps the
    autograd graph (for a backward after; the new keys and values in `cache` then keep it too)."""
    cache: Any
    ids: torch.Tensor
    interventions: Sequence[Intervention] = ()
    prompt_len: int = 0
    capture: Capture | None = None
    logits: str = "last"
    grad: bool = False
    out: torch.Tensor | None = field(default=None, init=False)
    captured: BoundCapture | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.ids = torch.as_tensor(self.ids, dtype=torch.long).reshape(-1)
        if self.logits not in ("last", "all", "none"):
            raise ValueError(f"logits must be last, all or none, got {self.logits!r}")

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())

    def _ivs(self) -> list[Intervention]:
        return list(self.interventions) + ([self.capture] if self.capture is not None else [])

    def _take_capture(self, bound: list[Bound]) -> None:
        if self.capture is not None:
            cap = bound[-1]
            assert isinstance(cap, BoundCapture)
            self.captured = cap


def run_one(subject: Subject, step: Step) -> Step:
    """`step` as a forward of its own (exactly what an unpacked call computes)."""
    cache_kw, keep = call_args(subject)
    extra: dict[str, Any] = {"logits_to_keep": 1} if (keep and step.logits != "all") else {}
    with intervene(subject, *step._ivs(), prompt_len=step.prompt_len) as bound, torch.set_grad_enabled(step.grad):
        out = subject.model(input_ids=step.ids.to(subject.device)[None], use_cache=True, **{cache_kw: step.cache},
                            **extra)
    step._take_capture(bound)
    step.out = None if step.logits == "none" else (out.logits[0, -1:] if step.logits == "last" else out.logits[0])
    return step


class _PackedCache(DynamicCache):
    """What the attention of a packed forward sees: per layer, the pasts of all steps then the new keys and values
    (kept in `new` for the steps' own caches). A DynamicCache so that model code treats it as one."""

    def __init__(self, pasts: list[Any]) -> None:
        super().__init__()
        self.pasts = [p for p in pasts if _length(p)]
        self.total = sum(_length(p) for p in self.pasts)
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.new[layer_idx] = (key_states, value_states)
        ks = [p.layers[layer_idx].keys for p in self.pasts]
        vs = [p.layers[layer_idx].values for p in self.pasts]
        return torch.cat(ks + [key_states], dim=-2), torch.cat(vs + [value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.total


def _length(cache: Any) -> int:
    return int(cache.get_seq_length())


def run_packed(subject: Subject, steps: Sequence[Step]) -> None:
    """Run `steps` (each over its own cache) as one forward; fills each step's `out` and `captured` and appends its
    keys and values to its cache. Raises what the forward raised (the caches are then unchanged)."""
    if len(steps) == 1:
        run_one(subject, steps[0])
        return
    dev = subject.device
    pasts = [_length(s.cache) for s in steps]
    lens = [s.tokens for s in steps]
    Q, P = sum(lens), sum(pasts)
    ids = torch.cat([s.ids for s in steps]).to(dev)[None]
    pos = torch.cat([torch.arange(p, p + n) for p, n in zip(pasts, lens)]).to(dev)[None]
    dtype = next(subject.model.parameters()).dtype
    mask = torch.full((Q, P + Q), torch.finfo(dtype).min, dtype=dtype)
    keep: list[int] = []
    spans: list[tuple[int, int]] = []
    q = o = 0
    for s, p, n in zip(steps, pasts, lens):
        mask[q:q + n, o:o + p] = 0
        mask[q:q + n, P + q:P + q + n] = torch.triu(torch.full((n, n), torch.finfo(dtype).min, dtype=dtype), 1)
        spans.append((q, q + n))
        keep.extend([q + n - 1] if s.logits == "last" else range(q, q + n) if s.logits == "all" else [])
        q, o = q + n, o + p
    packed = _PackedCache([s.cache for s in steps])
    cache_kw, has_keep = call_args(subject)
    extra: dict[str, Any] = {"logits_to_keep": torch.tensor(keep or [Q - 1], device=dev)} if has_keep else {}
    with ExitStack() as stack, torch.set_grad_enabled(any(s.grad for s in steps)):
        bounds = [stack.enter_context(intervene(subject, *s._ivs(), prompt_len=s.prompt_len, segment=(a, b, p)))
                  for s, (a, b), p in zip(steps, spans, pasts)]
        out = subject.model(input_ids=ids, position_ids=pos, attention_mask=mask.to(dev)[None, None],
                            use_cache=True, **{cache_kw: packed}, **extra)
    logits = out.logits[0]
    at = {col: j for j, col in enumerate(keep)} if has_keep else None
    for s, (a, b), bound in zip(steps, spans, bounds):
        for layer, (k, v) in sorted(packed.new.items()):
            k, v = k[..., a:b, :], v[..., a:b, :]
            s.cache.update(k if s.grad else k.detach(), v if s.grad else v.detach(), layer)
        s._take_capture(bound)
        if s.logits == "none":
            s.out = None
        else:
            cols = [b - 1] if s.logits == "last" else list(range(a, b))
            s.out = logits[[at[c] for c in cols]] if at is not None else logits[cols]
            if not s.grad:
                s.out = s.out.detach()


def packs(subject: Subject) -> bool:
    """Whether `subject` can run packed steps: its cache is plain full attention, and a packed forward of three
    sequences (two over a past of their own, one new) gives each its separate forward's logits (checked once)."""
    got = _PACKS.get(subject.model)
    if got is not None:
        return got
    ok = False
    if plain_cache(new_cache(subject)):
        try:
            ok = _self_check(subject)
        except Exception:  # a model whose forward does not take a 4D mask or position ids: run steps one by one
            ok = False
    _PACKS[subject.model] = ok
    return ok


def _self_check(subject: Subject) -> bool:
    vocab = subject.vocab_size
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, vocab, (n,), generator=g) for n in (7, 5, 3)]
    news = [torch.randint(0, vocab, (n,), generator=g) for n in (1, 4, 3)]

    def steps() -> list[Step]:  # two sequences over a past of their own, then a new one
        made = []
        for i, (s, n) in enumerate(zip(seqs, news)):
            c = new_cache(subject)
            if i < 2:
                run_one(subject, Step(c, s, prompt_len=s.numel(), logits="none"))
            made.append(Step(c, n, prompt_len=s.numel(), logits="all"))
        return made
    solo = [run_one(subject, st).out for st in steps()]
    packed = steps()
    run_packed(subject, packed)
    for st, ref in zip(packed, solo):
        assert st.out is not None and ref is not None
        scale = float(ref.abs().max()) + 1e-6
        if not bool(torch.isfinite(st.out).all()) or float((st.out - ref).abs().max()) > 1e-3 * scale:
            return False
    return True
