"""Benchmark the Monitor's views on SmolLM2-135M-Instruct with a 64-token conversation.

Prints, measured in one run (medians of --reps, the baseline interleaved with each view):
  activation view / plain forward (target <= 1.5), attribution view / plain forward (target <= 4),
  time to first streamed token, and the memory a session holds.

    .venv/bin/python bench/monitor.py [--stats-dir DIR] [--reps 7]

The activation view needs corpus statistics (to normalise); the first run computes a small set (4096 tokens of
WikiText-2) into --stats-dir and later runs reuse it. Views are timed through the `Monitor` (the server's logic,
no HTTP), each on a fresh cache, so every timing includes the forward (or forward + backward) it needs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GGUF = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS = SHARED / "corpora" / "wikitext-2-raw"

QUESTION = "Tell me a short story about a brave dog who saves a small village from a flood."


def med(xs):
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stats-dir", default=str(Path(tempfile.gettempdir()) / "neuronscope-bench-smollm2-stats"))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=64, help="conversation length")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 on a shared machine: 2 OpenMP threads on an oversubscribed CPU spin at "
                         "barriers and make the main thread's forwards erratic, 2-20x slower)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, args.threads))

    from neuronscope.server import Knowledge, Monitor
    from neuronscope.server.sessions import Message
    from neuronscope.subject import Subject

    t0 = time.perf_counter()
    subject = Subject.load(GGUF)
    print(f"loaded {subject.name} in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}")
    stats_dir = Path(args.stats_dir)
    if not (stats_dir / "stats.safetensors").is_file():
        from neuronscope.stats import compute_stats
        corpus = sorted(p for p in CORPUS.glob("*") if p.suffix in (".raw", ".txt") or "valid" in p.name)
        t0 = time.perf_counter()
        compute_stats(subject, corpus[0], stats_dir, tokens=4096, k=1000, n_exemplars=20, progress=False)
        print(f"computed statistics (4096 tokens of {corpus[0].name}) in {time.perf_counter() - t0:.1f} s")
    knowledge = Knowledge.load(subject, stats_dir)
    mon = Monitor(subject, knowledge)
    print("knowledge:", knowledge.capabilities)

    # a conversation of exactly --tokens tokens: the question, then the model's answer cut to fit
    s = mon.sessions.create()
    s.messages.append(Message("user", QUESTION))
    prompt_len = len(mon._prompt_ids(s))
    ids = torch.tensor([mon._prompt_ids(s)])
    new = subject.generate_ids(ids, max_new_tokens=max(1, args.tokens - prompt_len + 4))[0].tolist()
    for cut in range(len(new), 0, -1):
        s.messages[1:] = [Message("assistant", subject.decode(new[:cut]), ids=new[:cut])]
        s.changed()
        if len(mon.render(s)["ids"]) <= args.tokens:
            break
    T = len(mon.render(s)["ids"])
    conv = torch.tensor([mon.render(s)["ids"]])
    print(f"conversation: {T} tokens ({prompt_len} in the prompt)")

    def forward():
        with torch.no_grad():
            subject.model(input_ids=conv, use_cache=False)

    def activation_view():
        s.cache.clear()
        mon.activations(s, page_size=50)

    def attribution_view():
        s.cache.clear()
        mon.attribution(s, T - 1, page_size=50)

    for f in (forward, activation_view, attribution_view):  # warm up
        f()
    fwd, act, fwd2, att = [], [], [], []
    for _ in range(args.reps):
        for fn, out in ((forward, fwd), (activation_view, act), (forward, fwd2), (attribution_view, att)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    f_med = med(fwd + fwd2)
    view = mon.activations(s, page_size=50)
    print(f"plain forward ({T} tokens):      {1000 * f_med:8.1f} ms")
    print(f"activation view:                {1000 * med(act):8.1f} ms   ratio {med(act) / f_med:.2f} (target <= 1.5)"
          f"   [{view['total']} neurons firing, mode {view['mode']}]")
    print(f"attribution view (top 1000):    {1000 * med(att):8.1f} ms   ratio {med(att) / f_med:.2f} (target <= 4)")

    # time to first streamed token, on the prompt of the same conversation (a fresh session each time)
    ttft, total = [], []
    for _ in range(max(3, args.reps // 2)):
        s2 = mon.sessions.create()
        t0 = time.perf_counter()
        events = mon.send(s2, QUESTION, max_new_tokens=16)
        first = None
        for ev in events:
            if first is None and ev["type"] == "token":
                first = time.perf_counter() - t0
        total.append(time.perf_counter() - t0)
        ttft.append(first)
    print(f"time to first streamed token:   {1000 * med(ttft):8.1f} ms   (prompt {prompt_len} tokens; 16 tokens "
          f"in {1000 * med(total):.0f} ms)")

    # memory a session holds after chat + tokens + activations + one attribution
    s.cache.clear()
    mon.tokens(s)
    mon.activations(s)
    mon.attribution(s, T - 1)
    print(f"session memory (views cached):  {s.memory_bytes() / 1024:8.1f} KiB")


if __name__ == "__main__":
    sys.exit(main())
