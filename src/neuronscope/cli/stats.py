"""`neuronscope stats`: corpus statistics into an atlas folder; `neuronscope stats merge`: combine shard results."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import NeuronscopeError
from .common import DeviceOpt, DtypeOpt, GgufOpt, console, load_subject


def stats(
    args: Optional[List[str]] = typer.Argument(None, help="MODEL (a folder, .gguf file or hub id; left out: the "
                                               "default model), or `merge SHARD_DIR...`.", show_default=False),
    corpus: List[str] = typer.Option([], "--corpus", "-c", help="Corpus file or folder (plain text, JSONL with "
                                     "'text' or 'messages', JSON records, Parquet, CSV). Repeatable."),
    atlas: Optional[Path] = typer.Option(None, "--atlas", "-a", help="The atlas folder to write to (for merge: "
                                         "the output folder)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", "-n", min=1, help="Stop after this many tokens."),
    window: int = typer.Option(64, "--window", "-w", min=2, help="Tokens per window."),
    batch: Optional[int] = typer.Option(None, "--batch", "-b", min=1, help="Windows per forward (default: about "
                                        "1024 tokens on CPU; on a GPU up to 16384, keeping the batch's "
                                        "activations within 3 GiB)."),
    k: int = typer.Option(10000, "--k", min=1, help="Extreme values kept per neuron and side (quantiles need "
                          "ceil(p * tokens) <= K)."),
    exemplars: int = typer.Option(100, "--exemplars", min=1, help="Exemplar positions kept per neuron and side."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Process one part i/n of the corpus's windows "
                                        "(merge the parts with `neuronscope stats merge`)."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run --shards parts as tasks on this Ray cluster "
                                      "(address, e.g. ray://10.0.0.1:10001 or auto) and merge them."),
    shards: int = typer.Option(2, "--shards", min=1, help="Number of parts with --ray."),
    chat: bool = typer.Option(False, "--chat", help="Also put plain-text documents through the chat template "
                              "(chat-format records always are)."),
    restart: bool = typer.Option(False, "--restart", help="Discard a partial run in the folder instead of "
                                 "resuming it."),
    gguf_file: Optional[str] = GgufOpt,
    dtype: str = DtypeOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """Per-neuron corpus statistics: count, mean, variance, top/bottom-K values, extreme quantiles, exemplars.

    Resumable: run the same command again after an interruption and it continues.

    Example: neuronscope stats --corpus wiki.valid.raw --corpus alpaca.json --atlas atlas-smollm --tokens 200000

    Shards:  neuronscope stats MODEL --corpus C --atlas part0 --shard 0/2   (and 1/2 elsewhere), then
             neuronscope stats merge part0 part1 --atlas atlas-smollm
    """
    args = list(args or [])
    if args and args[0] == "merge":
        if not args[1:]:
            raise NeuronscopeError("Give the shard folders to merge: neuronscope stats merge DIR1 DIR2 --atlas OUT.")
        if atlas is None:
            raise NeuronscopeError("Give the output folder with --atlas.")
        from ..stats import merge_shards
        st = merge_shards(args[1:], atlas)
        console.print(f"merged {len(args) - 1} shards: {st.tokens:,} tokens -> {atlas}")
        return
    if len(args) > 1:
        raise NeuronscopeError(f"Expected one MODEL, got {len(args)} ({' '.join(args)}); use --corpus for files.")
    if atlas is None:
        raise NeuronscopeError("Give the atlas folder to write the statistics to with --atlas.")
    from ..stats.corpus import check_corpus
    check_corpus(corpus)  # a clear message before the model loads
    model = args[0] if args else None
    if ray is not None:
        from ..stats.ray_shards import run_on_ray
        st = run_on_ray(ray, model, corpus, atlas, shards=shards, gguf_file=gguf_file, dtype=dtype,
                        device=device, tokens=tokens, window=window, batch=batch, k=k, n_exemplars=exemplars,
                        chat=chat)
    else:
        from ..stats import compute_stats
        subject = load_subject(model, gguf_file, dtype, device)
        st = compute_stats(subject, corpus, atlas, tokens=tokens, window=window, batch=batch, k=k,
                           n_exemplars=exemplars, shard=shard, chat=chat, progress=True, restart=restart)
    info = st.info
    console.print(f"{info['tokens']:,} tokens in {info['seconds']:.1f} s "
                  f"({info.get('tokens_per_s') or 0:,.0f} tokens/s) -> {atlas}")
    if info.get("unresolved_levels"):
        console.print(f"quantiles not resolvable with K={k}: {', '.join(f'{x:g}' for x in info['unresolved_levels'])}"
                      " (stored as NaN)")


def register(app: typer.Typer) -> None:
    app.command("stats")(stats)
