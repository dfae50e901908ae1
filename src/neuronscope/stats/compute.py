"""`compute_stats`: stream a corpus through the model in fixed windows and keep every neuron's extremes.

The run first counts the corpus's windows, sizes the state by the levels asked for (plan.py), prints the plan and
refuses one that does not fit. It then goes batch by batch over this shard's windows (window w belongs to shard
(i, n) when w % n == i). The state is checkpointed at most every `checkpoint_tokens` tokens or `checkpoint_every`
seconds (one file, atomic, with a checksum: checkpoint.py), and when SIGINT/SIGTERM asks the run to stop (the batch
in progress is finished first); a later call with the same settings continues from the last checkpoint and gives
the same result as an uninterrupted run. At the end the results are written (see results.py), each finishing step
with its own progress bar, and the checkpoint is removed.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generator, Iterator, Sequence, cast

import torch

from .. import store
from ..errors import NeuronscopeError
from ..interrupt import StopRequest, signal_name
from ..interventions import (Bound, BoundCapture, Capture, Hook, Intervention, StepContext, SubjectLike,
                             intervene)
from . import checkpoint
from .corpus import (CorpusArg, Window, check_corpus, check_corpus_format, corpus_signature, count_windows,
                     iter_windows, parse_shard, shard_of)
from .extremes import LayerExtremes
from .levels import parse_levels, ranks_needed
from .plan import Plan, make_plan
from .results import EXTREMES_FILE, STATS_FILE, NeuronStats, exemplar_windows, write_arrays, write_windows

if TYPE_CHECKING:
    from tqdm import tqdm

    from ..subject import Subject

FORMAT = 2
FOLD_IN_FORWARD = True      # CPU runs fold each layer inside the forward (False: capture, then fold; for A/B)


def default_batch(subject: Subject, window: int) -> int:
    """Windows per forward: about 1024 tokens on a CPU; on a GPU up to 16,384 tokens, as many as keep the batch's
    captured activations (tokens x layers x neurons floats) within 3 GiB."""
    if subject.device.type == "cuda":
        tokens = min(16384, (3 << 30) // (4 * subject.n_layers * subject.n_neurons))
    else:
        tokens = 1024
    return max(1, tokens // window)


def _after_batch(batch_no: int) -> None:
    """Called after each batch is folded in (and checkpointed when one was due): a seam for tests and benchmarks."""


def _settings(subject: Subject, paths: Sequence[Path], window: int, tokens: int | None, batch: int, k: int,
              n_exemplars: int, shard: tuple[int, int] | None, chat: bool, levels: Sequence[float],
              corpus_format: str) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint it continues (JSON types, as the checkpoint stores): the
    corpus format asked for, and with each file how it is read."""
    return {
        "format": FORMAT,
        "model": subject.name, "fingerprint": subject.fingerprint,
        "corpus": corpus_signature(paths, corpus_format), "corpus_format": corpus_format,
        "window": window, "tokens_limit": tokens, "batch": batch,
        "k": k, "n_exemplars": n_exemplars, "shard": list(shard) if shard else None, "chat": bool(chat),
        "n_layers": subject.n_layers, "n_neurons": subject.n_neurons, "levels": [float(x) for x in levels],
    }


def fold_device(subject: Subject, k: int, n_exemplars: int,
                state_device: str | None = None) -> tuple[torch.device, int | None]:
    """Where the running extremes live and are folded, and their slack (None: the default): the model's GPU when
    they fit in half its free memory (all layers folded at once by the torch fold; twice K of slack when that fits
    too, for fewer compactions), else the CPU (the numba fold, layer by layer)."""
    explicit = state_device is not None and state_device != "auto"
    dev = torch.device(state_device) if state_device is not None and explicit else subject.device
    if dev.type != "cuda":
        return (dev if explicit else torch.device("cpu")), None
    rows = subject.n_layers * subject.n_neurons
    half_free = torch.cuda.mem_get_info(dev)[0] // 2
    if LayerExtremes.state_bytes(rows, k, n_exemplars, slack=2 * k) <= half_free:
        return dev, 2 * k
    if explicit or LayerExtremes.state_bytes(rows, k, n_exemplars) <= half_free:
        return dev, None
    return torch.device("cpu"), None


