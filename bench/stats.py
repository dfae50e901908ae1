"""Benchmark of `neuronscope stats` on SmolLM2-135M-Instruct: tokens/s against a plain forward, and peak memory.

    .venv/bin/python bench/stats.py [--tokens 32768] [--atlas /tmp/atlas-smollm] [--k K] [--batch 16]
    python bench/stats.py --device cuda --batch 256 --tokens 0      # on a GPU, the whole corpus

Builds a mixed corpus (WikiText-2 raw valid + test, TinyStories, Alpaca records as chats through the chat template,
documents interleaved) in a temporary folder, measures the plain forward (the whole model with its LM head, as a
user would run it) over the first windows before and after the statistics run, runs `compute_stats` over `--tokens`
tokens (0: all) into the atlas folder (K extremes, 100 exemplars a side), and prints the ratio of tokens/s (medians
of batches for the plain forward; the whole loop, reading and tokenising the corpus and folding included, for
stats), the ratio over the first 16K, 64K, 256K, 1M... tokens and over the second half of the run, the peak
memory, and a few neurons' quantiles and top exemplars.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GGUF = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPORA = SHARED / "corpora"


def mixed_corpus(folder: Path, corpora: Path = CORPORA) -> Path:
    """One JSONL that interleaves web-style text (WikiText, TinyStories) and chat-style records (Alpaca)."""
    from neuronscope.stats.corpus import iter_documents
    wiki = itertools.chain(iter_documents(corpora / "wikitext-2-raw" / "wiki.valid.raw"),
                           iter_documents(corpora / "wikitext-2-raw" / "wiki.test.raw"))
    sources = [wiki, iter_documents(corpora / "tinystories-sample" / "tinystories_sample.txt"),
               iter_documents(corpora / "alpaca-subset" / "alpaca_data.json")]
    out = folder / "mix.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for docs in itertools.zip_longest(*sources):
            for d in docs:
                if d is None:
                    continue
                f.write(json.dumps({"messages": d} if isinstance(d, list) else {"text": d}) + "\n")
    return out


def sync(subject) -> None:
    if subject.device.type == "cuda":
        torch.cuda.synchronize(subject.device)


def plain_forward_rates(subject, windows, batch: int, decoder_only: bool = False) -> list[float]:
    """tokens/s of plain forwards over consecutive batches of `windows`: the whole model (LM head included), or with
    decoder_only the decoder stack alone (what the statistics pass runs, without its capture and fold)."""
    model = subject.spec.get(subject.model, subject.spec.base) if decoder_only else subject.model
    rates = []
    for s in range(0, len(windows) - batch + 1, batch):
        ids = torch.tensor([w.token_ids for w in windows[s:s + batch]]).to(subject.device)
        sync(subject)
        t = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        sync(subject)
        rates.append(ids.numel() / (time.perf_counter() - t))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768, help="tokens to process (0: the whole corpus)")
    ap.add_argument("--atlas", default="/tmp/atlas-smollm" if Path("/tmp/atlas-smollm").is_dir() else
                    "/tmp/ns-stats-smollm")
    ap.add_argument("--model", default=str(GGUF))
    ap.add_argument("--corpora", default=str(CORPORA))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=int, default=None, help="extremes kept (default: sized by the levels and tokens)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--plain-batches", type=int, default=4, help="batches of plain forward before and after")
    ap.add_argument("--plain-every", type=int, default=32, help="during the run, after every this many batches, "
                    "time one batch of plain forward and one of the decoder stack alone (excluded from the stats "
                    "time), so the baselines see the same machine state as the run")
    ap.add_argument("--restart", action="store_true")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--profile", action="store_true", help="time the parts of the loop (synchronised timers; "
                    "slows the run a little)")
    ap.add_argument("--fold", default=None, choices=["numba", "torch"], help="the fold (default: numba on a CPU, "
                    "torch on a GPU)")
    ap.add_argument("--interleaved", type=int, default=0, help="Only the interleaved measurement: this many "
                    "batches, each run as a plain forward and as a stats step (forward + fold), alternating.")
    args = ap.parse_args()

    from neuronscope.stats import compute as compute_mod
    from neuronscope.stats import compute_stats
    from neuronscope.stats.corpus import iter_windows
    from neuronscope.subject import Subject

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, date {time.strftime('%Y-%m-%d %H:%M')}, "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""),
          flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="ns-bench-stats-"))
    corpus = mixed_corpus(tmp, Path(args.corpora))
    t = time.perf_counter()
    subject = Subject.load(args.model, device=args.device)
    print(f"model loaded in {time.perf_counter() - t:.1f} s ({subject.model.dtype}); rss {rss_mb():.0f} MB", flush=True)
    windows = list(iter_windows(subject.tokenizer, [corpus], args.window,
                                max_windows=(args.plain_batches + 1) * args.batch))

    if args.interleaved:
        return interleaved(subject, corpus, args)
    plain_forward_rates(subject, windows[:args.batch], args.batch)          # warm-up
    before = plain_forward_rates(subject, windows, args.batch)
    base_before = plain_forward_rates(subject, windows, args.batch, decoder_only=True)
    print(f"plain forward before: median {statistics.median(before):.1f} tok/s over {len(before)} batches "
          f"(decoder stack alone: {statistics.median(base_before):.1f})", flush=True)
    marks: list[float] = []
    during: list[float] = []
    base_during: list[float] = []
    excluded = [0.0]

    def mark(batch_no: int) -> None:
        sync(subject)
        now = time.perf_counter()
        marks.append(now - excluded[0])
        if args.plain_every and batch_no % args.plain_every == 0:
            during.extend(plain_forward_rates(subject, windows[:args.batch], args.batch))
            base_during.extend(plain_forward_rates(subject, windows[:args.batch], args.batch, decoder_only=True))
            excluded[0] += time.perf_counter() - now

    compute_mod._after_batch = mark
    totals = install_profile(subject) if args.profile else None
    t = time.perf_counter()
    st = compute_stats(subject, corpus, args.atlas, tokens=args.tokens or None, window=args.window,
                       batch=args.batch, k=args.k, n_exemplars=100, progress=True, restart=args.restart,
                       fold=args.fold)
    wall = time.perf_counter() - t
    after = plain_forward_rates(subject, windows, args.batch)
    base_after = plain_forward_rates(subject, windows, args.batch, decoder_only=True)
    print(f"plain forward after: median {statistics.median(after):.1f} tok/s over {len(after)} batches "
          f"(decoder stack alone: {statistics.median(base_after):.1f})", flush=True)
    plain = statistics.median(before + during + after)
    base_plain = statistics.median(base_before + base_during + base_after)
    print(f"baselines, medians of {len(before + during + after)} batches before, during and after the run: plain "
          f"forward {plain:.1f} tok/s, decoder stack alone {base_plain:.1f} tok/s")
    info = st.info
    loop = info["tokens"] / (marks[-1] - t)
    per_batch = args.batch * args.window
    import os
    added = sum(p.stat().st_size for p in Path(args.atlas).iterdir() if p.name.startswith(("stats", "atlas.sqlite")))
    res = {"device": args.device, "plain_tok_s": plain, "decoder_only_tok_s": base_plain, "tokens": info["tokens"],
           "loop_s": marks[-1] - t, "stats_tok_s": loop, "ratio": loop / plain,
           "ratio_vs_decoder_only": loop / base_plain, "end_to_end_s": wall, "end_to_end_tok_s": info["tokens"] / wall,
           "ratio_end_to_end": info["tokens"] / wall / plain, "k": info["k"], "batch": args.batch,
           "peak_rss_mb": rss_mb(), "plan_ram_mb": info["plan"]["ram_bytes"] / 2**20,
           "plan_checkpoint_mb": info["plan"]["checkpoint_bytes"] / 2**20, "atlas_added_mb": added / 2**20,
           "plan_atlas_mb": info["plan"]["atlas_bytes"] / 2**20, "load_avg": os.getloadavg()}
    print(f"stats: {info['tokens']:,} tokens, loop {marks[-1] - t:.1f} s ({loop:.1f} tok/s), end to end {wall:.1f} s "
          f"({info['tokens'] / wall:.1f} tok/s, ratio {info['tokens'] / wall / plain:.3f}; counting the corpus and "
          f"writing results included), K = {info['k']}", flush=True)
    print(f"atlas +{added / 2**20:.0f} MB (planned {res['plan_atlas_mb']:.0f} MB); checkpoint planned "
          f"{res['plan_checkpoint_mb']:.0f} MB; load average {os.getloadavg()}")
    print(f"RATIO stats/plain = {loop / plain:.3f} over the whole run ({info['tokens']:,} tokens); against the "
          f"decoder stack alone (no LM head, no capture, no fold) {loop / base_plain:.3f}")
    if totals is not None:
        res["profile_s"] = dict(totals)
        print("  time in parts of the loop (s): " + ", ".join(f"{k} {v:.2f}" for k, v in totals.items()))
    n = 16384
    while n <= len(marks) * per_batch:
        b = n // per_batch
        r = b * per_batch / (marks[b - 1] - t) / plain
        res[f"ratio_first_{n}"] = r
        res[f"ratio_vs_decoder_only_first_{n}"] = r * plain / base_plain
        print(f"  ratio over the first {n:>9,} tokens: {r:.3f} "
              f"(vs the decoder stack alone {r * plain / base_plain:.3f})")
        n *= 4
    if len(marks) >= 4:
        h = len(marks) // 2
        r = (len(marks) - h) * per_batch / (marks[-1] - marks[h - 1]) / plain
        res["ratio_second_half"] = r
        res["ratio_vs_decoder_only_second_half"] = r * plain / base_plain
        print(f"  ratio over the second half of the run (batches {h + 1}-{len(marks)}): {r:.3f} (vs the decoder "
              f"stack alone {r * plain / base_plain:.3f})")
    if subject.device.type == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        print(f"peak GPU memory {res['peak_gpu_mb']:.0f} MB")
    print(f"peak RSS {rss_mb():.0f} MB (planned {res['plan_ram_mb']:.0f} MB); state "
          f"{info['plan']['state_bytes'] / 2**20:.0f} MB")
    q_hi, q_lo = (st.quantile(x) for x in st.norm_levels())
    for layer in (3, 15, 27):
        i = int(torch.argmax(q_hi[layer]))
        print(f"\nneuron {layer}:{i}  q(lo)={q_lo[layer, i]:.3f} q(1e-4)={st.quantile(1e-4)[layer, i]:.3f} "
              f"q(1-1e-4)={st.quantile(1 - 1e-4)[layer, i]:.3f} q(hi)={q_hi[layer, i]:.3f} "
              f"mean={st.mean[layer, i]:.4f} std={st.var[layer, i].sqrt():.4f}")
        for e in st.exemplars(layer, i, "pos", n=3):
            toks = e.tokens
            p = e.position
            left = "".join(toks[max(0, p - 12):p]).replace("\n", " ")
            print(f"  {e.activation:8.3f}  ...{left}[[{toks[p]}]]{''.join(toks[p + 1:p + 4])}...")
    print(f"\natlas folder: {args.atlas}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


def install_profile(subject) -> dict[str, float]:
    """Wrap the loop's parts in synchronised timers; returns the running totals (seconds)."""
    from neuronscope.stats import compute as C
    from neuronscope.stats import extremes as X
    totals: dict[str, float] = {}

    def wrap(owner, name: str, label: str) -> None:
        f = getattr(owner, name)

        def timed(*a, **kw):
            sync(subject)
            t = time.perf_counter()
            r = f(*a, **kw)
            sync(subject)
            totals[label] = totals.get(label, 0.0) + time.perf_counter() - t
            return r
        setattr(owner, name, timed)

    wrap(C, "_forward_neurons", "forward+capture")
    wrap(X.LayerExtremes, "add", "fold")
    wrap(X.TopBuffer, "add", "fold: top/bottom buffers (torch)")
    wrap(X.TopBuffer, "_compact", "fold: of which compactions (torch)")
    wrap(X, "_fold_keys", "fold: exemplars (torch)")
    return totals


