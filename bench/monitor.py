"""Benchmark the Monitor's views on SmolLM2-135M-Instruct with a 64-token conversation.

Prints, measured in one run (medians of --reps, the baseline interleaved with each view):
  activation view / plain forward (target <= 1.5), attribution view / plain forward (target <= 3),
  the latency of every action that needs no forward pass (target <= 200 ms; first call and warm median),
  time to first streamed token for 1, 2 and 4 concurrent users, and the memory a session holds.

    .venv/bin/python bench/monitor.py [--atlas DIR | --stats-dir DIR] [--reps 7]

The activation view needs corpus statistics (to normalise): --atlas uses a full atlas folder (decodes, statistics,
descriptions, embedding index); without it the first run computes a small set (4096 tokens of WikiText-2) into
--stats-dir and later runs reuse it. Views are timed through the `Monitor` (the server's logic, no HTTP), each on a
fresh cache, so every timing includes the forward (or forward + backward) it needs. Record `uptime` with the figures.
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
    ap.add_argument("--atlas", default=None, help="an atlas folder of SmolLM2 (used instead of --stats-dir)")
    ap.add_argument("--concept", default="sister", help="the concept searched and steered in the action timings")
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
    stats_dir = Path(args.atlas or args.stats_dir)
    if not args.atlas and not (stats_dir / "stats.safetensors").is_file():
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

    actions(mon, s, T, args)
    concurrent_ttft(mon, prompt_len)

    # memory a session holds after chat + tokens + activations + one attribution
    s.cache.clear()
    mon.tokens(s)
    mon.activations(s)
    mon.attribution(s, T - 1)
    print(f"session memory (views cached):  {s.memory_bytes() / 1024:8.1f} KiB")


def timed(fn, reps: int) -> tuple[float, float]:
    """(first call, median of the next `reps` calls) in seconds."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    xs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t0)
    return first, med(xs)


def actions(mon, s, T: int, args) -> None:
    """Actions that need no forward pass of the conversation, on a state whose views are computed."""
    mon.activations(s, page_size=50)  # the analysis forward is done; what follows reads it
    mon.attribution(s, T - 1, page_size=1)
    k = mon.knowledge
    rows = mon.activations(s, page_size=1)["rows"]
    l, n = (rows[0]["layer"], rows[0]["neuron"]) if rows else (0, 0)
    made: list[str] = []

    def add_neurons():
        made.append(mon.add_steering(s, mode="suppress", neurons=[[l, n], [l, (n + 1) % mon.subject.n_neurons]])["id"])

    def add_concept():
        made.append(mon.add_steering(s, mode="suppress", concept=args.concept, n_neurons=20)["id"])

    def toggle():
        mon.set_steering(s, made[0], False)
        mon.set_steering(s, made[0], True)

    def cleanup():
        for sid in made:
            mon.remove_steering(s, sid)
        made.clear()
        mon.activations(s, page_size=50)
        mon.attribution(s, T - 1, page_size=1)

    cases = [("concept search", lambda: mon.concepts(args.concept, 50)),
             ("neuron detail (10 exemplars)", lambda: mon.neuron(l, n, 10)),
             ("neuron detail (no exemplars)", lambda: mon.neuron(l, (n + 7) % mon.subject.n_neurons, 0)),
             ("active concepts (clusters)", lambda: (s.cache.pop(next((x for x in list(s.cache) if isinstance(x, tuple)
                                                                     and x and x[0] == "clusters"), None), None),
                                                     mon.clusters(s))),
             ("clusters by attribution", lambda: mon.clusters(s, sort="attribution", position=T - 1)),
             ("activation table page (filter)", lambda: mon.activations(s, filter="the", page_size=50)),
             ("session state (reload)", lambda: mon.state(s)),
             ("export", lambda: mon.export(s))]
    print(f"actions without a forward pass (first call / warm median of {args.reps}; target <= 200 ms):")
    from neuronscope.errors import NeuronscopeError
    for name, fn in cases + [("add steering (2 neurons)", add_neurons), ("add steering (concept, 20)", add_concept)]:
        try:
            first, warm = timed(fn, args.reps)
        except NeuronscopeError as exc:  # e.g. concept search without an atlas
            print(f"  {name:34s} unavailable: {exc}")
            continue
        print(f"  {name:34s} {1000 * first:8.1f} ms / {1000 * warm:8.1f} ms")
        if made:
            cleanup()
    add_neurons()
    first, warm = timed(toggle, args.reps)
    print(f"  {'toggle a steering off and on':34s} {1000 * first:8.1f} ms / {1000 * warm:8.1f} ms")
    cleanup()
    del k


def concurrent_ttft(mon, prompt_len: int, n_new: int = 24) -> None:
    """Time to first token when 1, 2 or 4 users send at the same moment (each its own session)."""
    import threading
    print(f"time to first token with concurrent users ({prompt_len}-token prompt, {n_new} new tokens each):")
    for users in (1, 2, 4):
        ttft, total = [], []
        barrier = threading.Barrier(users)

        def one(barrier=barrier, ttft=ttft, total=total):
            s = mon.sessions.create()
            barrier.wait()
            t0 = time.perf_counter()
            first = None
            for ev in mon.send(s, QUESTION, max_new_tokens=n_new):
                if first is None and ev["type"] == "token":
                    first = time.perf_counter() - t0
            ttft.append(first)
            total.append(time.perf_counter() - t0)
        threads = [threading.Thread(target=one) for _ in range(users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(f"  {users} user(s): first token median {1000 * med(ttft):7.0f} ms (max {1000 * max(ttft):.0f} ms); "
              f"whole answers median {1000 * med(total):.0f} ms (max {1000 * max(total):.0f} ms)")


if __name__ == "__main__":
    sys.exit(main())
