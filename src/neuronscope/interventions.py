"""The intervention core: capture, clamp, scale, ablate and residual additions, as composable hooks.

Everything in neuronscope that reads or changes a model's internals goes through `intervene`:

    with intervene(subject, Capture(layers=[3]), Clamp(layer=5, neurons=[17], value=4.0, positions="generated")) as run:
        subject.generate_ids(ids, max_new_tokens=20)
    run[0].activations  # [layers, batch, positions, neurons]

An intervention (`Capture`, `Clamp`, ...) is an immutable spec (a frozen dataclass): `intervene` binds each one to
the subject (`spec.bind(subject)` validates it and returns a separate bound object holding the checked values,
caches and results) and yields the bound objects. One spec can therefore be used with two subjects, or from two
threads at once. (For convenience `capture_spec.activations` etc. read the last binding made in the current thread.)

Sites (see DESIGN.md section 2):
- "neurons": the MLP neuron activations, i.e. the input of the down projection, [B, T, n_neurons];
- "resid.mid": the residual stream after the attention add, before the MLP (sequential blocks only);
- "resid.post": the residual stream after the whole block.

Rows: every intervention takes `rows=[...]` (batch rows it applies to; default all), so one batched forward or
`generate` can carry a different intervention per row (a dose sweep, concurrent sessions); row r of the batch then
behaves exactly as a separate run of row r with only its own interventions.

One hook per (layer, site) runs all active edits in order, then all captures, so a capture records what the model
actually used. Positions are absolute token positions (columns of the input), tracked across `generate`'s KV-cache
calls; "prompt" means the positions of the first call (the prefill), "generated" every later one. Note that the
first generated token is predicted from the prefill's last position, so an edit on "generated" positions first
changes the second generated token. A prefill split into chunks over a KV cache (each chunk its own `intervene`, as
the Monitor does to share the model between sessions) passes `intervene(..., prompt_len=N)`: every call then knows
that positions 0..N-1 are the prompt, whatever chunk it runs; its absolute start is the cache's length as always.
Segments: several sequences packed into one forward (the Monitor's sessions sharing one batched step; see
server/packing.py) each open their own `intervene(..., segment=(a, b, start))`: that context's hooks see and edit
only columns a..b-1 of the packed input, whose first column is the sequence's absolute position `start`.
Hooks are always removed when the context ends, also on an exception; no weight is ever changed. Threads: a context
acts only on the forwards that the thread which opened it runs (its hooks pass other threads' forwards through
untouched), so several threads can run the same model at once, each with its own interventions (the Monitor runs one
model call per core this way).
"""
from __future__ import annotations

import math
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Protocol, Sequence, Union

import torch

from .arch import ArchSpec
from .errors import NeuronscopeError

SITES = ("neurons", "resid.mid", "resid.post")
PositionSpec = Union[str, int, slice, range, Sequence[int], None]
RowSpec = Union[int, Sequence[int], None]


class SubjectLike(Protocol):
    """What the intervention core needs of a model under study (`neuronscope.Subject` is one). Declared here, so
    the core sits below subject.py (which imports it for `Subject.generate(..., interventions=...)`) and imports
    nothing above itself."""
    model: torch.nn.Module
    spec: ArchSpec

    @property
    def family(self) -> str: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def has_mid_site(self) -> bool: ...
    def check_layer(self, layer: int) -> int: ...
    def check_neurons(self, neurons: Sequence[int]) -> list[int]: ...
    def parse_layers(self, text: str | Sequence[int] | None) -> list[int]: ...


# ---------------------------------------------------------------------------------------------------------------
# positions and rows
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class StepContext:
    """What a hook knows about the current forward call."""
    start: int = 0            # absolute position of the first token in this call
    length: int = 0           # tokens in this call
    prompt_len: int = 0       # tokens in the prefill of the current sequence
    grad: bool = False

    @property
    def is_prefill(self) -> bool:
        return self.start == 0

    def positions(self, device: torch.device | str) -> torch.Tensor:
        return torch.arange(self.start, self.start + self.length, device=device)