class _LayerActs:
    """Each layer's neuron activations [B*T, N] of one captured forward, read from the capture on demand (reading
    makes a copy: one layer at a time keeps the copies to one layer instead of a second whole batch)."""

    def __init__(self, bound: BoundCapture, n_layers: int, n_neurons: int) -> None:
        self._bound, self._l, self._n = bound, n_layers, n_neurons

    def __len__(self) -> int:
        return self._l

    def __getitem__(self, l: int) -> torch.Tensor:
        if not 0 <= l < self._l:
            raise IndexError(l)
        return self._bound.get("neurons", l).reshape(-1, self._n)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[l] for l in range(self._l))


@dataclass(frozen=True, eq=False)
class FoldInForward(Intervention):
    """Fold each layer's neuron activations into that layer's running state inside the forward, as the layer
    runs (a read: nothing is edited). A CPU run then never holds more than one layer's activations: a captured
    batch of all layers (tokens x layers x neurons floats, 0.19 GB for 1,024 tokens of SmolLM2-135M) is never
    made. `bind` gives the hooks; set the bound object's `index` (global token indices [B*T]) before each forward.
    """
    layers: tuple[LayerExtremes, ...] = ()      # the per-layer states, in layer order
    captures_only: ClassVar[bool] = True

    def bind(self, subject: SubjectLike) -> _BoundFold:
        return _BoundFold(self, subject)


class _BoundFold(Bound):
    captures_only = True
    spec: FoldInForward

    def __init__(self, spec: FoldInForward, subject: SubjectLike) -> None:
        n_layers = len(subject.spec.decoder_layers(subject.model))
        if len(spec.layers) != n_layers:
            raise NeuronscopeError(f"FoldInForward needs one state per layer ({n_layers}), got "
                                   f"{len(spec.layers)}.")
        self.spec = spec
        self.index: torch.Tensor | None = None

    def edits(self) -> Iterator[tuple[int, str, Hook]]:
        def make(st: LayerExtremes) -> Hook:
            def fn(x: torch.Tensor, ctx: StepContext) -> None:
                if self.index is None:
                    raise NeuronscopeError("FoldInForward ran without token indices; set `index` first.")
                st.add(x.detach().reshape(-1, x.shape[-1]), self.index)     # [B*T, neurons]
            return fn
        for layer, st in enumerate(self.spec.layers):
            yield layer, "neurons", make(st)


def _forward_neurons(subject: Subject, base: torch.nn.Module, ids: torch.Tensor, to_cpu: bool | None = None,
                     cap: Capture | None = None) -> _LayerActs:
    """One forward of the decoder stack (no LM head); returns each layer's neuron activations [B*T, N].

    cap: a Capture spec to reuse (a run passes one spec for all its batches and resets it after each: interventions
    remembers the last binding of every spec it ran, so a new spec per batch would keep every batch's activations
    alive)."""
    if cap is None:
        cap = Capture(layers=None, sites=("neurons",),
                      to_cpu=subject.device.type != "cpu" if to_cpu is None else to_cpu)
    with intervene(subject, cap) as bound, torch.no_grad():
        base(input_ids=ids.to(subject.device), use_cache=False)
    bound_cap = bound[0]
    assert isinstance(bound_cap, BoundCapture)
    return _LayerActs(bound_cap, subject.n_layers, subject.n_neurons)


