"""Benchmark: what capturing every MLP neuron, and a clamp during generation, cost on top of a plain forward.

Measured in one run, interleaved (each round runs every variant once, in a shuffled order), medians over the
rounds, ratios to the plain HF forward / generation measured in the same run. Peer libraries run side by side on
the same model and inputs, each on its own copy of the weights, each checked to capture the same activations (or to
generate the same tokens under the same clamp) as neuronscope; a peer that fails to import or to wrap the model is
skipped with the reason printed.

    make bench                      # builds .venv-bench with the peers, runs this script
    .venv-bench/bin/python bench/capture.py --models stories,smollm --repeats 11 --json bench/capture.json

Variants of the forward task (all under torch.inference_mode, same input ids, logits computed for every position):
  plain            model(input_ids)                                  the baseline
  neuronscope      with intervene(s, Capture()): model(input_ids)    all layers, all neurons, hooks installed per call
  neuronscope[open] one intervene() context kept open, cap.reset() and model(input_ids) per call (steady state)
  nnsight          model.trace(ids): down_proj.input.save() per layer
  transformer-lens TransformerBridge.run_with_cache(ids, names_filter=[blocks.L.mlp.hook_post])
  tl-bridge-plain  the bridge's forward without a cache (its fixed cost; it forces eager attention)
  pyvene           IntervenableModel with a CollectIntervention on each down_proj input, all positions
Generation task: greedy, exactly N new tokens (min_new_tokens = max_new_tokens), a clamp of K neurons of the middle
layer to a value; neuronscope at positions "all" and "generated"; pyvene only supports generated positions.
"""
from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import platform
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEURONSCOPE_SHARED", REPO.parent / "shared"))
DEFAULT_STORIES = SHARED / "models" / "stories260k"
DEFAULT_SMOLLM = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS = SHARED / "corpora" / "tinystories-sample" / "tinystories_sample.txt"

FORWARD_SHAPES = ((1, 16), (1, 64), (1, 512), (8, 128))   # (batch, tokens)
TARGETS = {"forward": 1.10, "generate": 1.05}
PEERS = ("nnsight", "transformer-lens", "pyvene")


# ---------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, seed: int = 0,
                     min_seconds: float = 0.0, max_repeats: int = 400,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Run every callable once per round, in a shuffled order, `warmup + repeats` rounds; seconds per call.

    min_seconds: when one round is short, run more rounds (up to `max_repeats`) so that the measured rounds take
    about this long in all; on a noisy machine a millisecond forward needs hundreds of rounds for a stable median.
    clock: time.perf_counter (wall) or time.process_time (CPU seconds of this process: on a machine shared with
    other jobs, the time spent waiting for a core is left out, which wall time cannot do).
    """
    rng = random.Random(seed)
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    rounds, r = warmup + repeats, 0
    while r < rounds:
        rng.shuffle(names)
        round_s = 0.0
        for n in names:
            t0 = clock()
            fns[n]()
            dt = clock() - t0
            round_s += dt
            if r >= warmup:
                times[n].append(dt)
        if r == warmup - 1 or (warmup == 0 and r == 0):
            if min_seconds > 0 and round_s > 0:
                wanted = min(max_repeats, math.ceil(min_seconds / round_s))
                rounds = max(rounds, warmup + wanted)
        r += 1
    return times


def summarize(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Median ms per variant; `ratio` = median / baseline median; `paired` = median of per-round ratios."""
    base = times[baseline]
    out = {}
    for n, ts in times.items():
        k = min(len(ts), len(base))
        out[n] = {
            "median_ms": 1000 * statistics.median(ts),
            "ratio": statistics.median(ts) / statistics.median(base),
            "paired_ratio": statistics.median(ts[i] / base[i] for i in range(k)),
            "repeats": len(ts),
        }
    return out


# ---------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------
_CORPUS_IDS: dict[int, torch.Tensor | None] = {}


def _corpus_ids(tokenizer) -> torch.Tensor | None:
    """The first 60,000 characters of the TinyStories sample as ids (tokenized once per tokenizer)."""
    key = id(tokenizer)
    if key not in _CORPUS_IDS:
        _CORPUS_IDS[key] = None
        if CORPUS.is_file():
            with open(CORPUS, encoding="utf-8", errors="replace") as f:
                text = f.read(60_000)
            _CORPUS_IDS[key] = tokenizer(text, return_tensors="pt")["input_ids"][0]
    return _CORPUS_IDS[key]