def check_positions(positions: PositionSpec) -> PositionSpec:
    """Validate a position spec: 'all', 'prompt', 'generated', an int, a slice/range or a list of ints >= 0."""
    if positions is None or positions in ("all", "prompt", "generated"):
        return positions
    if isinstance(positions, str):
        raise NeuronscopeError(f"Unknown positions '{positions}'; use all, prompt, generated, or token indices.")
    if isinstance(positions, bool):
        raise NeuronscopeError("Positions must be 'all', 'prompt', 'generated' or token indices.")
    if isinstance(positions, int):
        positions = [positions]
    if isinstance(positions, slice):
        if positions.step not in (None, 1) or (positions.start or 0) < 0 or \
                (positions.stop is not None and positions.stop < 0):
            raise NeuronscopeError("Position slices must be non-negative with step 1.")
        return positions
    pos = list(positions)
    if any((not isinstance(p, int)) or isinstance(p, bool) or p < 0 for p in pos):
        raise NeuronscopeError(f"Token positions must be integers >= 0, got {pos[:5]}.")
    return sorted(set(pos))


def position_mask(spec: PositionSpec, ctx: StepContext, device: torch.device | str) -> torch.Tensor | None:
    """Bool mask [T] of the current call's positions selected by `spec`; None means all of them."""
    if spec is None or spec == "all":
        return None
    start, end = ctx.start, ctx.start + ctx.length
    lo: int
    hi: int | None
    if spec == "prompt":
        lo, hi = 0, ctx.prompt_len
    elif spec == "generated":
        lo, hi = ctx.prompt_len, None
    elif isinstance(spec, slice):
        lo, hi = spec.start or 0, spec.stop
    elif isinstance(spec, str) or isinstance(spec, int):  # not reached after check_positions
        raise NeuronscopeError(f"Unchecked positions {spec!r}.")
    else:
        pos = torch.as_tensor([p for p in spec if start <= p < end], dtype=torch.long)
        mask = torch.zeros(ctx.length, dtype=torch.bool)
        mask[pos - start] = True
        return mask.to(device)
    hi = end if hi is None else hi
    if lo <= start and hi >= end:
        return None
    mask = torch.zeros(ctx.length, dtype=torch.bool)
    a, b = max(lo, start) - start, min(hi, end) - start
    if b > a:
        mask[a:b] = True
    return mask.to(device)


def check_rows(rows: RowSpec) -> tuple[int, ...] | None:
    """Validate a row spec: None (all rows of the batch), a row index or a list of them (ints >= 0)."""
    if rows is None:
        return None
    if isinstance(rows, bool) or isinstance(rows, str):
        raise NeuronscopeError(f"Rows must be batch row indices (integers >= 0), got {rows!r}.")
    items = [rows] if isinstance(rows, int) else list(rows)
    if not items or any((not isinstance(r, int)) or isinstance(r, bool) or r < 0 for r in items):
        raise NeuronscopeError(f"Rows must be a non-empty list of batch row indices (integers >= 0), got {rows!r}.")
    return tuple(sorted(set(items)))


