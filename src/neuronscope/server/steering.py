"""Steering: a session's steerings as Clamp edits, and adding, switching and removing them.

A steering clamps neurons (of a concept, found by search, or given explicitly) on prompt token ranges and/or every
generated token. Its kind decides the clamp value: "strengthen" sets q(1-1e-7) x strength (`Knowledge
.strengthen_value`; 50 neurons by default), "suppress" sets 0 (500 neurons), "clamp" sets the value given.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from ..concepts.records import NeuronMatch
from ..errors import NeuronscopeError
from ..interventions import Clamp
from ..refs import check_neuron, check_polarity
from ..subject import Subject
from . import schemas as S
from .knowledge import Knowledge
from .limits import Limits
from .render import Renderer, Rendering
from .sessions import Session, Steering

MODES = ("strengthen", "suppress", "clamp")
DEFAULT_NEURONS = {"strengthen": 50, "suppress": 500, "clamp": 500}

Picked = list[tuple[int, int, str]]                          # (layer, neuron, polarity)
Search = Callable[[str, int], list[NeuronMatch]]          # concept, k -> best neurons first
Positions = Sequence[int] | str


def clamps(st: Steering, positions: Positions) -> list[Clamp]:
    """The steering's neurons as one Clamp per layer at `positions` (a list, or "generated")."""
    by_layer: dict[int, list[tuple[int, float]]] = {}
    for l, i, _, v in st.neurons:
        by_layer.setdefault(l, []).append((i, v))
    out = []
    for l, items in by_layer.items():
        dedup = dict(items)
        out.append(Clamp(l, list(dedup), positions=positions, value=list(dedup.values())))
    return out


def active(s: Session) -> list[Steering]:
    """The session's steerings that are switched on."""
    return [st for st in s.steerings.values() if st.enabled]


def generation_edits(s: Session, prompt_len: int) -> list[Clamp]:
    """The edits of an answer to a prompt of `prompt_len` tokens: each steering's prompt ranges and, where it says
    so, every generated token."""
    ivs: list[Clamp] = []
    for st in active(s):
        ranges = [(a, min(b, prompt_len)) for a, b in st.ranges if a < prompt_len]
        positions = sorted({t for a, b in ranges for t in range(a, b)})
        if positions:
            ivs += clamps(st, positions)
        if st.generated:
            ivs += clamps(st, "generated")
    return ivs


def analysis_edits(s: Session, r: Rendering) -> tuple[list[Clamp], set[int]]:
    """The edits of a view's forward over the rendered conversation `r`, and the positions they touch: each
    steering's ranges, and the answers it steered when it steers generated tokens."""
    ivs: list[Clamp] = []
    steered: set[int] = set()
    for st in active(s):
        pos = {t for a, b in st.ranges for t in range(a, min(b, len(r.ids)))}
        if st.generated:
            for k, m in enumerate(s.messages):
                if m.role == "assistant" and st.id in m.steerings:
                    a, b = r.spans[k]
                    pos.update(range(a, b))
        if pos:
            ivs += clamps(st, sorted(pos))
            steered |= pos
    return ivs, steered


def check_request(L: Limits, s: Session, *, mode: str, concept: str | None, neurons: list[list[Any]] | None,
                  strength: float, value: float | None, n_neurons: int | None, ranges: list[list[int]] | None,
                  label: str | None) -> int:
    """One sentence for the first thing wrong with a request for a steering; returns how many neurons to find."""
    if label is not None and len(label) > L.max_concept_chars:
        raise NeuronscopeError(f"The label has {len(label)} characters; the limit is {L.max_concept_chars}.")
    if len(s.steerings) >= L.max_steerings:
        raise NeuronscopeError(f"A session holds at most {L.max_steerings} steerings; remove one first.")
    if ranges is not None and len(ranges) > L.max_ranges:
        raise NeuronscopeError(f"A steering has at most {L.max_ranges} token ranges, got {len(ranges)}.")
    if mode not in MODES:
        raise NeuronscopeError(f"Unknown steering mode '{mode}'; use strengthen, suppress or clamp.")
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and 0 <= strength <= L.max_strength):
        raise NeuronscopeError(f"Strength must be a finite number between 0 and {L.max_strength}.")
    if mode == "clamp" and (value is None or not math.isfinite(value) or abs(value) > L.max_clamp):
        raise NeuronscopeError(f"A clamp needs a finite value between -{L.max_clamp:g} and {L.max_clamp:g}.")
    n = n_neurons if n_neurons is not None else DEFAULT_NEURONS[mode]
    if not 1 <= n <= L.max_steer_neurons:
        raise NeuronscopeError(f"The number of neurons must be between 1 and {L.max_steer_neurons}.")
    if (concept is None or not concept.strip()) == (not neurons):
        raise NeuronscopeError("Give either a concept or a list of neurons to steer (not both, not neither).")
    return n


