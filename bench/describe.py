"""Benchmark and figures of scored descriptions, semantic search and clusters on SmolLM2-135M-Instruct (issue 11).

    .venv/bin/python bench/describe.py --atlas ATLAS [--explain 20] [--json out.json]

ATLAS must hold the atlas decodes and corpus statistics of SmolLM2 (neuronscope atlas build + neuronscope stats).
It measures and prints, in one run:
  - the time of `describe` for all 92,160 neuron-polarities (labels, scoring, index; target <= 10 min on this CPU)
    and the score distribution of the labels (median, share >= 0.5, share interpretable);
  - SmolLM2 itself as explainer on a random sample (--explain N neurons, 2 candidates, token simulator): what it
    writes, its scores against the labels' on the same neurons (paired);
  - 20 random neurons' descriptions as stored;
  - semantic search: median time of one search over --reps queries (target <= 100 ms), and the top rows for
    "animals" and "gender roles";
  - clusters of the neurons active (|normalised activation| >= 1 on some token) on the Alice question;
  - a dose sweep: `generate --steer "dogs" --strengths 0.25,0.5,1` on a question.
The machine's load (os.getloadavg) is recorded with every timing.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GGUF = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = SHARED / "models" / "all-minilm-l6-v2"
ALICE = "Alice has 4 brothers and 2 sisters. How many sisters does Alice's brother have?"
QUERIES = ["animals", "gender roles", "numbers", "family", "water", "colors", "money", "music", "food", "sports",
           "time", "emotions", "countries", "weather", "law", "computers", "body parts", "plants", "war", "school"]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--atlas", required=True)
    ap.add_argument("--explain", type=int, default=20, help="neurons described by SmolLM2 as explainer")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--skip-describe", action="store_true", help="reuse the stored labels")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on an oversubscribed CPU two threads "
                    "spin on OpenMP barriers and run several times slower)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from neuronscope.atlas.search import semantic_search
    from neuronscope.describe import Descriptions, LocalExplainer, cluster_neurons, describe_atlas
    from neuronscope.describe.describe import summarise
    from neuronscope.embed import Embedder
    from neuronscope.stats import NeuronStats
    from neuronscope.subject import Subject
    folder = Path(args.atlas)
    out: dict = {"model": str(GGUF.name), "atlas": str(folder), "torch_threads": torch.get_num_threads()}
    subject = Subject.load(GGUF)
    emb = Embedder(MINILM)
    stats = NeuronStats.open(folder)
    out["stats_tokens"] = stats.tokens
    # ---- describe everything -----------------------------------------------------------------------------
    if not args.skip_describe:
        l0 = load()
        t0 = time.perf_counter()
        describe_atlas(folder, subject=subject, embedder=emb, progress=True, overwrite=True)
        out["describe_all"] = {"seconds": round(time.perf_counter() - t0, 1), "load_before": l0, "load_after": load()}
    man = json.loads((folder / "manifest.json").read_text())["descriptions"]
    out["describe_manifest"] = {k: man[k] for k in ("seconds_last_run", "split", "scores_all", "index", "threshold")
                                if k in man}
    D = Descriptions.open(folder)
    rows = D.all()
    rng = random.Random(0)
    out["random_descriptions"] = [{k: r[k] for k in ("layer", "neuron", "polarity", "text", "score", "source")}
                                  for r in rng.sample(rows, 20)]
    n_nothing = sum(r["text"].startswith("nothing specific") for r in rows)
    out["share_nothing_specific"] = round(n_nothing / len(rows), 4)
    # ---- SmolLM2 as explainer on a sample ------------------------------------------------------------------
    if args.explain:
        sample = [(r["layer"], r["neuron"], r["polarity"]) for r in rng.sample(rows, args.explain)]
        label_score = {k: D.get(*k)["score"] for k in sample}
        l0 = load()
        t0 = time.perf_counter()
        describe_atlas(folder, explainer=LocalExplainer(subject), subject=subject, neurons=sample, n_candidates=2,
                       embedder=None, progress=True, overwrite=True)
        secs = time.perf_counter() - t0
        import sqlite3
        con = sqlite3.connect(folder / "atlas.sqlite")
        expl = []
        for k in sample:
            cands = json.loads(con.execute("SELECT candidates FROM descriptions WHERE layer=? AND neuron=? AND "
                                           "polarity=?", k).fetchone()[0])
            ex = [c for c in cands if c["source"] == "explainer"]
            best_ex = max(ex, key=lambda c: c["score"]) if ex else None
            expl.append({"neuron": list(k), "label": cands[0]["text"], "label_score": label_score[k],
                         "explainer": best_ex["text"] if best_ex else None,
                         "explainer_score": best_ex["score"] if best_ex else None})
        con.close()
        es = [e["explainer_score"] for e in expl if e["explainer_score"] is not None]
        ls = [e["label_score"] for e in expl if e["explainer_score"] is not None]
        diffs = sorted(a - b for a, b in zip(es, ls))
        out["explainer_sample"] = {
            "n": len(expl), "seconds": round(secs, 1), "load_before": l0, "load_after": load(),
            "explainer": {"median": round(statistics.median(es), 4), "share_ge_0.5": round(sum(s >= 0.5 for s in es)
                                                                                         / len(es), 4)} if es else None,
            "labels_same_neurons": {"median": round(statistics.median(ls), 4),
                                    "share_ge_0.5": round(sum(s >= 0.5 for s in ls) / len(ls), 4)} if ls else None,
            "explainer_minus_label_median": round(statistics.median(diffs), 4) if diffs else None,
            "explainer_better_share": round(sum(d > 0 for d in diffs) / len(diffs), 4) if diffs else None,
            "rows": expl}
        out["scores_after_explainer"] = summarise(folder, man["threshold"])
    # ---- semantic search ---------------------------------------------------------------------------------
    semantic_search(folder, "warm up", k=20, embedder=emb)
    times = []
    l0 = load()
    for q in QUERIES[:args.reps]:
        t0 = time.perf_counter()
        semantic_search(folder, q, k=20, embedder=emb)
        times.append(time.perf_counter() - t0)
    out["search"] = {"median_ms": round(1000 * statistics.median(times), 1), "min_ms": round(1000 * min(times), 1),
                     "max_ms": round(1000 * max(times), 1), "n": len(times), "load": l0}
    for q in ("animals", "gender roles", "dogs"):
        out[f"search_{q}"] = [{k: r[k] for k in ("layer", "neuron", "polarity", "score", "similarity", "token_score",
                                                 "description", "desc_score")}
                              for r in semantic_search(folder, q, k=10, embedder=emb)]
    # ---- clusters of the neurons active on the Alice question ----------------------------------------------
    from neuronscope.interventions import capture
    ids = subject.encode(ALICE, chat=True)
    _, cap = capture(subject, ids)
    acts = cap.activations[:, 0]                                   # [L, T, N]
    norm = stats.normalise(acts)
    peak_pos = norm.clamp_min(0).amax(1)                           # [L, N]
    peak_neg = (-norm).clamp_min(0).amax(1)
    active = [(l, n, "pos") for l, n in (peak_pos >= 1).nonzero().tolist()] + \
        [(l, n, "neg") for l, n in (peak_neg >= 1).nonzero().tolist()]
    interp = D.interpretable()
    t0 = time.perf_counter()
    groups = cluster_neurons(folder, active, embedder=emb)
    out["alice"] = {"active": len(active), "active_interpretable": sum(a in interp for a in active),
                    "clustered": sum(g["size"] for g in groups), "n_clusters": len(groups),
                    "seconds": round(time.perf_counter() - t0, 2),
                    "clusters": [{k: g[k] for k in ("name", "size", "coherence")} for g in groups[:25]]}
    act_i = [a for a in active if a in interp]
    gi = cluster_neurons(folder, act_i, embedder=emb) if len(act_i) >= 3 else []
    out["alice_interpretable_only"] = {"clustered": sum(g["size"] for g in gi), "n_clusters": len(gi),
                                       "clusters": [{k: g[k] for k in ("name", "size", "coherence")}
                                                    for g in gi[:25]]}
    # ---- a dose sweep ------------------------------------------------------------------------------------
    from neuronscope.describe import steer_generate
    t0 = time.perf_counter()
    res = steer_generate(subject, folder, "What is your favourite animal? Answer in one sentence.", "dogs",
                         [0.25, 0.5, 1.0], k=20, embedder=emb, chat=True, max_new_tokens=40)
    out["steer_dogs"] = {"neurons": res["neurons"], "answers": res["answers"],
                         "seconds": round(time.perf_counter() - t0, 1), "load": load()}
    text = json.dumps(out, indent=2, ensure_ascii=False)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