class _RowIndex:
    """The rows an edit applies to, as an index tensor per device; checked against each call's batch size."""

    def __init__(self, rows: tuple[int, ...] | None):
        self.rows = rows
        self._idx: dict[torch.device, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.rows is None:
            return None
        if self.rows[-1] >= x.shape[0]:
            raise NeuronscopeError(f"An intervention is limited to batch rows {list(self.rows)}, but the batch has "
                                   f"{x.shape[0]} row(s).")
        if len(self.rows) == x.shape[0]:
            return None
        idx = self._idx.get(x.device)
        if idx is None:
            idx = self._idx[x.device] = torch.as_tensor(self.rows, dtype=torch.long, device=x.device)
        return idx


def _finite(value: Any, what: str) -> None:
    if torch.is_tensor(value):
        if not torch.isfinite(value).all():
            raise NeuronscopeError(f"The {what} contains NaN or infinite values.")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(float(value)):
            raise NeuronscopeError(f"The {what} must be a finite number, got {value}.")
    else:
        raise NeuronscopeError(f"The {what} must be a number, got {value!r}.")


def _edit_in_place_ok(x: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and x.requires_grad)


# ---------------------------------------------------------------------------------------------------------------
# specs and their bindings
# ---------------------------------------------------------------------------------------------------------------
Hook = Callable[[torch.Tensor, StepContext], Union[torch.Tensor, None]]


class Bound:
    """One intervention bound to one subject: checked values, caches, and (for captures) results.

    `edits()` yields (layer, site, fn); fn(x, ctx) returns a new tensor (an edit) or None (a read).
    `captures_only` bindings run after all edits at the same hook.
    """
    captures_only: bool = False
    spec: Intervention

    def edits(self) -> Iterator[tuple[int, str, Hook]]:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget what was recorded (captures), keeping the hooks; for loops inside one open context."""


@dataclass(frozen=True, eq=False)
class Intervention:
    """Base class of the immutable intervention specs. `bind(subject)` checks one against a model and returns its
    `Bound` object; the spec itself never changes."""
    captures_only: ClassVar[bool] = False

    def bind(self, subject: SubjectLike) -> Bound:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class NeuronEdit(Intervention):
    """Base of edits of MLP neurons of one layer: `neurons` at `positions`, in `rows` of the batch (default all)."""
    layer: int
    neurons: Sequence[int] | int
    positions: PositionSpec = "all"
    rows: RowSpec = field(default=None, kw_only=True)

    def _values(self, subject: SubjectLike, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function giving the new values of the selected activations [B', T', n]."""
        raise NotImplementedError

    def bind(self, subject: SubjectLike) -> BoundNeuronEdit:
        return BoundNeuronEdit(self, subject)


class BoundNeuronEdit(Bound):
    def __init__(self, spec: NeuronEdit, subject: SubjectLike):
        self.spec = spec
        self.layer = subject.check_layer(spec.layer)
        neurons = [spec.neurons] if isinstance(spec.neurons, int) else list(spec.neurons)
        self.neurons = subject.check_neurons(neurons)
        if not self.neurons:
            raise NeuronscopeError("No neurons given to edit.")
        self.positions = check_positions(spec.positions)
        self.rows = _RowIndex(check_rows(spec.rows))
        self.apply = spec._values(subject, len(self.neurons))
        self._idx: dict[torch.device, torch.Tensor] = {}

    def _index(self, device: torch.device) -> torch.Tensor:
        idx = self._idx.get(device)
        if idx is None:
            idx = self._idx[device] = torch.as_tensor(self.neurons, dtype=torch.long, device=device)
        return idx

    def _edit(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Edit x [B, T, N] in place (x must be free to change) and return it."""
        idx = self._index(x.device)
        if mask is None:
            x[..., idx] = self.apply(x[..., idx])
        else:
            t = mask.nonzero().squeeze(1)
            sub = x[:, t][..., idx]
            x[:, t.unsqueeze(1), idx.unsqueeze(0)] = self.apply(sub)
        return x

    def edits(self) -> Iterator[tuple[int, str, Hook]]:
        def fn(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
            mask = position_mask(self.positions, ctx, x.device)
            if mask is not None and not bool(mask.any()):
                return x
            rows = self.rows(x)
            if not _edit_in_place_ok(x):
                x = x.clone()
            if rows is None:
                return self._edit(x, mask)
            x[rows] = self._edit(x[rows], mask)  # x[rows] is a copy: edit it, then put it back
            return x
        yield self.layer, "neurons", fn


@dataclass(frozen=True, eq=False)
class Clamp(NeuronEdit):
    """Set neurons to `value` (a number, or one number per neuron) at the chosen positions."""
    value: float | Sequence[float] | torch.Tensor = 0.0

    def _values(self, subject: SubjectLike, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
        v = torch.as_tensor(self.value, dtype=torch.float32)
        _finite(v, "clamp value")
        if v.ndim > 1 or (v.ndim == 1 and v.numel() not in (1, n)):
            raise NeuronscopeError(f"Give one clamp value or one per neuron ({n}), got {v.numel()}.")
        cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

        def apply(sel: torch.Tensor) -> torch.Tensor:
            key = (sel.device, sel.dtype)
            dev = cache.get(key)
            if dev is None:  # converted once, not on every decoded token
                dev = cache[key] = v.to(sel.device, sel.dtype)
            return dev.expand_as(sel)
        return apply


@dataclass(frozen=True, eq=False)
class Scale(NeuronEdit):
    """Multiply neurons by `factor` at the chosen positions."""
    factor: float = 1.0

    def _values(self, subject: SubjectLike, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
        _finite(self.factor, "scale factor")
        factor = float(self.factor)
        return lambda sel: sel * factor


@dataclass(frozen=True, eq=False)
class Ablate(NeuronEdit):
    """Zero-ablate neurons at the chosen positions."""

    def _values(self, subject: SubjectLike, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return torch.zeros_like


def _residual_site(subject: SubjectLike, site: str) -> str:
    if site not in ("resid.post", "resid.mid"):
        raise NeuronscopeError(f"Unknown residual site '{site}'; use resid.post or resid.mid.")
    if site == "resid.mid" and not subject.has_mid_site:
        raise NeuronscopeError(f"The {subject.family} model has parallel attention/MLP blocks: no resid.mid site.")
    return site


@dataclass(frozen=True, eq=False)
class AddToResidual(Intervention):
    """Add `vector` into the residual stream at `layers` and `site` ("resid.post" or "resid.mid").

    vector: [hidden] (broadcast over positions), or [T, hidden] whose row t is added at absolute position t
    (positions past its end get nothing). `positions` restricts where it is added; `scale` multiplies it; `rows`
    restricts it to some rows of the batch.
    """
    layers: Sequence[int] | int
    vector: torch.Tensor
    site: str = "resid.post"
    positions: PositionSpec = "all"
    scale: float = 1.0
    rows: RowSpec = field(default=None, kw_only=True)

    def bind(self, subject: SubjectLike) -> BoundAddToResidual:
        return BoundAddToResidual(self, subject)


class BoundAddToResidual(Bound):
    def __init__(self, spec: AddToResidual, subject: SubjectLike):
        self.spec = spec
        layers = [spec.layers] if isinstance(spec.layers, int) else list(spec.layers)
        self.layers = [subject.check_layer(int(l)) for l in layers]
        self.site = _residual_site(subject, spec.site)
        v = torch.as_tensor(spec.vector).detach().float()
        if v.ndim not in (1, 2) or v.shape[-1] != subject.hidden_size:
            raise NeuronscopeError(
                f"The residual vector must have shape [{subject.hidden_size}] or [positions, {subject.hidden_size}], "
                f"got {list(v.shape)}.")
        _finite(v, "residual vector")
        _finite(spec.scale, "vector scale")
        self.positions = check_positions(spec.positions)
        self.rows = _RowIndex(check_rows(spec.rows))
        self._v = v * float(spec.scale)
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def edits(self) -> Iterator[tuple[int, str, Hook]]:
        def fn(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
            key = (x.device, x.dtype)
            v = self._cache.get(key)
            if v is None:
                v = self._cache[key] = self._v.to(x.device, x.dtype)
            if v.ndim == 2:
                per_pos = torch.zeros(ctx.length, v.shape[1], device=x.device, dtype=x.dtype)
                a, b = ctx.start, min(ctx.start + ctx.length, v.shape[0])
                if b > a:
                    per_pos[: b - a] = v[a:b]
                v = per_pos
            mask = position_mask(self.positions, ctx, x.device)
            if mask is not None:
                v = v * mask.to(x.dtype).unsqueeze(-1) if v.ndim == 2 else mask.to(x.dtype).unsqueeze(-1) * v
            rows = self.rows(x)
            if rows is None:
                return x + v
            out = x.clone()
            out[rows] = x[rows] + v
            return out
        for layer in self.layers:
            yield layer, self.site, fn


# convenience: the last binding of each Capture spec made in this thread (weak keys: a spec dropped is forgotten)
_last_binding = threading.local()


def _remember(spec: Capture, bound: BoundCapture) -> None:
    table: weakref.WeakKeyDictionary[Capture, BoundCapture] | None = getattr(_last_binding, "table", None)
    if table is None:
        table = _last_binding.table = weakref.WeakKeyDictionary()
    table[spec] = bound


@dataclass(frozen=True, eq=False)
class Capture(Intervention):
    """Record MLP neuron activations and/or residual streams, per forward call, concatenated over positions.

    layers: which layers (None: all). sites: any of "neurons", "resid.mid", "resid.post".
    neurons: restrict the neuron capture to these ids (None: all). to_cpu: move each chunk to the CPU as it comes.
    dtype: store the captured values in this dtype. rows: capture only these batch rows.
    grad: add a zero probe that requires grad to the activations, so that one backward gives the total derivative
    of any output with respect to every captured activation (`.grads()`; attribution). `neurons`, `rows`, `dtype`
    and `to_cpu` apply to `.grads()` and the stored activations alike; the probes (`.leaves()`) are full width.
    The results live on the bound object that `intervene` yields; on the spec, `.activations`, `.get()`,
    `.grads()`... read the last binding made in the current thread.
    """
    layers: Sequence[int] | int | str | None = None
    sites: Sequence[str] = ("neurons",)
    neurons: Sequence[int] | None = None
    to_cpu: bool = False
    dtype: torch.dtype | None = None
    grad: bool = False
    rows: RowSpec = field(default=None, kw_only=True)

    def bind(self, subject: SubjectLike) -> BoundCapture:
        bound = BoundCapture(self, subject)
        _remember(self, bound)
        return bound

    # ---- the last binding in this thread ---------------------------------------------------------------------
    def _bound(self) -> BoundCapture:
        table: weakref.WeakKeyDictionary[Capture, BoundCapture] | None = getattr(_last_binding, "table", None)
        bound = table.get(self) if table is not None else None
        if bound is None:
            raise NeuronscopeError("This Capture has not been run in this thread; read the results from the object "
                                   "`intervene` yields (with intervene(subject, cap) as (bound,): ...).")
        return bound

    def get(self, site: str = "neurons", layer: int | None = None) -> torch.Tensor:
        return self._bound().get(site, layer)

    @property
    def activations(self) -> torch.Tensor:
        return self._bound().activations

    def resid(self, site: str = "resid.post") -> torch.Tensor:
        return self._bound().get(site)

    def leaves(self, site: str = "neurons") -> list[torch.Tensor]:
        return self._bound().leaves(site)

    def grads(self, site: str = "neurons") -> torch.Tensor:
        return self._bound().grads(site)

    def reset(self) -> None:
        self._bound().reset()


class BoundCapture(Bound):
    """A Capture bound to one subject: its layers, and what it recorded."""

    def __init__(self, spec: Capture, subject: SubjectLike):
        # the spec by weak reference: the per-thread table maps spec -> this object with weak keys, so a strong
        # reference back would keep every spec (and its recorded activations) alive for the thread's life
        self._spec = weakref.ref(spec)
        self.dtype, self.to_cpu = spec.dtype, bool(spec.to_cpu)
        layers = spec.layers
        self.layers: list[int] = subject.parse_layers([layers] if isinstance(layers, int) else layers)
        for s in spec.sites:
            if s not in SITES:
                raise NeuronscopeError(f"Unknown site '{s}'; sites are {', '.join(SITES)}.")
            if s == "resid.mid" and not subject.has_mid_site:
                raise NeuronscopeError(f"The {subject.family} model has parallel blocks: no resid.mid site.")
        self.sites = tuple(spec.sites)
        self.neurons = None if spec.neurons is None else subject.check_neurons(list(spec.neurons))
        if self.neurons is not None and "neurons" not in self.sites:
            raise NeuronscopeError("Capture(neurons=...) restricts the neuron site, which this capture does not "
                                   "record; add 'neurons' to its sites.")
        self.rows = _RowIndex(check_rows(spec.rows))
        self.grad = bool(spec.grad)
        self.captures_only = not self.grad
        self._nidx: dict[torch.device, torch.Tensor] = {}
        self._chunks: dict[tuple[str, int], list[torch.Tensor]] = {}
        self._probes: dict[tuple[str, int], list[torch.Tensor]] = {}

    @property
    def spec(self) -> Capture:  # type: ignore[override]
        spec = self._spec()
        if spec is None:
            raise NeuronscopeError("The Capture spec of this bound capture no longer exists.")
        return spec

    def reset(self) -> None:
        self._chunks = {}
        self._probes = {}

    def _select(self, t: torch.Tensor, site: str, rows: torch.Tensor | None) -> torch.Tensor:
        """What is kept of a [B, T, width] tensor: the chosen rows, neurons, dtype and device."""
        if rows is not None:
            t = t.index_select(0, rows.to(t.device))
        if site == "neurons" and self.neurons is not None:
            idx = self._nidx.get(t.device)
            if idx is None:
                idx = self._nidx[t.device] = torch.as_tensor(self.neurons, device=t.device)
            t = t.index_select(-1, idx)
        if self.dtype is not None:
            t = t.to(self.dtype)
        if self.to_cpu:
            t = t.to("cpu", non_blocking=True)
        return t

    def edits(self) -> Iterator[tuple[int, str, Hook]]:
        def make(site: str, layer: int) -> Hook:
            key = (site, layer)

            def fn(x: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
                out = None
                rows = self.rows(x)
                if self.grad:
                    # a zero probe that requires grad: its .grad is the TOTAL derivative d(out)/dx through every
                    # later layer (detaching x itself would cut the paths through later captured layers)
                    probe = torch.zeros_like(x, requires_grad=True)
                    self._probes.setdefault(key, []).append(probe)
                    out = x + probe
                self._chunks.setdefault(key, []).append(self._select(x.detach(), site, rows))
                return out
            return fn

        for site in self.sites:
            for layer in self.layers:
                yield layer, site, make(site, layer)

    def get(self, site: str = "neurons", layer: int | None = None) -> torch.Tensor:
        """One site: [B, T, width] for a layer, or stacked [L, B, T, width] over the captured layers."""
        if layer is not None:
            chunks = self._chunks.get((site, layer))
            if not chunks:
                raise NeuronscopeError(f"Nothing was captured at {site} of layer {layer}.")
            return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
        return torch.stack([self.get(site, l) for l in self.layers])

    @property
    def activations(self) -> torch.Tensor:
        """MLP neuron activations [layers, batch, positions, neurons]."""
        return self.get("neurons")

    def resid(self, site: str = "resid.post") -> torch.Tensor:
        return self.get(site)

    def leaves(self, site: str = "neurons") -> list[torch.Tensor]:
        """With grad=True: one zero leaf per captured chunk, layer by layer, added to the activations; after a
        backward its `.grad` is the total derivative of the output with respect to those activations."""
        return [c for l in self.layers for c in self._probes.get((site, l), [])]

    def grads(self, site: str = "neurons") -> torch.Tensor:
        """With grad=True, after a backward: d(output)/d(activation) as [layers, batch, positions, width] (the
        capture's rows and neurons, in its dtype, on the CPU with to_cpu)."""
        if not self.grad:
            raise NeuronscopeError("This capture recorded no gradients; use Capture(grad=True).")
        per_layer = []
        for l in self.layers:
            probes = self._probes.get((site, l), [])
            if not probes:
                raise NeuronscopeError(f"No gradients were captured at {site} of layer {l}.")
            g = [self._select(p.grad if p.grad is not None else torch.zeros_like(p), site, self.rows(p))
                 for p in probes]
            per_layer.append(g[0] if len(g) == 1 else torch.cat(g, dim=1))
        return torch.stack(per_layer)


@dataclass(frozen=True, eq=False)
class ResidualFunction(Intervention):
    """An edit given as a plain function of the residual stream: fn(layer, x, ctx) -> new x (or None to read).

    Used by the IRM, which reads one site and writes at several layers. With `rows`, fn sees the whole batch and
    only the chosen rows of its result are used.
    """
    layers: Sequence[int]
    site: str
    fn: Callable[[int, torch.Tensor, StepContext], Any]
    rows: RowSpec = field(default=None, kw_only=True)

    def bind(self, subject: SubjectLike) -> BoundResidualFunction:
        return BoundResidualFunction(self, subject)


class BoundResidualFunction(Bound):
    spec: ResidualFunction

    def __init__(self, spec: ResidualFunction, subject: SubjectLike):
        self.spec = spec
        self.layers = [subject.check_layer(l) for l in spec.layers]
        self.site = _residual_site(subject, spec.site)
        self.rows = _RowIndex(check_rows(spec.rows))

    def edits(self) -> Iterator[tuple[int, str, Hook]]:
        def make(layer: int) -> Hook:
            def fn(x: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
                rows = self.rows(x)
                y: torch.Tensor | None = self.spec.fn(layer, x, ctx)
                if y is None or rows is None:
                    return y
                out = x.clone()
                out[rows] = y[rows]
                return out
            return fn
        for layer in self.layers:
            yield layer, self.site, make(layer)


# ---------------------------------------------------------------------------------------------------------------
# the hook runner
# ---------------------------------------------------------------------------------------------------------------
def _cache_length(cache: Any) -> int:
    """How many positions a KV cache (a Cache object or legacy tuples) already holds; 0 for none."""
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


class _Runner:
    def __init__(self, subject: SubjectLike, interventions: Sequence[Intervention], prompt_len: int | None = None,
                 segment: tuple[int, int, int] | None = None):
        self.subject = subject
        self.interventions = list(interventions)
        self.bound: list[Bound] = []
        self.ctx = StepContext()
        self.fixed_prompt_len = prompt_len
        if prompt_len is not None:
            self.ctx.prompt_len = prompt_len
        self.segment = segment
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.fns: dict[tuple[int, str], list[Hook]] = {}
        self._edit_keys: set[tuple[int, str]] = set()
        self._mid_delta: dict[int, torch.Tensor | None] = {}

    def _collect(self) -> None:
        reads: dict[tuple[int, str], list[Hook]] = {}
        for iv in self.interventions:
            if not isinstance(iv, Intervention):
                raise NeuronscopeError(f"{iv!r} is not an intervention.")
            b = iv.bind(self.subject)
            self.bound.append(b)
            target = reads if b.captures_only else self.fns
            for layer, site, fn in b.edits():
                target.setdefault((layer, site), []).append(fn)
                if not b.captures_only:
                    self._edit_keys.add((layer, site))
        for key, fns in reads.items():
            self.fns.setdefault(key, []).extend(fns)

    def _run(self, key: tuple[int, str], x: torch.Tensor) -> torch.Tensor:
        if self.segment is not None:
            return self._run_segment(key, x)
        for fn in self.fns[key]:
            y = fn(x, self.ctx)
            if y is not None:
                x = y
        return x

    def _run_segment(self, key: tuple[int, str], x: torch.Tensor) -> torch.Tensor:
        """The hooks on this context's own columns of a packed input (a copy, so a capture keeps only them); the
        result is written back in place of those columns when an edit ran."""
        assert self.segment is not None
        a, b, _ = self.segment
        part = x[:, a:b].clone()
        y = part
        for fn in self.fns[key]:
            r = fn(y, self.ctx)
            if r is not None:
                y = r
        if y is part and key not in self._edit_keys:
            return x
        out = x.clone()  # never in place: the resid.mid hook tells an edit by a result that is not its input
        out[:, a:b] = y
        return out

    def install(self) -> None:
        """Bind the interventions and register one hook per (layer, site), plus the position tracker."""
        self._collect()
        spec, model = self.subject.spec, self.subject.model
        me = threading.get_ident()  # hooks are the module's; they act only on this thread's forwards
        self.handles.append(spec.get(model, spec.base).register_forward_pre_hook(self._tracker(me), with_kwargs=True))
        blocks = spec.decoder_layers(model)  # looked up once: install runs on every intervene()
        installers = {"neurons": self._install_neurons, "resid.post": self._install_post,
                      "resid.mid": self._install_mid}
        for (layer, site) in list(self.fns):
            installers[site](blocks[layer], layer, me)

    def _tracker(self, me: int) -> Callable[[torch.nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        """The base model's pre-hook: each call's absolute start (the KV cache's length), length and prompt."""
        def track(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if threading.get_ident() != me:
                return None
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs.get("inputs_embeds")
            self.ctx.start = _cache_length(kwargs.get("cache", kwargs.get("past_key_values")))
            past = self.ctx.start
            self.ctx.length = int(ids.shape[1]) if ids is not None else 0
            if self.segment is not None:
                a, b, self.ctx.start = self.segment
                self.ctx.length = b - a
            if past == 0 and self.fixed_prompt_len is None:
                self.ctx.prompt_len = self.ctx.length
            self.ctx.grad = torch.is_grad_enabled()
            return None
        return track

    def _install_neurons(self, block: torch.nn.Module, layer: int, me: int) -> None:
        """"neurons": a pre-hook on the down projection, whose input is the activation vector."""
        spec, key = self.subject.spec, (layer, "neurons")

        def pre(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if threading.get_ident() != me:
                return None
            return (self._run(key, args[0]),) + tuple(args[1:])
        self.handles.append(spec.get(block, spec.down).register_forward_pre_hook(pre))

    def _install_post(self, block: torch.nn.Module, layer: int, me: int) -> None:
        """"resid.post": a forward hook on the decoder layer."""
        key = (layer, "resid.post")

        def post(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if threading.get_ident() != me:
                return None
            if isinstance(output, tuple):
                return (self._run(key, output[0]),) + tuple(output[1:])
            return self._run(key, output)
        self.handles.append(block.register_forward_hook(post))

    def _install_mid(self, block: torch.nn.Module, layer: int, me: int) -> None:
        """"resid.mid": a pre-hook on the MLP's input norm edits what the MLP reads; a hook on the module whose
        output the block adds back adds the same change, so the residual stream gets it too."""
        spec, key = self.subject.spec, (layer, "resid.mid")
        assert spec.mlp_in_norm is not None and spec.mlp_out is not None  # checked by has_mid_site

        def mid_pre(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if threading.get_ident() != me:
                return None
            x = args[0]
            y = self._run(key, x)
            self._mid_delta[layer] = None if y is x else (y - x)
            return (y,) + tuple(args[1:])

        def mid_out(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if threading.get_ident() != me:
                return None
            d = self._mid_delta.pop(layer, None)
            if d is None:
                return None
            if isinstance(output, tuple):
                return (output[0] + d,) + tuple(output[1:])
            return output + d
        self.handles.append(spec.get(block, spec.mlp_in_norm).register_forward_pre_hook(mid_pre))
        self.handles.append(spec.get(block, spec.mlp_out).register_forward_hook(mid_out))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._mid_delta.clear()


@contextmanager
def intervene(subject: SubjectLike, *interventions: Intervention, prompt_len: int | None = None,
              segment: tuple[int, int, int] | None = None) -> Iterator[list[Bound]]:
    """Activate interventions on `subject` for the duration of the block; yields their bound objects, in order
    (read a capture's results from its bound object).

    `prompt_len`: the length of the sequence's prompt, for a call that continues a KV cache (a chunk of a prefill
    split over several calls, or one decoding step): "prompt" / "generated" positions then follow it instead of the
    first call's length.
    `segment` (a, b, start): the block's forward packs several sequences into one row, and these interventions
    belong to the one in columns a..b-1, whose column a is its absolute position `start` (needs `prompt_len`)."""
    if prompt_len is not None and (isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or prompt_len < 0):
        raise NeuronscopeError(f"prompt_len must be an integer >= 0, got {prompt_len!r}.")
    if segment is not None:
        if prompt_len is None or len(segment) != 3 or not all(isinstance(v, int) and v >= 0 for v in segment) \
                or segment[1] <= segment[0]:
            raise NeuronscopeError(f"A segment is (first column, end column, absolute start) with end > first and "
                                   f"a prompt_len, got {segment!r}.")
        segment = (int(segment[0]), int(segment[1]), int(segment[2]))
    runner = _Runner(subject, interventions, prompt_len, segment)
    try:
        runner.install()
        yield list(runner.bound)
    finally:
        runner.remove()


def capture(subject: SubjectLike, input_ids: torch.Tensor, *, layers: Sequence[int] | str | None = None,
            sites: Sequence[str] = ("neurons",), neurons: Sequence[int] | None = None,
            attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, BoundCapture]:
    """One forward pass with a capture: returns (logits, the bound capture holding the activations)."""
    with intervene(subject, Capture(layers=layers, sites=sites, neurons=neurons)) as bound, torch.no_grad():
        logits: torch.Tensor = subject.model(input_ids=input_ids.to(subject.device),
                                             attention_mask=attention_mask).logits
    cap = bound[0]
    assert isinstance(cap, BoundCapture)
    return logits, cap


__all__ = ["intervene", "capture", "Intervention", "Bound", "Capture", "BoundCapture", "Clamp", "Scale", "Ablate",
           "AddToResidual", "ResidualFunction", "NeuronEdit", "StepContext", "position_mask", "check_positions",
           "check_rows", "SITES"]
