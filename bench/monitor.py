"""Benchmark the Monitor's views on SmolLM2-135M-Instruct with a 64-token conversation.

Prints, measured in one run (medians of --reps, the baseline interleaved with each view):
  activation view / plain forward (target <= 1.5), attribution view / plain forward (target <= 3),
  the latency of every action that needs no forward pass (target <= 200 ms; first call and warm median),
  time to first streamed token for 1, 2 and 4 concurrent users, the longest stall of a streaming answer while another
  session runs a view of a long conversation (against that view's forward in one piece: how long the stream waited
  before views ran in chunks), and the memory a session holds.

    .venv/bin/python bench/monitor.py [--atlas DIR | --stats-dir DIR] [--reps 7]
    .venv/bin/python bench/monitor.py --atlas DIR --alice OUT_DIR    # the seed article's loop in the real page

--alice runs the loop of the seed article in headless Chromium against a live server (ask the Alice question, rank
the active concepts by attribution to the answer's number, suppress / strengthen the top concepts with one click,
regenerate), prints each steered answer and saves screenshots into OUT_DIR.

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


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stats-dir", default=str(Path(tempfile.gettempdir()) / "neuronscope-bench-smollm2-stats"))
    ap.add_argument("--atlas", default=None, help="an atlas folder of SmolLM2 (used instead of --stats-dir)")
    ap.add_argument("--concept", default="sister", help="the concept searched and steered in the action timings")
    ap.add_argument("--alice", default=None, help="run the Alice loop in the page; screenshots into this folder")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=64, help="conversation length")
    ap.add_argument("--long", type=int, default=900, help="length of the long conversation of the stall figures")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 on a shared machine: 2 OpenMP threads on an oversubscribed CPU spin at "
                         "barriers and make the main thread's forwards erratic, 2-20x slower)")
    ap.add_argument("--stall-steps", type=float, default=1.0,
                    help="the Monitor's --stall-steps: decoding steps a view's chunk may add to a streaming step")
    ap.add_argument("--streams", type=int, default=1, help="streaming answers during the stall figures")
    ap.add_argument("--slots", type=int, default=None, help="model calls at once (default: cores / torch threads)")
    ap.add_argument("--only", choices=["views", "stalls", "ttft", "actions"], default=None,
                    help="run only these figures (after the conversation is built)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(max(1, args.threads))
    mon = load_monitor(args)
    if args.alice:
        return alice(mon, Path(args.alice))
    import gc
    mon.warm()   # as `neuronscope serve` does at start: descriptions, vocabulary, index, embedder
    gc.freeze()  # as serve does after warm (a full collection of those tables held the GIL ~0.2 s)
    s, prompt_len = conversation(mon, args.tokens)
    T = len(mon.render(s).ids)
    if args.only == "stalls":
        return stalls(mon, args.long, args.streams)
    if args.only == "ttft":
        return concurrent_ttft(mon, prompt_len)
    if args.only == "actions":
        return actions(mon, s, T, args)
    if args.only == "views":
        return view_ratios(mon, s, args.reps)
    view_ratios(mon, s, args.reps)
    sequential_ttft(mon, prompt_len, args.reps)
    actions(mon, s, T, args)
    concurrent_ttft(mon, prompt_len)
    stalls(mon, args.long, args.streams)
    session_memory(mon, s, T)


def load_monitor(args: argparse.Namespace):
    """SmolLM2, the corpus statistics (--atlas, or a small set computed once into --stats-dir) and a Monitor on
    them, as `neuronscope serve` builds it."""
    from neuronscope.server import Knowledge, Monitor
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
    mon = Monitor(subject, knowledge, stall_steps=args.stall_steps)
    if args.slots is not None:
        from neuronscope.server.decoding import FairLock
        mon.model_lock = FairLock(stall_steps=args.stall_steps, slots=args.slots)
    print("knowledge:", knowledge.capabilities)
    return mon


def conversation(mon, tokens: int):
    """A session holding a conversation of exactly `tokens` tokens: the question, then the model's answer cut to
    fit; returns (session, prompt length)."""
    from neuronscope.server.sessions import Message
    subject = mon.subject
    s = mon.sessions.create()
    s.messages.append(Message("user", QUESTION))
    prompt_len = len(mon._prompt_ids(s))
    ids = torch.tensor([mon._prompt_ids(s)])
    new = subject.generate_ids(ids, max_new_tokens=max(1, tokens - prompt_len + 4))[0].tolist()
    for cut in range(len(new), 0, -1):
        s.messages[1:] = [Message("assistant", subject.decode(new[:cut]), ids=new[:cut])]
        s.changed()
        if len(mon.render(s).ids) <= tokens:
            break
    print(f"conversation: {len(mon.render(s).ids)} tokens ({prompt_len} in the prompt)")
    return s, prompt_len


def view_ratios(mon, s, reps: int) -> None:
    """The activation and attribution views against a plain forward of the same conversation (medians, the
    baseline interleaved with each view, each view on a fresh cache)."""
    subject = mon.subject
    T = len(mon.render(s).ids)
    conv = torch.tensor([mon.render(s).ids])

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
    for _ in range(reps):
        for fn, out in ((forward, fwd), (activation_view, act), (forward, fwd2), (attribution_view, att)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    f_med = med(fwd + fwd2)
    view = mon.activations(s, page_size=50)
    print(f"plain forward ({T} tokens):      {1000 * f_med:8.1f} ms")
    print(f"activation view:                {1000 * med(act):8.1f} ms   ratio {med(act) / f_med:.2f} (target <= 1.5)"
          f"   [{view.total} neurons firing, mode {view.mode}]")
    print(f"attribution view (top 1000):    {1000 * med(att):8.1f} ms   ratio {med(att) / f_med:.2f} (target <= 3)")


def sequential_ttft(mon, prompt_len: int, reps: int) -> None:
    """Time to first streamed token, on the prompt of the same conversation (a fresh session each time)."""
    ttft, total = [], []
    for _ in range(max(3, reps // 2)):
        s2 = mon.sessions.create()
        t0 = time.perf_counter()
        events = mon.send(s2, QUESTION, max_new_tokens=16)
        first = None
        for ev in events:
            if first is None and ev.type == "token":
                first = time.perf_counter() - t0
        total.append(time.perf_counter() - t0)
        ttft.append(first)
    print(f"time to first streamed token:   {1000 * med(ttft):8.1f} ms   (prompt {prompt_len} tokens; 16 tokens "
          f"in {1000 * med(total):.0f} ms)")


def session_memory(mon, s, T: int) -> None:
    """The memory a session holds after chat + tokens + activations + one attribution."""
    s.cache.clear()
    mon.tokens(s)
    mon.activations(s)
    mon.attribution(s, T - 1)
    print(f"session memory (views cached):  {s.memory_bytes() / 1024:8.1f} KiB")


ALICE = "Alice has 4 brothers and 2 sisters. How many sisters does Alice's brother have?"


def alice(mon, out: Path, n_concepts: int = 4) -> None:
    """The seed article's loop, clicked in the real page (headless Chromium)."""
    import re

    from playwright.sync_api import sync_playwright

    from neuronscope.server import create_app
    sys.path.insert(0, str(REPO))
    from tests.test_browser import ARGS, CHROMIUM
    from tests.test_server_support import LiveServer
    out.mkdir(parents=True, exist_ok=True)
    mon.warm()
    with LiveServer(create_app(mon)) as srv, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(srv.url + "/")
        page.wait_for_selector("#model-info:has-text('layers')")
        page.fill("#max-tokens", "40")
        page.fill("#message", ALICE)
        t0 = time.perf_counter()
        page.click("#send")
        page.wait_for_selector(".msg.assistant:not(.pending) .tok", timeout=600000)
        page.wait_for_function("!document.querySelector('#send').disabled", timeout=600000)
        print(f"answer in {time.perf_counter() - t0:.1f} s (page): {page.inner_text('.msg.assistant .body')!r}")
        page.wait_for_selector("#clusters .cluster", timeout=600000)
        print("active concepts (by summed activation):",
              [c.inner_text() for c in page.locator("#clusters .cl-name").all()[:8]])
        # click the answer's first number: concepts ranked by attribution to it
        toks = page.locator(".msg.assistant .body .tok")
        k = next((i for i in range(toks.count()) if re.search(r"\d", toks.nth(i).inner_text())), toks.count() - 1)
        target = toks.nth(k)
        print(f"clicked token {target.get_attribute('data-pos')} {target.inner_text()!r}")
        target.click()
        page.wait_for_selector("#attr-table tbody tr", timeout=600000)
        page.select_option("#cl-sort", "attribution")
        page.wait_for_function("document.querySelector('#cl-note').textContent.includes('attribution to token')",
                               timeout=600000)
        base = page.inner_text(".msg.assistant .body").strip()
        for which in ("interpretable", "all"):
            if which == "all":  # the toggle: every firing neuron, not only the interpretable ones
                page.click("#tab-activations")
                page.uncheck("#act-interp")
                page.wait_for_function("!document.querySelector('#act-summary').textContent.includes('interp')",
                                       timeout=600000)
                page.wait_for_function("document.querySelector('#cl-note').textContent.includes('attribution to')",
                                       timeout=600000)
            names = [c.inner_text() for c in page.locator("#clusters .cl-name").all()]
            print(f"active concepts of {which} neurons, by attribution to the number:", names[:8],
                  page.inner_text("#cl-note"))
            page.screenshot(path=str(out / f"alice-1-concepts-{which}.png"))
            for mode in ("suppress", "strengthen"):
                for j in range(min(n_concepts, len(names))):
                    card = page.locator("#clusters .cluster").filter(has_text=names[j]).first
                    card.locator(f".cl-steer[data-mode={mode}]").click()
                    page.wait_for_function(  # the new answer, made with this steering, is rendered
                        "([m, n]) => { const w = document.querySelector('.msg.compare .who'); return w && "
                        "!document.querySelector('#send').disabled && !document.querySelector('.msg.pending') && "
                        "w.textContent.includes(m) && w.textContent.includes(n); }", arg=[mode, names[j]],
                        timeout=600000)
                    now = page.inner_text(".msg.compare .body").strip()
                    print(f"  {mode} {names[j]!r}: {now!r}{'  (unchanged)' if now == base else ''}")
                    if j == 0:
                        page.screenshot(path=str(out / f"alice-2-{which}-{mode}.png"))
                    page.click(".steer-remove")
                    page.wait_for_function("document.querySelectorAll('.steer-remove').length === 0")
        page.screenshot(path=str(out / "alice-3-final.png"))
        browser.close()


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
    rows = mon.activations(s, page_size=1).rows
    l, n = (rows[0].layer, rows[0].neuron) if rows else (0, 0)
    made: list[str] = []

    def add_neurons():
        made.append(mon.add_steering(s, mode="suppress", neurons=[[l, n], [l, (n + 1) % mon.subject.n_neurons]]).id)

    def add_concept():
        made.append(mon.add_steering(s, mode="suppress", concept=args.concept, n_neurons=20).id)

    def toggle():
        mon.set_steering(s, made[0], False)
        mon.set_steering(s, made[0], True)

    def cleanup():
        for sid in made:
            mon.remove_steering(s, sid)
        made.clear()
        mon.activations(s, page_size=50)
        mon.attribution(s, T - 1, page_size=1)

    words = iter(["brother", "sister", "family", "number", "count", "girl", "boy", "mother", "father", "child",
                  "two", "four", "many", "answer", "question", "friend"])
    cases = [("concept search (a new query each call)", lambda: mon.concepts(next(words), 50)),
             ("concept search (the same query again)", lambda: mon.concepts(args.concept, 50)),
             ("neuron detail (10 exemplars, no marks)", lambda: mon.neuron((l + 1) % mon.subject.n_layers, n, 10,
                                                                        marks=False)),
             ("neuron detail (10 exemplars + marks)", lambda: mon.neuron(l, n, 10)),
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
            print(f"  {name:40s} unavailable: {exc}")
            continue
        print(f"  {name:40s} {1000 * first:8.1f} ms / {1000 * warm:8.1f} ms")
        if made:
            cleanup()
    add_neurons()
    first, warm = timed(toggle, args.reps)
    print(f"  {'toggle a steering off and on':40s} {1000 * first:8.1f} ms / {1000 * warm:8.1f} ms")
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
                if first is None and ev.type == "token":
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


def stalls(mon, n_tokens: int, n_streams: int = 1) -> None:
    """The gaps between two tokens of `n_streams` streaming answers while another session runs a view of an
    `n_tokens`-token conversation, against the gaps of the streams alone and that view's forward in one piece."""
    import threading

    from neuronscope.server.decoding import decode
    from neuronscope.server.sessions import Message
    subject = mon.subject
    b = mon.sessions.create()
    para = "The village by the river had stone houses, narrow streets and a market that opened every morning. "
    b.messages = [Message("user", para * max(1, n_tokens // 19)), Message("assistant", "It is a quiet place.")]
    b.changed()
    ids = torch.tensor([mon.render(b).ids])
    T = ids.shape[1]
    one = []
    for _ in range(3):
        t0 = time.perf_counter()
        with torch.no_grad():
            subject.model(input_ids=ids, use_cache=False)
        one.append(time.perf_counter() - t0)
    t_one = med(one)
    prompt = subject.encode(QUESTION, chat=subject.has_chat_template)[0].tolist()
    l, n = 15 % subject.n_layers, 7

    def activations():
        b.cache.clear()
        mon.activations(b, page_size=5)

    def attribution():
        b.cache.clear()
        mon.attribution(b, T - 1, page_size=5)

    def marks():
        mon._neuron_cache.clear()
        mon.neuron(l, n, 8)
    print(f"stall of a streaming answer while another session runs a view of a {T}-token conversation "
          f"({n_streams} stream(s), {mon.model_lock.slots} model call(s) at once, packed forwards when more wait, "
          f"--stall-steps {mon.model_lock.stall_steps:g}; the view's forward in one piece: "
          f"{1000 * t_one:.0f} ms); 'added' = a gap minus the stream's own median gap, in those gaps:")
    alone = None
    for name, view in (("alone (no view)", None), ("activation view", activations), ("attribution view", attribution),
                       (f"neuron {l}:{n} marks (16 windows)", marks)):
        streams: list[list[float]] = [[] for _ in range(n_streams)]
        done = threading.Event()

        def stream(times, done=done):
            decode(subject, prompt, interventions=[], lock=mon.model_lock, max_new_tokens=100000, temperature=0.0,
                   seed=None, eos=set(), on_token=lambda t: times.append(time.perf_counter()), cancelled=done.is_set)
        ths = [threading.Thread(target=stream, args=(times,)) for times in streams]
        for th in ths:
            th.start()
        while min(len(times) for times in streams) < 4:
            time.sleep(0.005)
        t0 = time.perf_counter()
        if view is None:
            time.sleep(3.0)
        else:
            view()
        t1 = time.perf_counter()
        done.set()
        for th in ths:
            th.join()
        gaps = [y - x for times in streams for x, y in zip(times, times[1:]) if y > t0 and x < t1]
        p90 = statistics.quantiles(gaps, n=10)[-1] if len(gaps) > 1 else gaps[0]
        alone = med(gaps) if alone is None else alone
        added = " ".join(f"{w} {(g - alone) / alone:+.2f}" for w, g in (("median", med(gaps)), ("p90", p90),
                                                                          ("max", max(gaps))))
        print(f"  {name:34s} view {1000 * (t1 - t0):7.0f} ms; stream gaps median {1000 * med(gaps):5.0f} ms, "
              f"p90 {1000 * p90:5.0f}, longest {1000 * max(gaps):5.0f} ms ({max(gaps) / t_one:.2f} x the forward in "
              f"one piece; {len(gaps)} gaps); added, in steps: {added}")
    print(f"  packed forwards so far: {mon.model_lock.packed}")


if __name__ == "__main__":
    sys.exit(main())
