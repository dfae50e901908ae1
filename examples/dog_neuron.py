"""The "dog neuron" check of Davies 2025 on SmolLM2-135M-Instruct: search the atlas for "dog", clamp the best
candidates, ask varied questions, and print the share of answers that mention dogs with and without the clamp.

    .venv/bin/python examples/dog_neuron.py --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf --atlas /tmp/atlas-smollm

The atlas is built first when the folder has none. Candidates: the neurons the search ranks best among the sites
given (default: down.pos and down.neg, whose write vectors promote dog tokens or, negated, do). Each is clamped to
`--value` times the largest |activation| it reaches on the unclamped answers (sign chosen so that the neuron writes
its dog direction: positive for down.pos/up/gate, negative for down.neg), at every position.
"""
from __future__ import annotations

import argparse
import re

import torch

QUESTIONS = [
    "What is your favourite animal?",
    "Tell me a very short story.",
    "What should I do this weekend?",
    "Describe your ideal home in two sentences.",
    "What is a good name for a pet?",
    "Write a haiku about the morning.",
    "What makes a good friend?",
    "Give me one tip for staying healthy.",
    "What did you dream about last night?",
    "Suggest a hobby for a retired teacher.",
    "What is the best thing about summer?",
    "Describe a walk in the park.",
    "What would you buy with a hundred dollars?",
    "Who is your hero and why?",
    "What is the meaning of loyalty?",
    "Recommend a gift for a child.",
    "What sound do you like most?",
    "Describe your perfect Sunday morning.",
    "What animal would make the best companion on a long trip?",
    "Write one sentence about the city at night.",
]
DOG = re.compile(r"\b(dogs?|pupp(y|ies)|pups?|canines?|doggy|doggo|hounds?|retrievers?|labradors?|poodles?|"
                 r"terriers?|barks?|barking|woof)\b", re.I)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="SmolLM2-135M-Instruct (GGUF file or HF folder)")
    ap.add_argument("--atlas", default="/tmp/atlas-smollm", help="atlas folder (built when missing)")
    ap.add_argument("--concept", default="dog")
    ap.add_argument("--sites", default="down.pos,down.neg")
    ap.add_argument("--neurons", type=int, default=3, help="how many of the best candidates to clamp")
    ap.add_argument("--value", type=float, default=3.0, help="clamp at VALUE x the neuron's max |activation|")
    ap.add_argument("--questions", type=int, default=len(QUESTIONS))
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this small model on a "
                    "shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from neuronscope.atlas import Atlas, build_atlas
    from neuronscope.errors import NeuronscopeError
    from neuronscope.interventions import Capture, Clamp, intervene
    from neuronscope.subject import Subject

    subject = Subject.load(args.model)
    try:
        atlas = Atlas.open(args.atlas)
    except NeuronscopeError:
        atlas = build_atlas(subject, args.atlas)
    found = atlas.search(args.concept, k=args.neurons, sites=args.sites, subject=subject)
    print(f"candidates for {args.concept!r}:")
    for r in found:
        print(f"  {r.layer}:{r.neuron} {r.site:<8} score {r.score:.3f}  {r.tokens}")
    questions = QUESTIONS[:args.questions]

    def answer(q: str, edits=()) -> str:
        return subject.generate(q, chat=True, max_new_tokens=args.max_new_tokens, interventions=edits)

    # unclamped answers, and each candidate's largest |activation| over them (prompt and answer)
    base, peak = [], torch.zeros(len(found))
    for q in questions:
        text = answer(q)
        base.append(text)
        ids = torch.cat([subject.encode(q, chat=True), subject.tokenizer(text, return_tensors="pt",
                         add_special_tokens=False)["input_ids"]], 1)
        layers = sorted({r.layer for r in found})
        with intervene(subject, Capture(layers=layers, sites=("neurons",))) as (cap,):
            subject.logits(ids)
        for j, r in enumerate(found):
            act = cap.get("neurons", r.layer)[0, :, r.neuron]
            peak[j] = max(float(peak[j]), float(act.abs().max()))
    edits = []
    for j, r in enumerate(found):
        sign = -1.0 if r.site == "down.neg" else 1.0
        edits.append(Clamp(r.layer, [r.neuron], "all", sign * args.value * float(peak[j])))
        print(f"  clamp {r.layer}:{r.neuron} = {sign * args.value * float(peak[j]):+.2f} "
              f"(max |act| {float(peak[j]):.2f})")
    steered = [answer(q, edits) for q in questions]
    n_base = sum(bool(DOG.search(t)) for t in base)
    n_steer = sum(bool(DOG.search(t)) for t in steered)
    for q, a, b in list(zip(questions, base, steered))[:4]:
        print(f"\nQ: {q}\n  without: {a.strip()[:160]!r}\n  with:    {b.strip()[:160]!r}")
    print(f"\nanswers mentioning dogs: without clamp {n_base}/{len(questions)} ({100 * n_base / len(questions):.0f}%), "
          f"with clamp {n_steer}/{len(questions)} ({100 * n_steer / len(questions):.0f}%)")


if __name__ == "__main__":
    main()
