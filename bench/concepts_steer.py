"""The model-side parts of bench/concepts.py: the Alice question's clusters as the Monitor shows them, steering by
concept against a random-neuron control, and the Monitor's concept search / steering set-up latency."""
from __future__ import annotations

import dataclasses
import re
import statistics
import time
from typing import Any

import torch

ALICE = "Alice has 4 brothers and 2 sisters. How many sisters does Alice's brother have?"
DOSES = (0.25, 0.5, 1.0)


def _monitor(subject: Any, atlas: str) -> Any:
    from neuronscope.server import Knowledge, Monitor
    mon = Monitor(subject, Knowledge.load(subject, atlas))
    mon.warm()
    return mon


def alice_part(subject: Any, atlas: str, emb: Any) -> dict:
    """The Alice question's answer and its active concepts (whole conversation), as the page lists them."""
    mon = _monitor(subject, atlas)
    s = mon.sessions.create()
    for _ in mon.send(s, ALICE, max_new_tokens=48):
        pass
    answer = s.messages[-1].content if s.messages else ""
    t0 = time.perf_counter()
    d = mon.clusters(s)
    secs = time.perf_counter() - t0
    shown = [c for c in d.clusters if c.kind in ("concept", "context")]      # what the page shows
    hidden = [c for c in d.clusters if c.kind in ("form", "unclear")]      # behind its toggle
    print("alice answer:", answer)
    print("shown:", [(c.name, c.size) for c in shown])
    print("hidden (syntax, format & unclear):", [(c.name, c.size) for c in hidden])
    return {"question": ALICE, "answer": answer, "method": d.method, "n_neurons": d.n_neurons,
            "seconds": round(secs, 3),
            "shown": [{"name": c.name, "kind": c.kind, "size": c.size, "tokens": c.tokens[:4]}
                      for c in shown],
            "hidden": [{"name": c.name, "kind": c.kind, "size": c.size} for c in hidden]}


def _mentions(text: str, words: set[str]) -> bool:
    return any(w in words for w in re.findall(r"[a-z]+", text.lower()))


def repetition(text: str) -> float:
    """Share of word trigrams that repeat an earlier one."""
    w = re.findall(r"\w+", text.lower())
    tri = [tuple(w[i:i + 3]) for i in range(len(w) - 2)]
    return 0.0 if not tri else 1.0 - len(set(tri)) / len(tri)


@torch.no_grad()
def _nll(subject: Any, prompt: torch.Tensor, answer: torch.Tensor) -> float:
    """Mean negative log-likelihood per answer token under the unsteered model."""
    if answer.numel() == 0:
        return float("nan")
    ids = torch.cat([prompt[0], answer]).unsqueeze(0)
    logp = torch.log_softmax(subject.logits(ids)[0, prompt.shape[1] - 1:-1].float(), -1)
    return float(-logp.gather(1, answer.unsqueeze(1)).mean())


def _mcnemar_greater(a: list[bool], b: list[bool]) -> float:
    """One-sided exact McNemar p that a mentions more often than b (paired)."""
    from scipy.stats import binomtest
    x = sum(1 for u, v in zip(a, b) if u and not v)
    y = sum(1 for u, v in zip(a, b) if v and not u)
    return 1.0 if x + y == 0 else float(binomtest(x, x + y, 0.5, alternative="greater").pvalue)