def make_inputs(subject, batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """[batch, tokens] ids of real text (TinyStories sample) when the corpus is there, else random ids."""
    g = torch.Generator().manual_seed(seed)
    ids = _corpus_ids(subject.tokenizer)
    if ids is not None:
        if ids.numel() >= tokens + batch:
            starts = torch.randint(0, ids.numel() - tokens, (batch,), generator=g)
            return torch.stack([ids[s:s + tokens] for s in starts.tolist()]).to(subject.device)
    return torch.randint(3, subject.vocab_size, (batch, tokens), generator=g).to(subject.device)


def capture_bytes(tensors) -> int:
    """Bytes held by the distinct storages behind captured tensors."""
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def peak_rss_mb() -> float:
    from neuronscope.stats.compute import peak_rss
    return peak_rss() / 2 ** 20


# ---------------------------------------------------------------------------------------------------------------
# the contestants: each gives capture(ids) -> list of per-layer [B,T,N] tensors, and clamp_generate(ids) -> ids
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ClampSpec:
    layer: int
    neurons: list[int]
    value: float
    new_tokens: int


def gen_kwargs(subject, n: int) -> dict[str, Any]:
    pad = getattr(subject.tokenizer, "pad_token_id", None)
    return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None,
                pad_token_id=pad)


class Plain:
    name = "plain"

    def __init__(self, subject):
        self.s = subject

    def forward(self, ids):
        return self.s.model(input_ids=ids).logits

    def generate(self, ids, clamp: ClampSpec):
        out = self.s.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    **gen_kwargs(self.s, clamp.new_tokens))
        return out[:, ids.shape[1]:]


class Ours:
    """neuronscope: the public intervene() API, hooks installed and removed on every call, like a user's code."""
    name = "neuronscope"

    def __init__(self, subject):
        from neuronscope.interventions import Capture, Clamp, intervene
        self.s, self._Capture, self._Clamp, self._intervene = subject, Capture, Clamp, intervene

    def capture(self, ids):
        cap = self._Capture()
        with self._intervene(self.s, cap):
            self.s.model(input_ids=ids)
        return [cap.get("neurons", l) for l in range(self.s.n_layers)]

    def open_capture(self):
        """The other way to use it: one context kept open over many forwards (hooks installed once)."""
        cap = self._Capture()
        ctx = self._intervene(self.s, cap)
        ctx.__enter__()

        def run(ids):
            cap.reset()
            self.s.model(input_ids=ids)
            return [cap.get("neurons", l) for l in range(self.s.n_layers)]
        return run, (lambda: ctx.__exit__(None, None, None))

    def generate(self, ids, clamp: ClampSpec, positions="all"):
        cl = self._Clamp(clamp.layer, clamp.neurons, positions=positions, value=clamp.value)
        with self._intervene(self.s, cl):
            out = self.s.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        **gen_kwargs(self.s, clamp.new_tokens))
        return out[:, ids.shape[1]:]


class NNsight:
    name = "nnsight"

    def __init__(self, subject):
        import nnsight
        from nnsight import TransformersModel
        self.version = nnsight.__version__
        self.s = subject
        self.lm = TransformersModel(copy.deepcopy(subject.model), tokenizer=subject.tokenizer,
                                    task="text-generation")
        self.layers = self.lm.model.layers

    def capture(self, ids):
        saved: list = []
        with self.lm.trace(ids):
            for l in range(self.s.n_layers):
                saved.append(self.layers[l].mlp.down_proj.input.save())
        return list(saved)

    def generate(self, ids, clamp: ClampSpec):
        out: list = []
        idx = list(clamp.neurons)
        with self.lm.generate(ids, attention_mask=torch.ones_like(ids), **gen_kwargs(self.s, clamp.new_tokens)) as tr:
            for _ in tr.iter[0:clamp.new_tokens]:
                self.layers[clamp.layer].mlp.down_proj.input[..., idx] = clamp.value
            out.append(tr.result.save())
        return out[0][:, ids.shape[1]:]


