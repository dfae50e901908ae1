"""Running interventions: `intervene` binds them and installs one hook per (layer, site), plus a tracker of each
call's absolute positions (across KV-cache calls, chunks and packed segments), acting only on the opening thread's
forwards; `capture` is one forward with a capture."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import NeuronscopeError
from .base import Bound, Hook, Intervention, SubjectLike
from .captures import BoundCapture, Capture
from .positions import StepContext


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
