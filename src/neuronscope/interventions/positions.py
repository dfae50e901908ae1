"""Where an intervention acts, and the checks of what it is given: absolute token positions (with the prompt /
generated split of a forward call, `StepContext`), batch rows (`RowIndex`), finite values."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch

from ..errors import NeuronscopeError

PositionSpec = Union[str, int, slice, range, Sequence[int], None]
RowSpec = Union[int, Sequence[int], None]


@dataclass
class StepContext:
    """What a hook knows about the current forward call."""
    start: int = 0            # absolute position of the first token in this call
    length: int = 0           # tokens in this call
    prompt_len: int = 0       # tokens in the prefill of the current sequence
    grad: bool = False

    @property
    def is_prefill(self) -> bool:
        return self.start == 0

    def positions(self, device: torch.device | str) -> torch.Tensor:
        return torch.arange(self.start, self.start + self.length, device=device)


def check_positions(positions: PositionSpec) -> PositionSpec:
    """Validate a position spec: 'all', 'prompt', 'generated', an int, a slice/range or a list of ints >= 0."""
    if positions is None or positions in ("all", "prompt", "generated"):
        return positions
    if isinstance(positions, str):
        raise NeuronscopeError(f"Unknown positions '{positions}'; use all, prompt, generated, or token indices.")
    if isinstance(positions, bool):
        raise NeuronscopeError("Positions must be 'all', 'prompt', 'generated' or token indices.")
    if isinstance(positions, int):
        positions = [positions]
    if isinstance(positions, slice):
        if positions.step not in (None, 1) or (positions.start or 0) < 0 or \
                (positions.stop is not None and positions.stop < 0):
            raise NeuronscopeError("Position slices must be non-negative with step 1.")
        return positions
    pos = list(positions)
    if any((not isinstance(p, int)) or isinstance(p, bool) or p < 0 for p in pos):
        raise NeuronscopeError(f"Token positions must be integers >= 0, got {pos[:5]}.")
    return sorted(set(pos))


def position_mask(spec: PositionSpec, ctx: StepContext, device: torch.device | str) -> torch.Tensor | None:
    """Bool mask [T] of the current call's positions selected by `spec`; None means all of them."""
    if spec is None or spec == "all":
        return None
    start, end = ctx.start, ctx.start + ctx.length
    lo: int
    hi: int | None
    if spec == "prompt":
        lo, hi = 0, ctx.prompt_len
    elif spec == "generated":
        lo, hi = ctx.prompt_len, None
    elif isinstance(spec, slice):
        lo, hi = spec.start or 0, spec.stop
    elif isinstance(spec, str) or isinstance(spec, int):  # not reached after check_positions
        raise NeuronscopeError(f"Unchecked positions {spec!r}.")
    else:
        pos = torch.as_tensor([p for p in spec if start <= p < end], dtype=torch.long)
        mask = torch.zeros(ctx.length, dtype=torch.bool)
        mask[pos - start] = True
        return mask.to(device)
    hi = end if hi is None else hi
    if lo <= start and hi >= end:
        return None
    mask = torch.zeros(ctx.length, dtype=torch.bool)
    a, b = max(lo, start) - start, min(hi, end) - start
    if b > a:
        mask[a:b] = True
    return mask.to(device)


def check_rows(rows: RowSpec) -> tuple[int, ...] | None:
    """Validate a row spec: None (all rows of the batch), a row index or a list of them (ints >= 0)."""
    if rows is None:
        return None
    if isinstance(rows, bool) or isinstance(rows, str):
        raise NeuronscopeError(f"Rows must be batch row indices (integers >= 0), got {rows!r}.")
    items = [rows] if isinstance(rows, int) else list(rows)
    if not items or any((not isinstance(r, int)) or isinstance(r, bool) or r < 0 for r in items):
        raise NeuronscopeError(f"Rows must be a non-empty list of batch row indices (integers >= 0), got {rows!r}.")
    return tuple(sorted(set(items)))


class RowIndex:
    """The rows an edit applies to, as an index tensor per device; checked against each call's batch size."""

    def __init__(self, rows: tuple[int, ...] | None):
        self.rows = rows
        self._idx: dict[torch.device, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.rows is None:
            return None
        if self.rows[-1] >= x.shape[0]:
            raise NeuronscopeError(f"An intervention is limited to batch rows {list(self.rows)}, but the batch has "
                                   f"{x.shape[0]} row(s).")
        if len(self.rows) == x.shape[0]:
            return None
        idx = self._idx.get(x.device)
        if idx is None:
            idx = self._idx[x.device] = torch.as_tensor(self.rows, dtype=torch.long, device=x.device)
        return idx


def check_finite(value: Any, what: str) -> None:
    """One sentence unless `value` (a number or a tensor) is finite."""
    if torch.is_tensor(value):
        if not torch.isfinite(value).all():
            raise NeuronscopeError(f"The {what} contains NaN or infinite values.")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(float(value)):
            raise NeuronscopeError(f"The {what} must be a finite number, got {value}.")
    else:
        raise NeuronscopeError(f"The {what} must be a number, got {value!r}.")


def may_edit_in_place(x: torch.Tensor) -> bool:
    """Whether a hook may change `x` in place (not when autograd needs it as it is)."""
    return not (torch.is_grad_enabled() and x.requires_grad)
