"""Neuron and layer references: the one home of their range checks and of the index grammar ("0-4,9").

    parse_index_set("0-3,8", 12, what="layer")  -> [0, 1, 2, 3, 8]     (also 'all'; bounded by a size)
    parse_indices("0-4,9", what="position")     -> [0, 1, 2, 3, 4, 9]  (no upper bound: token positions)
    format_index_set([0, 1, 2, 3, 8])           -> "0-3,8"
    check_layer(l, n_layers) / check_neuron(l, i, n_layers, n_neurons)  -> one sentence when out of range
    parse_neuron_refs("3:17+,4:5-,5:10-12")      -> [NeuronRef(3, 17, "pos"), ...]

Every module that reads a layer set, a position list or a neuron id from a user goes through these, so the
grammar and the wording of the errors are the same in the CLI, the library and the web app.
"""
from __future__ import annotations

import re
from typing import Iterable, NamedTuple, Sequence

from .errors import NeuronscopeError

_RANGE = re.compile(r"\s*(-?\d+)\s*(?:-\s*(-?\d+))?\s*")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_indices(text: str, size: int | None = None, *, what: str = "index") -> list[int]:
    """'a-b', 'a,b,c' or mixes like '0-3,8' -> sorted unique ints >= 0 (and < size when a size is given).
    'all' (or '*') means every index below `size`."""
    t = text.strip().lower()
    if t == "":
        raise NeuronscopeError(f"Empty {what} set; use 'all', a range like 0-7, or a list like 3,7,11.")
    if t in ("all", "*"):
        if size is None:
            raise NeuronscopeError(f"'all' {what}s has no meaning here; give indices like 0-4,9.")
        return list(range(size))
    out: set[int] = set()
    for part in t.split(","):
        m = _RANGE.fullmatch(part)
        if not m:
            raise NeuronscopeError(f"Cannot read the {what} set '{text.strip()}': use 'all', a range like 0-7, or "
                                   "a list like 3,7,11.")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
        if b < a:
            raise NeuronscopeError(f"The {what} range '{part.strip()}' runs backwards.")
        if a < 0:
            valid = f"valid {what}s are 0 to {size - 1}" if size is not None else f"{what}s are >= 0"
            raise NeuronscopeError(f"{what.capitalize()} {a} is out of range: {valid}.")
        if size is not None and b >= size:
            raise NeuronscopeError(f"{what.capitalize()} {max(a, size)} is out of range: valid {what}s are 0 to "
                                   f"{size - 1}.")
        out.update(range(a, b + 1))
    return sorted(out)


def parse_index_set(text: str, size: int, *, what: str = "index") -> list[int]:
    """'all' | 'a-b' | 'a,b,c' | mixes like '0-3,8' -> sorted unique ints in [0, size)."""
    return parse_indices(text, size, what=what)


def format_index_set(indices: Iterable[int]) -> str:
    """Sorted indices written back in the grammar: [0, 1, 2, 5] -> '0-2,5'."""
    xs = sorted(set(indices))
    parts: list[str] = []
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(parts)


def check_layer(layer: object, n_layers: int, *, where: str = "this model") -> int:
    """`layer` as an int in [0, n_layers), or one sentence."""
    if not _is_int(layer):
        raise NeuronscopeError(f"Layer must be an integer, got {layer!r}.")
    assert isinstance(layer, int)
    if not 0 <= layer < n_layers:
        raise NeuronscopeError(f"Layer {layer} is out of range: {where} has layers 0 to {n_layers - 1}.")
    return layer


def check_neuron_id(neuron: object, n_neurons: int) -> int:
    if not _is_int(neuron):
        raise NeuronscopeError(f"Neuron ids must be integers, got {neuron!r}.")
    assert isinstance(neuron, int)
    if not 0 <= neuron < n_neurons:
        raise NeuronscopeError(f"Neuron {neuron} is out of range: each layer has neurons 0 to {n_neurons - 1}.")
    return neuron


def check_neurons(neurons: Sequence[object], n_neurons: int) -> list[int]:
    return [check_neuron_id(n, n_neurons) for n in neurons]


def check_neuron(layer: object, neuron: object, n_layers: int, n_neurons: int, *,
                 where: str = "this model") -> tuple[int, int]:
    """(layer, neuron) checked against a model's (or an atlas's, or the statistics') shape."""
    return check_layer(layer, n_layers, where=where), check_neuron_id(neuron, n_neurons)


POLARITIES = ("pos", "neg")


def check_polarity(polarity: object) -> str:
    if polarity not in POLARITIES:
        raise NeuronscopeError(f"Polarity must be 'pos' or 'neg', got {polarity!r}.")
    assert isinstance(polarity, str)
    return polarity


class NeuronRef(NamedTuple):
    """Neuron `neuron` of layer `layer`, optionally one polarity ("pos": positive activations, "neg": negative)."""
    layer: int
    neuron: int
    polarity: str | None = None


def parse_neuron_refs(text: str) -> list[tuple[int, int] | tuple[int, int, str]]:
    """'3:17,5:100-102' (both polarities) or '3:17+,4:5-' (+ pos, - neg) -> (layer, neuron[, polarity]) items."""
    out: list[tuple[int, int] | tuple[int, int, str]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        pol = None
        if part[-1] in "+-" and ":" in part and not part.rstrip("+-").endswith("-"):
            pol = "pos" if part[-1] == "+" else "neg"
            part = part[:-1]
        if ":" not in part:
            raise NeuronscopeError(f"A neuron is written LAYER:NEURON (e.g. 3:17, 3:17+ or 3:10-20), got '{part}'.")
        l, n = part.split(":", 1)
        try:
            layer = int(l)
            if "-" in n:
                a, b = n.split("-", 1)
                ids = list(range(int(a), int(b) + 1))
            else:
                ids = [int(n)]
        except ValueError:
            raise NeuronscopeError(f"A neuron is written LAYER:NEURON with integers, got '{part}'.") from None
        for i in ids:
            out.append((layer, i) if pol is None else (layer, i, pol))
    if not out:
        raise NeuronscopeError("No neurons given.")
    return out


__all__ = ["parse_indices", "parse_index_set", "format_index_set", "check_layer", "check_neuron",
           "check_neuron_id", "check_neurons", "check_polarity", "POLARITIES", "NeuronRef", "parse_neuron_refs"]
