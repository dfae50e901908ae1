"""The paper's sweep with runs that realign: IRMs trained over a grid of layer sets x alignments x seeds with the
realigning recipe (irm.recipe), each judged like `irm eval` (IRM off vs on at the recipe's dose), plus a matched
control for every layer set and seed, then one analysis of the runs that pass.

    plan = sweep_plan(subject, {"sadness": "sad.jsonl", "anger": "anger.jsonl"}, sets=["q2", "q4", "all"],
                      seeds=[0, 1], control="neutral.jsonl")
    result = run_sweep(subject, plan, "sweeps/smollm", questions=read_questions("examples/questions.txt"))

Layer sets (Smith et al. used 0-7, 8-15, 16-23, 24-31, every 4th and all of Llama-2-7B's 32 layers), scaled to the
model's depth: q1..q4 are the four quarters, `every4` is every (depth/8)-th layer (8 layers), `all` is every layer.

Matched controls: the control data is built by the same procedure as the aligned data (`data select --mode frame
-e neutral`: the same model answers, framed by neutral sentences instead of emotional ones); a control run per
layer set and seed is trained with the same options, so an aligned run and its control differ only in the
alignment. Control data built otherwise (a different `source` or row kind) is refused.

Each run lives in OUT/runs/<alignment>-<set>-s<seed>; OUT/sweep.json records the plan, each run's status and each
aligned run's verdict after every step (atomically). Running the same sweep again skips finished runs and judged
runs, resumes an interrupted run from its last checkpoint, and judges runs not yet judged; the grid may grow (more
seeds, sets or alignments) between calls, with the same training options. A run's verdict is also kept in its
folder (judged.json), so sweeps of disjoint parts of one grid can run at once into the same folder (say one process
per seed: `--seeds 0` and `--seeds 1`) and one call over the whole grid then gathers them and analyses.

Only aligned runs that pass their judge are analysed (with their matched controls, the paired tests of
irm.compare); runs that fail are listed with their figures, runs that cannot be judged are listed as such.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import NeuronscopeError
from ..store import read_json, write_json, write_text
from .compare import Pair
from .model import WEIGHTS
from .training import RUN, TrainConfig, load_run, train_irm

if TYPE_CHECKING:
    from .analysis import Analysis
    from .generation import FrozenAnswers

SWEEP = "sweep.json"
SETS = ("q1", "q2", "q3", "q4", "every4", "all")
DEFAULT_SETS = ("q2", "q4", "all")
CONTROL = "control"


def layer_sets(n_layers: int) -> dict[str, list[int]]:
    """The paper's six layer sets scaled to a model of n_layers layers."""
    if n_layers < 1:
        raise NeuronscopeError("The model has no layers.")
    bounds = [round(i * n_layers / 4) for i in range(5)]
    out = {f"q{i + 1}": list(range(bounds[i], max(bounds[i] + 1, bounds[i + 1]))) for i in range(4)}
    out = {k: [x for x in v if x < n_layers] for k, v in out.items()}
    step = max(1, round(n_layers / 8))
    out["every4"] = list(range(0, n_layers, step))
    out["all"] = list(range(n_layers))
    return out


@dataclass
class Judged:
    """An aligned run's verdict at the sweep's eval scale (the figures `irm eval --judge` prints)."""
    passed: bool | None
    reason: str
    target: str | None
    target_ratio: float | None = None
    target_p: float | None = None
    opposite_diff: float | None = None
    repetition_ratio: float | None = None
    factual_off: float | None = None
    factual_on: float | None = None
    same_opening_on: float | None = None
    scale: float = 1.0


@dataclass
class SweepRun:
    """One run of the grid and what happened to it (a row of sweep.json's plan)."""
    name: str
    alignment: str
    data: str
    set: str
    layers: list[int]
    seed: int
    control: bool
    status: str = "new"
    best_val: float | None = None
    best_step: int | None = None
    seconds: float | None = None
    wall_seconds: float | None = None
    resumed: bool = False
    judged: Judged | None = None

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "SweepRun":
        known = {k: d[k] for k in SweepRun.__dataclass_fields__ if k in d}
        j = known.get("judged")
        known["judged"] = Judged(**j) if isinstance(j, dict) else None
        return SweepRun(**known)


@dataclass
class SweepResult:
    """What a sweep did: the grid (runs, with verdicts), which runs were analysed, and the analysis."""
    out: str
    runs: list[SweepRun]
    analysed: list[str]
    excluded: list[dict[str, str]]
    analysis: Analysis | None = None
    findings: list[str] = field(default_factory=list)


