"""`irm sweep` on stories260k: the scaled layer sets, a grid killed with SIGKILL mid-way resumes (finished runs are
kept as they are, the rest finish), and the cross-run report comes with its nulls."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

from neuronscope.irm.sweep import layer_sets
from tests.conftest import REPO, STORIES
from tests.test_irm import _rows


def test_layer_sets_scale_the_papers_six():
    s32 = layer_sets(32)
    assert s32["q1"] == list(range(8)) and s32["q4"] == list(range(24, 32))
    assert s32["every4"] == list(range(0, 32, 4)) and s32["all"] == list(range(32))
    s30 = layer_sets(30)
    assert sum(len(s30[q]) for q in ("q1", "q2", "q3", "q4")) == 30 and len(s30["every4"]) == 8
    s5 = layer_sets(5)
    assert all(s5[k] for k in s5) and s5["all"] == list(range(5))


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_sweep_resumes_a_killed_grid(tmp_path):
    for name, word in (("happy", "happy"), ("sad", "sad"), ("ctrl", "the")):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in _rows(word, 80)) + "\n")
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "neuronscope", "irm", "sweep", "-m", str(STORIES),
           "-a", f"happy={tmp_path / 'happy.jsonl'}", "-a", f"sad={tmp_path / 'sad.jsonl'}",
           "--control", str(tmp_path / "ctrl.jsonl"), "--sets", "q1,all", "--seeds", "0", "--no-chat",
           "--width", "16", "--steps", "8", "--eval-every", "4", "--batch-size", "4", "-n", "4", "-o", str(out)]
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
    assert len(plan) == 6 and any(r["status"] != "done" for r in plan)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads(state.read_text())["plan"]
    assert all(x["status"] == "done" for x in plan), plan
    assert _sha(first) == sha_first and first.stat().st_mtime_ns == mtime_first      # not retrained
    assert any(x.get("resumed") for x in plan) or len(done_before) >= 1
    a = json.loads((out / "report" / "analysis.json").read_text())
    assert len(a["runs"]) == 4 and len(a["controls"]) == 2 and a["findings"]
    assert any(t["null"].startswith("control") for x in a["runs"] for t in x["striation_tests"])
    assert "Findings" in (out / "report" / "report.md").read_text()
