"""Figures of neuron descriptions on SmolLM2-135M-Instruct (issue 18): every kind, scored honestly, per layer.

    .venv/bin/python bench/describe.py --atlas ATLAS [--skip-describe] [--explain 20] [--json out.json]

ATLAS must hold SmolLM2's atlas decodes and corpus statistics (neuronscope atlas build + neuronscope stats; the
figures in RESULTS.md use >= 200K tokens of clean WikiText-2). It measures and prints, in one run:
  - the time of `describe` for all 92,160 neuron-polarities, per stage (labels, window/topic embeddings and context
    descriptions, scoring of every kind on the held-out windows, output effects, write, index), with the load;
  - per layer and for each kind (label = the token label alone, i.e. what describe gave before issue 18; context;
    best-of = the kept description): median Pearson r, median detection, share interpretable under the two-score rule
    (r >= threshold and detection >= detection threshold) and under Pearson alone;
  - output descriptions: how many were measured, their median output score and effect, the share that held on the
    held-out prompts, and the same score for the write vector's direct decode on the same prompts (paired);
  - the same 20 random neuron-polarities (seed 0) as the token label alone and as kept now;
  - the share of descriptions whose firing part names '@' or '=' (WikiText markup; 0 on clean text);
  - optionally SmolLM2 itself as explainer on --explain random neurons, scored the same way.
The machine's load (os.getloadavg) is recorded with every timing.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GGUF = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = SHARED / "models" / "all-minilm-l6-v2"
BANDS = [(0, 4), (5, 9), (10, 14), (15, 20), (21, 25), (26, 29)]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _med(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def _share(xs: list[bool]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def kind_rows(folder: Path) -> list[dict]:
    """Every stored row with its candidates (one query; Descriptions.get per row would take minutes)."""
    con = sqlite3.connect(folder / "atlas.sqlite")
    try:
        rows = con.execute("SELECT layer, neuron, polarity, text, score, source, detection, output_score, effect, "
                           "candidates FROM descriptions").fetchall()
    finally:
        con.close()
    keys = ("layer", "neuron", "polarity", "text", "score", "source", "detection", "output_score", "effect")
    return [dict(zip(keys, r[:-1]), candidates=json.loads(r[-1] or "[]")) for r in rows]


def per_layer(rows: list[dict], thr: float, dthr: float) -> dict:
    """Per band of layers and kind: median r, median detection, share interpretable (both scores / r alone)."""
    out: dict = {}
    for a, b in BANDS + [(0, 10**6)]:
        name = f"{a}-{b}" if b < 10**6 else "all"
        sel = [r for r in rows if a <= r["layer"] <= b]
        band: dict = {"n": len(sel)}
        for kind in ("label", "context", "best"):
            pairs = []
            for r in sel:
                if kind == "best":
                    pairs.append((r["score"], r["detection"]))
                    continue
                c = next((c for c in r["candidates"] if c["source"] == kind), None)
                if c is not None:
                    pairs.append((c["score"], c["detection"]))
            band[kind] = {"n": len(pairs), "median_r": _med([p[0] for p in pairs]),
                          "median_detection": _med([p[1] for p in pairs if p[1] is not None]),
                          "share_interpretable": _share([p[0] >= thr and (p[1] or 0) >= dthr for p in pairs]),
                          "share_r_ge_threshold": _share([p[0] >= thr for p in pairs])}
        out[name] = band
    return out


def outputs(rows: list[dict]) -> dict:
    """Measured output descriptions: scores, effects, held share, and the decode's score on the same prompts."""
    from neuronscope.describe.describe import output_passes
    ms = [c for r in rows for c in r["candidates"] if c["source"] == "output"]
    paired = [(c["output_score"], c["decode_output_score"]) for c in ms if c.get("decode_output_score") is not None]
    diffs = [a - b for a, b in paired]
    res = {"measured": len(ms), "median_output_score": _med([c["output_score"] for c in ms]),
           "median_effect_nats": _med([c["effect"] for c in ms]),
           "share_held": _share([output_passes(c["output_score"], c["effect"]) for c in ms]),
           "decode_median_output_score": _med([b for _, b in paired]),
           "causal_minus_decode_median": _med(diffs),
           "causal_better_share": _share([d > 0 for d in diffs]), "decode_better_share": _share([d < 0 for d in diffs])}
    if diffs:
        from scipy.stats import wilcoxon
        nz = [d for d in diffs if d != 0]
        res["wilcoxon_p"] = float(wilcoxon(nz).pvalue) if len(nz) > 10 else None
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--atlas", required=True)
    ap.add_argument("--explain", type=int, default=0, help="neurons described by SmolLM2 as explainer (slow)")
    ap.add_argument("--outputs", default="auto", help="describe --outputs: auto, all or none")
    ap.add_argument("--skip-describe", action="store_true", help="report on the stored descriptions")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from neuronscope.describe import Descriptions, LocalExplainer, describe_atlas
    from neuronscope.embed import Embedder
    from neuronscope.stats import NeuronStats
    from neuronscope.subject import Subject
    folder = Path(args.atlas)
    out: dict = {"model": GGUF.name, "atlas": str(folder), "torch_threads": torch.get_num_threads()}
    subject = Subject.load(GGUF)
    stats = NeuronStats.open(folder)
    out["stats_tokens"] = stats.tokens
    out["corpus"] = [c.get("path") for c in stats.info.get("corpus", [])]
    if not args.skip_describe:
        l0 = load()
        t0 = time.perf_counter()
        describe_atlas(folder, subject=subject, embedder=Embedder(MINILM), progress=True, overwrite=True,
                       outputs=args.outputs)
        out["describe_all"] = {"seconds": round(time.perf_counter() - t0, 1), "load_before": l0, "load_after": load()}
    man = json.loads((folder / "manifest.json").read_text())["descriptions"]
    out["describe_manifest"] = {k: man[k] for k in ("seconds_last_run", "split", "scores_all", "kinds",
                                                    "scores_output", "threshold", "detection_threshold", "output")
                                if k in man}
    thr, dthr = float(man["threshold"]), float(man.get("detection_threshold", 0.75))
    rows = kind_rows(folder)
    out["per_layer"] = per_layer(rows, thr, dthr)
    out["outputs"] = outputs(rows)
    out["kept_source_share"] = {s: _share([r["source"] == s for r in rows]) for s in ("label", "context",
                                                                                     "explainer")}
    fires = [r["text"].split(" | ")[0] for r in rows]
    out["markup_share"] = {"fires_on_at": _share(["'@'" in f for f in fires]),
                           "fires_on_equals": _share(["'='" in f for f in fires])}
    rng = random.Random(0)
    sample = rng.sample(sorted(rows, key=lambda r: (r["layer"], r["neuron"], r["polarity"])), 20)
    out["random_20"] = [{"neuron": f"{r['layer']}:{r['neuron']}{'+' if r['polarity'] == 'pos' else '-'}",
                         "before (token label)": next((f"{c['text']} (r {c['score']:.2f}, det {c['detection']:.2f})"
                                                       for c in r["candidates"] if c["source"] == "label"), None),
                         "after (kept)": f"{r['text']} (r {r['score']:.2f}, det {(r['detection'] or 0):.2f}, "
                                         f"{r['source']})"} for r in sample]
    if args.explain:
        D = Descriptions.open(folder)
        keys = [(r["layer"], r["neuron"], r["polarity"]) for r in rng.sample(rows, args.explain)]
        t0 = time.perf_counter()
        describe_atlas(folder, explainer=LocalExplainer(subject), subject=subject, neurons=keys, n_candidates=2,
                       embedder=None, progress=True, overwrite=True, outputs="none")
        ex = []
        for k in keys:
            got = D.get(*k, candidates=True)
            c = got.candidates or [] if got else []
            e = [x for x in c if x.source == "explainer"]
            lab = next(x for x in c if x.source == "label")
            if e:
                best = max(e, key=lambda x: x.score or 0.0)
                ex.append({"neuron": list(k), "explainer": best.text, "r": best.score,
                           "detection": best.detection, "label_r": lab.score, "label_detection": lab.detection})
        out["explainer_sample"] = {"n": len(ex), "seconds": round(time.perf_counter() - t0, 1), "load": load(),
                                   "median_r": _med([e["r"] for e in ex]),
                                   "median_detection": _med([e["detection"] for e in ex]),
                                   "label_median_r": _med([e["label_r"] for e in ex]), "rows": ex}
    text = json.dumps(out, indent=2, ensure_ascii=False)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
