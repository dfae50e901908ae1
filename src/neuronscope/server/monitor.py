"""The Monitor's logic, free of HTTP: one facade over the parts that each do one job.

    mon = Monitor(subject, Knowledge.load(subject, "atlas/smollm2"))
    s = mon.sessions.create()
    for event in mon.send(s, "Tell me about dogs", max_new_tokens=40): ...   # TokenEvent..., DoneEvent
    mon.activations(s, page_size=20).rows          # views are pydantic models (schemas.py)

The parts: `runtime` (the shared model, its scheduler and chunk sizes), `render` (a conversation as tokens),
`chat` (answers, streamed), `views` (tokens, activations, attribution), `neurons` (a neuron's page), `concepts`
(concept search), `clustering` (active concepts), `steering` (steerings as Clamp edits), `transfer` (session
export and import), `annotate` (descriptions and normalisation wording for rows).

One model serves every session: every model call goes through `Monitor.model_lock` (`scheduler.FairLock`), first come
first served: answers are decoded one token per call (`decoding.decode`), a view's forward (activations, attribution)
runs in chunks over a KV cache (`chunked.forward_chunks`); one call per core runs at once (each thread's interventions
its own), and the decoding steps waiting at the same time run as one packed forward (`packing`), so a view never holds
up another session's stream by more than about one decoding step. Views of a conversation state are computed once and
cached in the session until the conversation or its steerings change.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from ..errors import NeuronscopeError
from ..interventions import Capture
from ..subject import Subject
from . import schemas as S
from .annotate import Annotator
from .cache import BoundedCache
from .chat import Chat, Event
from .clustering import Clusters
from .concepts import Concepts
from .chunked import CHUNK_TOKENS, GRAD_CHUNK_TOKENS, IDLE_CHUNK_TOKENS, forward_chunks
from .knowledge import Knowledge
from .limits import Limits
from .neurons import NeuronPages
from .packing import packs
from .render import PLAIN_SEPARATOR, Renderer, Rendering
from .runtime import Runtime
from .scheduler import STALL_STEPS, FairLock
from .sessions import Session, SessionStore
from .steering import MODES, Steerer
from .transfer import EXPORT_FORMAT, Importer, export_session
from .views import CONTENT_ROLES, SORTS, Analysis, Views, chat_mode

__all__ = ["Monitor", "MODES", "SORTS", "CONTENT_ROLES", "PLAIN_SEPARATOR", "EXPORT_FORMAT"]


class Monitor:
    def __init__(self, subject: Subject, knowledge: Knowledge | None = None, limits: Limits | None = None,
                 sessions: SessionStore | None = None, chunk_tokens: int = CHUNK_TOKENS,
                 idle_chunk_tokens: int = IDLE_CHUNK_TOKENS, grad_chunk_tokens: int = GRAD_CHUNK_TOKENS,
                 stall_steps: float = STALL_STEPS) -> None:
        """`chunk_tokens`: the most positions of a view's forward (or a prefill) run per model call while an
        answer streams (`grad_chunk_tokens` for an attribution's forward); `idle_chunk_tokens`: the same while none
        does; `stall_steps`: how many decoding steps another session's work may add to a streaming answer's step
        (see `scheduler.FairLock`)."""
        self.runtime = Runtime(subject, chunk_tokens, idle_chunk_tokens, grad_chunk_tokens, stall_steps)
        self.subject = subject
        self.knowledge = knowledge if knowledge is not None else Knowledge.load(subject, None)
        self.limits = limits if limits is not None else Limits()
        self.sessions = sessions if sessions is not None else SessionStore(
            max_sessions=self.limits.max_sessions, max_per_client=self.limits.max_sessions_per_client)
        packs(subject)  # checked once per model, now rather than in the first packed forward (SmolLM2: ~0.7 s)
        max_pos = getattr(subject.config, "max_position_embeddings", None)
        if max_pos:
            self.limits.max_tokens = min(self.limits.max_tokens, int(max_pos))
        self._neuron_cache = BoundedCache()
        self.renderer = Renderer(subject)
        self.annotator = Annotator(self.knowledge)
        self.concept_search = Concepts(self.knowledge, self.limits, self._neuron_cache)
        self.chat = Chat(self.runtime, self.renderer, self.limits)
        self.views = Views(self.runtime, self.renderer, self.knowledge, self.limits, self.annotator)
        self.neuron_pages = NeuronPages(self.runtime, self.renderer, self.knowledge, self.limits, self.annotator,
                                        self._neuron_cache)
        self.cluster_view = Clusters(self.views, self.knowledge, self.limits)
        self.steerer = Steerer(subject, self.knowledge, self.limits, self.renderer, self.concept_search.writers)
        self.importer = Importer(subject, self.limits, lambda s: len(self.renderer.render(s).ids))

    @property
    def model_lock(self) -> FairLock:
        """The scheduler of every model call (`scheduler.FairLock`); replaceable, e.g. by a benchmark."""
        return self.runtime.lock

    @model_lock.setter
    def model_lock(self, lock: FairLock) -> None:
        self.runtime.lock = lock

    @property
    def chat_template(self) -> bool:
        return self.renderer.chat_template

    @property
    def eos(self) -> set[int]:
        return self.runtime.eos

    # ---- model and sessions -------------------------------------------------------------------------------
    def info(self) -> S.InfoOut:
        """The model, what the atlas provides, notes on what is missing, and the limits."""
        s = self.subject
        model = S.ModelOut(name=s.name, family=s.family, n_layers=s.n_layers, n_neurons=s.n_neurons,
                           hidden_size=s.hidden_size, vocab_size=s.vocab_size, fingerprint=s.fingerprint)
        return S.InfoOut(model=model, chat_template=self.chat_template, chat_mode=chat_mode(self.chat_template),
                         capabilities=self.knowledge.capabilities, notes=list(self.knowledge.notes),
                         limits=self.limits.public())

    def state(self, s: Session) -> S.StateOut:
        """The conversation, steerings and the answer being generated (if any): what a reloaded page restores."""
        with s.lock:
            r = self.render(s)
            messages = [S.MessageOut(role=m.role, content=m.content, steered=bool(m.steerings), start=r.spans[k][0],
                                     end=r.spans[k][1], steered_by=m.steered_by, previous=m.previous)
                        for k, m in enumerate(s.messages)]
            return S.StateOut(session_id=s.id, version=s.version, n_tokens=len(r.ids), messages=messages,
                              steerings=[st.public() for st in s.steerings.values()],
                              generating=s.generating.model_copy() if s.generating is not None else None,
                              fingerprint=self.subject.fingerprint)

    def warm(self) -> None:
        """Do once what the first click of each kind would do (read the descriptions, vocabulary, quantiles and
        exemplar tables; load the embedding index and embedder, run one semantic search and one clustering; one
        short forward with hooks), so the first click is as fast as the next; `neuronscope serve` runs it in the
        background. Nothing is added to the caches of views."""
        self.annotator.descriptions()
        k, rt = self.knowledge, self.runtime
        steps: list[Callable[[], object]] = [
            lambda: k.top_tokens(0, 0, "pos"), lambda: k.normalise_one(0, 0, 1.0), lambda: k.decodes(0, 0),
            lambda: k.quantiles_of(0, 0), lambda: k.exemplars(0, 0, "pos", 1), self.annotator.level_marks,
            self.annotator.normalised_by, lambda: self.display_tokens(self.subject.encode("warm up")[0].tolist()),
            lambda: forward_chunks(self.subject, self.subject.encode("warm up")[0], lock=rt.lock,
                                   chunk=rt.chunk_tokens, capture=Capture(layers=None))]
        if k.atlas_dir and self.concept_search.has_index():
            from ..concepts.semantic import semantic_search
            folder = k.atlas_dir
            steps.append(lambda: semantic_search(folder, "the", k=5))
        if k.atlas_dir and self.concept_search.has_evidence():
            from ..concepts.search import concept_search
            ev_folder = k.atlas_dir
            steps.append(lambda: concept_search(ev_folder, "animals", k=5))   # builds the concept evidence once
        steps.append(lambda: k.clusters([(0, i, "pos") for i in range(min(8, self.subject.n_neurons))]))
        for step in steps:
            try:
                step()
            except NeuronscopeError:  # a part the atlas lacks: its views say so when asked
                pass

    # ---- the conversation (render.py) ---------------------------------------------------------------------
    def render(self, s: Session) -> Rendering:
        """The conversation's token ids, with the span [start, end) of each message (cached per version)."""
        return self.renderer.render(s)

    def display_tokens(self, ids: list[int]) -> list[str]:
        """Each token as it reads in context (with its leading space, special tokens shown)."""
        return self.renderer.display_tokens(ids)

    def _prompt_ids(self, s: Session) -> list[int]:  # kept for bench/monitor.py
        return self.renderer.prompt_ids(s)

    def _next_strings(self, prev: int, alts: list[int]) -> list[str]:  # kept for tests/test_browser.py
        return self.renderer.next_strings(prev, alts)

    # ---- chat (chat.py) -----------------------------------------------------------------------------------
    def send(self, s: Session, content: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int | None = None) -> Iterator[Event]:
        """Add a user message and stream the answer (events: token..., then done). Validates before anything."""
        return self.chat.send(s, content, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)

    def regenerate(self, s: Session, *, max_new_tokens: int = 64, temperature: float = 0.0,
                   seed: int | None = None) -> Iterator[Event]:
        """Drop the last answer (if any) and answer the last user message again, with the current steerings."""
        return self.chat.regenerate(s, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)

    def new_chat(self, s: Session) -> None:
        """Clear the conversation; steerings on generated tokens stay (their prompt ranges are dropped)."""
        self.chat.new_chat(s)

    # ---- views (views.py, neurons.py, concepts.py, clustering.py) -----------------------------------------
    def analysis(self, s: Session) -> Analysis:
        """One forward of the conversation with its steerings: tokens, top-5, firing neurons (cached)."""
        return self.views.analysis(s)

    def tokens(self, s: Session) -> S.TokensOut:
        """Every token of the conversation with its probability and top-5."""
        return self.views.tokens(s)

    def activations(self, s: Session, *, start: int | None = None, end: int | None = None, sort: str = "activation",
                    order: str = "desc", page: int = 0, page_size: int = 50, filter: str = "",
                    polarity: str | None = None, content_only: bool = False,
                    interpretable: bool = False) -> S.ActivationsOut:
        """Neurons firing in the token range [start, end), one row per (layer, neuron, polarity), paged."""
        return self.views.activations(s, start=start, end=end, sort=sort, order=order, page=page,
                                      page_size=page_size, filter=filter, polarity=polarity,
                                      content_only=content_only, interpretable=interpretable)

    def attribution(self, s: Session, position: int, token_id: int | None = None, *, page: int = 0,
                    page_size: int = 50) -> S.AttributionOut:
        """The neurons that caused the token at `position` (top 1000 by |a * dp/da|), once per state, cached."""
        return self.views.attribution(s, position, token_id, page=page, page_size=page_size)

    def neuron(self, layer: int, neuron: int, n_exemplars: int = 10, marks: bool = True) -> S.NeuronOut:
        """A neuron's decodes, description and top exemplars (with each token's normalised activation)."""
        return self.neuron_pages.neuron(layer, neuron, n_exemplars, marks)

    def neuron_outputs(self, layer: int, neuron: int) -> S.NeuronOutputsOut:
        """What a neuron makes the model say (its causal output effect), measured on demand."""
        return self.neuron_pages.outputs(layer, neuron)

    def concepts(self, query: str, k: int = 50) -> S.ConceptsOut:
        """Neurons for a concept, best first (by meaning when the atlas has the describe index, else by text)."""
        return self.concept_search.concepts(query, k)

    def clusters(self, s: Session, start: int | None = None, end: int | None = None, *, max_neurons: int = 300,
                 content_only: bool = False, interpretable: bool = False, sort: str = "activation",
                 position: int | None = None) -> S.ClustersOut:
        """The active concepts: neurons firing in [start, end) grouped into named clusters of related neurons."""
        return self.cluster_view.clusters(s, start, end, max_neurons=max_neurons, content_only=content_only,
                                          interpretable=interpretable, sort=sort, position=position)

    # ---- steering (steering.py) ---------------------------------------------------------------------------
    def add_steering(self, s: Session, *, mode: str, concept: str | None = None,
                     neurons: list[list[Any]] | None = None, strength: float = 0.75, value: float | None = None,
                     n_neurons: int | None = None, ranges: list[list[int]] | None = None,
                     generated: bool = True, label: str | None = None, enabled: bool = True) -> S.SteeringOut:
        """Steer a concept (its neurons found by search) or explicit neurons; `label` names it (e.g. a cluster)."""
        return self.steerer.add(s, mode=mode, concept=concept, neurons=neurons, strength=strength, value=value,
                                n_neurons=n_neurons, ranges=ranges, generated=generated, label=label,
                                enabled=enabled)

    def remove_steering(self, s: Session, steering_id: str) -> bool:
        """Remove a steering; False if there is no such steering."""
        return self.steerer.remove(s, steering_id)

    def set_steering(self, s: Session, steering_id: str, enabled: bool) -> S.SteeringOut | None:
        """Switch a steering off (kept, not applied) or on again; None if there is no such steering."""
        return self.steerer.switch(s, steering_id, enabled)

    # ---- export / import (transfer.py) --------------------------------------------------------------------
    def export(self, s: Session) -> S.ExportOut:
        """The session as JSON: conversation (with the exact answer ids), steerings, model fingerprint."""
        return export_session(s, self.subject)

    def import_session(self, s: Session, data: dict[str, Any] | S.ExportOut) -> S.StateOut:
        """Replace an idle session's conversation and steerings by an export of this same model (validated): its
        JSON, or the `ExportOut` that `export` returned."""
        self.importer.load(s, data.model_dump() if isinstance(data, S.ExportOut) else data)
        return self.state(s)