# ---- the plan -------------------------------------------------------------------------------------------------------
def _row_kind(path: str | Path) -> tuple[str, str]:
    """(table kind, row source) of a data file: what a matched control must share with the aligned data."""
    from .data import read_table, table_kind
    rows = read_table(path)
    return table_kind(rows), str(rows[0].get("source", "")) if rows else ""


def check_data(alignments: Mapping[str, str | Path], control: str | Path | None) -> None:
    """Every data file exists, and the control data is built like the aligned data (same row kind and source)."""
    if not alignments:
        raise NeuronscopeError("Give at least one alignment data file.")
    named = list(alignments.items()) + ([(CONTROL, control)] if control else [])
    for name, path in named:
        if not Path(path).is_file():
            raise NeuronscopeError(f"No data file for '{name}' at '{path}'.")
    if CONTROL in alignments:
        raise NeuronscopeError("'control' names the matched control runs; give the alignment another name.")
    if control:
        ref = _row_kind(control)
        for name, path in alignments.items():
            if _row_kind(path) != ref:
                raise NeuronscopeError(
                    f"The control data is not built like '{name}' (rows {ref} vs {_row_kind(path)}); a matched "
                    "control needs the same construction, e.g. `data select --mode frame -e neutral` for frame rows.")


def sweep_plan(subject: Any, alignments: Mapping[str, str | Path], *, sets: Sequence[str] = DEFAULT_SETS,
               seeds: Sequence[int] = (0, 1), control: str | Path | None = None) -> list[SweepRun]:
    """The runs of a sweep: every alignment x layer set x seed, and a matched control for every layer set x seed.

    Ordered seed by seed, then layer set by layer set, each set's aligned runs followed by its control: a sweep cut
    short has finished whole (aligned runs, matched control) groups, so `--seeds 0` analyses it."""
    known = layer_sets(subject.n_layers)
    bad = [s for s in sets if s not in known]
    if bad:
        raise NeuronscopeError(f"Unknown layer set(s) {', '.join(bad)}; use {', '.join(SETS)}.")
    check_data(alignments, control)
    groups = list(alignments.items()) + ([(CONTROL, control)] if control else [])
    return [SweepRun(f"{name}-{s}-s{seed}", name, str(Path(path).resolve()), s, known[s], int(seed), name == CONTROL)
            for seed in seeds for s in sets for name, path in groups]


def run_status(run_dir: Path) -> str:
    """'new', 'done', 'stopped early', or 'partial' (a run that can be resumed)."""
    f = run_dir / RUN
    if not f.is_file():
        return "new"
    st = read_json(f).get("status", "partial")
    return st if st in ("done", "stopped early") else "partial"


def finished(status: str) -> bool:
    return status in ("done", "stopped early")


def _merge_state(out: Path, plan: Sequence[SweepRun], base: dict[str, Any]) -> dict[str, SweepRun]:
    """The plan's runs with what sweep.json already knows about them; a changed sweep is refused."""
    state_file = out / SWEEP
    kept: dict[str, SweepRun] = {}
    if state_file.is_file():
        old = read_json(state_file)
        for key in ("fingerprint", "width", "depth", "train", "eval"):
            if old.get(key) != base[key]:
                raise NeuronscopeError(f"'{out}' holds a sweep with other {key} settings ({old.get(key)!r}); use "
                                       "the same options or a new folder.")
        kept = {p["name"]: SweepRun.from_dict(p) for p in old.get("plan", [])}
    for p in plan:       # a grid may grow (more seeds, sets, alignments); a run may not change
        q = kept.get(p.name)
        if q is not None and (q.data, q.layers, q.seed) != (p.data, p.layers, p.seed):
            raise NeuronscopeError(f"Run '{p.name}' in '{out}' was planned with other data or layers; use a new "
                                   "folder.")
    runs = {}
    for p in plan:
        r = kept.get(p.name, p)
        r.status = run_status(out / "runs" / p.name)
        if finished(r.status) and r.seconds is None:       # trained by another process of a parallel sweep
            _training_facts(out / "runs" / p.name, r)
        if r.judged is None and not r.control and finished(r.status):
            r.judged = saved_verdict(out / "runs" / p.name)
        runs[p.name] = r
    return runs


def _training_facts(run_dir: Path, r: SweepRun) -> None:
    """A finished run's training time and best validation loss, from its run.json."""
    try:
        info = read_json(run_dir / RUN)
        r.seconds, r.best_val, r.best_step = info.get("seconds"), info.get("best_val"), info.get("best_step")
    except (OSError, ValueError, AttributeError):
        pass