def compute_stats(subject: Subject, corpus: CorpusArg, atlas_dir: str | os.PathLike[str], *, tokens: int | None = None,
                  window: int = 64, batch: int | None = None, k: int | None = None, n_exemplars: int = 100,
                  levels: Sequence[float] | str | None = None, shard: str | tuple[int, int] | None = None,
                  chat: bool = False, progress: bool = True, checkpoint_every: float = 600.0,
                  checkpoint_tokens: int = 100_000, restart: bool = False, keep_extremes: bool | None = None,
                  check_fit: bool = True, state_device: str | None = None, fold: str | None = None,
                  corpus_format: str = "auto") -> NeuronStats:
    """Per-neuron count, mean, variance, extreme quantiles and exemplars over a corpus.

    corpus: a file or list of files (see corpus.py for formats). tokens: stop after this many tokens (whole windows;
    over the whole corpus, before sharding). window: tokens per window. batch: windows per forward (default: about
    1024 tokens on CPU). levels: the quantile levels (default levels.LEVELS). k: extremes kept per neuron and side
    (default: sized by the levels and the run's tokens, max ceil(p * tokens); give it for shards to be merged into
    a run larger than --tokens). n_exemplars: exemplar positions kept per neuron and side. shard: 'i/n' to process
    windows w with w % n == i (merge the shards with `merge_shards`). chat: also put plain-text documents through
    the chat template as user turns (chat-format records always go through it). checkpoint_every /
    checkpoint_tokens: a checkpoint at most this many seconds / tokens apart (0: after every batch). restart:
    discard a partial run. keep_extremes: also store the K extremes per neuron (stats_extremes.safetensors, what a
    merge needs; default: only for a shard). check_fit: refuse a run whose planned memory or disk does not fit.
    state_device: where the running extremes live ("cpu", "cuda", ...; default: the model's GPU when they fit in
    half its free memory, else the CPU). fold: "numba" (CPU state, one layer at a time, the default there) or
    "torch" (all layers at once, the default on a GPU). The result does not depend on either. corpus_format:
    "auto" (WikiText files, found by name or content, are read as the text they stand for, one article a
    document), "plain" (every file as it is) or "wikitext" (every text file as WikiText); a setting of the run,
    recorded with the others.

    SIGINT / SIGTERM during the run finish the current batch, write a checkpoint and raise `Interrupted` (a
    NeuronscopeError) saying how to resume; the next call with the same settings resumes from that checkpoint.
    """
    t_start = time.perf_counter()
    say: Callable[[str], None] = _say if progress else (lambda msg: None)
    run = _plan_run(subject, corpus, Path(atlas_dir), say, tokens=tokens, window=window, batch=batch, k=k,
                    n_exemplars=n_exemplars, levels=levels, shard=shard, chat=chat, keep_extremes=keep_extremes,
                    state_device=state_device, fold=fold, corpus_format=corpus_format)
    state = _open_state(run, say, restart=restart, check_fit=check_fit)
    loop = _Loop(run, state, progress=progress, checkpoint_every=checkpoint_every,
                 checkpoint_tokens=checkpoint_tokens, started=t_start)
    n_windows, loop_seconds = loop.run_batches()
    layers = ([v.to("cpu") for v in state.groups[0].split(subject.n_layers)] if run.stacked else state.layers)
    _trim_heap()
    # a signal now lets the (short) finishing steps complete: stopping here would lose the batches since the last
    # checkpoint; a second signal stops at once
    with StopRequest(note="the statistics are complete and being written; this takes a moment (send the signal "
                          "again to stop at once and lose the batches since the last checkpoint)."):
        return finish(run, layers, n_windows, loop_seconds=loop_seconds, started=t_start - state.seconds,
                      progress=progress)


# ---------------------------------------------------------------------------------------------------------------
# the plan: what the run is, fixed before its first batch
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class StatsRun:
    """A statistics run as planned before its first batch: the corpus and how it is read, its windows, the state's
    size and place, the fold, the plan and the settings a resumed run must share."""

    subject: Subject
    folder: Path
    paths: list[Path]
    corpus_format: str
    window: int
    batch: int
    chat: bool
    shard: tuple[int, int] | None
    max_windows: int | None      # the run's window limit (--tokens), over all shards
    my_windows: int              # this shard's windows
    k: int
    n_exemplars: int
    state_device: torch.device
    slack: int | None
    stacked: bool                # the torch fold: one state for all layers
    in_forward: bool             # each layer folded inside the forward, as it runs
    keep: bool                   # also store the K extremes
    plan: Plan
    settings: dict[str, Any]
    peak_before: int             # this process's peak memory when the run began (e.g. the model's load)

    def windows(self) -> Iterator[Window]:
        """All the run's windows (every shard's), in order."""
        return iter_windows(self.subject.tokenizer, self.paths, self.window, chat=self.chat,
                            max_windows=self.max_windows, corpus_format=self.corpus_format)


def _check_options(window: int, n_exemplars: int, k: int | None, tokens: int | None) -> None:
    for name, v, lo in (("window", window, 2), ("n_exemplars", n_exemplars, 1)) + ((("k", k, 1),) if k is not None
                                                                                 else ()):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise NeuronscopeError(f"{name} must be an integer >= {lo}, got {v!r}.")
    if tokens is not None and (not isinstance(tokens, int) or tokens < window):
        raise NeuronscopeError(f"--tokens must be at least one window ({window} tokens), got {tokens!r}.")


