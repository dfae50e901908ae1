"""Chat: add a message (or answer the last one again) and stream the answer, decoded on the server to its end.

An answer is generated in a thread of its own, one token per model call (`decoding.decode`), with the session's
steerings; it finishes and is stored in the session even if nobody reads the events (a reload mid-answer finds it;
`session.generating` holds the partial text meanwhile).
"""
from __future__ import annotations

import math
import queue
import threading
from typing import Any, Iterator

from ..errors import NeuronscopeError
from ..interventions import Intervention
from . import schemas as S
from .decoding import decode
from .limits import Limits
from .render import Renderer
from .runtime import Runtime
from .sessions import Message, Session
from .steering import active, generation_edits

Event = S.Event  # TokenEvent | DoneEvent | ErrorEvent


def check_idle(s: Session) -> None:
    """One sentence when the session is still answering."""
    if s.generating is not None:
        raise NeuronscopeError("An answer is still being generated in this session; wait for it to finish.")


class Chat:
    """Conversations of the sessions, answered by the shared model."""

    def __init__(self, runtime: Runtime, renderer: Renderer, limits: Limits) -> None:
        self.runtime, self.renderer, self.limits = runtime, renderer, limits

    def _check_gen(self, max_new_tokens: int, temperature: float) -> None:
        L = self.limits
        if not 1 <= int(max_new_tokens) <= L.max_new_tokens:
            raise NeuronscopeError(f"max_new_tokens must be between 1 and {L.max_new_tokens}, got {max_new_tokens}.")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                and 0.0 <= temperature <= L.max_temperature):
            raise NeuronscopeError(f"Temperature must be between 0 (greedy) and {L.max_temperature}, "
                                   f"got {temperature}.")

    def _checked_prompt(self, s: Session, max_new_tokens: int) -> list[int]:
        prompt = self.renderer.prompt_ids(s)
        if len(prompt) + max_new_tokens > self.limits.max_tokens:
            raise NeuronscopeError(
                f"The conversation would reach {len(prompt) + max_new_tokens} tokens, over the limit of "
                f"{self.limits.max_tokens}; start a new chat or ask for fewer new tokens.")
        return prompt

    def send(self, s: Session, content: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int | None = None) -> Iterator[Event]:
        """Add a user message and stream the answer (events: token..., then done). Validates before anything."""
        if not isinstance(content, str) or not content.strip():
            raise NeuronscopeError("The message is empty; type something to send.")
        if len(content) > self.limits.max_message_chars:
            raise NeuronscopeError(f"The message has {len(content)} characters; the limit is "
                                   f"{self.limits.max_message_chars}.")
        self._check_gen(max_new_tokens, temperature)
        with s.lock:
            check_idle(s)
            s.messages.append(Message("user", content))
            try:
                prompt = self._checked_prompt(s, max_new_tokens)
            except NeuronscopeError:
                s.messages.pop()
                raise
            s.changed()
            s.generating = S.GeneratingOut(text="", n_tokens=0)
        return self._stream(s, prompt, max_new_tokens, temperature, seed)

    def regenerate(self, s: Session, *, max_new_tokens: int = 64, temperature: float = 0.0,
                   seed: int | None = None) -> Iterator[Event]:
        """Drop the last answer (if any) and answer the last user message again, with the current steerings."""
        self._check_gen(max_new_tokens, temperature)
        with s.lock:
            check_idle(s)
            msgs = list(s.messages)
            previous: list[S.PreviousOut] = []
            if msgs and msgs[-1].role == "assistant":
                last = msgs.pop()
                before = S.PreviousOut(content=last.content, steered_by=last.steered_by)
                previous = ([before] + last.previous)[:self.limits.max_previous_answers]
            if not msgs or msgs[-1].role != "user":
                raise NeuronscopeError("There is no message to answer yet; send one first.")
            old = s.messages
            s.messages = msgs
            try:
                prompt = self._checked_prompt(s, max_new_tokens)
            except NeuronscopeError:
                s.messages = old
                raise
            s.changed()
            s.generating = S.GeneratingOut(text="", n_tokens=0)
        return self._stream(s, prompt, max_new_tokens, temperature, seed, previous=previous)

    @staticmethod
    def new_chat(s: Session) -> None:
        """Clear the conversation; steerings on generated tokens stay (their prompt ranges are dropped)."""
        with s.lock:
            check_idle(s)
            s.messages = []
            for sid in list(s.steerings):
                st = s.steerings[sid]
                st.ranges = []
                if not st.generated:
                    del s.steerings[sid]
            s.changed()

    def _stream(self, s: Session, prompt: list[int], max_new_tokens: int, temperature: float,
                seed: int | None, previous: list[S.PreviousOut] | None = None) -> Iterator[Event]:
        """Start generating in a thread that finishes (and stores the answer) even if nobody reads the events."""
        q: queue.Queue[tuple[str, Any]] = queue.Queue()
        ivs: list[Intervention] = list(generation_edits(s, len(prompt)))
        on = [st for st in active(s) if st.generated or st.ranges]
        steering_ids = [st.id for st in on if st.generated]
        steered_by = [st.public() for st in on]
        rt, subject = self.runtime, self.runtime.subject
        new: list[int] = []

        def on_token(t: int) -> None:
            new.append(t)
            text = subject.decode([x for x in new if x not in rt.eos])
            with s.lock:
                s.generating = S.GeneratingOut(text=text, n_tokens=len(new))
            q.put(("token", t))

        def work() -> None:
            try:
                decode(subject, prompt, interventions=ivs, lock=rt.lock, max_new_tokens=max_new_tokens,
                       temperature=float(temperature), seed=seed, eos=rt.eos, on_token=on_token,
                       chunk=rt.chunk_tokens, idle_chunk=rt.idle_chunk_tokens)
                content_ids = [t for t in new if t not in rt.eos]
                with s.lock:
                    s.messages.append(Message("assistant", subject.decode(content_ids), ids=content_ids,
                                              steerings=steering_ids, steered_by=steered_by,
                                              previous=list(previous or [])))
                    s.generating = None
                    s.changed()
                    version = s.version
                finish = "eos" if any(t in rt.eos for t in new) else "length"
                q.put(("end", {"finish": finish, "version": version}))
            except Exception as exc:  # reported to the client as an error event
                with s.lock:
                    s.generating = None
                q.put(("error", f"Generation failed: {exc}"))

        threading.Thread(target=work, daemon=True, name=f"answer-{s.id[:6]}").start()
        return self._events(q, steered=bool(steering_ids) or bool(ivs))

    def _events(self, q: queue.Queue[tuple[str, Any]], steered: bool) -> Iterator[Event]:
        """The answer's events as its thread produces them: token..., then done (or error)."""
        subject, eos = self.runtime.subject, self.runtime.eos
        text = ""
        seen: list[int] = []
        while True:
            kind, val = q.get()
            if kind == "error":
                yield S.ErrorEvent(error=val)
                return
            if kind == "end":
                break
            seen.append(val)
            if val in eos:
                continue
            full = subject.decode([t for t in seen if t not in eos])
            delta, text = full[len(text):], full
            yield S.TokenEvent(id=val, text=delta, token=subject.token_strings([val])[0])
        yield S.DoneEvent(text=text, n_tokens=len(seen), finish_reason=val["finish"], version=val["version"],
                          steered=steered)