def interleaved(subject, corpus, args) -> None:
    """Plain forward and stats step on the same batch, alternating, so machine load hits both alike."""
    from neuronscope.stats.compute import _forward_neurons
    from neuronscope.stats.corpus import iter_windows
    from neuronscope.stats.extremes import LayerExtremes
    wins = list(iter_windows(subject.tokenizer, [corpus], args.window, max_windows=args.interleaved * args.batch))
    base = subject.spec.get(subject.model, subject.spec.base)
    from neuronscope.stats.levels import LEVELS, ranks_needed
    k = args.k or ranks_needed(LEVELS, args.interleaved * args.batch * args.window)
    layers = [LayerExtremes(subject.n_neurons, k, 100) for _ in range(subject.n_layers)]
    plain_t, stats_t, ratios = [], [], []
    for b in range(args.interleaved):
        ws = wins[b * args.batch:(b + 1) * args.batch]
        ids = torch.tensor([w.token_ids for w in ws])
        index = (torch.tensor([w.index for w in ws]).unsqueeze(1) * args.window + torch.arange(args.window)).reshape(-1)
        t = time.perf_counter()
        with torch.no_grad():
            subject.model(input_ids=ids)
        tp = time.perf_counter() - t
        t = time.perf_counter()
        for st, a in zip(layers, _forward_neurons(subject, base, ids)):
            st.add(a, index)
        ts = time.perf_counter() - t
        plain_t.append(tp)
        stats_t.append(ts)
        ratios.append(tp / ts)
        print(f"batch {b}: plain {ids.numel() / tp:.0f} tok/s, stats {ids.numel() / ts:.0f} tok/s, "
              f"ratio {tp / ts:.3f}", flush=True)
    n = args.batch * args.window
    print(f"INTERLEAVED {args.interleaved} batches of {n} tokens, K={k}: plain {n * len(plain_t) / sum(plain_t):.0f}"
          f" tok/s, stats {n * len(stats_t) / sum(stats_t):.0f} tok/s, ratio of totals "
          f"{sum(plain_t) / sum(stats_t):.3f}, median per-batch ratio {statistics.median(ratios):.3f}; "
          f"peak RSS {rss_mb():.0f} MB")


def rss_mb() -> float:
    from neuronscope.stats.compute import peak_rss
    return peak_rss() / 2 ** 20


if __name__ == "__main__":
    sys.exit(main())
