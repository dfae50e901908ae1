"""Steering by concept: the neurons that *write* a concept (concept search's writes side: their write vector or
measured output effect promotes the concept's words) or a cluster's members, each clamped to its own strong corpus
quantile times a strength, and a dose sweep computed in one batched generate.

    neurons = concept_neurons("atlas-smollm", "dogs", k=20)            # [(layer, neuron, polarity)]
    edits = steer_interventions(stats, neurons, strength=0.5)          # Clamp specs
    answers = steer_sweep(subject, "Tell me a story.", neurons, [0.25, 0.5, 1.0], stats, chat=True)

A neuron is clamped to q(1 - 1e-7) x strength for the positive polarity and q(1e-7) x strength for the negative
one (the Monitor's "strengthen", DESIGN.md section 2; the most extreme level the corpus resolves when 1e-7 is not),
at every position of the prompt and of the answer. The sweep puts the prompt in R + 1 rows of one batch (row 0
without edits, row r with strength r) and gives each row its own clamps (the intervention core's `rows=`), so one
`generate_ids` call gives what R + 1 separate runs give (tests/test_steer.py checks that).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import NeuronscopeError
from ..refs import check_neuron, check_polarity

Neuron = tuple[int, int, str]


MIN_SIMILARITY = 0.3
MIN_WRITES = 0.12


@dataclasses.dataclass
class SteeredAnswer:
    """An answer of a dose sweep: strength None is the unsteered answer."""
    strength: float | None
    text: str


@dataclasses.dataclass
class SteeredGeneration:
    """What `steer_generate` did: the neuron polarities it clamped and the answer at each strength."""
    neurons: list[tuple[int, int, str]]
    answers: list[SteeredAnswer]


def concept_neurons(folder: str | Path, concept: str, *, k: int = 20, embedder: Any = None,
                    min_similarity: float = MIN_SIMILARITY, min_writes: float = MIN_WRITES) -> list[Neuron]:
    """The concept's top-k writers (concept search, writes side), keeping those whose writes score reaches
    `min_writes` (0.12: the top promoted token alone, of 20 weighted 1/sqrt(rank), gives 0.135), since steering a
    neuron that does not write the concept steers nothing the user asked for. Folders without concept evidence (no
    window embeddings) fall back to the interpretable neurons whose description embedding is within `min_similarity`
    of the concept."""
    from .evidence import has_concept_evidence
    from .search import concept_search
    if has_concept_evidence(folder):
        res = concept_search(folder, concept, side="writes", k=k, embedder=embedder)
        out = [(h.layer, h.neuron, h.polarity) for h in res.hits if h.writes >= float(min_writes)]
        if not out:
            raise NeuronscopeError(f"No neuron writes '{concept}' (none promotes its words); try a more common "
                                   "phrasing, or steer named neurons (20:1234+,21:77-).")
        return out
    from .semantic import semantic_search
    rows = semantic_search(folder, concept, k=k, embedder=embedder, interpretable=True)
    out = [(r.layer, r.neuron, r.polarity) for r in rows if r.similarity >= float(min_similarity)]
    if not out:
        raise NeuronscopeError(f"No interpretable neuron matches '{concept}'; try another word, or describe the "
                               "atlas with an explainer to get more interpretable neurons.")
    return out


def random_control(stats: Any, neurons: Sequence[Sequence[Any]], *, seed: int = 0) -> list[Neuron]:
    """A control for steering `neurons`: as many random neuron polarities, each in the layer and with the polarity
    of one of them (so the clamps have the same count, layers and quantile-based strengths), none of them."""
    import random
    rng = random.Random(seed)
    taken = {(int(it[0]), int(it[1])) for it in neurons}
    out: list[Neuron] = []
    for it in neurons:
        l, p = int(it[0]), str(it[2]) if len(it) == 3 else "pos"
        while True:
            n = rng.randrange(stats.n_neurons)
            if (l, n) not in taken:
                taken.add((l, n))
                out.append((l, n, p))
                break
    return out


def steer_interventions(stats: Any, neurons: Sequence[Sequence[Any]], strength: float, *, positions: Any = "all",
                        rows: Any = None) -> list[Any]:
    """Clamp specs (one per layer) that set each neuron to its strong quantile x strength."""
    from ..interventions import Clamp
    if not neurons:
        raise NeuronscopeError("No neurons to steer.")
    s = float(strength)
    if not s == s or abs(s) == float("inf"):
        raise NeuronscopeError(f"The strength must be a finite number, got {strength}.")
    hi_level, lo_level = stats.level_info.strong_levels()
    hi, lo = stats.quantile(hi_level).float(), stats.quantile(lo_level).float()
    by_layer: dict[int, dict[int, float]] = {}
    for it in neurons:
        l, n = int(it[0]), int(it[1])
        p = check_polarity(it[2] if len(it) == 3 else "pos")
        check_neuron(l, n, stats.n_layers, stats.n_neurons, where="these statistics")
        q = float(hi[l, n] if p == "pos" else lo[l, n])
        if q != q:
            raise NeuronscopeError(f"Neuron {l}:{n} has no {p} quantile in these statistics.")
        by_layer.setdefault(l, {}).setdefault(n, q * s)         # a neuron named with both polarities: the first
    return [Clamp(layer=l, neurons=list(vals), value=list(vals.values()), positions=positions, rows=rows)
            for l, vals in sorted(by_layer.items())]


def steer_sweep(subject: Any, prompt: str, neurons: Sequence[Sequence[Any]], strengths: Sequence[float],
                stats: Any, *, chat: bool = False, system: str | None = None, max_new_tokens: int = 64,
                positions: Any = "all") -> list[SteeredAnswer]:
    """The answer without steering (strength None) and at each strength, from one batched greedy generate whose
    rows carry different clamps."""
    from ..interventions import intervene
    if not strengths:
        raise NeuronscopeError("Give at least one strength, like 0.25,0.5,1.")
    ids = subject.encode(prompt, chat=chat, system=system)
    R = len(strengths) + 1
    batch = ids.repeat(R, 1)
    edits = []
    for r, s in enumerate(strengths, start=1):
        edits += [dataclasses.replace(e, rows=[r]) for e in steer_interventions(stats, neurons, s,
                                                                                 positions=positions)]
    with intervene(subject, *edits):
        new = subject.generate_ids(batch, max_new_tokens=max_new_tokens, temperature=0.0)
    return [SteeredAnswer(None if r == 0 else float(strengths[r - 1]), _text(subject, new[r])) for r in range(R)]


def _text(subject: Any, row: torch.Tensor) -> str:
    ids = row.tolist()
    eos = getattr(subject.tokenizer, "eos_token_id", None)
    if eos is not None and eos in ids:
        ids = ids[:ids.index(eos)]
    return str(subject.decode(torch.tensor(ids, dtype=torch.long)))


def parse_strengths(text: str) -> list[float]:
    """'0.25,0.5,1' -> [0.25, 0.5, 1.0] (a clear error for anything else)."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            v = float(part)
        except ValueError:
            raise NeuronscopeError(f"Cannot read the strengths '{text}': write numbers like 0.25,0.5,1.") from None
        if v != v or abs(v) == float("inf"):
            raise NeuronscopeError(f"Strengths must be finite numbers, got '{part}'.")
        out.append(v)
    return out


