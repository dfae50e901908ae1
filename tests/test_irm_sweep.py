"""`irm sweep` on stories260k: the scaled layer sets; a grid killed with SIGKILL mid-way resumes (finished runs are
kept as they are, the rest finish); every aligned run is judged, a run that fails its judge is listed and left out
of the analysis, the runs that pass are compared with their matched controls; a degenerate run is refused."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from neuronscope.errors import NeuronscopeError
from neuronscope.irm.sweep import layer_sets
from tests.conftest import REPO, STORIES
from tests.test_irm import SENTS


def test_layer_sets_scale_the_papers_six():
    s32 = layer_sets(32)
    assert s32["q1"] == list(range(8)) and s32["q4"] == list(range(24, 32))
    assert s32["every4"] == list(range(0, 32, 4)) and s32["all"] == list(range(32))
    s30 = layer_sets(30)
    assert sum(len(s30[q]) for q in ("q1", "q2", "q3", "q4")) == 30 and len(s30["every4"]) == 8
    assert s30["q2"] == list(range(8, 15)) and s30["q4"] == list(range(22, 30))
    s5 = layer_sets(5)
    assert all(s5[k] for k in s5) and s5["all"] == list(range(5))


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _write(path, response, n=120):
    path.write_text("".join(json.dumps({"prompt": p, "response": response}) + "\n" for p in SENTS[:n]))


def test_sweep_resumes_judges_and_excludes_runs_that_fail(tmp_path):
    # sadness: rows that make every answer sad (passes its judge); joy: rows with no joy word at all (fails);
    # control: built the same way with neutral words in place of the emotional ones
    _write(tmp_path / "sad.jsonl", " sad and cried, sad and lonely.")
    _write(tmp_path / "joy.jsonl", " and then the bus went to town.")
    _write(tmp_path / "ctrl.jsonl", " and walked, and then stood there.")
    (tmp_path / "q.txt").write_text("\n".join(SENTS[200:212]) + "\n")
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "neuronscope", "irm", "sweep", "-m", str(STORIES),
           "-a", f"sadness={tmp_path / 'sad.jsonl'}", "-a", f"joy={tmp_path / 'joy.jsonl'}",
           "--control", str(tmp_path / "ctrl.jsonl"), "-q", str(tmp_path / "q.txt"), "--sets", "all",
           "--seeds", "0,1", "--width", "32", "--steps", "30", "--eval-every", "15", "--batch-size", "16",
           "--lr", "3e-3", "--judge-tokens", "12", "--limit", "12", "-n", "4", "-o", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), TOKENIZERS_PARALLELISM="false")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "sweep.json"
    t0 = time.time()
    done_before: list[str] = []
    while time.time() - t0 < 400 and p.poll() is None:
        if state.is_file():
            try:
                plan = json.loads(state.read_text())["plan"]
            except (ValueError, KeyError):
                plan = []
            done_before = [r["name"] for r in plan if r["status"] == "done"]
            if done_before:
                break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert done_before, "the first run never finished"
    first = out / "runs" / done_before[0] / "irm.safetensors"
    sha_first, mtime_first = _sha(first), first.stat().st_mtime_ns
    plan = json.loads(state.read_text())["plan"]
    assert len(plan) == 6 and any(r["status"] != "done" for r in plan)      # 2 x 1 x 2 aligned + 1 x 2 controls
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(state.read_text())
    plan = {x["name"]: x for x in s["plan"]}
    assert all(x["status"] in ("done", "stopped early") for x in plan.values()), plan
    assert _sha(first) == sha_first and first.stat().st_mtime_ns == mtime_first      # not retrained
    assert s["eval"]["scale"] == 0.7 and s["train"]["patience"] == 3                   # the recipe's dose and stop
    # every aligned run judged (judged.json like `irm eval`), controls not
    for name, x in plan.items():
        if x["control"]:
            assert x["judged"] is None and name.startswith("control-")
        else:
            assert x["judged"]["target"] == x["alignment"] and (out / "runs" / name / "judged.json").is_file()
    passed = sorted(n for n, x in plan.items() if not x["control"] and x["judged"]["passed"])
    failed = sorted(n for n, x in plan.items() if not x["control"] and not x["judged"]["passed"])
    assert all(n.startswith("sadness-") for n in passed) and len(passed) >= 2
    assert {n for n in failed if n.startswith("joy-")} == {"joy-all-s0", "joy-all-s1"}
    a = json.loads((out / "report" / "analysis.json").read_text())
    assert sorted(x["name"] for x in a["runs"]) == passed                       # only passing runs analysed
    assert sorted(x["name"] for x in a["sweep"]["excluded"]) == failed           # the others listed
    assert all("failed its judge" in x["sentence"] and "joy x" in x["sentence"]
               for x in a["sweep"]["excluded"] if x["name"].startswith("joy"))
    m = a["matched"]
    assert len(m["pairs"]) == len(passed) and [t["group"] for t in m["striation"]] == ["all"]
    assert all(p["control"] == p["aligned"].replace("sadness", "control") for p in m["pairs"])
    report = (out / "report" / "report.md").read_text()
    assert "Aligned runs against their matched controls" in report and "Runs judged by the sweep" in report
    assert "failed its judge" in report and "Layer set" in report
    # the same command again trains and judges nothing
    r2 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0 and "passed and were analysed" in r2.stdout
    s2 = json.loads(state.read_text())
    assert [x["judged"] for x in s2["plan"]] == [x["judged"] for x in s["plan"]]


def test_a_degenerate_run_is_refused(stories, tmp_path):
    from neuronscope.irm import IRM, TrainConfig, analyze_runs, train_irm
    rows = [{"prompt": p, "response": " sad and cried."} for p in SENTS[:60]]
    runs = []
    for name in ("good", "zero"):
        res = train_irm(stories, rows, tmp_path / name, inject_layers="1-3", width=16, progress=False,
                        config=TrainConfig(steps=10, batch_size=8, lr=3e-3, eval_every=10, patience=0))
        runs.append(tmp_path / name)
    IRM(res.irm.config).save(tmp_path / "zero")        # a fresh IRM: its last layer is zero, it writes nothing
    with pytest.raises(NeuronscopeError, match="'zero' is degenerate: its output is all zero"):
        analyze_runs(runs, tmp_path / "rep", subject=stories, max_new_tokens=4, n_random=2, n_permutations=20,
                     progress=False)
    r = analyze_runs(runs, tmp_path / "rep", subject=stories, max_new_tokens=4, n_random=2, n_permutations=20,
                     progress=False, skip_degenerate=True)
    assert [x.name for x in r.runs] == ["good"] and r.refused[0].name == "zero"
    assert "all zero" in r.findings[0] and "refused" in (tmp_path / "rep" / "report.md").read_text()


def test_plan_groups_each_set_with_its_matched_control_seed_by_seed(stories, tmp_path):
    from neuronscope.irm.sweep import sweep_plan
    for name in ("sad", "joy", "ctrl"):
        _write(tmp_path / f"{name}.jsonl", " and then the bus went to town.", n=4)
    plan = sweep_plan(stories, {"sadness": tmp_path / "sad.jsonl", "joy": tmp_path / "joy.jsonl"},
                      sets=["q1", "all"], seeds=[0, 1], control=tmp_path / "ctrl.jsonl")
    assert [r.name for r in plan[:6]] == ["sadness-q1-s0", "joy-q1-s0", "control-q1-s0",
                                         "sadness-all-s0", "joy-all-s0", "control-all-s0"]
    assert len(plan) == 12 and {r.seed for r in plan[6:]} == {1}


def test_frozen_answers_are_decoded_once_and_equal_a_fresh_decode(stories):
    from neuronscope.irm.generation import FrozenAnswers, generate_texts
    memo = FrozenAnswers()
    prompts = list(SENTS[:3])
    first = memo.texts(stories, prompts, max_new_tokens=6, temperature=0.0, seed=0, desc="a")
    calls = []
    stories_generate = stories.generate_ids
    try:
        stories.generate_ids = lambda *a, **k: calls.append(1) or stories_generate(*a, **k)
        again = memo.texts(stories, prompts, max_new_tokens=6, temperature=0.0, seed=0, desc="b", progress=False)
        other = memo.texts(stories, prompts, max_new_tokens=7, temperature=0.0, seed=0)
    finally:
        del stories.generate_ids
    assert again == first and len(calls) == 1 and len(other) == 3
    assert first == generate_texts(stories, prompts, irm=None, max_new_tokens=6, temperature=0.0, seed=0)


def test_a_run_folder_keeps_its_verdict_for_sweeps_of_parts_of_a_grid(stories, tmp_path):
    """sweep.json written by a process that ran another part of the grid lacks a run's verdict: the run's own
    judged.json gives it back, unless the IRM was written after it (a stale judgement)."""
    from neuronscope.irm.sweep import _merge_state, sweep_plan
    from neuronscope.store import write_json
    for name in ("sad", "ctrl"):
        _write(tmp_path / f"{name}.jsonl", " and then the bus went to town.", n=4)
    plan = sweep_plan(stories, {"sadness": tmp_path / "sad.jsonl"}, sets=["all"], seeds=[0],
                      control=tmp_path / "ctrl.jsonl")
    out = tmp_path / "sweep"
    run = out / "runs" / "sadness-all-s0"
    write_json(run / "run.json", {"status": "done", "seconds": 301.5, "best_val": 0.6, "best_step": 50})
    (run / "irm.safetensors").write_bytes(b"weights")
    verdict = {"target_doubles": True, "target_significant": True, "opposite_not_up": True, "repetition_ok": False,
               "passed": False, "target_ratio": 20.0, "target_p": 1e-4, "opposite_diff": 0.0,
               "repetition_ratio": 2.0}
    write_json(run / "judged.json", {"verdict": verdict, "target": "sadness", "scale": 0.7,
                                     "openings": {"on": {"share": 0.5}}, "factual": {"accuracy_off": 0.6,
                                                                                     "accuracy_on": 0.7}})
    t = time.time()
    os.utime(run / "irm.safetensors", (t - 10, t - 10))
    os.utime(run / "judged.json", (t, t))
    runs = _merge_state(out, plan, {})
    j = runs["sadness-all-s0"].judged
    assert j is not None and j.passed is False and j.reason == "repetition over 1.5x" and j.factual_on == 0.7
    assert (runs["sadness-all-s0"].seconds, runs["sadness-all-s0"].best_step) == (301.5, 50)   # from its run.json
    assert runs["control-all-s0"].judged is None and runs["control-all-s0"].status == "new"
    os.utime(run / "irm.safetensors", (t + 10, t + 10))       # retrained after that judgement: judged again
    again = sweep_plan(stories, {"sadness": tmp_path / "sad.jsonl"}, sets=["all"], seeds=[0],
                       control=tmp_path / "ctrl.jsonl")
    assert _merge_state(out, again, {})["sadness-all-s0"].judged is None
