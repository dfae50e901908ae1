"""Recording: `Capture` reads MLP neuron activations and residual streams per forward call (optionally with zero
probes whose gradients are the total derivatives, for attribution); its `BoundCapture` holds what was recorded."""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ..errors import NeuronscopeError
from .base import SITES, Bound, Hook, Intervention, SubjectLike
from .positions import RowIndex, RowSpec, StepContext, check_rows


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
        self.rows = RowIndex(check_rows(spec.rows))
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