def check_ranges(ranges: list[list[int]] | None, T: int, generated: bool) -> list[tuple[int, int]]:
    """The token ranges as pairs inside a conversation of T tokens; steering nowhere is an error."""
    clean = []
    for rg in ranges or []:
        if len(rg) != 2:
            raise NeuronscopeError("Each token range is a pair [start, end).")
        a, b = int(rg[0]), int(rg[1])
        if not 0 <= a < b <= T:
            raise NeuronscopeError(f"The token range [{a}, {b}) is outside the conversation ({T} tokens).")
        clean.append((a, b))
    if not clean and not generated:
        raise NeuronscopeError("Choose where to steer: prompt token ranges and/or the generated tokens.")
    return clean


def polarity_of(x: Any) -> str:
    """A neuron's third item: "pos"/"neg", or 0/1 for them."""
    return check_polarity({0: "pos", 1: "neg"}.get(x, x) if not isinstance(x, str) else x)


class Steerer:
    """Adds, switches and removes a session's steerings, for one subject and its knowledge."""

    def __init__(self, subject: Subject, knowledge: Knowledge, limits: Limits, renderer: Renderer,
                 search: Search) -> None:
        self.subject, self.knowledge, self.limits = subject, knowledge, limits
        self.renderer, self.search = renderer, search

    def _explicit(self, neurons: list[list[Any]]) -> Picked:
        """Neurons given as [layer, neuron] or [layer, neuron, polarity], checked."""
        L = self.limits
        picked = []
        for nrn in neurons[:L.max_steer_neurons]:
            if len(nrn) not in (2, 3):
                raise NeuronscopeError("Each neuron is [layer, neuron] or [layer, neuron, polarity].")
            l, i = int(nrn[0]), int(nrn[1])
            check_neuron(l, i, self.subject.n_layers, self.subject.n_neurons)
            picked.append((l, i, polarity_of(nrn[2]) if len(nrn) == 3 else "pos"))
        if len(neurons) > L.max_steer_neurons:
            raise NeuronscopeError(f"At most {L.max_steer_neurons} neurons can be steered at once.")
        return picked

    def _of_concept(self, concept: str, n: int) -> Picked:
        """The concept's best `n` neurons, by the Monitor's concept search."""
        found = self.search(concept, n)
        if not found:
            raise NeuronscopeError(f"No neurons found for the concept '{concept}'.")
        return [r.key for r in found[:n]]

    def values(self, picked: Picked, mode: str, strength: float,
               value: float | None) -> list[tuple[int, int, str, float]]:
        """Each neuron with the value its kind of steering clamps it to."""
        if mode == "suppress":
            return [(l, i, pol, 0.0) for l, i, pol in picked]
        if mode == "clamp":
            assert value is not None  # check_request
            return [(l, i, pol, float(value)) for l, i, pol in picked]
        return [(l, i, pol, self.knowledge.strengthen_value(l, i, pol, strength)) for l, i, pol in picked]

    def add(self, s: Session, *, mode: str, concept: str | None = None, neurons: list[list[Any]] | None = None,
            strength: float = 0.75, value: float | None = None, n_neurons: int | None = None,
            ranges: list[list[int]] | None = None, generated: bool = True, label: str | None = None,
            enabled: bool = True) -> S.SteeringOut:
        """Steer a concept (its neurons found by search) or explicit neurons; `label` names it (e.g. a cluster)."""
        n = check_request(self.limits, s, mode=mode, concept=concept, neurons=neurons, strength=strength,
                          value=value, n_neurons=n_neurons, ranges=ranges, label=label)
        with s.lock:
            clean_ranges = check_ranges(ranges, len(self.renderer.render(s).ids), generated)
            if neurons:
                picked = self._explicit(neurons)
            else:
                assert concept is not None  # check_request
                picked = self._of_concept(concept, n)
            vals = self.values(picked, mode, strength, value)
            s.n_steerings_made += 1
            st = Steering(id=f"st{s.n_steerings_made}", mode=mode, concept=concept.strip() if concept else None,
                          strength=float(strength) if mode == "strengthen" else None, neurons=vals,
                          ranges=clean_ranges, generated=bool(generated), enabled=bool(enabled),
                          label=label.strip() if label and label.strip() else None)
            while st.id in s.steerings:
                st.id += "x"
            s.steerings[st.id] = st
            s.changed()
            return st.public()

    @staticmethod
    def remove(s: Session, steering_id: str) -> bool:
        """Remove a steering; False if there is no such steering."""
        with s.lock:
            if s.steerings.pop(steering_id, None) is None:
                return False
            s.changed()
            return True

    @staticmethod
    def switch(s: Session, steering_id: str, enabled: bool) -> S.SteeringOut | None:
        """Switch a steering off (kept, not applied) or on again; None if there is no such steering."""
        with s.lock:
            st = s.steerings.get(steering_id)
            if st is None:
                return None
            if st.enabled != bool(enabled):
                st.enabled = bool(enabled)
                s.changed()
            return st.public()