def steer_part(subject: Any, atlas: str, emb: Any, sets: dict, k: int = 20, max_new: int = 32, n_questions: int = 20,
               doses: tuple[float, ...] = DOSES) -> dict:
    from neuronscope.atlas.folder import AtlasFolder
    from neuronscope.concepts.steer import concept_neurons, random_control, steer_interventions
    from neuronscope.interventions import intervene
    from neuronscope.stats.results import NeuronStats
    stats = NeuronStats.from_folder(AtlasFolder.open(atlas))
    qs = sets["questions"][:n_questions]
    eos = getattr(subject.tokenizer, "eos_token_id", None)
    out: dict = {"doses": list(doses), "k": k, "max_new_tokens": max_new, "questions": len(qs), "concepts": {}}
    pooled: dict[str, list] = {}
    t_all = time.perf_counter()
    for ci, concept in enumerate(sets["steer"]):
        words = set(sets["eval"][concept])
        writers = concept_neurons(atlas, concept, k=k, embedder=emb)
        control = random_control(stats, writers, seed=ci)
        cvec = torch.nn.functional.normalize(torch.as_tensor(emb([concept])).float(), dim=1)[0]
        rows: dict[str, dict[str, list]] = {}
        examples = []
        for qi, q in enumerate(qs):
            ids = subject.encode(q, chat=True)
            R = 1 + 2 * len(doses)
            edits = []
            for j, d in enumerate(doses):
                edits += [dataclasses.replace(e, rows=[1 + j]) for e in steer_interventions(stats, writers, d)]
                edits += [dataclasses.replace(e, rows=[1 + len(doses) + j])
                          for e in steer_interventions(stats, control, d)]
            with intervene(subject, *edits):
                new = subject.generate_ids(ids.repeat(R, 1), max_new_tokens=max_new, temperature=0.0)
            names = ["off"] + [f"steer {d:g}" for d in doses] + [f"control {d:g}" for d in doses]
            for r, name in enumerate(names):
                x = new[r].tolist()
                if eos is not None and eos in x:
                    x = x[:x.index(eos)]
                a = torch.tensor(x, dtype=torch.long)
                text = subject.decode(a)
                e = torch.nn.functional.normalize(torch.as_tensor(emb([text or " "])).float(), dim=1)[0]
                row = rows.setdefault(name, {"mention": [], "sim": [], "rep": [], "nll": []})
                row["mention"].append(_mentions(text, words))
                row["sim"].append(float(e @ cvec))
                row["rep"].append(repetition(text))
                row["nll"].append(_nll(subject, ids, a))
                if qi < 2:
                    examples.append({"q": q, "row": name, "text": text})
        res: dict = {"writers": [f"{l}:{n}{'+' if p == 'pos' else '-'}" for l, n, p in writers],
                     "n_writers": len(writers), "examples": examples}
        for name, row in rows.items():
            res[name] = {"mention_rate": round(statistics.mean(row["mention"]), 3),
                         "similarity": round(statistics.mean(row["sim"]), 4),
                         "repetition": round(statistics.mean(row["rep"]), 4),
                         "nll": round(statistics.mean([v for v in row["nll"] if v == v] or [float("nan")]), 4)}
            pooled.setdefault(name, []).append(row)
        for d in doses:
            st, ct, off = rows[f"steer {d:g}"], rows[f"control {d:g}"], rows["off"]
            res[f"steer {d:g}"]["p_vs_off"] = _mcnemar_greater(st["mention"], off["mention"])
            res[f"steer {d:g}"]["p_vs_control"] = _mcnemar_greater(st["mention"], ct["mention"])
        out["concepts"][concept] = res
        print(concept, len(writers), "writers;", {n: (res[n]["mention_rate"], res[n]["repetition"])
                                                  for n in rows}, flush=True)
    summary = {}
    for name, lst in pooled.items():
        m = [v for row in lst for v in row["mention"]]
        summary[name] = {"mention_rate": round(statistics.mean(m), 3),
                         "similarity": round(statistics.mean([v for row in lst for v in row["sim"]]), 4),
                         "repetition": round(statistics.mean([v for row in lst for v in row["rep"]]), 4),
                         "nll": round(statistics.mean([v for row in lst for v in row["nll"] if v == v]), 4)}
    off_m = [v for row in pooled["off"] for v in row["mention"]]
    for d in doses:
        sm = [v for row in pooled[f"steer {d:g}"] for v in row["mention"]]
        cm = [v for row in pooled[f"control {d:g}"] for v in row["mention"]]
        summary[f"steer {d:g}"]["p_vs_off"] = _mcnemar_greater(sm, off_m)
        summary[f"steer {d:g}"]["p_vs_control"] = _mcnemar_greater(sm, cm)
        from scipy.stats import wilcoxon
        so = [v for row in pooled[f"steer {d:g}"] for v in row["sim"]]
        oo = [v for row in pooled["off"] for v in row["sim"]]
        summary[f"steer {d:g}"]["similarity_p_vs_off"] = float(wilcoxon(so, oo, alternative="greater").pvalue)
    out["pooled"] = summary
    out["seconds"] = round(time.perf_counter() - t_all, 1)
    print("pooled:", summary, flush=True)
    return out


def speed_part(subject: Any, atlas: str, emb: Any) -> dict:
    """Median latency of the Monitor's concept search and of a concept steering's set-up (no regeneration), each on
    queries it has not seen (no cache hits)."""
    mon = _monitor(subject, atlas)
    words = ["birds", "rivers", "kitchen", "doctors", "trains", "gardens", "winter", "money", "dance", "school",
             "mountains", "cars", "flowers", "painting", "farming", "computers", "football", "cheese", "stars",
             "oceans", "guitars"]
    search, setup = [], []
    for w in words[:20]:
        t0 = time.perf_counter()
        mon.concepts(w, k=50)
        search.append(time.perf_counter() - t0)
    s = mon.sessions.create()
    for _ in mon.send(s, "Tell me about your day.", max_new_tokens=8):
        pass
    for w in words[1:21]:
        t0 = time.perf_counter()
        try:
            st = mon.add_steering(s, mode="strengthen", concept=w + " and more")
        except Exception as exc:   # a concept with no writers: counted, reported
            print("no steering for", w, exc)
            continue
        setup.append(time.perf_counter() - t0)
        mon.remove_steering(s, st.id)
    res = {"concept_search_ms_median": round(1000 * statistics.median(search), 1),
           "steering_setup_ms_median": round(1000 * statistics.median(setup), 1) if setup else None,
           "n_search": len(search), "n_setup": len(setup)}
    print("speed:", res)
    return res