class TLBridge:
    name = "transformer-lens"

    def __init__(self, subject):
        import transformer_lens
        from transformer_lens.model_bridge import TransformerBridge
        self.version = getattr(transformer_lens, "__version__", "4.3")
        self.s = subject
        src = subject.source.location if subject.source is not None and subject.source.is_local else subject.name
        self.br = TransformerBridge.boot_transformers(src, hf_model=copy.deepcopy(subject.model),
                                                      tokenizer=subject.tokenizer, device=str(subject.device))
        self.names = [f"blocks.{l}.mlp.hook_post" for l in range(subject.n_layers)]
        wanted = set(self.names)
        self._filter = lambda n: n in wanted

    def forward(self, ids):
        return self.br(ids)

    def capture(self, ids):
        _, cache = self.br.run_with_cache(ids, names_filter=self._filter)
        return [cache[n] for n in self.names]

    def generate(self, ids, clamp: ClampSpec, hooked: bool = True):
        idx = list(clamp.neurons)

        def fn(x, hook):
            x[..., idx] = clamp.value
            return x
        hooks = [(f"blocks.{clamp.layer}.mlp.hook_post", fn)] if hooked else []
        with self.br.hooks(fwd_hooks=hooks):
            out = self.br.generate(ids, max_new_tokens=clamp.new_tokens, do_sample=False, stop_at_eos=False,
                                   verbose=False)
        return out[:, ids.shape[1]:]