def saved_verdict(run_dir: Path) -> Judged | None:
    """The verdict a finished run's judged.json holds when it was judged after the final IRM was written, else None.
    sweep.json is then a summary the run folders can rebuild: sweeps over disjoint parts of a grid (e.g. one
    process a seed, `--seeds 0` and `--seeds 1` into one folder) come together in one call over the whole grid."""
    judged, irm = run_dir / "judged.json", run_dir / WEIGHTS
    if not (judged.is_file() and irm.is_file()) or judged.stat().st_mtime < irm.stat().st_mtime:
        return None
    try:
        return summarize_verdict(read_json(judged))
    except (KeyError, TypeError, ValueError, OSError):
        return None


# ---- training and judging -------------------------------------------------------------------------------------------
@dataclass
class EvalSettings:
    """How each aligned run is judged (recorded in sweep.json; a sweep keeps them)."""
    scale: float = 0.7
    limit: int = 40
    max_new_tokens: int = 48
    facts: bool = True


def train_one(subject: Any, r: SweepRun, run_dir: Path, cfg: TrainConfig, width: int, depth: int,
              progress: bool) -> None:
    """Train (or resume) one run of the grid and record its figures."""
    resume = (run_dir / RUN).is_file()
    t0 = time.perf_counter()
    c = TrainConfig(**dict(asdict(cfg), seed=r.seed))
    res = train_irm(subject, r.data, run_dir, inject_layers=r.layers, width=width, depth=depth, config=c,
                    resume=resume, progress=progress, alignment=r.alignment)
    r.status, r.best_val, r.best_step = run_status(run_dir), res.best_val, res.best_step
    r.seconds, r.wall_seconds, r.resumed = res.seconds, time.perf_counter() - t0, resume


def judge_one(subject: Any, r: SweepRun, run_dir: Path, questions: Sequence[str], ev: EvalSettings,
              progress: bool, frozen: FrozenAnswers | None = None) -> Judged:
    """Judge a trained aligned run as `irm eval --judge builtin` does (saved as RUN/judged.json)."""
    from .evaluation import drop_training_prompts, judge_irm
    from .factual import FACTS
    from .judge import Judge
    judge = Judge()
    if r.alignment not in judge.emotions:
        return Judged(None, f"the judge knows no emotion '{r.alignment}' (it knows {', '.join(judge.emotions)})",
                      None, scale=ev.scale)
    irm, run = load_run(run_dir, device=subject.device)
    qs, _ = drop_training_prompts(run, run_dir, list(questions))
    if len(qs) < 2:
        return Judged(None, "fewer than two held-out questions", r.alignment, scale=ev.scale)
    rep = judge_irm(subject, irm, qs[:ev.limit], judge=judge, target=r.alignment, chat=run["train"].get("chat", False),
                    max_new_tokens=ev.max_new_tokens, scale=ev.scale, progress=progress,
                    facts=FACTS if ev.facts else None, frozen=frozen).to_json()
    write_json(run_dir / "judged.json", rep)
    return summarize_verdict(rep)


def summarize_verdict(rep: Mapping[str, Any]) -> Judged:
    """The figures of a judged.json that decide and explain a run's verdict."""
    v = rep["verdict"]
    fact = rep.get("factual") or {}
    failed = [k for k, ok in (("target not doubled", v["target_doubles"]),
                              ("target not significant", v["target_significant"]),
                              ("opposite up", v.get("opposite_not_up", True)),
                              ("repetition over 1.5x", v["repetition_ok"])) if not ok]
    return Judged(bool(v["passed"]), "passed" if v["passed"] else "; ".join(failed), rep["target"],
                  v["target_ratio"], v["target_p"], v.get("opposite_diff"), v["repetition_ratio"],
                  fact.get("accuracy_off"), fact.get("accuracy_on"), rep["openings"]["on"]["share"], rep["scale"])


def excluded_sentence(r: SweepRun) -> str:
    """Why an aligned run is left out of the analysis, with its figures."""
    j = r.judged
    if j is None or j.passed is None:
        return f"{r.name} is not analysed: it could not be judged ({j.reason if j else 'not trained'})."
    return (f"{r.name} is not analysed: it failed its judge at scale {j.scale:g} ({j.reason}; {j.target} "
            f"x{_num(j.target_ratio)}, p {_num(j.target_p)}, repetition x{_num(j.repetition_ratio)}).")


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


