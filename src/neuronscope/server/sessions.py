"""Browser sessions: each has its own conversation, steerings and cached views; idle sessions expire.

A `SessionStore` hands out unguessable ids, touches a session on every use, and drops sessions idle for longer than
`ttl` seconds. Each session belongs to the client that made it (`owner`, the client token of the HTTP layer); `get`
with another owner finds nothing. A client over `max_per_client` sessions loses its own least recently used one, never
another client's; when the whole store is full, a new session is refused (`StoreFull`). A session's state is only
reachable through its id, so one session's conversation, steerings or caches never leak into another's. Every change
to the conversation or the steerings bumps `version`, which keys the cached views (tokens + activations, attributions).
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import NeuronscopeError
from .schemas import GeneratingOut, PreviousOut, SteeringOut, SteerNeuronOut


@dataclass
class Message:
    role: str                     # "user" | "assistant"
    content: str
    ids: list[int] | None = None  # the exact generated ids (used to render models without a chat template)
    steerings: list[str] = field(default_factory=list)  # steering ids active when this answer was generated
    steered_by: list[SteeringOut] = field(default_factory=list)  # those steerings as they were (public form)
    previous: list[PreviousOut] = field(default_factory=list)  # earlier answers to it: content, steered_by


@dataclass
class Steering:
    id: str
    mode: str                                   # strengthen | suppress | clamp
    concept: str | None
    strength: float | None
    neurons: list[tuple[int, int, str, float]]  # (layer, neuron, polarity, clamp value)
    ranges: list[tuple[int, int]]               # prompt token ranges [start, end)
    generated: bool                             # also every generated token
    enabled: bool = True                        # off: kept, but not applied
    label: str | None = None                    # a name given by the user or the page (e.g. a cluster's name)

    def public(self) -> SteeringOut:
        return SteeringOut(id=self.id, mode=self.mode, concept=self.concept, strength=self.strength,
                           n_neurons=len(self.neurons), ranges=[list(r) for r in self.ranges], generated=self.generated,
                           enabled=self.enabled, label=self.label,
                           neurons=[SteerNeuronOut(layer=l, neuron=i, polarity=p, value=v)
                                    for l, i, p, v in self.neurons])


@dataclass
class Session:
    id: str
    created: float
    last_used: float
    messages: list[Message] = field(default_factory=list)
    steerings: dict[str, Steering] = field(default_factory=dict)
    version: int = 0
    cache: dict[Any, Any] = field(default_factory=dict)  # views by key (a name, or a tuple with arguments)
    owner: str | None = None      # the client token that made it (None: made in-process, e.g. a notebook)
    generating: GeneratingOut | None = None  # the answer being generated now: its text so far (survives a reload)
    n_steerings_made: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def changed(self) -> None:
        """The conversation or the steerings changed: bump the version and drop every cached view."""
        self.version += 1
        self.cache.clear()

    def memory_bytes(self) -> int:
        """Approximate memory held by this session: cached tensors plus conversation text."""
        total = sum(len(m.content) + 8 * len(m.ids or []) for m in self.messages)

        def size(obj: Any) -> int:
            if torch.is_tensor(obj):
                return obj.element_size() * obj.numel()
            if isinstance(obj, dict):
                return sum(size(v) for v in obj.values())
            if hasattr(obj, "__dict__"):  # a cached view (a pydantic model) or a record (a dataclass)
                return size(vars(obj))
            if isinstance(obj, (list, tuple)):
                return sum(size(v) for v in obj) + 8 * len(obj)
            if isinstance(obj, str):
                return len(obj)
            return 8
        return total + size(self.cache) + sum(48 * len(s.neurons) for s in self.steerings.values())


class StoreFull(NeuronscopeError):
    """Every session slot is taken by other clients."""


class SessionStore:
    """Thread-safe map of live sessions with idle expiry, owned per client."""

    def __init__(self, ttl: float = 1800.0, max_sessions: int = 64, clock: Callable[[], float] = time.monotonic,
                 max_per_client: int = 8) -> None:
        self.ttl, self.max_sessions, self.clock = float(ttl), int(max_sessions), clock
        self.max_per_client = int(max_per_client)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def sweep(self) -> int:
        """Drop idle sessions; returns how many were dropped."""
        now = self.clock()
        with self._lock:
            dead = [k for k, s in self._sessions.items() if now - s.last_used > self.ttl]
            for k in dead:
                del self._sessions[k]
        return len(dead)

    def create(self, owner: str | None = None) -> Session:
        """A new session of `owner`; its own least recently used one goes when it is over its limit."""
        self.sweep()
        now = self.clock()
        s = Session(id=secrets.token_urlsafe(16), created=now, last_used=now, owner=owner)
        with self._lock:
            mine = sorted((x for x in self._sessions.values() if x.owner == owner), key=lambda x: x.last_used)
            while mine and (len(mine) >= self.max_per_client or len(self._sessions) >= self.max_sessions):
                del self._sessions[mine.pop(0).id]
            if len(self._sessions) >= self.max_sessions:
                raise StoreFull(f"The server holds its maximum of {self.max_sessions} sessions for other clients; "
                                "try again when one expires.")
            self._sessions[s.id] = s
        return s

    def get(self, sid: str, owner: str | None = None) -> Session | None:
        """The session `sid` if it is alive and belongs to `owner` (else None, as if it did not exist)."""
        self.sweep()
        with self._lock:
            s = self._sessions.get(sid)
            if s is None or s.owner != owner:
                return None
            s.last_used = self.clock()
            return s

    def count(self, owner: str | None) -> int:
        with self._lock:
            return sum(1 for x in self._sessions.values() if x.owner == owner)

    def delete(self, sid: str, owner: str | None = None) -> bool:
        with self._lock:
            s = self._sessions.get(sid)
            if s is None or s.owner != owner:
                return False
            del self._sessions[sid]
            return True
