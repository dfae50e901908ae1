"""How strongly an alignment took, as numbers.

    report = evaluate_irm(subject, irm, aligned_rows, neutral_texts=[...])
    report.aligned.delta          # loss(on) - loss(off): strongly negative when the alignment took

    judged = judge_irm(subject, irm, questions, judge=Judge(), target="sadness")
    judged.metrics["sadness"]     # PairedStats: off/on rates, difference, 95% interval, p_value
    judged.factual, judged.openings, judged.verdict
    judged.to_json()              # judged.json

`judge_irm` is the measure that matters: answers to held-out neutral questions generated with the IRM off and on
(same decoding, same seeds), scored by an offline judge (emotion word rates, VADER sentiment), with the fluency cost
(3-gram repetition rate; the answer's perplexity under the frozen model) as paired differences.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from ..errors import NeuronscopeError

if TYPE_CHECKING:
    from ..subject import Subject
    from .generation import FrozenAnswers
from .data import Example, read_table, tokenize_rows
from .factual import FACTS, Fact, facts_digest, score_answers
from .model import IRM
from .judge import Judge
from .openings import OpeningStats, shared_openings
from .paired import PairedStats, paired_difference
from .training import _pad_id, validation_loss


@dataclass
class LossPair:
    """Token-weighted mean next-token loss on one text set with the IRM off and on."""
    off: float
    on: float
    delta: float
    ppl_off: float
    ppl_on: float
    examples: int
    tokens: int


@dataclass
class LossEval:
    """evaluate_irm's result; to_json() is eval.json's content (keys only for the parts evaluated, as before)."""
    aligned: LossPair | None = None
    neutral: LossPair | None = None
    selectivity: float | None = None      # aligned delta - neutral delta: negative = the IRM helps aligned text more
    data: str | None = None
    neutral_source: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("aligned", "neutral", "selectivity", "data"):
            if d[k] is None:
                del d[k]
        if self.data is None:
            d.pop("neutral_source")
        return d


def _pair(subject: Subject, irm: IRM, examples: Sequence[Example], batch_size: int) -> LossPair:
    pad = _pad_id(subject)
    off = validation_loss(subject, None, examples, batch_size, pad)
    on = validation_loss(subject, irm, examples, batch_size, pad)
    return LossPair(off, on, on - off, math.exp(min(off, 50)), math.exp(min(on, 50)), len(examples),
                    sum(e.n_target for e in examples))


def evaluate_irm(subject: Subject, irm: IRM, aligned_rows: Sequence[dict[str, Any]] | None = None, *,
                 neutral_texts: Sequence[str] | None = None, chat: bool = False, max_len: int = 256,
                 batch_size: int = 8) -> LossEval:
    """Next-token loss (mean over target tokens) with the IRM off and on, on aligned rows and on neutral text."""
    irm.check_subject(subject)
    if not aligned_rows and not neutral_texts:
        raise NeuronscopeError("Give aligned rows and/or neutral text to evaluate on.")
    report = LossEval()
    if aligned_rows:
        report.aligned = _pair(subject, irm, tokenize_rows(subject, aligned_rows, chat=chat, max_len=max_len),
                               batch_size)
    if neutral_texts:
        rows = [{"text": t} for t in neutral_texts if t.strip()]
        report.neutral = _pair(subject, irm, tokenize_rows(subject, rows, chat=False, max_len=max_len), batch_size)
    if report.aligned is not None and report.neutral is not None:
        report.selectivity = report.aligned.delta - report.neutral.delta
    return report


@torch.no_grad()
def answer_nll(subject: Subject, prompts: Sequence[str], answers: Sequence[str], *, chat: bool = False,
               max_len: int = 512, batch_size: int = 8) -> list[float]:
    """Mean next-token loss of each answer given its prompt under the frozen model (no hooks); nan if empty."""
    from .data import IGNORE, collate
    import torch.nn.functional as F
    rows = [{"prompt": p, "response": a if a.strip() else "."} for p, a in zip(prompts, answers)]
    examples = tokenize_rows(subject, rows, chat=chat, max_len=max_len, add_eos=False, keep_empty=True)
    pad = _pad_id(subject)
    out: list[float] = []
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i:i + batch_size], pad)
        logits = subject.model(input_ids=b["input_ids"].to(subject.device),
                               attention_mask=b["attention_mask"].to(subject.device)).logits[:, :-1].float()
        tg = b["labels"][:, 1:].to(logits.device)
        nll = F.cross_entropy(logits.transpose(1, 2), tg, ignore_index=IGNORE, reduction="none")
        cnt = (tg != IGNORE).sum(1)
        out += [float(x) if c > 0 else float("nan") for x, c in zip((nll.sum(1) / cnt.clamp(min=1)).tolist(),
                                                                    cnt.tolist())]
    return [v if answers[j].strip() else float("nan") for j, v in enumerate(out)]


@dataclass
class Verdict:
    """Did the alignment take (the issue's criteria); opposite_* only when there is an opposite emotion."""
    target_ratio: float
    target_doubles: bool
    target_p: float
    target_significant: bool
    repetition_ratio: float
    repetition_ok: bool
    passed: bool
    criteria: str
    opposite_diff: float | None = None
    opposite_not_up: bool | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON form, keys in the order judged.json always had them."""
        d: dict[str, Any] = {"target_ratio": self.target_ratio, "target_doubles": self.target_doubles,
                             "target_p": self.target_p, "target_significant": self.target_significant}
        if self.opposite_not_up is not None:
            d.update(opposite_diff=self.opposite_diff, opposite_not_up=self.opposite_not_up)
        d.update(repetition_ratio=self.repetition_ratio, repetition_ok=self.repetition_ok, passed=self.passed,
                 criteria=self.criteria)
        return d


@dataclass
class Answer:
    """One question answered with the IRM off and on."""
    prompt: str
    off: str
    on: str


@dataclass
class JudgedEval:
    """judge_irm's result; to_json() is judged.json's content (openings and factual are new in issue 20; factual,
    verdict and questions only when present)."""
    judge: dict[str, Any]
    n_prompts: int
    chat: bool
    max_new_tokens: int
    temperature: float
    seed: int
    scale: float
    target: str | None
    opposite: str | None
    metrics: dict[str, PairedStats]
    answers: list[Answer]
    openings: dict[str, OpeningStats]
    factual: FactualAccuracy | None = None
    verdict: Verdict | None = None
    questions: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k) for k in ("judge", "n_prompts", "chat", "max_new_tokens",
                                                             "temperature", "seed", "scale", "target", "opposite")}
        d["metrics"] = {k: m.to_json() for k, m in self.metrics.items()}
        d["answers"] = [asdict(a) for a in self.answers]
        d["openings"] = {k: asdict(o) for k, o in self.openings.items()}
        if self.factual is not None:
            d["factual"] = asdict(self.factual)
        if self.verdict is not None:
            d["verdict"] = self.verdict.to_json()
        if self.questions is not None:
            d["questions"] = self.questions
        return d


def judge_irm(subject: Subject, irm: IRM, prompts: Sequence[str], *, judge: Judge | None = None,
              target: str | None = None, opposite: str | None = None, chat: bool = False,
              max_new_tokens: int = 48, temperature: float = 0.0, seed: int = 0, scale: float = 1.0,
              batch_size: int = 8, progress: bool = True,
              facts: Sequence[Fact] | None = FACTS, frozen: FrozenAnswers | None = None) -> JudgedEval:
    """Answers to `prompts` with the IRM off and on, judged; paired statistics per measure (see module doc).

    Also the cost to the answers: factual accuracy on `facts` (off vs on, paired; None skips it) and the share of
    answers that open with the same sentence as another answer (memorised frames), IRM off and on.
    frozen: a memo of IRM-off answers shared by many judgements of the same questions (irm sweep)."""
    from .generation import frozen_texts, generate_texts
    from .judge import OPPOSITE, check_emotion
    irm.check_subject(subject)
    prompts = [p for p in prompts if p.strip()]
    if len(prompts) < 2:
        raise NeuronscopeError("Give at least two held-out prompts to judge.")
    judge = judge or Judge()
    if target is not None:
        check_emotion(judge, target)
        opposite = opposite or OPPOSITE.get(target)
    kw: dict[str, Any] = dict(chat=chat, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                              batch_size=batch_size, progress=progress)
    off = frozen_texts(subject, prompts, frozen, desc="answers, IRM off", **kw)
    on = generate_texts(subject, prompts, irm=irm, scale=scale, desc="answers, IRM on", **kw)
    metrics = judged_metrics(subject, judge, prompts, off, on, chat=chat, batch_size=batch_size, seed=seed)
    rep = JudgedEval(judge.info(), len(prompts), chat, max_new_tokens, temperature, seed, scale, target, opposite,
                     metrics, [Answer(p, a, b) for p, a, b in zip(prompts, off, on)],
                     {"off": shared_openings(off), "on": shared_openings(on)})
    if facts:
        rep.factual = factual_accuracy(subject, irm, facts, scale=scale, frozen=frozen, **kw)
    if target is not None:
        rep.verdict = verdict(metrics, target, opposite)
    return rep


def judged_metrics(subject: Subject, judge: Judge, prompts: Sequence[str], off: Sequence[str], on: Sequence[str], *,
                   chat: bool, batch_size: int, seed: int) -> dict[str, PairedStats]:
    """Paired off/on statistics of every judged measure and of the answers' loss under the frozen model."""
    s_off, s_on = judge.score_many(off), judge.score_many(on)
    nll_off = answer_nll(subject, prompts, off, chat=chat, batch_size=batch_size)
    nll_on = answer_nll(subject, prompts, on, chat=chat, batch_size=batch_size)
    metrics: dict[str, PairedStats] = {}
    for key in list(judge.emotions) + ["vader_compound", "repetition", "words"]:
        metrics[key] = paired_difference([x[key] for x in s_off], [x[key] for x in s_on], seed=seed)
    ok = [i for i in range(len(prompts)) if math.isfinite(nll_off[i]) and math.isfinite(nll_on[i])]
    if len(ok) >= 2:
        nll = paired_difference([nll_off[i] for i in ok], [nll_on[i] for i in ok], seed=seed)
        nll.ppl_off, nll.ppl_on = math.exp(nll.off), math.exp(nll.on)
        metrics["answer_nll"] = nll
    return metrics


@dataclass
class FactualAccuracy:
    """Right answers to the factual questions with the IRM off and on (paired over questions)."""
    n: int
    facts_sha256_16: str
    right_off: int
    right_on: int
    accuracy_off: float
    accuracy_on: float
    diff: float
    ci95: list[float]
    p_value: float
    lost: list[str]          # questions answered right with the IRM off and wrong with it on
    gained: list[str]
    answers: list[dict[str, Any]]


def factual_accuracy(subject: Subject, irm: IRM, facts: Sequence[Fact], *, scale: float = 1.0, seed: int = 0,
                     frozen: FrozenAnswers | None = None, **generate_kw: Any) -> FactualAccuracy:
    """Answers to the factual questions with the IRM off and on (same decoding), judged by factual.is_correct."""
    from .generation import frozen_texts, generate_texts
    qs = [f.question for f in facts]
    off = frozen_texts(subject, qs, frozen, seed=seed, desc="facts, IRM off", **generate_kw)
    on = generate_texts(subject, qs, irm=irm, scale=scale, seed=seed, desc="facts, IRM on", **generate_kw)
    r_off, r_on = score_answers(off, facts), score_answers(on, facts)
    d = paired_difference(r_off, r_on, seed=seed)
    return FactualAccuracy(len(facts), facts_digest(facts), int(sum(r_off)), int(sum(r_on)), d.off, d.on, d.diff,
                           d.ci95, d.p_value,
                           [f.question for f, a, b in zip(facts, r_off, r_on) if a > b],
                           [f.question for f, a, b in zip(facts, r_off, r_on) if b > a],
                           [{"question": f.question, "accepted": list(f.accepted), "off": a, "on": b,
                             "right_off": bool(x), "right_on": bool(y)}
                            for f, a, b, x, y in zip(facts, off, on, r_off, r_on)])


def verdict(metrics: Mapping[str, PairedStats], target: str, opposite: str | None, *, alpha: float = 0.01,
            min_ratio: float = 2.0, max_repetition_ratio: float = 1.5) -> Verdict:
    """Did the alignment take? target rate at least `min_ratio` x and p < alpha; opposite not up (no significant
    rise at 0.05); repetition within `max_repetition_ratio` x of IRM-off (strictly: when IRM-off repeats nothing, IRM-on
    may repeat at most 1% of its 3-grams)."""
    t = metrics[target]
    ratio = (t.on / t.off) if t.off > 0 else (math.inf if t.on > 0 else 0.0)
    r = metrics["repetition"]
    rep_ratio = (r.on / r.off) if r.off > 0 else (math.inf if r.on > 0.01 else 1.0)
    v = Verdict(ratio, ratio >= min_ratio, t.p_value, t.p_value < alpha and t.diff > 0, rep_ratio,
                rep_ratio <= max_repetition_ratio, False,
                f"{target} rate x{min_ratio:g} with paired p < {alpha:g}; {opposite} not significantly up; "
                f"repetition <= {max_repetition_ratio:g} x IRM-off")
    if opposite is not None and opposite in metrics:
        o = metrics[opposite]
        v.opposite_diff, v.opposite_not_up = o.diff, not (o.diff > 0 and o.p_value < 0.05)
    v.passed = bool(v.target_doubles and v.target_significant and v.opposite_not_up is not False and v.repetition_ok)
    return v


def held_out_rows(run: dict[str, Any], run_dir: str | Path) -> list[dict[str, Any]]:
    """The validation rows of a run's own training file (re-split with the recorded seed)."""
    from ..store import read_json
    data = run.get("data", {})
    path = data.get("path")
    if not path or not Path(path).is_file():
        raise NeuronscopeError("The run's training file is not available; pass --data with aligned rows.")
    rows = read_table(path)
    sp = read_json(Path(run_dir) / "split.json")
    if len(rows) != data.get("rows"):
        raise NeuronscopeError(f"'{path}' changed since training; pass --data with held-out aligned rows.")
    return [rows[i] for i in sp["val_rows"]]


def drop_training_prompts(run: dict[str, Any], run_dir: str | Path, questions: list[str]) -> tuple[list[str], int]:
    """`questions` without those the run was trained on (a training row's prompt, compared case- and space-folded).

    Returns the kept questions and how many were dropped. Without the run's training file nothing can be checked and
    every question is kept (the count is then 0)."""
    from ..store import read_json
    data = run.get("data", {})
    path = data.get("path")
    split_file = Path(run_dir) / "split.json"
    if not path or not Path(path).is_file() or not split_file.is_file():
        return list(questions), 0
    rows = read_table(path)
    val = set(read_json(split_file).get("val_rows", []))

    def fold(text: str) -> str:
        return " ".join(text.split()).casefold()

    trained = {fold(r["prompt"]) for i, r in enumerate(rows) if i not in val and isinstance(r.get("prompt"), str)}
    kept = [q for q in questions if fold(q) not in trained]
    return kept, len(questions) - len(kept)


__all__ = ["evaluate_irm", "held_out_rows", "judge_irm", "judged_metrics", "factual_accuracy", "FactualAccuracy",
           "answer_nll", "verdict", "drop_training_prompts", "LossPair", "LossEval", "Verdict", "Answer",
           "JudgedEval"]
