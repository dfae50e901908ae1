"""The size of a statistics run, decided before it starts: how many extremes to keep, and the memory and disk.

The quantile levels asked for and the number of tokens fix the extremes each neuron needs per side: q(1 - p) over
n tokens is the ceil(p n)-th largest value, so K = max over the levels of ceil(p n) values are kept (exact for any
corpus of at most n tokens); `k=` (`--k`) overrides it, e.g. for shards that will be merged into a larger run.
The running state is then, per neuron, 2 (K + slack) float32 values, 2 E int64 exemplar keys and a few moments
(`LayerExtremes.state_bytes`). The peak memory is the model, the state, one batch of captured activations (all
layers), the interpreter, torch and numba (BASE_BYTES, measured) and, at the end, the result arrays. The disk is
the checkpoint (the state, twice while one replaces the other) and what the atlas gains: stats.safetensors,
the exemplar windows, and stats_extremes.safetensors with --keep-extremes.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import NeuronscopeError
from .extremes import LayerExtremes, default_slack
from .levels import fmt_level, ranks_needed

if TYPE_CHECKING:
    from ..subject import Subject

BASE_BYTES = 512 << 20       # imports, numba, tokenizer, the first batch's transients (measured on SmolLM2, 2026-12-02)
WINDOW_ROW_BYTES = 28        # atlas.sqlite bytes per token of a stored exemplar window (ids, strings, text)


def gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.0f} MB"


@dataclass
class Plan:
    """The planned size of one run (bytes)."""

    k: int
    k_sized: bool                 # K from the levels and tokens (False: given with --k)
    tokens: int                   # the tokens K is sized for (of the whole run, all shards together)
    levels: tuple[float, ...]
    rows: int                     # neurons (layers x neurons per layer)
    slack: int
    n_exemplars: int
    state: int                    # the running state (also the checkpoint file)
    model: int
    batch: int                    # one batch of captured activations
    finish: int                   # extra memory of the finishing steps
    ram: int                      # the planned peak resident memory
    checkpoint: int
    atlas: int                    # what the atlas folder gains
    extremes: int                 # of which stats_extremes.safetensors (0 without --keep-extremes)

    def describe(self) -> str:
        src = (f"sized for {', '.join(fmt_level(x) for x in self.levels)} over {self.tokens:,} tokens"
               if self.k_sized else "set with --k")
        return (f"plan: K = {self.k:,} extremes per neuron and side ({src}), {self.n_exemplars} exemplars, "
                f"{self.rows:,} neurons; memory ~{gb(self.ram)} peak (state {gb(self.state)}, model {gb(self.model)}, "
                f"batch {gb(self.batch)}); disk: checkpoint {gb(self.checkpoint)}, atlas +{gb(self.atlas)}"
                + (f" (extremes {gb(self.extremes)})" if self.extremes else ""))

    def check(self, folder: Path) -> None:
        """Refuse, with a sentence naming the options, a run that cannot fit in the free memory or disk (the
        model is loaded already: what must still fit is the state, the batch and the finishing arrays)."""
        fix = ("ask for fewer tokens (--tokens), less extreme levels (--levels, e.g. 1e-7,1e-5,1-1e-5,1-1e-7), "
               "fewer exemplars (--exemplars) or a smaller --batch (a shard keeps the K of the whole run, so "
               "--shard does not help)")
        free = available_memory()
        need = self.ram - BASE_BYTES - self.model
        if free is not None and need > free:
            raise NeuronscopeError(f"The statistics run needs about {gb(need)} more memory (K = {self.k:,} extremes "
                                   f"of {self.rows:,} neurons, {gb(self.state)} of state) but only {gb(free)} is "
                                   f"free; {fix}.")
        probe = Path(folder)
        while not probe.exists():
            probe = probe.parent
        disk = shutil.disk_usage(probe).free
        if 2 * self.checkpoint + self.atlas > disk:
            raise NeuronscopeError(f"The statistics run needs about {gb(2 * self.checkpoint + self.atlas)} of disk "
                                   f"in '{folder}' (checkpoints {gb(self.checkpoint)} twice while one replaces the "
                                   f"other, results {gb(self.atlas)}) but only {gb(disk)} is free; {fix}, or use "
                                   "another --atlas folder.")


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def stats_file_bytes(n_levels: int, rows: int, n_exemplars: int) -> int:
    """stats.safetensors: quantiles (float32), count, mean, var (8 bytes), exemplar values (4) and indices (8)."""
    return rows * (4 * n_levels + 3 * 8 + 2 * n_exemplars * 12)


def extremes_file_bytes(rows: int, k: int, n_exemplars: int) -> int:
    return rows * (2 * k * 4 + 2 * n_exemplars * 8)


def model_bytes(subject: Subject) -> int:
    m = subject.model
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def make_plan(subject: Subject, *, levels: Sequence[float], tokens: int, k: int | None, n_exemplars: int, window: int,
              batch: int, n_windows: int, keep_extremes: bool, slack: int | None = None,
              on_gpu: bool = False, in_forward: bool = False) -> Plan:
    """The plan of a run over `tokens` tokens (of the whole run; n_windows: this shard's windows).

    in_forward: each layer is folded as it runs (a CPU run), so a batch holds one layer's activations, not all."""
    rows = subject.n_layers * subject.n_neurons
    sized = k is None
    kk = ranks_needed(levels, tokens) if k is None else int(k)
    sl = default_slack(kk) if slack is None else slack
    state = LayerExtremes.state_bytes(rows, kk, n_exemplars, slack=sl)
    # the capture of all layers (+ the all-layers copy on a GPU), or one layer's activations when folded in the forward
    batch_b = (batch * window * subject.n_neurons * 4 if in_forward
               else batch * window * rows * 4 * (2 if on_gpu else 1))
    stats_b = stats_file_bytes(len(levels), rows, n_exemplars)
    ext_b = extremes_file_bytes(rows, kk, n_exemplars) if keep_extremes else 0
    windows_b = min(n_windows, 2 * n_exemplars * rows) * window * WINDOW_ROW_BYTES
    finish = 2 * stats_b + ext_b
    model_b = model_bytes(subject)
    ram = BASE_BYTES + model_b + (0 if on_gpu else state) + max(batch_b, finish)
    return Plan(k=kk, k_sized=sized, tokens=tokens, levels=tuple(levels), rows=rows, slack=sl,
                n_exemplars=n_exemplars, state=state, model=model_b, batch=batch_b, finish=finish, ram=ram,
                checkpoint=state, atlas=stats_b + ext_b + windows_b, extremes=ext_b)
