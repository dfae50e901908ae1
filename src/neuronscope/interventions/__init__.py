"""The intervention core: capture, clamp, scale, ablate and residual additions, as composable hooks.

Everything in neuronscope that reads or changes a model's internals goes through `intervene`:

    with intervene(subject, Capture(layers=[3]), Clamp(layer=5, neurons=[17], value=4.0, positions="generated")) as run:
        subject.generate_ids(ids, max_new_tokens=20)
    run[0].activations  # [layers, batch, positions, neurons]

An intervention (`Capture`, `Clamp`, ...) is an immutable spec (a frozen dataclass): `intervene` binds each one to
the subject (`spec.bind(subject)` validates it and returns a separate bound object holding the checked values,
caches and results) and yields the bound objects. One spec can therefore be used with two subjects, or from two
threads at once. (For convenience `capture_spec.activations` etc. read the last binding made in the current thread.)

Sites (see DESIGN.md section 2):
- "neurons": the MLP neuron activations, i.e. the input of the down projection, [B, T, n_neurons];
- "resid.mid": the residual stream after the attention add, before the MLP (sequential blocks only);
- "resid.post": the residual stream after the whole block.

Rows: every intervention takes `rows=[...]` (batch rows it applies to; default all), so one batched forward or
`generate` can carry a different intervention per row (a dose sweep, concurrent sessions); row r of the batch then
behaves exactly as a separate run of row r with only its own interventions.

One hook per (layer, site) runs all active edits in order, then all captures, so a capture records what the model
actually used. Positions are absolute token positions (columns of the input), tracked across `generate`'s KV-cache
calls; "prompt" means the positions of the first call (the prefill), "generated" every later one. Note that the
first generated token is predicted from the prefill's last position, so an edit on "generated" positions first
changes the second generated token. A prefill split into chunks over a KV cache (each chunk its own `intervene`, as
the Monitor does to share the model between sessions) passes `intervene(..., prompt_len=N)`: every call then knows
that positions 0..N-1 are the prompt, whatever chunk it runs; its absolute start is the cache's length as always.
Segments: several sequences packed into one forward (the Monitor's sessions sharing one batched step; see
server/packing.py) each open their own `intervene(..., segment=(a, b, start))`: that context's hooks see and edit
only columns a..b-1 of the packed input, whose first column is the sequence's absolute position `start`.
Hooks are always removed when the context ends, also on an exception; no weight is ever changed. Threads: a context
acts only on the forwards that the thread which opened it runs (its hooks pass other threads' forwards through
untouched), so several threads can run the same model at once, each with its own interventions (the Monitor runs one
model call per core this way).

The package, one concept a module: `positions` (positions, rows, value checks), `base` (`Intervention`, `Bound`,
`SubjectLike`, the sites), `edits` (Clamp, Scale, Ablate, AddToResidual, ResidualFunction), `captures` (Capture),
`runner` (`intervene`, `capture`). Import from the package: `from neuronscope.interventions import Clamp, intervene`.
"""
from __future__ import annotations

from .base import SITES, Bound, Hook, Intervention, SubjectLike
from .captures import BoundCapture, Capture
from .edits import (Ablate, AddToResidual, BoundAddToResidual, BoundNeuronEdit, BoundResidualFunction, Clamp,
                    NeuronEdit, ResidualFunction, Scale)
from .positions import PositionSpec, RowSpec, StepContext, check_positions, check_rows, position_mask
from .runner import capture, intervene

__all__ = ["intervene", "capture", "Intervention", "Bound", "Capture", "BoundCapture", "Clamp", "Scale", "Ablate",
           "AddToResidual", "ResidualFunction", "NeuronEdit", "BoundNeuronEdit", "BoundAddToResidual",
           "BoundResidualFunction", "StepContext", "position_mask", "check_positions", "check_rows", "SITES",
           "SubjectLike", "Hook", "PositionSpec", "RowSpec"]
