"""The intervention core: capture, clamp, scale, ablate and residual additions, as composable hooks.

Everything in neuronscope that reads or changes a model's internals goes through `intervene`:

    with intervene(subject, Capture(layers=[3]), Clamp(layer=5, neurons=[17], value=4.0, positions="generated")) as run:
        subject.generate_ids(ids, max_new_tokens=20)
    run[0].activations  # [layers, batch, positions, neurons]

Sites (see DESIGN.md section 2):
- "neurons": the MLP neuron activations, i.e. the input of the down projection, [B, T, n_neurons];
- "resid.mid": the residual stream after the attention add, before the MLP (sequential blocks only);
- "resid.post": the residual stream after the whole block.

One hook per (layer, site) runs all active edits in order, then all captures, so a capture records what the model
actually used. Positions are absolute token positions (columns of the input), tracked across `generate`'s KV-cache
calls; "prompt" means the positions of the first call (the prefill), "generated" every later one. Note that the
first generated token is predicted from the prefill's last position, so an edit on "generated" positions first
changes the second generated token. Hooks are always removed when the context ends, also on an exception; no weight
is ever changed.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, Union

import torch

from .errors import NeuronscopeError

SITES = ("neurons", "resid.mid", "resid.post")
PositionSpec = Union[str, int, slice, range, Sequence[int], None]


# ---------------------------------------------------------------------------------------------------------------
# positions
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

    def positions(self, device) -> torch.Tensor:
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


def position_mask(spec: PositionSpec, ctx: StepContext, device) -> torch.Tensor | None:
    """Bool mask [T] of the current call's positions selected by `spec`; None means all of them."""
    if spec is None or spec == "all":
        return None
    start, end = ctx.start, ctx.start + ctx.length
    if spec == "prompt":
        lo, hi = 0, ctx.prompt_len
    elif spec == "generated":
        lo, hi = ctx.prompt_len, None
    elif isinstance(spec, slice):
        lo, hi = spec.start or 0, spec.stop
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


def _finite(value: Any, what: str) -> None:
    if torch.is_tensor(value):
        if not torch.isfinite(value).all():
            raise NeuronscopeError(f"The {what} contains NaN or infinite values.")
    elif isinstance(value, (int, float)):
        if not math.isfinite(float(value)):
            raise NeuronscopeError(f"The {what} must be a finite number, got {value}.")
    else:
        raise NeuronscopeError(f"The {what} must be a number, got {value!r}.")


# ---------------------------------------------------------------------------------------------------------------
# interventions
# ---------------------------------------------------------------------------------------------------------------
Hook = Callable[[torch.Tensor, StepContext], Union[torch.Tensor, None]]


class Intervention:
    """Base class: an intervention names the (layer, site) pairs it touches and a function for each.

    `edits(subject)` yields (layer, site, fn); fn(x, ctx) returns a new tensor (an edit) or None (a read).
    `captures_only` interventions run after all edits at the same hook.
    """
    captures_only = False

    def bind(self, subject) -> None:  # validate against the model; called on entering the context
        pass

    def edits(self, subject) -> Iterator[tuple[int, str, Hook]]:
        raise NotImplementedError

    def reset(self) -> None:
        pass


def _edit_in_place_ok(x: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and x.requires_grad)


