"""The views of a session's conversation: its tokens with their top-5, the neurons firing in a token range, and the
neurons a token is attributed to. One forward (in chunks, with the session's steerings) gives tokens and firings;
an attribution runs its own forward and backward; both are computed once per conversation state, cached in the
session until the conversation or its steerings change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..attribution import AttributionRow
from ..errors import NeuronscopeError
from ..interventions import Capture
from ..refs import check_polarity
from . import schemas as S
from .annotate import Annotator
from .chunked import attribute_chunked
from .knowledge import Knowledge
from .limits import Limits
from .render import Renderer, Rendering
from .runtime import Runtime
from .sessions import Session
from .steering import analysis_edits

SORTS = ("activation", "layer", "neuron", "count")
CONTENT_ROLES = ("user", "assistant")      # other tokens are chat template, system prompt or turn separators



@dataclass
class Firing:
    """One neuron firing in a conversation, one polarity: every position it fires at, with its normalised value there
    (the raw activation where there are no corpus statistics) and its raw activation."""
    layer: int
    neuron: int
    polarity: str
    positions: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)


@dataclass
class Analysis:
    """One forward of a conversation (with its steerings): its tokens and the neurons firing on them."""
    tokens: list[S.TokenOut]
    firings: list[Firing]
    mode: str                        # normalised | raw (no corpus statistics) | empty (no tokens)


@dataclass
class AttributedRow(AttributionRow):
    """An attribution row of a conversation: the library's row with the neuron's polarity there, the token at its
    position, and its normalised activation."""
    polarity: str = "pos"
    token: str = ""
    normalised: float | None = None


@dataclass
class AttributionResult:
    """The whole attribution of one token of one conversation state (its rows best first; cached per state)."""
    target_position: int
    target_token: int
    target_text: str
    probability: float
    rows: list[AttributedRow]
    position_scores: list[float]     # the rows' summed scores per position


Picked = tuple[Firing, tuple[int, float], int]  # a firing, its strongest (position, value) in range, its count
SORT_KEYS: dict[str, Callable[[Picked], Any]] = {
    "activation": lambda x: abs(x[1][1]), "layer": lambda x: (x[0].layer, x[0].neuron),
    "neuron": lambda x: (x[0].neuron, x[0].layer), "count": lambda x: (x[2], abs(x[1][1]))}


def chat_mode(chat_template: bool) -> str:
    return "chat template" if chat_template else "plain continuation (no chat template)"


def check_page(limits: Limits, page: int, page_size: int) -> None:
    if not 1 <= page_size <= limits.max_page_size or page < 0:
        raise NeuronscopeError(f"page must be >= 0 and page_size between 1 and {limits.max_page_size}.")


def check_range(start: int | None, end: int | None, T: int) -> tuple[int, int]:
    """[start, end) inside a conversation of T tokens (None: its start, its end)."""
    a = 0 if start is None else start
    b = T if end is None else end
    if not (0 <= a < b <= T) and not (T == 0 and a == 0 and b == 0):
        raise NeuronscopeError(f"The token range [{a}, {b}) is outside the conversation, which has tokens "
                               f"0 to {T - 1}." if T else "The conversation is empty: there is no token range.")
    return a, b


def firing_groups(idx: torch.Tensor, vals: torch.Tensor, raw: torch.Tensor) -> list[Firing]:
    """Firings (layer, position, neuron) grouped into one `Firing` per (layer, neuron, polarity)."""
    groups: dict[tuple[int, int, str], Firing] = {}
    for (l, t, i), v, rv in zip(idx.tolist(), vals.tolist(), raw.tolist()):
        pol = "pos" if rv >= 0 else "neg"
        g = groups.setdefault((l, i, pol), Firing(l, i, pol))
        g.positions.append(t)
        g.values.append(v)
        g.raw.append(rv)
    return list(groups.values())


class Views:
    """Tokens, activations and attribution of sessions' conversations."""

    def __init__(self, runtime: Runtime, renderer: Renderer, knowledge: Knowledge, limits: Limits,
                 annotator: Annotator) -> None:
        self.runtime, self.renderer, self.knowledge = runtime, renderer, knowledge
        self.limits, self.annotator = limits, annotator

    # ---- one forward: tokens, top-5, activations ----------------------------------------------------------
    def analysis(self, s: Session) -> Analysis:
        """One forward of the conversation (with its steerings; in chunks, one lock hold each): tokens, top-5,
        firing neurons. Cached."""
        with s.lock:
            a: Analysis | None = s.cache.get("analysis")
            if a is not None:
                return a
            r = self.renderer.render(s)
            if not r.ids:
                a = Analysis([], [], "empty")
                s.cache["analysis"] = a
                return a
            ivs, steered = analysis_edits(s, r)
            run = self.runtime.forward(torch.tensor([r.ids]), interventions=ivs, capture=Capture(layers=None))
            assert run.logits is not None
            logits = run.logits.float()                                            # [T, vocab]
            acts = run.activations()[:, 0].float()                                 # [L, T, N]
            a = Analysis(self._tokens(r, logits, steered), *self._firings(acts))
            s.cache["analysis"] = a
            return a

    def _tokens(self, r: Rendering, logits: torch.Tensor, steered: set[int]) -> list[S.TokenOut]:
        """Each token with its probability and the top-5 the model predicted at its position."""
        ids = r.ids
        T = len(ids)
        probs = torch.softmax(logits, -1)
        tp, ti = probs.topk(5, dim=-1)
        own: list[float | None] = [None]
        if T > 1:
            own += probs[torch.arange(T - 1), torch.tensor(ids[1:], dtype=torch.long)].tolist()
        strs = r.strings
        tokens: list[S.TokenOut] = []
        for t in range(T):
            top5: list[S.AltOut] = []
            if t:  # what the model predicted AT this position (from the tokens before it): this token's rivals
                alts = ti[t - 1].tolist()
                top5 = [S.AltOut(token=x, id=i, prob=p)
                        for x, i, p in zip(self.renderer.next_strings(ids[t - 1], alts), alts, tp[t - 1].tolist())]
            tokens.append(S.TokenOut(position=t, id=ids[t], text=strs[t], role=r.roles[t],
                                     message=r.message[t], steered=t in steered, prob=own[t], top5=top5))
        return tokens

    def _firings(self, acts: torch.Tensor) -> tuple[list[Firing], str]:
        """The firing neurons of acts [L, T, N]: beyond their quantiles ("normalised"), or without statistics the
        strongest raw activations of each token ("raw")."""
        L, T, N = acts.shape
        norm = self.knowledge.normalise(acts)
        if norm is not None:
            mode = "normalised"
            idx = (norm.abs() > 1).nonzero()
            vals = norm[idx[:, 0], idx[:, 1], idx[:, 2]]
        else:
            mode = "raw"
            k = min(self.limits.raw_per_token, L * N)
            flat = acts.permute(1, 0, 2).reshape(T, L * N)
            top = flat.abs().topk(k, dim=1).indices                               # [T, k]
            pos = torch.arange(T).unsqueeze(1).expand_as(top).reshape(-1)
            idx = torch.stack([top.reshape(-1) // N, pos, top.reshape(-1) % N], dim=1)
            vals = acts[idx[:, 0], idx[:, 1], idx[:, 2]]
        raw = acts[idx[:, 0], idx[:, 1], idx[:, 2]]
        return firing_groups(idx, vals, raw), mode

    def token_strings(self, s: Session) -> list[str]:
        """The conversation's tokens as they read in context."""
        return self.renderer.display_tokens(self.renderer.render(s).ids)

    def tokens(self, s: Session) -> S.TokensOut:
        """Every token of the conversation with its probability and top-5."""
        a = self.analysis(s)
        return S.TokensOut(version=s.version, tokens=a.tokens, chat_mode=chat_mode(self.renderer.chat_template))

    # ---- activations ----------------------------------------------------------------------------------------
    def _check_view(self, sort: str, order: str, polarity: str | None, page: int, page_size: int) -> None:
        if sort not in SORTS:
            raise NeuronscopeError(f"Unknown sort '{sort}'; use one of {', '.join(SORTS)}.")
        if order not in ("asc", "desc"):
            raise NeuronscopeError("Order must be asc or desc.")
        if polarity is not None:
            check_polarity(polarity)
        check_page(self.limits, page, page_size)

    def _matches(self, row: Firing, needle: str) -> bool:
        """Whether the filter text is in the neuron's names, description, top tokens or polarity."""
        if not needle:
            return True
        note = self.annotator.note(row.layer, row.neuron, row.polarity)
        hay = " ".join([f"l{row.layer}/n{row.neuron}", f"{row.layer}:{row.neuron}", note.description or "",
                        " ".join(note.top_tokens), row.polarity]).lower()
        return needle in hay

    def _select(self, rows: list[Firing], lo: int, hi: int, in_view: Callable[[int], bool], polarity: str | None,
                interpretable: bool, needle: str) -> list[Picked]:
        """The firings inside [lo, hi) that pass the filters, each with its strongest firing and count."""
        index = self.annotator.descriptions() if interpretable else None
        view = []
        for row in rows:
            if polarity and row.polarity != polarity:
                continue
            inside = [(t, v) for t, v in zip(row.positions, row.values) if lo <= t < hi and in_view(t)]
            if not inside:
                continue
            if index is not None:
                d = index.get((row.layer, row.neuron, row.polarity))
                if not (d and d.interpretable):
                    continue
            view.append((row, max(inside, key=lambda tv: abs(tv[1])), len(inside)))
        if needle:
            self.annotator.prefetch((r.layer, r.neuron, r.polarity) for r, _, _ in view)
            view = [x for x in view if self._matches(x[0], needle)]
        return view

    def _notes(self, mode: str, interpretable: bool) -> list[str]:
        notes = list(self.knowledge.notes)
        if interpretable and self.knowledge.descriptions is None:
            notes.insert(0, "No descriptions: every firing neuron is shown (none can be judged interpretable).")
        if mode == "raw":
            notes.insert(0, f"Not normalised: no corpus statistics, so this shows the {self.limits.raw_per_token} "
                            "strongest raw activations of each token (values are raw activations).")
        return notes

    def _page(self, view: list[Picked], page: int, page_size: int) -> list[S.ActivationRowOut]:
        rows: list[S.ActivationRowOut] = []
        shown = view[page * page_size:(page + 1) * page_size]
        self.annotator.prefetch((r.layer, r.neuron, r.polarity) for r, _, _ in shown)
        for row, (t, v), count in shown:
            note = self.annotator.note(row.layer, row.neuron, row.polarity)
            rows.append(S.ActivationRowOut(
                layer=row.layer, neuron=row.neuron, polarity=row.polarity, activation=v, position=t, count=count,
                description=note.description, interpretable=note.interpretable, top_tokens=note.top_tokens,
                fires=[S.FireOut(position=p, value=x) for p, x in zip(row.positions, row.values)]))
        return rows

    def activations(self, s: Session, *, start: int | None = None, end: int | None = None, sort: str = "activation",
                    order: str = "desc", page: int = 0, page_size: int = 50, filter: str = "",
                    polarity: str | None = None, content_only: bool = False,
                    interpretable: bool = False) -> S.ActivationsOut:
        """Neurons firing in the token range [start, end): one row per (layer, neuron, polarity), paged.

        `content_only` keeps firings on the messages' own tokens (not the chat template, system prompt or turn
        separators); `interpretable` keeps neurons whose description counts as interpretable (needs descriptions).
        """
        self._check_view(sort, order, polarity, page, page_size)
        a = self.analysis(s)
        T = len(a.tokens)
        lo, hi = check_range(start, end, T)
        if len(filter) > self.limits.max_filter_chars:
            raise NeuronscopeError(f"The filter has {len(filter)} characters; the limit is "
                                   f"{self.limits.max_filter_chars}.")
        roles = self.renderer.render(s).roles

        def in_view(t: int) -> bool:
            return not content_only or roles[t] in CONTENT_ROLES
        view = self._select(a.firings, lo, hi, in_view, polarity, interpretable, filter.strip().lower())
        view.sort(key=SORT_KEYS[sort], reverse=(order == "desc"))
        tints = [0.0] * T
        for row, _, _ in view:
            for t, v in zip(row.positions, row.values):
                if in_view(t):
                    tints[t] += v
        return S.ActivationsOut(version=s.version, mode=a.mode, start=lo, end=hi, total=len(view), page=page,
                                page_size=page_size, rows=self._page(view, page, page_size), token_sums=tints,
                                notes=self._notes(a.mode, interpretable),
                                normalised_by=self.annotator.normalised_by() if a.mode == "normalised" else None)

    # ---- attribution --------------------------------------------------------------------------------------
    def attribution(self, s: Session, position: int, token_id: int | None = None, *, page: int = 0,
                    page_size: int = 50) -> S.AttributionOut:
        """The neurons that caused the token at `position` (top 1000 by |a * dp/da|), once per state, cached."""
        check_page(self.limits, page, page_size)
        res = self.attribution_result(s, position, token_id)
        shown = res.rows[page * page_size:(page + 1) * page_size]
        self.annotator.prefetch((r.layer, r.neuron, r.polarity) for r in shown)
        page_rows = [self._attribution_row(row) for row in shown]
        return S.AttributionOut(version=s.version, target_position=res.target_position,
                                target_token=res.target_token, target_text=res.target_text,
                                probability=res.probability, total=len(res.rows), page=page, page_size=page_size,
                                rows=page_rows, position_scores=res.position_scores, notes=list(self.knowledge.notes))

    def _attribution_row(self, row: AttributedRow) -> S.AttributionRowOut:
        note = self.annotator.note(row.layer, row.neuron, row.polarity)
        return S.AttributionRowOut(layer=row.layer, position=row.position, neuron=row.neuron, token=row.token,
                                   activation=row.activation, normalised=row.normalised, gradient=row.gradient,
                                   score=row.score, polarity=row.polarity, description=note.description,
                                   interpretable=note.interpretable, top_tokens=note.top_tokens)

    def _check_target(self, position: int, token_id: int | None, T: int) -> None:
        if not 1 <= position < T:
            raise NeuronscopeError(f"Position {position} has no token to explain: pick a token at positions 1 "
                                   f"to {T - 1}." if T > 1 else "The conversation is too short to attribute.")
        vocab = self.runtime.subject.vocab_size
        if token_id is not None and not 0 <= token_id < vocab:
            raise NeuronscopeError(f"Token id {token_id} is out of range: the vocabulary has {vocab} tokens.")

    def attribution_result(self, s: Session, position: int, token_id: int | None) -> AttributionResult:
        """The whole attribution result of one state (computed once, cached in the session)."""
        with s.lock:
            r = self.renderer.render(s)
            T = len(r.ids)
            self._check_target(position, token_id, T)
            key = ("attr", position, token_id)
            res: AttributionResult | None = s.cache.get(key)
            if res is None:
                res = s.cache[key] = self._attribute(s, r, position, token_id)
        return res

    def _attribute(self, s: Session, r: Rendering, position: int, token_id: int | None) -> AttributionResult:
        rt = self.runtime
        ivs, _ = analysis_edits(s, r)
        att = attribute_chunked(rt.subject, torch.tensor([r.ids]), position, token_id,
                                top=self.limits.attribution_top, lock=rt.lock, chunk=rt.grad_chunk_tokens,
                                idle_chunk=rt.idle_chunk_tokens, interventions=ivs)
        strs = self.renderer.display_tokens(r.ids)
        rows = [AttributedRow(**vars(row), polarity="pos" if row.activation >= 0 else "neg", token=strs[row.position],
                              normalised=self.knowledge.normalise_one(row.layer, row.neuron, row.activation))
                for row in att.rows()]
        sums = [0.0] * len(r.ids)
        for row in rows:
            sums[row.position] += row.score
        return AttributionResult(position, att.target_token, rt.subject.token_strings([att.target_token])[0],
                                 att.probability, rows, sums)
