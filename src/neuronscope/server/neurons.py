"""One neuron's page: its decodes, descriptions, quantiles and top exemplars, each exemplar token marked with the
neuron's activation there (a forward of the exemplar windows that stops after the neuron's layer)."""
from __future__ import annotations


import torch

from ..errors import NeuronscopeError
from ..interventions import Capture
from ..refs import check_neuron
from ..stats.results import Exemplar
from . import schemas as S
from .annotate import Annotator
from .cache import BoundedCache
from .chunked import forward_chunks
from .knowledge import Knowledge
from .limits import Limits
from .render import Renderer
from .runtime import Runtime

POLARITIES = ("pos", "neg")


class NeuronPages:
    """Neuron details, cached per (neuron, n_exemplars, marks) in a cache shared with concept search."""

    def __init__(self, runtime: Runtime, renderer: Renderer, knowledge: Knowledge, limits: Limits,
                 annotator: Annotator, cache: BoundedCache) -> None:
        self.runtime, self.renderer, self.knowledge = runtime, renderer, knowledge
        self.limits, self.annotator, self.cache = limits, annotator, cache

    def neuron(self, layer: int, neuron: int, n_exemplars: int = 10, marks: bool = True) -> S.NeuronOut:
        """A neuron's decodes, description and top exemplars (with each token's normalised activation).

        The marks (the neuron's activation at every token of each exemplar window) need a forward of the windows;
        `marks=False` answers without it (no model call), so a page can show the detail at once and the marks
        after. Results are cached per (neuron, n_exemplars, marks).
        """
        subject = self.runtime.subject
        check_neuron(layer, neuron, subject.n_layers, subject.n_neurons)
        if not 0 <= n_exemplars <= self.limits.max_exemplars:
            raise NeuronscopeError(f"n_exemplars must be between 0 and {self.limits.max_exemplars}.")
        key = (layer, neuron, n_exemplars, bool(marks))
        hit: S.NeuronOut | None = self.cache.get(key)
        if hit is not None:
            return hit
        out = self._neuron(layer, neuron, n_exemplars, marks)
        self.cache.put(key, out)
        return out

    def _exemplar(self, layer: int, neuron: int, e: Exemplar) -> S.ExemplarOut:
        """One exemplar as the page shows it: its tokens, its activation and each token's mark (normalised)."""
        k = self.knowledge
        marked = [k.normalise_one(layer, neuron, x) for x in e.acts] if e.acts else None
        return S.ExemplarOut(activation=e.activation, normalised=k.normalise_one(layer, neuron, e.activation),
                             position=e.position,
                             tokens=self.renderer.display_tokens(e.token_ids) if e.token_ids else list(e.tokens),
                             text=e.text, marks=marked)

    def _neuron(self, layer: int, neuron: int, n_exemplars: int, marks: bool) -> S.NeuronOut:
        k = self.knowledge
        decodes, source = k.decodes(layer, neuron)
        found = {pol: k.exemplars(layer, neuron, pol, n_exemplars) if n_exemplars and k.stats is not None else []
                 for pol in POLARITIES}
        if marks:
            every = [e for pol in POLARITIES for e in found[pol]]
            for e, acts in zip(every, self.window_acts([list(e.token_ids) for e in every], layer, neuron)):
                e.acts = acts
        exemplars = {pol: [self._exemplar(layer, neuron, e) for e in found[pol]] for pol in POLARITIES}
        return S.NeuronOut(layer=layer, neuron=neuron, decodes=decodes, decodes_source=source,
                           descriptions={p: k.description(layer, neuron, p) for p in POLARITIES},
                           description_kinds={p: k.description_kinds(layer, neuron, p) for p in POLARITIES},
                           exemplars=exemplars, quantiles=k.quantiles_of(layer, neuron),
                           quantile_marks=self.annotator.level_marks(), normalised_by=self.annotator.normalised_by(),
                           notes=list(k.notes))

    def outputs(self, layer: int, neuron: int) -> S.NeuronOutputsOut:
        """What the neuron makes the model say, measured on demand (describe's output effects: raised to its firing
        level at the last position of the neutral prompts, through every later layer), both polarities, one hold
        of the model lock. Every vocabulary token may be named (describe limits names to corpus tokens)."""
        from ..describe.describe import output_passes
        from ..describe.effects import measure_effects
        k, rt = self.knowledge, self.runtime
        check_neuron(layer, neuron, rt.subject.n_layers, rt.subject.n_neurons)
        if k.stats is None:
            raise NeuronscopeError("Output effects need corpus statistics (the neuron's firing level); start the "
                                   "server with an --atlas that has them.")
        keys = [(layer, neuron, p) for p in POLARITIES]
        with rt.lock:
            got = measure_effects(rt.subject, k.stats, keys, batch=2)
        tok = rt.subject.tokenizer

        def row(p: str) -> S.OutputEffectOut | None:
            e = got.get((layer, neuron, p))
            if e is None:
                return None
            says = [S.TokenEffectOut(token=tok.decode([i]), delta=d) for i, d in zip(e.says, e.says_delta)]
            less = [S.TokenEffectOut(token=tok.decode([i]), delta=d) for i, d in zip(e.less, e.less_delta)]
            return S.OutputEffectOut(value=e.value, says=says, less=less, output_score=e.score, effect=e.effect,
                                     held=output_passes(e.score, e.effect))
        return S.NeuronOutputsOut(layer=layer, neuron=neuron, outputs={p: row(p) for p in POLARITIES})

    def window_acts(self, windows: list[list[int]], layer: int, neuron: int) -> list[list[float]]:
        """Neuron (layer, neuron)'s activation at every token of each exemplar window: forwards that stop after
        `layer` (the layers above cannot change it), windows of one length batched so that a lock hold runs about
        one chunk of tokens (`chunked.forward_chunks`)."""
        rt = self.runtime
        out: list[list[float] | None] = [None] * len(windows)
        by_len: dict[int, list[int]] = {}
        for j, w in enumerate(windows):
            if w:
                by_len.setdefault(len(w), []).append(j)
        for n, js in by_len.items():
            per_call = rt.lock.chunk_size(rt.chunk_tokens, rt.idle_chunk_tokens)
            rows = max(1, min(len(js), per_call // n))
            for a in range(0, len(js), rows):
                part = js[a:a + rows]
                run = forward_chunks(rt.subject, torch.tensor([windows[j] for j in part]), lock=rt.lock,
                                     chunk=max(1, rt.chunk_tokens // len(part)),
                                     idle_chunk=max(1, rt.idle_chunk_tokens // len(part)),
                                     capture=Capture(layers=[layer], neurons=[neuron]), stop_after=layer)
                acts = run.activations()[0, :, :, 0].float()
                for j, row in zip(part, acts):
                    out[j] = row.tolist()
        return [x if x is not None else [] for x in out]