@dataclass
class NeuronEdit(Intervention):
    layer: int
    neurons: Sequence[int] | int
    positions: PositionSpec = "all"

    def bind(self, subject) -> None:
        subject.check_layer(self.layer)
        if isinstance(self.neurons, int):
            self.neurons = [self.neurons]
        self.neurons = subject.check_neurons(list(self.neurons))
        if not self.neurons:
            raise NeuronscopeError("No neurons given to edit.")
        self.positions = check_positions(self.positions)
        self._idx: dict[Any, torch.Tensor] = {}

    def _index(self, device) -> torch.Tensor:
        idx = self._idx.get(device)
        if idx is None:
            idx = self._idx[device] = torch.as_tensor(self.neurons, dtype=torch.long, device=device)
        return idx

    def apply(self, sel: torch.Tensor) -> torch.Tensor:
        """New values for the selected activations [B, T', k]."""
        raise NotImplementedError

    def edits(self, subject):
        def fn(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
            idx = self._index(x.device)
            mask = position_mask(self.positions, ctx, x.device)
            if mask is not None and not bool(mask.any()):
                return x
            if not _edit_in_place_ok(x):
                x = x.clone()
            if mask is None:
                x[..., idx] = self.apply(x[..., idx])
            else:
                t = mask.nonzero().squeeze(1)
                sub = x[:, t][..., idx]
                x[:, t.unsqueeze(1), idx.unsqueeze(0)] = self.apply(sub)
            return x
        yield self.layer, "neurons", fn


@dataclass
class Clamp(NeuronEdit):
    """Set neurons to `value` (a number, or one number per neuron) at the chosen positions."""
    value: float | Sequence[float] | torch.Tensor = 0.0

    def bind(self, subject) -> None:
        super().bind(subject)
        v = torch.as_tensor(self.value, dtype=torch.float32)
        _finite(v, "clamp value")
        if v.ndim > 1 or (v.ndim == 1 and v.numel() not in (1, len(self.neurons))):
            raise NeuronscopeError(f"Give one clamp value or one per neuron ({len(self.neurons)}), got {v.numel()}.")
        self._v = v
        self._v_key = None

    def apply(self, sel):
        key = (sel.device, sel.dtype)
        if self._v_key != key:  # converted once, not on every decoded token
            self._v_dev, self._v_key = self._v.to(sel.device, sel.dtype), key
        return self._v_dev.expand_as(sel)


@dataclass
class Scale(NeuronEdit):
    """Multiply neurons by `factor` at the chosen positions."""
    factor: float = 1.0

    def bind(self, subject) -> None:
        super().bind(subject)
        _finite(self.factor, "scale factor")

    def apply(self, sel):
        return sel * self.factor


@dataclass
class Ablate(NeuronEdit):
    """Zero-ablate neurons at the chosen positions."""

    def apply(self, sel):
        return torch.zeros_like(sel)


@dataclass
class AddToResidual(Intervention):
    """Add `vector` into the residual stream at `layers` and `site` ("resid.post" or "resid.mid").

    vector: [hidden] (broadcast over positions), or [T, hidden] whose row t is added at absolute position t
    (positions past its end get nothing). `positions` restricts where it is added; `scale` multiplies it.
    """
    layers: Sequence[int] | int
    vector: torch.Tensor
    site: str = "resid.post"
    positions: PositionSpec = "all"
    scale: float = 1.0

    def bind(self, subject) -> None:
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        self.layers = [subject.check_layer(int(l)) for l in self.layers]
        if self.site not in ("resid.post", "resid.mid"):
            raise NeuronscopeError(f"Unknown residual site '{self.site}'; use resid.post or resid.mid.")
        if self.site == "resid.mid" and not subject.has_mid_site:
            raise NeuronscopeError(f"The {subject.family} model has parallel attention/MLP blocks: no resid.mid site.")
        v = torch.as_tensor(self.vector).detach().float()
        if v.ndim not in (1, 2) or v.shape[-1] != subject.hidden_size:
            raise NeuronscopeError(
                f"The residual vector must have shape [{subject.hidden_size}] or [positions, {subject.hidden_size}], "
                f"got {list(v.shape)}.")
        _finite(v, "residual vector")
        _finite(self.scale, "vector scale")
        self.positions = check_positions(self.positions)
        self._v = v * float(self.scale)
        self._cache: dict[Any, torch.Tensor] = {}

    def edits(self, subject):
        def fn(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
            key = (x.device, x.dtype)
            v = self._cache.get(key)
            if v is None:
                v = self._cache[key] = self._v.to(x.device, x.dtype)
            if v.ndim == 2:
                rows = torch.zeros(ctx.length, v.shape[1], device=x.device, dtype=x.dtype)
                a, b = ctx.start, min(ctx.start + ctx.length, v.shape[0])
                if b > a:
                    rows[: b - a] = v[a:b]
                v = rows
            mask = position_mask(self.positions, ctx, x.device)
            if mask is not None:
                v = v * mask.to(x.dtype).unsqueeze(-1) if v.ndim == 2 else mask.to(x.dtype).unsqueeze(-1) * v
            return x + v
        for layer in self.layers:
            yield layer, self.site, fn


@dataclass
class Capture(Intervention):
    """Record MLP neuron activations and/or residual streams, per forward call, concatenated over positions.

    layers: which layers (None: all). sites: any of "neurons", "resid.mid", "resid.post".
    neurons: restrict the neuron capture to these ids (None: all). to_cpu: move each chunk to the CPU as it comes.
    grad: add a zero probe that requires grad to the activations, so that one backward gives the total derivative
    of any output with respect to every captured activation (`.grads()`; attribution).
    """
    layers: Sequence[int] | None = None
    sites: Sequence[str] = ("neurons",)
    neurons: Sequence[int] | None = None
    to_cpu: bool = False
    dtype: torch.dtype | None = None
    grad: bool = False
    captures_only = True
    _chunks: dict[tuple[str, int], list[torch.Tensor]] = field(default_factory=dict, repr=False)

    def bind(self, subject) -> None:
        self.layers = subject.parse_layers([self.layers] if isinstance(self.layers, int) else self.layers)
        for s in self.sites:
            if s not in SITES:
                raise NeuronscopeError(f"Unknown site '{s}'; sites are {', '.join(SITES)}.")
            if s == "resid.mid" and not subject.has_mid_site:
                raise NeuronscopeError(f"The {subject.family} model has parallel blocks: no resid.mid site.")
        if self.neurons is not None:
            self.neurons = subject.check_neurons(list(self.neurons))
        self.captures_only = not self.grad
        self.reset()

    def reset(self) -> None:
        self._chunks = {}
        self._probes: dict[tuple[str, int], list[torch.Tensor]] = {}

    def edits(self, subject):
        idx_cache: dict[Any, torch.Tensor] = {}

        def make(site: str, layer: int):
            key = (site, layer)

            def fn(x: torch.Tensor, ctx: StepContext):
                out = None
                if self.grad:
                    # a zero probe that requires grad: its .grad is the TOTAL derivative d(out)/dx through every
                    # later layer (detaching x itself would cut the paths through later captured layers)
                    probe = torch.zeros_like(x, requires_grad=True)
                    self._probes.setdefault(key, []).append(probe)
                    out = x + probe
                    keep = x.detach()
                else:
                    keep = x.detach()
                    if site == "neurons" and self.neurons is not None:
                        idx = idx_cache.get(x.device)
                        if idx is None:
                            idx = idx_cache[x.device] = torch.as_tensor(self.neurons, device=x.device)
                        keep = keep.index_select(-1, idx)
                    if self.dtype is not None:
                        keep = keep.to(self.dtype)
                    if self.to_cpu:
                        keep = keep.to("cpu", non_blocking=True)
                self._chunks.setdefault(key, []).append(keep)
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
        """With grad=True, after a backward: d(output)/d(activation) as [layers, batch, positions, width]."""
        per_layer = []
        for l in self.layers:
            g = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._probes.get((site, l), [])]
            if not g:
                raise NeuronscopeError(f"No gradients were captured at {site} of layer {l}.")
            per_layer.append(g[0] if len(g) == 1 else torch.cat(g, dim=1))
        return torch.stack(per_layer)


class ResidualFunction(Intervention):
    """An edit given as a plain function of the residual stream: fn(layer, x, ctx) -> new x (or None to read).

    Used by the IRM, which reads one site and writes at several layers.
    """

    def __init__(self, layers: Sequence[int], site: str, fn: Callable[[int, torch.Tensor, StepContext], Any]):
        self.layers, self.site, self.fn = list(layers), site, fn

    def bind(self, subject) -> None:
        for l in self.layers:
            subject.check_layer(l)
        if self.site not in ("resid.post", "resid.mid"):
            raise NeuronscopeError(f"Unknown residual site '{self.site}'.")
        if self.site == "resid.mid" and not subject.has_mid_site:
            raise NeuronscopeError(f"The {subject.family} model has parallel blocks: no resid.mid site.")

    def edits(self, subject):
        for layer in self.layers:
            yield layer, self.site, (lambda x, ctx, _l=layer: self.fn(_l, x, ctx))


# ---------------------------------------------------------------------------------------------------------------
# the hook runner
# ---------------------------------------------------------------------------------------------------------------
class _Runner:
    def __init__(self, subject, interventions: Sequence[Intervention]):
        self.subject = subject
        self.interventions = list(interventions)
        self.ctx = StepContext()
        self.handles: list[Any] = []
        self.fns: dict[tuple[int, str], list[Hook]] = {}
        self._mid_delta: dict[int, torch.Tensor | None] = {}

    def _collect(self) -> None:
        reads: dict[tuple[int, str], list[Hook]] = {}
        for iv in self.interventions:
            if not isinstance(iv, Intervention):
                raise NeuronscopeError(f"{iv!r} is not an intervention.")
            iv.bind(self.subject)
            target = reads if iv.captures_only else self.fns
            for layer, site, fn in iv.edits(self.subject):
                target.setdefault((layer, site), []).append(fn)
        for key, fns in reads.items():
            self.fns.setdefault(key, []).extend(fns)

    def _run(self, key, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fns[key]:
            y = fn(x, self.ctx)
            if y is not None:
                x = y
        return x

    def install(self) -> None:
        self._collect()
        spec, model = self.subject.spec, self.subject.model
        base = spec.get(model, spec.base)
        blocks = spec.decoder_layers(model)  # looked up once: install runs on every intervene()

        def track(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs.get("inputs_embeds")
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = 0
            if cache is not None and hasattr(cache, "get_seq_length"):
                past = int(cache.get_seq_length())
            elif isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
                past = int(cache[0][0].shape[-2])
            self.ctx.start = past
            self.ctx.length = int(ids.shape[1])
            if past == 0:
                self.ctx.prompt_len = self.ctx.length
            self.ctx.grad = torch.is_grad_enabled()
            return None
        self.handles.append(base.register_forward_pre_hook(track, with_kwargs=True))

        for (layer, site) in list(self.fns):
            key = (layer, site)
            if site == "neurons":
                mod = spec.get(blocks[layer], spec.down)

                def pre(module, args, _k=key):
                    return (self._run(_k, args[0]),) + tuple(args[1:])
                self.handles.append(mod.register_forward_pre_hook(pre))
            elif site == "resid.post":
                mod = blocks[layer]

                def post(module, args, output, _k=key):
                    if isinstance(output, tuple):
                        return (self._run(_k, output[0]),) + tuple(output[1:])
                    return self._run(_k, output)
                self.handles.append(mod.register_forward_hook(post))
            elif site == "resid.mid":
                norm = spec.get(blocks[layer], spec.mlp_in_norm)
                out_mod = spec.get(blocks[layer], spec.mlp_out)

                def mid_pre(module, args, _k=key, _l=layer):
                    x = args[0]
                    y = self._run(_k, x)
                    self._mid_delta[_l] = None if y is x else (y - x)
                    return (y,) + tuple(args[1:])

                def mid_out(module, args, output, _l=layer):
                    d = self._mid_delta.pop(_l, None)
                    if d is None:
                        return None
                    if isinstance(output, tuple):
                        return (output[0] + d,) + tuple(output[1:])
                    return output + d
                self.handles.append(norm.register_forward_pre_hook(mid_pre))
                self.handles.append(out_mod.register_forward_hook(mid_out))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._mid_delta.clear()


@contextmanager
def intervene(subject, *interventions: Intervention) -> Iterator[list[Intervention]]:
    """Activate interventions on `subject` for the duration of the block; yields them (read captures after)."""
    runner = _Runner(subject, interventions)
    try:
        runner.install()
        yield list(interventions)
    finally:
        runner.remove()


def capture(subject, input_ids: torch.Tensor, *, layers=None, sites=("neurons",), neurons=None,
            attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Capture]:
    """One forward pass with a capture: returns (logits, the Capture)."""
    cap = Capture(layers=layers, sites=sites, neurons=neurons)
    with intervene(subject, cap), torch.no_grad():
        logits = subject.model(input_ids=input_ids.to(subject.device), attention_mask=attention_mask).logits
    return logits, cap


__all__ = ["intervene", "capture", "Intervention", "Capture", "Clamp", "Scale", "Ablate", "AddToResidual",
           "ResidualFunction", "StepContext", "position_mask", "check_positions", "SITES"]