def _count(subject: Subject, paths: list[Path], window: int, shard: tuple[int, int] | None, chat: bool,
           max_windows: int | None, corpus_format: str) -> tuple[int, int]:
    """(the run's windows over all shards, this shard's): the first fixes K, the second the progress bar."""
    run_windows = count_windows(subject.tokenizer, paths, window, chat=chat, max_windows=max_windows,
                                corpus_format=corpus_format)
    if run_windows == 0:
        raise NeuronscopeError(f"The corpus gave no complete window of {window} tokens; give more text or a "
                               "smaller --window.")
    my_windows = sum(1 for w in range(run_windows) if shard_of(w, shard))
    if my_windows == 0 and shard is not None:
        raise NeuronscopeError(f"Shard {shard[0]}/{shard[1]} gets no window of the corpus's {run_windows}; use "
                               "fewer shards or more text.")
    return run_windows, my_windows


def _plan_run(subject: Subject, corpus: CorpusArg, folder: Path, say: Callable[[str], None], *, tokens: int | None,
              window: int, batch: int | None, k: int | None, n_exemplars: int,
              levels: Sequence[float] | str | None, shard: str | tuple[int, int] | None, chat: bool,
              keep_extremes: bool | None, state_device: str | None, fold: str | None,
              corpus_format: str) -> StatsRun:
    """Check the options, count the corpus's windows, size the state, decide where it lives and how it is folded,
    and print the plan (a fold that cannot be used is refused after it)."""
    paths = check_corpus(corpus)
    check_corpus_format(corpus_format)
    part = parse_shard(shard)
    lv = parse_levels(levels)
    _check_options(window, n_exemplars, k, tokens)
    if batch is None:
        batch = default_batch(subject, window)
    if not isinstance(batch, int) or batch < 1:
        raise NeuronscopeError(f"The batch must be at least 1 window, got {batch!r}.")
    if subject.tokenizer is None:
        raise NeuronscopeError("This subject has no tokenizer, so it cannot read a corpus.")
    max_windows = tokens // window if tokens else None
    peak_before = peak_rss()    # e.g. the model's load (a GGUF's first de-quantisation peaks at ~4x the model)
    folder.mkdir(parents=True, exist_ok=True)
    _model_section(folder, subject)
    run_windows, my_windows = _count(subject, paths, window, part, chat, max_windows, corpus_format)
    k_eff = k if k is not None else ranks_needed(lv, run_windows * window)
    fdev, slack = fold_device(subject, k_eff, n_exemplars, state_device)
    stacked = (fold or ("numba" if fdev.type == "cpu" else "torch")) == "torch"
    # on a CPU each layer is folded as it runs (one layer's activations alive at a time, no captured batch);
    # a GPU model keeps the capture, so the forward is not stopped by a copy to the CPU state at every layer
    in_forward = FOLD_IN_FORWARD and not stacked and subject.device.type == "cpu"
    keep = part is not None if keep_extremes is None else bool(keep_extremes)
    plan = make_plan(subject, levels=lv, tokens=run_windows * window, k=k, n_exemplars=n_exemplars, window=window,
                     batch=batch, n_windows=my_windows, keep_extremes=keep, slack=slack,
                     on_gpu=fdev.type == "cuda", in_forward=in_forward)
    settings = _settings(subject, paths, window, tokens, batch, k_eff, n_exemplars, part, chat, lv, corpus_format)
    say(plan.describe())
    if fold not in (None, "numba", "torch") or (fold == "numba" and fdev.type != "cpu"):
        raise NeuronscopeError(f"fold must be 'torch', or 'numba' with the state on the CPU; got {fold!r}.")
    return StatsRun(subject=subject, folder=folder, paths=paths, corpus_format=corpus_format, window=window,
                    batch=batch, chat=chat, shard=part, max_windows=max_windows, my_windows=my_windows, k=k_eff,
                    n_exemplars=n_exemplars, state_device=fdev, slack=slack, stacked=stacked,
                    in_forward=in_forward, keep=keep, plan=plan, settings=settings, peak_before=peak_before)


