"""Benchmark: cost of one IRM training step relative to one forward+backward of the frozen model alone.

Definitions (same batch, same loss code, CPU fp32):
  frozen fwd+bwd  = model(inputs_embeds=E) with E a leaf that requires grad (so backward runs through every layer,
                    down to the input embeddings, as the IRM's backward must), next-token loss, loss.backward();
  IRM step        = `neuronscope.irm.training.train_step`: forward with the IRM hooks (read layer 0 mid, inject
                    into every layer mid-block), same loss, backward into the IRM, Adam step.
Ratio = median(IRM step) / median(frozen fwd+bwd), measured interleaved in one run (target <= 1.15).
Peak memory: each mode runs in a fresh subprocess; peak RSS (VmHWM) minus RSS after loading the model, compared
with the model's own weights (fp32 bytes).

    .venv/bin/python bench/irm.py [--model PATH.gguf] [--batch 8] [--tokens 128] [--repeats 5] [--threads 2]
        [--layers all]
    .venv/bin/python bench/irm.py --judged RUN/judged.json   # the judged figures of a run (from `irm eval --judge`)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO.parent / "shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


def _rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def setup(model: str, batch: int, tokens: int, width: int, layers: str = "all"):
    from neuronscope.irm import IRM
    from neuronscope.subject import Subject
    s = Subject.load(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, s.vocab_size, (batch, tokens), generator=g)
    labels = ids.clone()
    labels[:, : tokens // 4] = -100       # a prompt part without loss, like prompt/response data
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    irm = IRM.for_subject(s, layers, width=width)
    with torch.no_grad():                 # a trained-looking IRM (the zero-initialised last layer is not typical)
        irm.net[-1].weight.normal_(0, 1e-3)
    opt = torch.optim.Adam(irm.parameters(), lr=1e-4)
    return s, b, irm, opt


def frozen_step(s, b) -> None:
    from neuronscope.irm.data import lm_loss
    emb = s.spec.get(s.model, s.spec.embed)(b["input_ids"]).detach().requires_grad_(True)
    logits = s.model(inputs_embeds=emb, attention_mask=b["attention_mask"]).logits
    lm_loss(logits, b["labels"]).backward()


def irm_step(s, b, irm, opt) -> None:
    from neuronscope.irm.training import train_step
    train_step(s, irm, opt, b)


def memory_child(args) -> None:
    torch.set_num_threads(args.threads)
    s, b, irm, opt = setup(args.model, args.batch, args.tokens, args.width, args.layers)
    import gc
    gc.collect()
    base = _rss("VmRSS")
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in s.model.parameters()}.values())
    if args.child == "frozen":
        frozen_step(s, b)
    else:
        irm_step(s, b, irm, opt)
    print(json.dumps({"mode": args.child, "peak_extra": _rss("VmHWM") - base, "weights": weights,
                      "irm_params": irm.n_parameters()}))


def judged_figures(path: str) -> None:
    """The judged rates off/on with intervals, the fluency cost and the verdict of one `irm eval --judge` result."""
    rep = json.loads(Path(path).read_text())
    m = rep["metrics"]
    keys = [k for k in (rep.get("target"), rep.get("opposite")) if k] + ["vader_compound", "repetition",
                                                                          "answer_nll", "words"]
    rows = {k: {f: m[k][f] for f in ("off", "on", "diff", "ci95", "p_value", "t_test_p")} for k in keys if k in m}
    print(json.dumps({"judge": rep["judge"], "n_prompts": rep["n_prompts"], "max_new_tokens": rep["max_new_tokens"],
                      "measures": rows, "verdict": rep.get("verdict")}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", default="all", help="Injected layers of the IRM (e.g. all, 15-29).")
    ap.add_argument("--judged", help="Print the judged figures of a judged.json and exit.")
    ap.add_argument("--child", choices=["frozen", "irm"], help=argparse.SUPPRESS)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", help="Also write the results here.")
    args = ap.parse_args()
    if args.judged:
        return judged_figures(args.judged)
    if args.child:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    s, b, irm, opt = setup(args.model, args.batch, args.tokens, args.width, args.layers)
    frozen_step(s, b)
    irm_step(s, b, irm, opt)                # warm-up
    tf, ti = [], []
    for _ in range(args.repeats):           # interleaved, so load changes hit both alike
        t = time.perf_counter()
        frozen_step(s, b)
        tf.append(time.perf_counter() - t)
        t = time.perf_counter()
        irm_step(s, b, irm, opt)
        ti.append(time.perf_counter() - t)
    res = {"model": s.name, "batch": args.batch, "tokens": args.tokens, "threads": args.threads,
           "irm_params": irm.n_parameters(), "inject_layers": len(irm.config.inject_layers),
           "frozen_fwd_bwd_s": statistics.median(tf), "irm_step_s": statistics.median(ti),
           "ratio": statistics.median(ti) / statistics.median(tf),
           "ratios_per_pair": [i / f for i, f in zip(ti, tf)]}
    if not args.no_memory:
        for mode in ("frozen", "irm"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", args.model, "--batch",
                                  str(args.batch), "--tokens", str(args.tokens), "--width", str(args.width),
                                  "--threads", str(args.threads), "--layers", args.layers],
                                 capture_output=True, text=True, check=True)
            m = json.loads(out.stdout.strip().splitlines()[-1])
            res[f"peak_extra_{mode}_mb"] = m["peak_extra"] / 2**20
            res["weights_mb"] = m["weights"] / 2**20
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
