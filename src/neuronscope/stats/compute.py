"""`compute_stats`: stream a corpus through the model in fixed windows and keep every neuron's extremes.

The run goes batch by batch over this shard's windows (window w belongs to shard (i, n) when w % n == i). After
each batch the state may be checkpointed (`.stats-partial/` in the atlas folder, atomically); a later call with the
same settings continues from the last checkpoint and gives the same result as an uninterrupted run. At the end the
results are written (see results.py) and the checkpoint is removed.
"""
from __future__ import annotations

import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Generator, Iterator, Sequence

import torch

from .. import store
from ..errors import NeuronscopeError
from .corpus import Window, check_corpus, corpus_signature, iter_windows, parse_shard, shard_of
from .extremes import LayerExtremes
from .results import NeuronStats, exemplar_windows, write_arrays, write_windows

PARTIAL = ".stats-partial"
FORMAT = 1


def default_batch(subject, window: int) -> int:
    """Windows per forward: about 1024 tokens on a CPU; on a GPU up to 16,384 tokens, as many as keep the batch's
    captured activations (tokens x layers x neurons floats) within 3 GiB."""
    if subject.device.type == "cuda":
        tokens = min(16384, (3 << 30) // (4 * subject.n_layers * subject.n_neurons))
    else:
        tokens = 1024
    return max(1, tokens // window)


def _after_batch(batch_no: int) -> None:
    """Called after each batch is folded in and checkpointed (a seam for tests that interrupt a run)."""


def _settings(subject, paths, window, tokens, batch, k, n_exemplars, shard, chat) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": subject.name, "fingerprint": subject.fingerprint,
        "corpus": corpus_signature(paths), "window": window, "tokens_limit": tokens, "batch": batch,
        "k": k, "n_exemplars": n_exemplars, "shard": list(shard) if shard else None, "chat": bool(chat),
        "n_layers": subject.n_layers, "n_neurons": subject.n_neurons,
    }


def fold_device(subject, k: int, n_exemplars: int,
                state_device: str | None = None) -> tuple[torch.device, int | None]:
    """Where the running extremes live and are folded, and their slack (None: the default): the model's GPU when
    they fit in half its free memory (all layers folded at once by the torch fold; twice K of slack when that fits
    too, for fewer compactions), else the CPU (the numba fold, layer by layer)."""
    explicit = state_device not in (None, "auto")
    dev = torch.device(state_device) if explicit else subject.device
    if dev.type != "cuda":
        return (dev if explicit else torch.device("cpu")), None
    rows = subject.n_layers * subject.n_neurons
    half_free = torch.cuda.mem_get_info(dev)[0] // 2
    if LayerExtremes.state_bytes(rows, k, n_exemplars, slack=2 * k) <= half_free:
        return dev, 2 * k
    if explicit or LayerExtremes.state_bytes(rows, k, n_exemplars) <= half_free:
        return dev, None
    return torch.device("cpu"), None


def _forward_neurons(subject, base, ids: torch.Tensor, to_cpu: bool | None = None) -> list[torch.Tensor]:
    """One forward of the decoder stack (no LM head); returns each layer's neuron activations [B*T, N]."""
    from ..interventions import Capture, intervene
    cap = Capture(layers=None, sites=("neurons",), to_cpu=subject.device.type != "cpu" if to_cpu is None else to_cpu)
    with intervene(subject, cap), torch.no_grad():
        base(input_ids=ids.to(subject.device), use_cache=False)
    return [cap.get("neurons", l).reshape(-1, subject.n_neurons) for l in range(subject.n_layers)]


def compute_stats(subject, corpus, atlas_dir, *, tokens: int | None = None, window: int = 64,
                  batch: int | None = None, k: int = 10000, n_exemplars: int = 100,
                  shard: str | tuple[int, int] | None = None, chat: bool = False, progress: bool = True,
                  checkpoint_every: float = 600.0, restart: bool = False,
                  state_device: str | None = None, fold: str | None = None) -> NeuronStats:
    """Per-neuron count, mean, variance, top/bottom-K values, quantiles and exemplars over a corpus.

    corpus: a file or list of files (see corpus.py for formats). tokens: stop after this many tokens (whole windows;
    over the whole corpus, before sharding). window: tokens per window. batch: windows per forward (default: about
    1024 tokens on CPU). k: extremes kept per neuron and side. n_exemplars: exemplar positions kept per neuron and
    side. shard: 'i/n' to process windows w with w % n == i (merge the shards with `merge_shards`). chat: also put
    plain-text documents through the chat template as user turns (chat-format records always go through it).
    checkpoint_every: seconds between checkpoints (0: after every batch). restart: discard a partial run.
    state_device: where the running extremes live ("cpu", "cuda", ...; default: the model's GPU when they fit in
    half its free memory, else the CPU). fold: "numba" (CPU state, one layer at a time, the default there) or
    "torch" (all layers at once, the default on a GPU). The result does not depend on either.
    """
    paths = check_corpus(corpus)
    shard = parse_shard(shard)
    for name, v, lo in (("window", window, 2), ("k", k, 1), ("n_exemplars", n_exemplars, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise NeuronscopeError(f"{name} must be an integer >= {lo}, got {v!r}.")
    if tokens is not None and (not isinstance(tokens, int) or tokens < window):
        raise NeuronscopeError(f"--tokens must be at least one window ({window} tokens), got {tokens!r}.")
    if batch is None:
        batch = default_batch(subject, window)
    if not isinstance(batch, int) or batch < 1:
        raise NeuronscopeError(f"The batch must be at least 1 window, got {batch!r}.")
    if subject.tokenizer is None:
        raise NeuronscopeError("This subject has no tokenizer, so it cannot read a corpus.")
    max_windows = tokens // window if tokens else None
    folder = Path(atlas_dir)
    folder.mkdir(parents=True, exist_ok=True)
    settings = _settings(subject, paths, window, tokens, batch, k, n_exemplars, shard, chat)
    _model_section(folder, subject)

    L, N = subject.n_layers, subject.n_neurons
    fdev, slack = fold_device(subject, k, n_exemplars, state_device)
    if fold not in (None, "numba", "torch") or (fold == "numba" and fdev.type != "cpu"):
        raise NeuronscopeError(f"fold must be 'torch', or 'numba' with the state on the CPU; got {fold!r}.")
    stacked = (fold or ("numba" if fdev.type == "cpu" else "torch")) == "torch"
    if not stacked:             # the numba fold, one layer at a time
        groups = [LayerExtremes(N, k, n_exemplars) for _ in range(L)]
        layers = groups
    else:                       # the torch fold, all layers at once
        groups = [LayerExtremes(L * N, k, n_exemplars, device=fdev, fold="torch", slack=slack)]
        layers = groups[0].split(L)
    partial = folder / PARTIAL
    done_batches, done_windows = 0, 0
    elapsed_before = 0.0
    if restart and partial.exists():
        shutil.rmtree(partial)
    if (partial / "state.json").is_file():
        prev = store.read_json(partial / "state.json")
        if prev.get("settings") != settings:
            raise NeuronscopeError(f"'{folder}' holds a partial statistics run with other settings (model, corpus, "
                                   "window, K, shard...); pass restart=True (--restart) to discard it.")
        tensors = store.load_tensors(partial / "state.safetensors")
        for l, st in enumerate(layers):
            st.load_state(tensors, f"{l}.")
        if stacked:             # the per-layer views loaded the memory; the count lives on the whole state
            groups[0].count = layers[0].count
        done_batches, done_windows = prev["batches"], prev["windows"]
        elapsed_before = prev.get("seconds", 0.0)

    # the LM head is not needed for statistics: run the decoder stack only
    base = subject.spec.get(subject.model, subject.spec.base)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        total = None
        if max_windows is not None:
            total = (max_windows // shard[1] + (1 if shard and shard[0] < max_windows % shard[1] else 0)
                     if shard else max_windows) * window
        bar = tqdm(total=total, unit="tok", unit_scale=True, desc="stats", initial=done_windows * window,
                   dynamic_ncols=True)

    def save_checkpoint(batches: int, windows: int, seconds: float) -> None:
        state: dict[str, torch.Tensor] = {}
        views = groups[0].split(L) if stacked else layers
        for l, st in enumerate(views):
            state.update(st.state(f"{l}."))
        partial.mkdir(exist_ok=True)
        store.save_tensors(partial / "state.safetensors", state)
        store.write_json(partial / "state.json", {"settings": settings, "batches": batches, "windows": windows,
                                                  "seconds": seconds})

    t0 = time.perf_counter()
    last_ckpt = t0
    batch_no, processed = 0, 0

    def run_batch(ws: list[Window]) -> None:
        nonlocal processed, last_ckpt
        ids = torch.tensor([w.token_ids for w in ws], dtype=torch.long)
        index = (torch.tensor([w.index for w in ws], dtype=torch.int64).unsqueeze(1) * window
                 + torch.arange(window, dtype=torch.int64)).reshape(-1)
        acts = _forward_neurons(subject, base, ids, to_cpu=fdev.type == "cpu" and subject.device.type != "cpu")
        if stacked:
            groups[0].add(torch.cat(acts, dim=1) if L > 1 else acts[0], index)
        else:
            for st, a in zip(groups, acts):
                st.add(a, index)
        processed += len(ws)
        now = time.perf_counter()
        if now - last_ckpt >= checkpoint_every:
            save_checkpoint(batch_no, done_windows + processed, elapsed_before + now - t0)
            last_ckpt = now
        if bar is not None:
            bar.update(len(ws) * window)
        _after_batch(batch_no)

    stream = (w for w in iter_windows(subject.tokenizer, paths, window, chat=chat, max_windows=max_windows)
              if shard_of(w.index, shard))
    batches = _prefetched(_batched(stream, batch))
    try:
        for ws in batches:
            batch_no += 1
            if batch_no > done_batches:
                run_batch(ws)
    finally:
        batches.close()
        if bar is not None:
            bar.close()
    n_windows = done_windows + processed
    seconds = elapsed_before + time.perf_counter() - t0
    if n_windows == 0:
        raise NeuronscopeError(f"The corpus gave no complete window of {window} tokens"
                               + (f" for shard {shard[0]}/{shard[1]}" if shard else "") + "; give more text or a "
                               "smaller --window.")
    if stacked:
        layers = [v.to("cpu") for v in groups[0].split(L)]
    return finish(subject, folder, layers, settings, paths, n_windows, seconds, window, chat, max_windows)


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
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
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
            yield item
    finally:
        stop.set()
        th.join(timeout=5)


def finish(subject, folder: Path, layers: Sequence[LayerExtremes], settings: dict[str, Any], paths, n_windows: int,
           seconds: float, window: int, chat: bool, max_windows: int | None) -> NeuronStats:
    """Write the results of a finished run, store the exemplar windows, update the manifest, drop the checkpoint."""
    need = exemplar_windows(layers, window)
    rows: dict[int, list[int]] = {}
    if need:
        last = max(need)
        for w in iter_windows(subject.tokenizer, paths, window, chat=chat, max_windows=max_windows):
            if w.index in need:
                rows[w.index] = w.token_ids
            if w.index >= last:
                break
    write_windows(folder, rows, subject.token_strings)
    extra = write_arrays(folder, layers, settings)
    n = layers[0].count
    section = dict(settings)
    section.update({
        "complete": True, "tokens": n, "windows": n_windows, "seconds": round(seconds, 3),
        "tokens_per_s": round(n / seconds, 1) if seconds > 0 else None,
        "quantile_definition": "q(p) = r-th smallest, q(1-p) = r-th largest activation, r = ceil(p*n); NaN when "
                               "r > K",
        **extra, "files": ["stats.safetensors",
                                                                   "stats_extremes.safetensors"],
    })
    store.update_manifest(folder, "stats", section)
    shutil.rmtree(folder / PARTIAL, ignore_errors=True)
    return NeuronStats.open(folder)


def _model_section(folder: Path, subject) -> None:
    """Add the manifest's "model" section when the folder has none yet (a stats-only folder)."""
    man = store.read_manifest(folder)
    if "model" in man:
        if man["model"].get("fingerprint") not in (None, subject.fingerprint):
            raise NeuronscopeError(f"The atlas '{folder}' belongs to another model ({man['model'].get('name')}); "
                                   "use a separate folder for each model.")
        return
    store.update_manifest(folder, "model", {
        "name": subject.name, "fingerprint": subject.fingerprint, "family": subject.family,
        "n_layers": subject.n_layers, "n_neurons": subject.n_neurons, "hidden_size": subject.hidden_size,
        "vocab_size": subject.vocab_size, "tied": subject.tied})