# ---------------------------------------------------------------------------------------------------------------
# the running state: new, or resumed from the folder's checkpoint
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _State:
    groups: list[LayerExtremes]     # what the fold adds into: one per layer (numba) or one of all layers (torch)
    layers: list[LayerExtremes]     # one per layer (for the torch fold, views of groups[0])
    batches: int = 0                # batches, windows and seconds of the sessions before this one
    windows: int = 0
    seconds: float = 0.0
    loop_seconds: float = 0.0


def _open_state(run: StatsRun, say: Callable[[str], None], *, restart: bool, check_fit: bool) -> _State:
    """The running state: a checkpoint with other settings is refused, one with the same settings resumed (after
    `restart` discards it, a new state). The plan is checked against the free memory and disk first."""
    if restart:
        checkpoint.discard(run.folder)
    saved = checkpoint.load(run.folder)
    if saved is not None and saved[1].get("settings") != run.settings:
        raise NeuronscopeError(f"'{run.folder}' holds a partial statistics run with other settings (model, corpus, "
                               "corpus format, window, levels, K, shard...); pass restart=True (--restart) to "
                               "discard it, or run with the same settings to resume it.")
    if check_fit:
        run.plan.check(run.folder)
    L, N = run.subject.n_layers, run.subject.n_neurons
    if not run.stacked:         # the numba fold, one layer at a time
        groups = [LayerExtremes(N, run.k, run.n_exemplars) for _ in range(L)]
        state = _State(groups, groups)
    else:                       # the torch fold, all layers at once
        groups = [LayerExtremes(L * N, run.k, run.n_exemplars, device=run.state_device, fold="torch",
                                slack=run.slack)]
        state = _State(groups, groups[0].split(L))
    if saved is None:
        return state
    tensors, prog = saved
    for l, st in enumerate(state.layers):
        st.load_state(tensors, f"{l}.")
    if run.stacked:             # the per-layer views loaded the memory; the count lives on the whole state
        groups[0].count = state.layers[0].count
    del tensors
    state.batches, state.windows = prog["batches"], prog["windows"]
    state.seconds, state.loop_seconds = prog.get("seconds", 0.0), prog.get("loop_seconds", 0.0)
    say(f"resuming from {state.layers[0].count:,} tokens ({state.batches} batches) of an interrupted run "
        f"(checkpoint {checkpoint.path_in(run.folder)}; --restart starts over)")
    return state


