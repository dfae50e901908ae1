"""`neuronscope stats`: corpus statistics into an atlas folder; `neuronscope stats merge`: combine shard results."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional

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
    k: Optional[int] = typer.Option(None, "--k", min=1, help="Extreme values kept per neuron and side (default: "
                                    "sized by the levels and tokens, max ceil(p * tokens); give it for shards that "
                                    "will be merged into a run larger than --tokens).", show_default=False),
    levels: Optional[str] = typer.Option(None, "--levels", help="Quantile levels, comma-separated (default "
                                         "1e-7,1e-6,1e-5,1e-4 and their complements).", show_default=False),
    keep_extremes: Optional[bool] = typer.Option(None, "--keep-extremes/--no-keep-extremes", help="Also store the "
                                                 "K extremes per neuron (what `stats merge` needs; default: only "
                                                 "with --shard).", show_default=False),
    checkpoint_tokens: int = typer.Option(100_000, "--checkpoint-tokens", min=0, help="A checkpoint at most this "
                                          "many tokens apart (0: after every batch)."),
    checkpoint_every: float = typer.Option(600.0, "--checkpoint-every", min=0, help="A checkpoint at most this "
                                           "many seconds apart."),
    exemplars: int = typer.Option(100, "--exemplars", min=1, help="Exemplar positions kept per neuron and side."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Process one part i/n of the corpus's windows "
                                        "(merge the parts with `neuronscope stats merge`)."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run --shards parts as tasks on this Ray cluster "
                                      "(address, e.g. ray://10.0.0.1:10001 or auto) and merge them."),
    shards: int = typer.Option(2, "--shards", min=1, help="Number of parts with --ray."),
    chat: bool = typer.Option(False, "--chat", help="Also put plain-text documents through the chat template "
                              "(chat-format records always are)."),
    corpus_format: str = typer.Option("auto", "--corpus-format", help="auto: a WikiText file (named wiki.*.raw or "
                                      "wiki.*.tokens, or whose first lines have its spaced headings and "
                                      "punctuation) is read as the text it stands for: ' @-@ ' -> '-', ' @,@ ' -> "
                                      "',', ' @.@ ' -> '.', no space before punctuation or inside brackets and "
                                      "quotes, headings kept as plain lines ('= = History = =' -> 'History'), one "
                                      "article (from one '= Title =' to the next) a document; plain: every file "
                                      "as it is; wikitext: every text file as WikiText. A setting of the run: "
                                      "resuming with another is refused."),
    restart: bool = typer.Option(False, "--restart", help="Discard a partial run in the folder instead of "
                                 "resuming it."),
    gguf_file: Optional[str] = GgufOpt,
    dtype: str = DtypeOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """Per-neuron corpus statistics: count, mean, variance, extreme quantiles, exemplars (and top/bottom-K).

    Resumable: Ctrl-C (or SIGTERM) finishes the batch, saves a checkpoint and exits with status 130 (143); run the
    same command again and it continues from there. The state is sized by the levels and tokens asked for; the
    plan (memory, disk) is printed before the run starts, and a run that cannot fit is refused.

    Example: neuronscope stats --corpus wiki.valid.raw --corpus alpaca.json --atlas atlas-smollm --tokens 200000

    WikiText files are read as clean text, one article a document (--corpus-format; headings kept as lines).

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
        st = merge_shards(args[1:], atlas, keep_extremes=bool(keep_extremes))
        console.print(f"merged {len(args) - 1} shards: {st.tokens:,} tokens -> {atlas}")
        return
    if len(args) > 1:
        raise NeuronscopeError(f"Expected one MODEL, got {len(args)} ({' '.join(args)}); use --corpus for files.")
    if atlas is None:
        raise NeuronscopeError("Give the atlas folder to write the statistics to with --atlas.")
    from ..stats.corpus import check_corpus, check_corpus_format
    check_corpus(corpus)  # a clear message before the model loads
    check_corpus_format(corpus_format)
    model = args[0] if args else None
    if ray is not None:
        from ..stats.ray_shards import run_on_ray
        st = run_on_ray(ray, model, corpus, atlas, shards=shards, gguf_file=gguf_file, dtype=dtype,
                        device=device, tokens=tokens, window=window, batch=batch, k=k, n_exemplars=exemplars,
                        chat=chat, levels=levels, corpus_format=corpus_format)
    else:
        import time
        from ..interrupt import Interrupted
        from ..stats import compute_stats
        from ..stats.compute import peak_rss, reset_peak_rss
        t = time.perf_counter()
        subject = load_subject(model, gguf_file, dtype, device)
        # this process is ours: restart its peak-memory mark so the run records its own peak, not the load's
        # (a GGUF's first load de-quantises it once into the cache, a one-off peak above the model's size)
        load_peak = peak_rss()
        reset_peak_rss()
        console.print(f"model loaded in {time.perf_counter() - t:.1f} s (peak memory of the load "
                      f"{load_peak / 1e9:.2f} GB)", style="dim")
        try:
            st = compute_stats(subject, corpus, atlas, tokens=tokens, window=window, batch=batch, k=k,
                               n_exemplars=exemplars, levels=levels, shard=shard, chat=chat, progress=True,
                               restart=restart, keep_extremes=keep_extremes, checkpoint_tokens=checkpoint_tokens,
                               checkpoint_every=checkpoint_every, corpus_format=corpus_format)
        except Interrupted as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(exc.exit_code) from None
    console.print(summary(st.info, atlas))


def summary(info: dict[str, Any], atlas: str | os.PathLike[str]) -> str:
    """The closing lines of a run: end-to-end time and rate with the loop's beside them, and the marked levels."""
    from ..stats.levels import fmt_level
    out = (f"{info['tokens']:,} tokens in {info['seconds']:.1f} s end to end "
           f"({info.get('tokens_per_s') or 0:,.0f} tokens/s)")
    if info.get("loop_seconds"):
        out += (f"; the loop {info['loop_seconds']:.1f} s ({info.get('loop_tokens_per_s') or 0:,.0f} tokens/s), "
                f"finishing {info.get('finish_seconds', 0):.1f} s")
    out += f" -> {atlas}"
    marks = [x for x in info.get("level_ranks", []) if x.get("mark")]
    if marks:
        out += "\nlevels not resolved by this corpus: " + "; ".join(f"{fmt_level(x['level'])} {x['mark']}"
                                                                   for x in marks)
    nb = info.get("normalised_by")
    if nb:
        out += (f"\nnormalised activation: act / q({fmt_level(nb['pos'])}) above zero, "
                f"act / |q({fmt_level(nb['neg'])})| below")
    return out


def register(app: typer.Typer) -> None:
    app.command("stats")(stats)