# ---- the sweep ------------------------------------------------------------------------------------------------------
def run_sweep(subject: Any, plan: Sequence[SweepRun], out_dir: str | Path, *, questions: Sequence[str],
              config: TrainConfig | None = None, width: int = 256, depth: int = 1,
              evaluation: EvalSettings | None = None, analyze: bool = True,
              analysis_kwargs: dict[str, Any] | None = None, progress: bool = True) -> SweepResult:
    """Train every run of `plan` not yet finished (resuming partial ones), judge every aligned run not yet judged,
    then analyse the runs that pass with their matched controls."""
    cfg = (config or TrainConfig()).validate()
    ev = evaluation or EvalSettings()
    out = Path(out_dir)
    base = {"model": subject.name, "fingerprint": subject.fingerprint, "train": asdict(cfg), "width": width,
            "depth": depth, "eval": asdict(ev)}
    runs = _merge_state(out, plan, base)

    def save() -> None:
        write_json(out / SWEEP, dict(base, plan=[asdict(r) for r in runs.values()]))
    save()
    from tqdm.auto import tqdm
    from .generation import FrozenAnswers
    frozen = FrozenAnswers()       # the IRM-off answers are the same for every run: decoded once
    for r in tqdm([runs[p.name] for p in plan], desc="sweep runs", disable=not progress, dynamic_ncols=True):
        run_dir = out / "runs" / r.name
        if not finished(r.status):
            train_one(subject, r, run_dir, cfg, width, depth, progress)
            r.judged = None
            save()
        if not r.control and r.judged is None:
            r.judged = judge_one(subject, r, run_dir, questions, ev, progress, frozen)
            save()
    result = grid_result(out, [runs[p.name] for p in plan])
    if analyze:
        analyse_grid(subject, out, result, analysis_kwargs or {}, ev, progress)
    return result


def grid_result(out: Path, plan: Sequence[SweepRun]) -> SweepResult:
    """Which aligned runs pass (and are analysed) and which do not (listed with their figures)."""
    aligned = [r for r in plan if not r.control]
    passed = [r.name for r in aligned if r.judged is not None and r.judged.passed]
    excluded = [{"name": r.name, "sentence": excluded_sentence(r)} for r in aligned if r.name not in passed]
    return SweepResult(str(out), list(plan), passed, excluded)


def analyse_grid(subject: Any, out: Path, result: SweepResult, kwargs: dict[str, Any], ev: EvalSettings,
                 progress: bool) -> None:
    """analyze_runs over the passing runs and all controls, with the (aligned, matched control) pairs."""
    from .analysis import analyze_runs
    runs = {r.name: r for r in result.runs}
    controls = [r for r in result.runs if r.control]
    pairs = []
    for name in result.analysed:
        r = runs[name]
        c = next((c for c in controls if c.set == r.set and c.seed == r.seed), None)
        if c is not None:
            pairs.append(Pair(r.name, c.name, r.alignment, r.set, r.seed))
    note = (f"Every aligned run was judged like `irm eval --judge builtin` at scale {ev.scale:g} on at most "
            f"{ev.limit} held-out questions; only runs that passed are analysed ({len(result.analysed)} of "
            f"{len([r for r in result.runs if not r.control])}).")
    judged = [dict(name=r.name, train_seconds=r.seconds, **asdict(r.judged)) for r in result.runs
              if not r.control and r.judged is not None]
    secs = sorted(r.seconds for r in result.runs if r.seconds is not None)
    if secs:
        note += (f" Training: {len(secs)} runs, {sum(secs) / 60:.0f} min in all (median {secs[len(secs) // 2]:.0f} s "
                 "a run).")
    sweep_info = {"note": note, "judged": judged, "excluded": result.excluded}
    if not result.analysed:
        text = "\n".join(["# IRM sweep", "", "No aligned run passed its judge; nothing is analysed.", ""]
                         + [f"- {x['sentence']}" for x in result.excluded])
        write_text(out / "report" / "report.md", text + "\n")
        result.findings = [x["sentence"] for x in result.excluded] + ["No aligned run passed its judge; nothing "
                                                                      "is analysed."]
        return
    result.analysis = analyze_runs([out / "runs" / n for n in result.analysed], out / "report", subject=subject,
                                   controls=[out / "runs" / c.name for c in controls], progress=progress,
                                   pairs=pairs, skip_degenerate=True, sweep=sweep_info, **kwargs)
    result.findings = list(result.analysis.findings)


__all__ = ["layer_sets", "sweep_plan", "run_sweep", "run_status", "SETS", "DEFAULT_SETS", "SweepRun", "Judged",
           "SweepResult", "EvalSettings", "summarize_verdict", "excluded_sentence", "check_data"]