class PyVene:
    name = "pyvene"

    def __init__(self, subject):
        import pyvene as pv
        self.pv, self.s = pv, subject
        self.model = copy.deepcopy(subject.model)
        cfg = pv.IntervenableConfig([
            {"layer": l, "component": f"model.layers[{l}].mlp.down_proj.input",
             "intervention_type": pv.CollectIntervention} for l in range(subject.n_layers)])
        self.collect = pv.IntervenableModel(cfg, self.model)
        self.collect.disable_model_gradients()
        self._clampers: dict = {}

    def capture(self, ids):
        B, T = ids.shape
        locs = [[list(range(T))] * B] * self.s.n_layers
        (_, collected), _ = self.collect({"input_ids": ids}, unit_locations={"base": locs})
        return list(collected)

    def _clamper(self, clamp: ClampSpec):
        key = (clamp.layer, tuple(clamp.neurons), clamp.value)
        if key not in self._clampers:
            pv = self.pv
            idx = torch.as_tensor(clamp.neurons)
            value = clamp.value

            class ClampIntervention(pv.ConstantSourceIntervention, pv.LocalistRepresentationIntervention):
                def forward(self, base, source=None, subspaces=None, **kwargs):
                    base = base.clone()
                    base[..., idx] = value
                    return base

            cfg = pv.IntervenableConfig([{"layer": clamp.layer,
                                          "component": f"model.layers[{clamp.layer}].mlp.down_proj.input",
                                          "intervention": ClampIntervention()}])
            m = pv.IntervenableModel(cfg, self.model)
            m.disable_model_gradients()
            self._clampers[key] = m
        return self._clampers[key]

    def generate(self, ids, clamp: ClampSpec):
        """Generated positions only: pyvene 0.1.8 intervenes either on the prompt or on the generated tokens."""
        m = self._clamper(clamp)
        _, out = m.generate({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, intervene_on_prompt=False,
                            **gen_kwargs(self.s, clamp.new_tokens))
        return out[:, ids.shape[1]:]


PEER_CLASSES = {"nnsight": NNsight, "transformer-lens": TLBridge, "pyvene": PyVene}


def load_peers(subject, names, log=print) -> dict[str, Any]:
    """Wrap `subject` in each named peer library; a peer that cannot be imported or wrapped is skipped with a note."""
    peers = {}
    for n in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peers[n] = PEER_CLASSES[n](subject)
        except Exception as exc:  # noqa: BLE001 - any failure of a third-party library means "skip it"
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            log(f"[skip] {n}: {type(exc).__name__}: {first}")
    return peers


# ---------------------------------------------------------------------------------------------------------------
# the measurements
# ---------------------------------------------------------------------------------------------------------------
def check_same(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    a, b = a.float().reshape(b.shape) if a.numel() == b.numel() else a.float(), b.float()
    if a.shape != b.shape:
        return {"same": False, "note": f"shape {list(a.shape)} vs {list(b.shape)}"}
    diff = float((a - b).abs().max())
    scale = float(b.abs().max()) or 1.0
    return {"same": diff <= 1e-3 * scale + 1e-5, "max_abs_diff": diff}


def bench_forward(subject, peers: dict, shape, repeats: int, log=print, min_seconds: float = 0.0,
                  clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Forward with all MLP neurons captured / plain forward, for every contestant, interleaved."""
    B, T = shape
    ids = make_inputs(subject, B, T, seed=B * 1000 + T)
    plain, ours = Plain(subject), Ours(subject)
    ref = ours.capture(ids)
    mid = subject.n_layers // 2
    fns: dict[str, Callable[[], Any]] = {"plain": lambda: plain.forward(ids), "neuronscope": lambda: ours.capture(ids)}
    checks: dict[str, Any] = {}
    numel = B * T * subject.n_layers * subject.n_neurons
    memory = {"neuronscope": capture_bytes(ref) / numel}
    for name, p in peers.items():
        try:
            got = p.capture(ids)
            checks[name] = check_same(got[mid], ref[mid])
            memory[name] = capture_bytes(got) / numel
            fns[name] = (lambda p=p: p.capture(ids))
            if name == "transformer-lens":
                fns["tl-bridge-plain"] = (lambda p=p: p.forward(ids))
        except Exception as exc:  # noqa: BLE001
            log(f"[skip] {name} capture {B}x{T}: {type(exc).__name__}: {str(exc)[:160]}")
            checks[name] = {"same": False, "note": f"failed: {type(exc).__name__}"}
    del ref
    gc.collect()
    run_open, close = ours.open_capture()
    fns["neuronscope[open]"] = lambda: run_open(ids)
    try:
        times = time_interleaved(fns, repeats, min_seconds=min_seconds, clock=clock)
    finally:
        close()
    return {"task": "forward", "shape": f"{B}x{T}", "results": summarize(times, "plain"), "checks": checks,
            "bytes_per_token_neuron": memory}


def pick_clamp(subject, new_tokens: int) -> ClampSpec:
    """A clamp strong enough to change the greedy continuation: 16 neurons of the middle layer set to 8."""
    n = min(16, subject.n_neurons)
    return ClampSpec(layer=subject.n_layers // 2, neurons=list(range(0, n * 7, 7))[:n], value=8.0,
                     new_tokens=new_tokens)


def bench_generate(subject, peers: dict, prompt_len: int, new_tokens: int, repeats: int,
                   log=print, min_seconds: float = 0.0,
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Greedy generation of `new_tokens` with a clamp active / plain generation, interleaved."""
    ids = make_inputs(subject, 1, prompt_len, seed=prompt_len)
    clamp = pick_clamp(subject, new_tokens)
    plain, ours = Plain(subject), Ours(subject)
    base = plain.generate(ids, clamp)
    ref_all = ours.generate(ids, clamp, "all")
    ref_gen = ours.generate(ids, clamp, "generated")
    checks: dict[str, Any] = {"clamp_changes_output": bool((ref_all != base).any()),
                              "ours_tokens": int(ref_all.shape[1])}
    fns: dict[str, Callable[[], Any]] = {
        "plain": lambda: plain.generate(ids, clamp),
        "neuronscope": lambda: ours.generate(ids, clamp, "all"),
        "neuronscope[generated]": lambda: ours.generate(ids, clamp, "generated"),
    }
    for name, p in peers.items():
        ref = ref_gen if name == "pyvene" else ref_all
        try:
            got = p.generate(ids, clamp)
            checks[name] = {"same_tokens": bool(got.shape == ref.shape and (got == ref).all()),
                            "tokens": int(got.shape[1]),
                            "compared_with": "neuronscope[generated]" if name == "pyvene" else "neuronscope"}
            fns[name] = (lambda p=p: p.generate(ids, clamp))
            if name == "transformer-lens":
                plain_tl = p.generate(ids, clamp, hooked=False)
                checks["tl-bridge-plain"] = {"same_tokens": bool(plain_tl.shape == base.shape and
                                                                 (plain_tl == base).all()),
                                             "compared_with": "plain"}
                fns["tl-bridge-plain"] = (lambda p=p: p.generate(ids, clamp, hooked=False))
        except Exception as exc:  # noqa: BLE001
            log(f"[skip] {name} generate: {type(exc).__name__}: {str(exc)[:160]}")
            checks[name] = {"same_tokens": False, "note": f"failed: {type(exc).__name__}"}
    times = time_interleaved(fns, repeats, min_seconds=min_seconds, clock=clock)
    return {"task": "generate", "shape": f"1x{prompt_len}+{new_tokens}", "results": summarize(times, "plain"),
            "checks": checks}


def load_subject(name: str, args) -> Any:
    from neuronscope.subject import Subject
    if name == "stories":
        return Subject.load(args.stories)
    if name == "smollm":
        return Subject.load(args.smollm)
    raise SystemExit(f"error: unknown model '{name}'; use stories, smollm")


def run(args, log=print) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{args.threads} threads",
        "repeats": args.repeats, "clock": args.clock, "models": {},
    }
    for mname in args.models.split(","):
        t0 = time.perf_counter()
        subject = load_subject(mname.strip(), args)
        peers = load_peers(subject, [p for p in args.peers.split(",") if p], log=log)
        log(f"{mname}: {subject.n_layers} layers x {subject.n_neurons} neurons; peers: {', '.join(peers) or 'none'} "
            f"(loaded in {time.perf_counter() - t0:.0f} s)")
        rows = []
        with torch.inference_mode():
            for shape in args.shapes:
                rows.append(bench_forward(subject, peers, shape, args.repeats, log=log, min_seconds=args.min_time,
                                          clock=CLOCKS[args.clock]))
                log(f"  forward {rows[-1]['shape']} done")
            for p_len in args.gen_prompts:
                rows.append(bench_generate(subject, peers, p_len, args.new_tokens, args.repeats, log=log,
                                           min_seconds=args.min_time, clock=CLOCKS[args.clock]))
                log(f"  generate {rows[-1]['shape']} done")
        report["models"][mname] = {"name": subject.name, "layers": subject.n_layers, "neurons": subject.n_neurons,
                                   "peers": {n: getattr(p, "version", "") for n, p in peers.items()},
                                   "rows": rows, "peak_rss_mb": peak_rss_mb()}
        del peers, subject
        gc.collect()
    return report


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    console = Console(width=max(150, Console().width))
    for mname, m in report["models"].items():
        t = Table(title=f"{mname}: {m['layers']} x {m['neurons']} neurons; ratio = median / plain median "
                        f"({report['clock']} clock, n interleaved rounds, at least {report['repeats']}); "
                        f"peak RSS {m['peak_rss_mb']:.0f} MB")
        for col in ("task", "shape", "variant", "n", "median ms", "ratio", "paired", "target", "check", "B/tok/neuron"):
            t.add_column(col, justify="right" if col not in ("task", "variant", "check") else "left")
        for row in m["rows"]:
            target = TARGETS[row["task"]]
            for v, r in row["results"].items():
                c = row["checks"].get(v)
                if v == "plain":
                    check = ""
                elif c is None:
                    check = "reference" if v.startswith("neuronscope") else ""
                elif "same" in c:
                    check = ("same" if c["same"] else "DIFFERENT") + (f" ({c['max_abs_diff']:.1e})"
                                                                      if "max_abs_diff" in c else f" {c.get('note')}")
                else:
                    check = ("same tokens" if c["same_tokens"] else "DIFFERENT tokens") + \
                            (f" vs {c['compared_with']}" if c.get("compared_with") else "")
                ok = "" if v == "plain" or not v.startswith("neuronscope") else \
                    ("ok" if r["ratio"] <= target else "MISS")
                mem = row.get("bytes_per_token_neuron", {}).get(v)
                t.add_row(row["task"], row["shape"], escape(v), str(r["repeats"]), f"{r['median_ms']:.2f}",
                          f"{r['ratio']:.3f}",
                          f"{r['paired_ratio']:.3f}", f"<= {target:.2f} {ok}", check,
                          "" if mem is None else f"{mem:.1f}")
        console.print(t)
        gen = [r for r in m["rows"] if r["task"] == "generate"]
        for g in gen:
            console.print(f"  {g['shape']}: clamp changes the greedy output: {g['checks']['clamp_changes_output']}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example: bench/capture.py --models stories --repeats 21 --json out.json")
    ap.add_argument("--models", default="stories,smollm", help="comma list of stories, smollm")
    ap.add_argument("--repeats", type=int, default=11, help="interleaved rounds per measurement (median taken)")
    ap.add_argument("--min-time", type=float, default=20.0,
                    help="seconds each measurement should last at least: short ones get more rounds (max 400)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall: perf_counter; cpu: process CPU time (fairer on a machine shared with other jobs)")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)} ('' for none)")
    ap.add_argument("--shapes", default=",".join(f"{b}x{t}" for b, t in FORWARD_SHAPES),
                    help="forward inputs as BATCHxTOKENS, comma separated")
    ap.add_argument("--gen-prompts", default="64,512", help="prompt lengths for the generation task")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per generation")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared, oversubscribed CPU two threads run 5-20x slower)")
    ap.add_argument("--stories", default=str(DEFAULT_STORIES), help="stories260k folder")
    ap.add_argument("--smollm", default=str(DEFAULT_SMOLLM), help="SmolLM2-135M-Instruct GGUF file")
    ap.add_argument("--json", default=None, help="also write the full report as JSON here")
    args = ap.parse_args(argv)
    try:
        args.shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",") if s]
        args.gen_prompts = [int(x) for x in args.gen_prompts.split(",") if x]
    except ValueError:
        ap.error("--shapes takes BATCHxTOKENS items like 1x16,8x128; --gen-prompts integers like 64,512")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    return args


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    report = run(args)
    print_report(report)
    if args.json:
        from neuronscope.store import write_json
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
