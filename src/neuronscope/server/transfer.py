"""Session export and import: a session as JSON (its conversation with the exact answer ids, its steerings, the
model's fingerprint), and an export read back into an idle session of the same weights, checked field by field."""
from __future__ import annotations

import math
from typing import Any, Callable

from pydantic import ValidationError

from ..errors import NeuronscopeError
from ..refs import check_neuron, check_polarity
from ..subject import Subject
from . import schemas as S
from .chat import check_idle
from .limits import Limits
from .sessions import Message, Session, Steering
from .steering import MODES

EXPORT_FORMAT = "neuronscope-monitor-session/1"


def export_session(s: Session, subject: Subject) -> S.ExportOut:
    """The session as JSON: conversation (with the exact answer ids), steerings, model fingerprint."""
    with s.lock:
        return S.ExportOut(format=EXPORT_FORMAT, model={"name": subject.name, "fingerprint": subject.fingerprint},
                           messages=[S.ExportMessageOut(role=m.role, content=m.content, ids=m.ids,
                                                        steerings=list(m.steerings), steered_by=m.steered_by,
                                                        previous=m.previous) for m in s.messages],
                           steerings=[st.public() for st in s.steerings.values()],
                           n_steerings_made=s.n_steerings_made)


class Importer:
    """Checks exports against one subject and the limits, and loads them into sessions."""

    def __init__(self, subject: Subject, limits: Limits, n_tokens: Callable[[Session], int]) -> None:
        """`n_tokens(session)`: the length of the session's rendered conversation."""
        self.subject, self.limits, self.n_tokens = subject, limits, n_tokens

    def _check_header(self, data: Any) -> None:
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise NeuronscopeError(f"This is not a Monitor session export (format '{EXPORT_FORMAT}' expected).")
        fp = (data.get("model") or {}).get("fingerprint")
        if fp != self.subject.fingerprint:
            raise NeuronscopeError(f"The session was exported from other weights (fingerprint {str(fp)[:40]}); "
                                   f"this server runs {self.subject.name} ({self.subject.fingerprint}).")

    def _message(self, k: int, m: Any) -> Message:
        """Message k of an export: turns alternate user, assistant; its ids (if any) are in the vocabulary."""
        L, vocab = self.limits, self.subject.vocab_size
        role = m.get("role") if isinstance(m, dict) else None
        if role != ("user" if k % 2 == 0 else "assistant"):
            raise NeuronscopeError(f"Message {k} must be a {'user' if k % 2 == 0 else 'assistant'} turn.")
        content = m.get("content")
        if not isinstance(content, str) or len(content) > L.max_message_chars * 4:
            raise NeuronscopeError(f"Message {k} has no text or is over {L.max_message_chars * 4} characters.")
        ids = m.get("ids")
        if ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) and 0 <= t < vocab
                                                                  for t in ids)):
            raise NeuronscopeError(f"Message {k} has token ids outside the vocabulary.")
        try:  # what the page shows of earlier answers: checked now, not when a view is built
            steered_by = [S.SteeringOut.model_validate(x) for x in m.get("steered_by") or []]
            previous = [S.PreviousOut.model_validate(x) for x in m.get("previous") or []]
        except ValidationError as exc:
            raise NeuronscopeError(f"Message {k} says what steered it in a malformed way "
                                   f"({exc.errors()[0]['msg']}).") from None
        return Message(role, content, ids=ids, steerings=[str(x) for x in m.get("steerings") or []],
                       steered_by=steered_by, previous=previous)

    def _messages(self, data: dict[str, Any]) -> list[Message]:
        msgs = data.get("messages") or []
        if not isinstance(msgs, list):
            raise NeuronscopeError("The export's messages must be a list.")
        return [self._message(k, m) for k, m in enumerate(msgs)]

    def _neurons(self, neurons: Any) -> list[tuple[int, int, str, float]]:
        L = self.limits
        if not isinstance(neurons, list) or not neurons or len(neurons) > L.max_steer_neurons:
            raise NeuronscopeError(f"Each steering needs 1 to {L.max_steer_neurons} neurons.")
        vals = []
        for n in neurons:
            l, i, pol = int(n["layer"]), int(n["neuron"]), str(n.get("polarity", "pos"))
            check_neuron(l, i, self.subject.n_layers, self.subject.n_neurons)
            check_polarity(pol)
            v = float(n["value"])
            if not math.isfinite(v) or abs(v) > max(L.max_clamp, 1e6):
                raise NeuronscopeError("A steering value is not a finite number.")
            vals.append((l, i, pol, v))
        return vals

    def _steering(self, st: Any, n_tokens: int, default_id: str) -> Steering:
        """One exported steering, checked against a conversation of `n_tokens` tokens."""
        if not isinstance(st, dict):
            raise NeuronscopeError("Each steering is an object.")
        vals = self._neurons(st.get("neurons") or [])
        mode = st.get("mode")
        if mode not in MODES:
            raise NeuronscopeError(f"Unknown steering mode '{str(mode)[:20]}'.")
        ranges = [(int(a), int(b)) for a, b in st.get("ranges") or []]
        if any(not 0 <= a < b <= n_tokens for a, b in ranges):
            raise NeuronscopeError("A steering's token range is outside the imported conversation.")
        strength = st.get("strength")
        return Steering(id=str(st.get("id") or default_id)[:40], mode=mode, concept=st.get("concept"),
                        label=st.get("label"), strength=float(strength) if strength is not None else None,
                        neurons=vals, ranges=ranges, generated=bool(st.get("generated", True)),
                        enabled=bool(st.get("enabled", True)))

    def _load(self, s: Session, out: list[Message], steer: list[Any]) -> None:
        """Put the conversation and the steerings into the session (its lock held; on an error the caller puts
        back what was there)."""
        L = self.limits
        s.messages, s.steerings = out, {}
        s.cache.clear()  # views of the conversation just replaced (a rendering among them) are not this one's
        n_tokens = self.n_tokens(s) if out else 0
        if n_tokens > L.max_tokens:
            raise NeuronscopeError(f"The conversation has {n_tokens} tokens, over the limit of {L.max_tokens}.")
        for st in steer:
            loaded = self._steering(st, n_tokens, f"st{len(s.steerings) + 1}")
            s.steerings[loaded.id] = loaded

    def load(self, s: Session, data: dict[str, Any]) -> None:
        """Replace an idle session's conversation and steerings by an export of this same model (validated); a bad
        export is one sentence and leaves the session as it was."""
        L = self.limits
        self._check_header(data)
        out = self._messages(data)
        steer = data.get("steerings") or []
        if not isinstance(steer, list) or len(steer) > L.max_steerings:
            raise NeuronscopeError(f"The export holds more than {L.max_steerings} steerings.")
        with s.lock:
            check_idle(s)
            old = (s.messages, s.steerings, s.n_steerings_made)
            try:
                self._load(s, out, steer)
            except NeuronscopeError:
                s.messages, s.steerings, s.n_steerings_made = old
                s.changed()
                raise
            except (KeyError, TypeError, ValueError) as exc:
                s.messages, s.steerings, s.n_steerings_made = old
                s.changed()
                raise NeuronscopeError(f"The export is malformed ({type(exc).__name__}: {str(exc)[:80]}).") from None
            s.n_steerings_made = max(int(data.get("n_steerings_made") or 0), len(s.steerings))
            s.changed()
