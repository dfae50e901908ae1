"""The paper's sweep: IRMs trained over a grid of layer sets x alignments x seeds as resumable runs, plus control
runs (the same training on control data), then one cross-run analysis (irm.analysis, with its nulls).

    plan = sweep_plan(subject, {"sadness": "sad.jsonl", "anger": "anger.jsonl"}, sets=["q1", "q3", "all"],
                      seeds=[0, 1], control="neutral.jsonl")
    result = run_sweep(subject, plan, "sweeps/smollm", config=TrainConfig(steps=40))

Layer sets (Smith et al. used 0-7, 8-15, 16-23, 24-31, every 4th and all of Llama-2-7B's 32 layers), scaled to the
model's depth: q1..q4 are the four quarters, `every4` is every (depth/8)-th layer (8 layers), `all` is every layer.
Each run lives in OUT/runs/<alignment>-<set>-s<seed>; OUT/sweep.json records the plan and each run's status after
every run (atomically). Running the same sweep again skips finished runs and resumes an interrupted one from its
last checkpoint, so a killed grid loses at most the steps since that run's last checkpoint; the grid may grow
(more seeds, sets or alignments) between calls, with the same training options.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from ..errors import NeuronscopeError
from ..store import read_json, write_json
from .training import RUN, TrainConfig, train_irm

SWEEP = "sweep.json"
SETS = ("q1", "q2", "q3", "q4", "every4", "all")


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


def sweep_plan(subject, alignments: dict[str, str | Path], *, sets: Sequence[str] = SETS,
               seeds: Sequence[int] = (0, 1), control: str | Path | None = None,
               control_seeds: Sequence[int] = (0,)) -> list[dict[str, Any]]:
    """The runs of a sweep: every alignment x layer set x seed, and the control data x layer set x control seed."""
    if not alignments:
        raise NeuronscopeError("Give at least one alignment data file.")
    known = layer_sets(subject.n_layers)
    bad = [s for s in sets if s not in known]
    if bad:
        raise NeuronscopeError(f"Unknown layer set(s) {', '.join(bad)}; use {', '.join(SETS)}.")
    for name, path in list(alignments.items()) + ([("control", control)] if control else []):
        if not Path(path).is_file():
            raise NeuronscopeError(f"No data file for '{name}' at '{path}'.")
    plan = []
    for name, path in alignments.items():
        for s in sets:
            for seed in seeds:
                plan.append({"name": f"{name}-{s}-s{seed}", "alignment": name, "data": str(Path(path).resolve()),
                             "set": s, "layers": known[s], "seed": int(seed), "control": False})
    if control:
        for s in sets:
            for seed in control_seeds:
                plan.append({"name": f"control-{s}-s{seed}", "alignment": "control",
                             "data": str(Path(control).resolve()), "set": s, "layers": known[s], "seed": int(seed),
                             "control": True})
    return plan


def run_status(run_dir: Path) -> str:
    """'new', 'done', 'stopped early', or 'partial' (a run that can be resumed)."""
    f = run_dir / RUN
    if not f.is_file():
        return "new"
    st = read_json(f).get("status", "partial")
    return st if st in ("done", "stopped early") else "partial"


def run_sweep(subject, plan: Sequence[dict[str, Any]], out_dir: str | Path, *, config: TrainConfig | None = None,
              width: int = 256, depth: int = 1, analyze: bool = True, analysis_kwargs: dict[str, Any] | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Train every run of `plan` not yet finished (resuming partial ones), then analyse them all together."""
    cfg = (config or TrainConfig()).validate()
    out = Path(out_dir)
    runs_dir = out / "runs"
    state_file = out / SWEEP
    base = {"model": subject.name, "fingerprint": subject.fingerprint, "train": asdict(cfg), "width": width,
            "depth": depth}
    kept: dict[str, dict[str, Any]] = {}
    if state_file.is_file():
        old = read_json(state_file)
        kept = {p["name"]: p for p in old.get("plan", [])}
        for key in ("fingerprint", "width", "depth"):
            if old.get(key) != base[key]:
                raise NeuronscopeError(f"'{out}' holds a sweep with a different {key} ({old.get(key)!r}); "
                                       "use a new folder.")
        if old.get("train", {}).get("steps") != base["train"]["steps"] or \
                old.get("train", {}).get("lr") != base["train"]["lr"]:
            raise NeuronscopeError(f"'{out}' holds a sweep trained with other steps or learning rate; use the same "
                                   "options or a new folder.")
        before = {p["name"]: p for p in old.get("plan", [])}
        for p in plan:       # a grid may grow (more seeds, sets, alignments); a run may not change
            q = before.get(p["name"])
            if q is not None and (q["data"], q["layers"], q["seed"]) != (p["data"], p["layers"], p["seed"]):
                raise NeuronscopeError(f"Run '{p['name']}' in '{out}' was planned with other data or layers; "
                                       "use a new folder.")
    records = {p["name"]: dict(kept.get(p["name"], {}), **p, status=run_status(runs_dir / p["name"])) for p in plan}

    def save() -> None:
        write_json(state_file, dict(base, plan=list(records.values())))
    save()
    from tqdm.auto import tqdm
    todo = [p for p in plan if records[p["name"]]["status"] not in ("done", "stopped early")]
    for p in tqdm(todo, desc="sweep runs", disable=not progress, dynamic_ncols=True):
        run_dir = runs_dir / p["name"]
        resume = (run_dir / RUN).is_file()
        t0 = time.perf_counter()
        c = TrainConfig(**dict(asdict(cfg), seed=p["seed"]))
        res = train_irm(subject, p["data"], run_dir, inject_layers=p["layers"], width=width, depth=depth, config=c,
                        resume=resume, progress=progress, alignment=p["alignment"])
        records[p["name"]].update(status=run_status(run_dir), best_val=res.best_val, best_step=res.best_step,
                                  seconds=res.seconds, wall_seconds=time.perf_counter() - t0, resumed=resume)
        save()
    result: dict[str, Any] = dict(base, plan=list(records.values()))
    if analyze:
        from .analysis import analyze_runs
        aligned = [runs_dir / p["name"] for p in plan if not p["control"]]
        ctrls = [runs_dir / p["name"] for p in plan if p["control"]]
        result["analysis"] = analyze_runs(aligned, out / "report", subject=subject, controls=ctrls,
                                          progress=progress, **(analysis_kwargs or {}))
    return result


__all__ = ["layer_sets", "sweep_plan", "run_sweep", "run_status", "SETS"]
