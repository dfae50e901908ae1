"""The one home of the Monitor's limits: every bound on input, the HTTP schemas and the page read them from here.

`Limits()` holds the defaults; a `Monitor` may be given tighter ones (tests do), and validates against its own
instance, so a breach is always a NeuronscopeError (HTTP 400) whose sentence names the limit. The request schemas
(`schemas.py`) and query parameters (`app.py`) take their bounds from `DEFAULT`, so the OpenAPI schema documents the
same numbers the logic enforces.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Limits:
    """Bounds on every input (each breach is a NeuronscopeError: a 400 with a message)."""
    max_message_chars: int = 4000
    max_tokens: int = 1024          # whole conversation, generated tokens included
    max_new_tokens: int = 256
    max_temperature: float = 2.0
    max_strength: float = 2.0
    max_clamp: float = 1e4
    max_steer_neurons: int = 1000
    max_steerings: int = 64         # per session
    max_ranges: int = 64            # prompt token ranges per steering
    max_concept_chars: int = 200
    max_filter_chars: int = 200
    attribution_top: int = 1000
    raw_per_token: int = 10         # without statistics: strongest raw activations shown per token
    max_page_size: int = 1000
    max_exemplars: int = 50
    max_body_bytes: int = 1 << 20   # a request body (an imported session is the largest legitimate one)
    max_sessions: int = 64          # live sessions, all clients together
    max_sessions_per_client: int = 8
    max_previous_answers: int = 8   # earlier answers kept beside a regenerated one

    def public(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


DEFAULT = Limits()