def steer_targets(folder: Any, steer: str, *, k: int = 20, embedder: Any = None) -> list[Neuron]:
    """What `--steer` names: a neuron list (20:1234+,21:77-; a cluster's steer form) or a concept (its top-k
    writers, `concept_neurons`)."""
    import re
    if re.fullmatch(r"\s*\d+\s*:\s*\d+.*", steer or "") and re.fullmatch(r"[\d:+\-,\s]+", steer):
        from ..specs import parse_neuron_refs
        return [(it[0], it[1], it[2] if len(it) == 3 else "pos") for it in parse_neuron_refs(steer)]
    return concept_neurons(folder, steer, k=k, embedder=embedder)


def steer_generate(subject: Any, folder: Any, prompt: str, steer: str, strengths: Sequence[float], *, k: int = 20,
                   embedder: Any = None, chat: bool = False, system: str | None = None, max_new_tokens: int = 64
                   ) -> SteeredGeneration:
    """`neuronscope generate --steer`: the neurons `steer` names (a concept's writers, or explicit refs) and the
    dose sweep's answers (steer_sweep)."""
    from ..atlas.folder import AtlasFolder
    af = AtlasFolder.open(folder)
    af.check_model(subject)
    from ..stats.results import NeuronStats
    stats = NeuronStats.from_folder(af)
    neurons = steer_targets(folder, steer, k=k, embedder=embedder)
    answers = steer_sweep(subject, prompt, neurons, strengths, stats, chat=chat, system=system,
                          max_new_tokens=max_new_tokens)
    return SteeredGeneration([(int(l), int(n), str(p)) for l, n, p in neurons], answers)
