"""The edits: of MLP neurons of one layer (`Clamp`, `Scale`, `Ablate`), and of the residual stream (`AddToResidual`, a
vector; `ResidualFunction`, any function of it, as the IRM injects)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import NeuronscopeError
from .base import Bound, Hook, Intervention, SubjectLike
from .positions import (PositionSpec, RowIndex, RowSpec, StepContext, check_finite, check_positions, check_rows,
                        may_edit_in_place, position_mask)


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
        self.rows = RowIndex(check_rows(spec.rows))
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
            if not may_edit_in_place(x):
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
        check_finite(v, "clamp value")
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
        check_finite(self.factor, "scale factor")
        factor = float(self.factor)
        return lambda sel: sel * factor


@dataclass(frozen=True, eq=False)
class Ablate(NeuronEdit):
    """Zero-ablate neurons at the chosen positions."""

    def _values(self, subject: SubjectLike, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return torch.zeros_like


def residual_site(subject: SubjectLike, site: str) -> str:
    """`site` when it is a residual site of this model, else one sentence."""
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
        self.site = residual_site(subject, spec.site)
        v = torch.as_tensor(spec.vector).detach().float()
        if v.ndim not in (1, 2) or v.shape[-1] != subject.hidden_size:
            raise NeuronscopeError(
                f"The residual vector must have shape [{subject.hidden_size}] or [positions, {subject.hidden_size}], "
                f"got {list(v.shape)}.")
        check_finite(v, "residual vector")
        check_finite(spec.scale, "vector scale")
        self.positions = check_positions(spec.positions)
        self.rows = RowIndex(check_rows(spec.rows))
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
        self.site = residual_site(subject, spec.site)
        self.rows = RowIndex(check_rows(spec.rows))

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