# ---------------------------------------------------------------------------------------------------------------
# the loop: batches of this shard's windows through the model, folded into the state, checkpointed
# ---------------------------------------------------------------------------------------------------------------
class _Loop:
    """The batch loop of one session: skips the batches a resumed checkpoint holds, folds the others in, writes
    a checkpoint when one is due or a signal asks the run to stop (then raises `Interrupted`)."""

    def __init__(self, run: StatsRun, state: _State, *, progress: bool, checkpoint_every: float,
                 checkpoint_tokens: int, started: float) -> None:
        self.run, self.state, self.started = run, state, started
        self.every, self.every_tokens = checkpoint_every, checkpoint_tokens
        subject = run.subject
        # the LM head is not needed for statistics: run the decoder stack only
        self.base = subject.spec.get(subject.model, subject.spec.base)
        self.bar = None
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=run.my_windows * run.window, unit="tok", unit_scale=True, desc="stats",
                            initial=state.windows * run.window, dynamic_ncols=True)
        self.cap_spec = Capture(layers=None, sites=("neurons",),
                                to_cpu=run.state_device.type == "cpu" and subject.device.type != "cpu")
        self.fold_spec = FoldInForward(layers=tuple(state.groups)) if run.in_forward else None
        self.processed = 0

    def run_batches(self) -> tuple[int, float]:
        """Run the session's batches; (windows done over all sessions, seconds in the loop over all sessions)."""
        run, state = self.run, self.state
        t0 = time.perf_counter()
        last_ckpt, last_ckpt_windows = t0, state.windows
        stream = (w for w in run.windows() if shard_of(w.index, run.shard))
        batches = _prefetched(_batched(stream, run.batch))
        batch_no = 0
        try:
            with StopRequest("stats") as stop:
                for ws in batches:
                    batch_no += 1
                    if batch_no <= state.batches:
                        continue
                    self.fold_batch(ws)
                    now = time.perf_counter()
                    windows_now = state.windows + self.processed
                    if (stop or now - last_ckpt >= self.every
                            or (windows_now - last_ckpt_windows) * run.window >= self.every_tokens):
                        self.save_checkpoint(batch_no, windows_now, now - t0)
                        last_ckpt, last_ckpt_windows = time.perf_counter(), windows_now
                    _after_batch(batch_no)
                    if stop:
                        self.close_bar()
                        raise stop.interrupted(
                            f"stopped after {windows_now * run.window:,} tokens by {signal_name(stop.signum)}; the "
                            f"work is saved in {checkpoint.path_in(run.folder)}. Run the same command again to "
                            "resume from there (add --restart to start over instead).")
        finally:
            batches.close()
            self.close_bar()
        return state.windows + self.processed, state.loop_seconds + time.perf_counter() - t0

    def fold_batch(self, ws: list[Window]) -> None:
        """One forward of a batch of windows, its activations folded into the state."""
        run, subject, window = self.run, self.run.subject, self.run.window
        ids = torch.tensor([w.token_ids for w in ws], dtype=torch.long)
        index = (torch.tensor([w.index for w in ws], dtype=torch.int64).unsqueeze(1) * window
                 + torch.arange(window, dtype=torch.int64)).reshape(-1)
        if self.fold_spec is not None:
            with intervene(subject, self.fold_spec) as bound, torch.no_grad():
                bound[0].index = index     # type: ignore[attr-defined]
                self.base(input_ids=ids.to(subject.device), use_cache=False)
        else:
            acts = _forward_neurons(subject, self.base, ids, cap=self.cap_spec)
            groups = self.state.groups
            if run.stacked:
                groups[0].add(torch.cat(list(acts), dim=1) if len(acts) > 1 else acts[0], index)
            else:
                for st, a in zip(groups, acts):
                    st.add(a, index)
            del acts
            self.cap_spec.reset()   # interventions keeps the spec's last binding: drop this batch's activations now
        self.processed += len(ws)
        if self.bar is not None:
            self.bar.update(len(ws) * window)

    def save_checkpoint(self, batches: int, windows: int, loop_s: float) -> None:
        run, state = self.run, self.state
        tensors: dict[str, torch.Tensor] = {}
        views = state.groups[0].split(run.subject.n_layers) if run.stacked else state.layers
        for l, st in enumerate(views):
            tensors.update(st.state(f"{l}."))
        checkpoint.save(run.folder, tensors, {
            "settings": run.settings, "batches": batches, "windows": windows, "tokens": windows * run.window,
            "loop_seconds": state.loop_seconds + loop_s,
            "seconds": state.seconds + time.perf_counter() - self.started})

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _trim_heap() -> None:
    """Give the batches' freed memory back to the system before the finishing steps allocate theirs (glibc keeps
    freed blocks in its arenas; without this the finishing arrays come on top of the loop's peak)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):       # not glibc
        pass


def peak_rss() -> int:
    """This process's peak resident memory so far (bytes).

    On Linux this is VmHWM of /proc/self/status, the high-water mark of this program's own memory. Not ru_maxrss:
    Linux carries the parent's resident size over an exec into the child's ru_maxrss (a `stats` run started by
    `subprocess` from a 2.5 GB notebook or test worker would report 2.5 GB whatever it used itself).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def reset_peak_rss() -> bool:
    """Restart this process's peak-memory mark at its current size (Linux: `5` into /proc/self/clear_refs); False
    where that is not possible. For programs that own their process (the CLI, after the model is loaded, so that the
    figure a run records is the run's own and not the load's); a library call never does it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _batched(stream: Iterator[Window], batch: int) -> Iterator[list[Window]]:
    pending: list[Window] = []
    for w in stream:
        pending.append(w)
        if len(pending) == batch:
            yield pending
            pending = []
    if pending:
        yield pending


def _prefetched(batches: Iterator[list[Window]], depth: int = 4) -> Generator[list[Window], None, None]:
    """Read and tokenise the next batches in a thread while the model runs (the tokenizer releases the GIL), so a
    fast GPU does not wait for the corpus. Errors in the reader are raised here; closing stops the reader."""
    q: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for b in batches:
                if not put(b):
                    return
            put(done)
        except BaseException as e:      # handed to the consumer
            put(e)

    th = threading.Thread(target=reader, name="neuronscope-corpus", daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield cast("list[Window]", item)
    finally:
        stop.set()
        th.join(timeout=5)


def _after_write(name: str) -> None:
    """Called after each write of the finishing steps ('windows', 'arrays', 'manifest'): a seam for crash tests."""


def finish(run: StatsRun, layers: Sequence[LayerExtremes], n_windows: int, *, loop_seconds: float,
           started: float, progress: bool = True) -> NeuronStats:
    """Write the results of a finished run, store the exemplar windows, update the manifest, drop the checkpoint.

    Each step has its own progress bar. `started`: perf_counter time the run (all its sessions) began, so the
    reported time is end to end; `loop_seconds`: the time in the batch loop alone.
    """
    t_fin = time.perf_counter()
    write_windows(run.folder, _exemplar_rows(run, layers, progress), run.subject.token_strings)
    _after_write("windows")
    bar = _bar(progress, len(layers) + 2, "results", "step")
    extra = write_arrays(run.folder, layers, run.settings, keep_extremes=run.keep,
                         step=(lambda: bar.update(1)) if bar is not None else None)
    _after_write("arrays")
    store.update_manifest(run.folder, "stats", _manifest_section(run, layers[0].count, n_windows, extra,
                                                                 loop_seconds, started, t_fin))
    if bar is not None:
        bar.update(1)
        bar.close()
    _after_write("manifest")
    checkpoint.discard(run.folder)
    return NeuronStats.open(run.folder)


def _exemplar_rows(run: StatsRun, layers: Sequence[LayerExtremes], progress: bool) -> dict[int, list[int]]:
    """The token ids of every window an exemplar points into, read again from the corpus (as the run read it)."""
    need = exemplar_windows(layers, run.window)
    rows: dict[int, list[int]] = {}
    if not need:
        return rows
    last = max(need)
    bar = _bar(progress, last + 1, "exemplar windows", "win")
    for w in run.windows():
        if w.index in need:
            rows[w.index] = w.token_ids
        if bar is not None:
            bar.update(1)
        if w.index >= last:
            break
    if bar is not None:
        bar.close()
    return rows


def _manifest_section(run: StatsRun, n: int, n_windows: int, extra: dict[str, Any], loop_seconds: float,
                      started: float, t_fin: float) -> dict[str, Any]:
    """The manifest's "stats" section of a finished run: its settings, counts, timing, plan and measured peak."""
    plan = run.plan
    now = time.perf_counter()
    seconds = now - started
    section = dict(run.settings)
    section.update({
        "complete": True, "tokens": n, "windows": n_windows, "seconds": round(seconds, 3),
        "tokens_per_s": round(n / seconds, 1) if seconds > 0 else None,
        "loop_seconds": round(loop_seconds, 3),
        "loop_tokens_per_s": round(n / loop_seconds, 1) if loop_seconds > 0 else None,
        "finish_seconds": round(now - t_fin, 3),
        "quantile_definition": "q(p) = r-th smallest, q(1-p) = r-th largest activation, r = ceil(p*n); NaN when "
                               "r > K; a level with n*p < 1 is only the sample extreme (see level_ranks)",
        **extra, "keep_extremes": run.keep,
        "files": [STATS_FILE] + ([EXTREMES_FILE] if run.keep else []),
        "plan": {"k": plan.k, "k_sized": plan.k_sized, "ram_bytes": plan.ram, "state_bytes": plan.state,
                 "checkpoint_bytes": plan.checkpoint, "atlas_bytes": plan.atlas},
        "peak_rss_bytes": peak_rss(),
        "peak_rss_before_bytes": run.peak_before,   # this process's peak when the run began (e.g. the model's load)
    })
    return section


def _bar(progress: bool, total: int, desc: str, unit: str) -> tqdm[Any] | None:
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)


def _model_section(folder: Path, subject: Subject) -> None:
    """Make the folder this model's (atlas.folder.AtlasFolder.claim: the one home of the model section and of the
    guard against writing into a user's folder or another model's atlas)."""
    from ..atlas.folder import AtlasFolder
    AtlasFolder.open(folder, create=True).claim(subject)
