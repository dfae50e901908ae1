"""What every intervention is: an immutable spec (`Intervention`) that `bind(subject)` checks against one model and
turns into a `Bound` object yielding its hooks; `SubjectLike`, what the core needs of a model; the sites."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Protocol, Sequence, Union

import torch

from ..arch import ArchSpec
from .positions import StepContext

SITES = ("neurons", "resid.mid", "resid.post")


class SubjectLike(Protocol):
    """What the intervention core needs of a model under study (`neuronscope.Subject` is one). Declared here, so
    the core sits below subject.py (which imports it for `Subject.generate(..., interventions=...)`) and imports
    nothing above itself."""
    model: torch.nn.Module
    spec: ArchSpec

    @property
    def family(self) -> str: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def has_mid_site(self) -> bool: ...
    def check_layer(self, layer: int) -> int: ...
    def check_neurons(self, neurons: Sequence[int]) -> list[int]: ...
    def parse_layers(self, text: str | Sequence[int] | None) -> list[int]: ...


Hook = Callable[[torch.Tensor, StepContext], Union[torch.Tensor, None]]


class Bound:
    """One intervention bound to one subject: checked values, caches, and (for captures) results.

    `edits()` yields (layer, site, fn); fn(x, ctx) returns a new tensor (an edit) or None (a read).
    `captures_only` bindings run after all edits at the same hook.
    """
    captures_only: bool = False
    spec: Intervention

    def edits(self) -> Iterator[tuple[int, str, Hook]]:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget what was recorded (captures), keeping the hooks; for loops inside one open context."""


@dataclass(frozen=True, eq=False)
class Intervention:
    """Base class of the immutable intervention specs. `bind(subject)` checks one against a model and returns its
    `Bound` object; the spec itself never changes."""
    captures_only: ClassVar[bool] = False

    def bind(self, subject: SubjectLike) -> Bound:
        raise NotImplementedError
