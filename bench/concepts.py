"""Concept search, clusters and steering by concept, measured on a described atlas (issue 19).

    python bench/concepts.py --atlas ATLAS --model MODEL --embedder ../shared/models/all-minilm-l6-v2 \
        [--set eval|dev] [--parts search,alice,steer,speed] [--out bench/results/concepts-smollm.json]

The concepts, their word lists and the steering questions are in bench/data/concepts.json, written before any
result was seen; thresholds of the search were set on its 'dev' concepts only.

- **search**: ground truth independent of the search (which never reads the word lists): a polarity *reads* a
  concept when at least half of its 20 strongest exemplar tokens are words of the list; it *writes* it when at least
  3 distinct words of the list are among the 20 tokens its write vector promotes or among what its measured output
  effect makes the model say. recall@50 = hits in the top 50 / min(50, ground-truth size); precision@20 = hits
  in the top 20 / min(20, ground-truth size). The old description-embedding search (semantic_search) is scored
  the same way as a baseline, and chance is the ground truth's share of all polarities.
- **alice**: the cluster names of the Monitor's concept panel for the Alice question (active neurons of the answer).
- **steer**: each steering concept's writers (top 20 on the writes side), clamped at doses 0.25 / 0.5 / 1 x their own
  strong quantile; a control of 20 random polarities from the same layers with the same strengths; 20 neutral
  questions (the first 20 of the list; 32 new tokens); mention rate = share of answers with a word of the concept's
  list (off / steered / control), paired exact McNemar p-values, embedding similarity of answers to the concept,
  repetition (share of repeated word trigrams) and perplexity of the answers under the unsteered model.
- **speed**: concept search and concept steering set-up latency (median of 20).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def load_sets() -> dict:
    return json.loads((HERE / "data" / "concepts.json").read_text())


# ---- ground truth ------------------------------------------------------------------------------------------------
def ground_truth(ev, words: list[str]) -> tuple[set[int], set[int]]:
    """(reader rows, writer rows) of the evidence for a word list (see the module docstring)."""
    from neuronscope.concepts.evidence import PIECE
    code = {k: i for i, k in enumerate(ev.keys)}
    member = torch.zeros(len(ev.keys) + 1, dtype=torch.bool)
    for w in words:
        if w in code:
            member[code[w]] = True
    rc = ev.read_codes[:, :20]
    rin = member[rc.clamp_min(0)] & (rc >= 0)
    shown = (rc >= 0) | (rc == PIECE)               # a piece of a longer word ('Mad' of 'Madrid') is no list word
    readers = set(((rin.sum(1).float() / shown.sum(1).clamp_min(1)) >= 0.5).nonzero().flatten().tolist())
    K = ev.write_codes.shape[1] // 2
    writers: set[int] = set()
    for part in (ev.write_codes[:, :K], ev.write_codes[:, K:]):
        hit = member[part] & (part >= 0)
        # distinct words: a token and its repeat (the same key twice) count once
        distinct = torch.zeros(part.shape[0], dtype=torch.long)
        for j in range(part.shape[1]):
            first = torch.ones(part.shape[0], dtype=torch.bool)
            for i in range(j):
                first &= part[:, i] != part[:, j]
            distinct += (hit[:, j] & first).long()
        writers |= set((distinct >= 3).nonzero().flatten().tolist())
    return readers, writers


def pr(ranked: list[int], truth: set[int]) -> dict:
    if not truth:
        return {"truth": 0, "recall@50": None, "precision@20": None}
    r50 = len(set(ranked[:50]) & truth) / min(50, len(truth))
    p20 = len(set(ranked[:20]) & truth) / min(20, len(truth))
    return {"truth": len(truth), "recall@50": round(r50, 3), "precision@20": round(p20, 3)}


def search_part(atlas: str, emb, sets: dict, which: str) -> dict:
    from neuronscope.concepts.search import concept_search, open_evidence
    from neuronscope.concepts.semantic import semantic_search
    ev, _ = open_evidence(atlas, emb)
    M = ev.read_codes.shape[0]
    out = {}
    for concept, words in sets[which].items():
        readers, writers = ground_truth(ev, words)
        row = {"chance_reads": round(len(readers) / M, 5), "chance_writes": round(len(writers) / M, 5)}
        for side, truth in (("reads", readers), ("writes", writers)):
            res = concept_search(atlas, concept, side=side, k=50, embedder=emb)
            ranked = [ev.row(h.layer, h.neuron, h.polarity) for h in res.hits]
            row[side] = pr(ranked, truth)
            row[side]["top5"] = [h.ref + " " + ",".join(h.read_words if side == "reads" else h.write_words)
                                 for h in res.hits[:5]]
        base = semantic_search(atlas, concept, k=50, embedder=emb)
        ranked = [ev.row(h.layer, h.neuron, h.polarity) for h in base]
        row["baseline_description_search"] = {"reads": pr(ranked, readers), "writes": pr(ranked, writers)}
        out[concept] = row
        print(concept, {s: (row[s]["truth"], row[s]["recall@50"], row[s]["precision@20"]) for s in ("reads", "writes")},
              "baseline", {s: row["baseline_description_search"][s]["precision@20"] for s in ("reads", "writes")},
              flush=True)
    rows = list(out.values())
    for side in ("reads", "writes"):
        vals = [r[side] for r in rows if r[side]["truth"]]
        out[f"median_{side}"] = {m: statistics.median([v[m] for v in vals]) for m in ("recall@50", "precision@20")} \
            if vals else None
        bvals = [r["baseline_description_search"][side] for r in rows
                 if r["baseline_description_search"][side]["truth"]]
        out[f"median_baseline_{side}"] = {m: statistics.median([v[m] for v in bvals])
                                          for m in ("recall@50", "precision@20")} if bvals else None
        pairs = [(r[side], r["baseline_description_search"][side]) for r in rows if r[side]["truth"]]
        from scipy.stats import wilcoxon
        out[f"paired_vs_baseline_{side}"] = {
            m: float(wilcoxon([a[m] for a, _ in pairs], [b[m] for _, b in pairs], alternative="greater").pvalue)
            for m in ("recall@50", "precision@20")} if len(pairs) >= 5 else None
        out[f"median_chance_{side}"] = statistics.median([r[f"chance_{side}"] for r in rows])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--atlas", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--embedder", required=True)
    ap.add_argument("--set", default="eval", choices=["eval", "dev"])
    ap.add_argument("--parts", default="search,alice,steer,speed")
    ap.add_argument("--out", default=None)
    ap.add_argument("--doses", default="0.25,0.5,1", help="steering doses (x each neuron's strong quantile)")
    args = ap.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    from neuronscope.embed import load_embedder
    emb = load_embedder(args.embedder)
    sets = load_sets()
    parts = set(args.parts.split(","))
    res: dict = {"atlas": args.atlas, "model": args.model, "set": args.set, "date": time.strftime("%Y-%m-%d"),
                 "machine": platform.platform(), "cores": os.cpu_count(), "load_before": os.getloadavg()}
    if "search" in parts:
        res["search"] = search_part(args.atlas, emb, sets, args.set)
    if parts & {"alice", "steer", "speed"}:
        from concepts_steer import alice_part, speed_part, steer_part   # type: ignore[import-not-found]
        from neuronscope.subject import Subject
        subject = Subject.load(args.model)
        if "alice" in parts:
            res["alice"] = alice_part(subject, args.atlas, emb)
        if "steer" in parts:
            res["steer"] = steer_part(subject, args.atlas, emb, sets,
                                      doses=tuple(float(x) for x in args.doses.split(",")))
        if "speed" in parts:
            res["speed"] = speed_part(subject, args.atlas, emb)
    res["load_after"] = os.getloadavg()
    text = json.dumps(res, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text[:4000])


if __name__ == "__main__":
    main()
