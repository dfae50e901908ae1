"""Text forms of interventions, as typed on the command line (and usable from notebooks).

    clamp/scale:   LAYER:NEURON[,NEURON...]=VALUE[@WHERE]      e.g. 12:345=8.0@generated
    ablate:        LAYER:NEURON[,NEURON...][@WHERE]            e.g. 3:17,18
    add-vector:    LAYERS[/SITE]=SOURCE[*SCALE][@WHERE]        e.g. 4-6/mid=token:dog*8, 10=steer.safetensors#v
    neurons:       LAYER:NEURON[+|-][,...] or LAYER:A-B            e.g. 3:17+,4:5-,5:10-20 (describe, cluster, show)

WHERE is all (default), prompt, generated, or token positions like 0-4,9. LAYERS is a layer set (0-7, 3,7, all).
SOURCE is token:WORD (the unembedding row of WORD's first token), FILE.safetensors[#KEY] or FILE.npy holding a
[hidden] or [positions, hidden] tensor.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import NeuronscopeError
from .interventions import Ablate, AddToResidual, Clamp, Scale
from .refs import parse_index_set, parse_indices, parse_neuron_refs

if TYPE_CHECKING:
    from .subject import Subject


_EDIT = re.compile(r"^\s*(-?\d+)\s*:\s*([-\d,\s]+?)\s*(?:=\s*([^@]+?))?\s*(?:@\s*(.+))?\s*$")


def parse_where(text: str | None) -> str | list[int]:
    """WHERE: all (default), prompt, generated, or token positions in the index grammar (refs.parse_indices)."""
    if text is None or text.strip() in ("", "all"):
        return "all"
    t = text.strip().lower()
    if t in ("prompt", "generated"):
        return t
    try:
        return parse_indices(t, what="position")
    except NeuronscopeError as exc:
        raise NeuronscopeError(f"Cannot read positions '{text}' ({str(exc).rstrip('.')}): use all, prompt, "
                               "generated or indices like 0-4,9.") from None


def _number(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise NeuronscopeError(f"The {what} '{text}' is not a number.") from None
    if not math.isfinite(v):
        raise NeuronscopeError(f"The {what} must be finite, got '{text}'.")
    return v


def parse_neuron_edit(text: str, kind: str = "clamp") -> Clamp | Scale | Ablate:
    """'L:N[,N]=V[@WHERE]' -> Clamp / Scale; 'L:N[,N][@WHERE]' -> Ablate."""
    m = _EDIT.match(text)
    if not m:
        form = "LAYER:NEURON[,NEURON]" + ("" if kind == "ablate" else "=VALUE") + "[@WHERE]"
        raise NeuronscopeError(f"Cannot read the {kind} '{text}': expected {form}, e.g. 12:345"
                               + ("" if kind == "ablate" else "=8.0") + ".")
    layer = int(m.group(1))
    try:
        neurons = [int(n) for n in m.group(2).replace(" ", "").split(",") if n]
    except ValueError:
        raise NeuronscopeError(f"Cannot read the neuron ids in '{text}'.") from None
    where = parse_where(m.group(4))
    if kind == "ablate":
        if m.group(3) is not None:
            raise NeuronscopeError(f"An ablation takes no value: '{text}'.")
        return Ablate(layer=layer, neurons=neurons, positions=where)
    if m.group(3) is None:
        raise NeuronscopeError(f"The {kind} '{text}' needs a value: LAYER:NEURON=VALUE.")
    value = _number(m.group(3), f"{kind} value")
    if kind == "scale":
        return Scale(layer=layer, neurons=neurons, positions=where, factor=value)
    return Clamp(layer=layer, neurons=neurons, positions=where, value=value)


def load_vector(source: str, subject: Subject) -> torch.Tensor:
    """A residual vector from token:WORD, FILE.safetensors[#KEY] or FILE.npy."""
    if source.startswith("token:"):
        word = source[len("token:"):]
        if not word:
            raise NeuronscopeError("token: needs a word, e.g. token:dog.")
        ids = subject.tokenizer(" " + word if not word.startswith(" ") else word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise NeuronscopeError(f"The word '{word}' gives no tokens.")
        w: torch.Tensor = subject.spec.unembedding(subject.model)[ids[0]].detach().float().cpu()
        unit: torch.Tensor = w / w.norm().clamp_min(1e-12)
        return unit
    path, _, key = source.partition("#")
    p = Path(path).expanduser()
    if not p.is_file():
        raise NeuronscopeError(f"No vector file at '{path}'.")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            tensors = load_file(str(p))
        except Exception as exc:  # safetensors raises its own error types
            raise NeuronscopeError(f"Cannot read '{path}' as safetensors: {exc}.") from None
        if key:
            if key not in tensors:
                raise NeuronscopeError(f"'{path}' has no tensor '{key}'; it has {', '.join(tensors)}.")
            return tensors[key].float()
        if len(tensors) != 1:
            raise NeuronscopeError(f"'{path}' holds {len(tensors)} tensors; pick one with #KEY ({', '.join(tensors)}).")
        return next(iter(tensors.values())).float()
    if p.suffix == ".npy":
        import numpy as np
        return torch.from_numpy(np.load(p, allow_pickle=False)).float()
    raise NeuronscopeError(f"Vector files must be .safetensors or .npy, got '{path}'.")


_ADD = re.compile(r"^\s*([^=/]+?)\s*(?:/\s*(mid|post|resid\.mid|resid\.post))?\s*=\s*(.+?)\s*$")


def parse_add_vector(text: str, subject: Subject) -> AddToResidual:
    """'LAYERS[/SITE]=SOURCE[*SCALE][@WHERE]' -> AddToResidual."""
    m = _ADD.match(text)
    if not m:
        raise NeuronscopeError(f"Cannot read the vector addition '{text}': expected LAYERS[/mid|post]=SOURCE[*SCALE]"
                               "[@WHERE], e.g. 4-6/mid=token:dog*8.")
    layers = parse_index_set(m.group(1), subject.n_layers, what="layer")
    site = "resid." + (m.group(2) or "post").replace("resid.", "")
    rest = m.group(3)
    where: str | list[int] = "all"
    if "@" in rest:
        rest, _, w = rest.rpartition("@")
        where = parse_where(w)
    scale = 1.0
    if "*" in rest:
        rest, _, s = rest.rpartition("*")
        scale = _number(s, "vector scale")
    vector = load_vector(rest.strip(), subject)
    return AddToResidual(layers=layers, vector=vector, site=site, positions=where, scale=scale)


__all__ = ["parse_where", "parse_neuron_edit", "load_vector", "parse_add_vector", "parse_neuron_refs"]
