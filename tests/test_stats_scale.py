"""Statistics that scale (issue 14): levels and their ranks, state sized by the question, crash-consistent
checkpoints (a kill at every write point, then resume), a real SIGINT to the CLI, and the memory estimate."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from neuronscope.errors import NeuronscopeError
from neuronscope.stats import checkpoint, compute_stats
from neuronscope.stats import compute as compute_mod
from neuronscope.stats.levels import LEVELS, Levels, divisors, fmt_level, normalise, parse_levels, ranks_needed

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEURONSCOPE_SHARED", REPO.parent / "shared"))
TINY = SHARED / "corpora" / "tinystories-sample" / "tinystories_sample.txt"
WINDOW, E = 32, 8
OPTS = dict(window=WINDOW, n_exemplars=E, batch=8, tokens=2048, progress=False)
ARRAYS = ("quantiles", "count", "mean", "var", "ex_pos_value", "ex_pos_index", "ex_neg_value", "ex_neg_index")


def same(a, b) -> None:
    for name in ARRAYS:
        assert torch.equal(a._a[name], b._a[name]), name
    assert a.tokens == b.tokens


# ---- levels ---------------------------------------------------------------------------------------------------
def test_levels_ranks_marks_and_normalisation_levels():
    lv = Levels(LEVELS, 100_000, k=10)
    lo = [lv.get(p) for p in (1e-7, 1e-6, 1e-5, 1e-4)]
    assert [x.rank for x in lo] == [1, 1, 1, 10]
    assert [x.resolved for x in lo] == [False, False, True, True]   # 1e-5 * 1e5 = 1: exactly resolved
    assert lo[0].effective == pytest.approx(1e-5) and "sample extreme" in lo[0].mark and lo[2].mark == ""
    assert lv.norm_levels() == (1 - 1e-5, 1e-5) and lv.strong_levels() == (1 - 1e-5, 1e-5)
    small = Levels(LEVELS, 20_000, k=2)
    assert small.norm_levels() == (1 - 1e-4, 1e-4)        # 1e-5 is only the sample extreme over 20K tokens
    assert set(small.unresolved()) == {1e-7, 1e-6, 1e-5, 1 - 1e-5, 1 - 1e-6, 1 - 1e-7}
    assert Levels(LEVELS, 3 * 10**8).norm_levels() == (1 - 1e-5, 1e-5)
    assert Levels(LEVELS, 3 * 10**8).strong_levels() == (1 - 1e-7, 1e-7)
    assert Levels(LEVELS, 10**6, k=5).get(1e-4).mark.startswith("not stored")       # rank 100 > K
    assert ranks_needed(LEVELS, 20_000) == 2 and ranks_needed(LEVELS, 3 * 10**8) == 30_000
    assert ranks_needed((1e-7, 1e-5), 3 * 10**8) == 3000
    assert fmt_level(1 - 1e-7) == "1-1e-07" and fmt_level(1e-5) == "1e-05"
    assert parse_levels("0.99,1e-3") == (1e-3, 0.99)
    with pytest.raises(NeuronscopeError, match="strictly between"):
        parse_levels("0,0.5")
    hi, lo_ = divisors(torch.tensor([2.0, float("nan")]), torch.tensor([-4.0, 1.0]))
    z = normalise(torch.tensor([1.0, -1.0]), hi, lo_)
    assert z[0] == 0.5 and z[1] < -1e9            # a tail that never goes below zero: any negative value fires


# ---- sized state ----------------------------------------------------------------------------------------------
def test_sized_state_equals_k_10000(stories, tmp_path):
    """K sized by the levels (here ceil(0.01 n) = 21) gives the quantiles and exemplars that K = 10,000 gives."""
    levels = (1e-3, 0.01, 0.99, 0.999)
    sized = compute_stats(stories, TINY, tmp_path / "sized", levels=levels, **OPTS)
    big = compute_stats(stories, TINY, tmp_path / "big", levels=levels, k=10_000, **OPTS)
    assert sized.info["k"] == 21 == ranks_needed(levels, 2048) and sized.info["plan"]["k_sized"]
    assert big.info["k"] == 10_000
    same(sized, big)
    assert not torch.isnan(sized._a["quantiles"]).any()
    assert sized.info["plan"]["state_bytes"] * 20 < big.info["plan"]["state_bytes"]
    assert not (tmp_path / "sized" / "stats_extremes.safetensors").exists()       # no --keep-extremes
    with pytest.raises(NeuronscopeError, match="--keep-extremes"):
        sized.extremes(0)
    ranks = {x["level"]: x for x in sized.info["level_ranks"]}
    assert ranks[0.01]["rank"] == 21 and ranks[0.01]["resolved"] and ranks[1e-3]["resolved"]


def test_a_run_that_cannot_fit_is_refused(stories, tmp_path, monkeypatch):
    from neuronscope.stats import plan
    monkeypatch.setattr(plan, "available_memory", lambda: 1 << 20)
    with pytest.raises(NeuronscopeError, match=r"more memory .*\(--tokens\).*--levels"):
        compute_stats(stories, TINY, tmp_path / "x", **OPTS)


# ---- crash-consistent checkpoints ---------------------------------------------------------------------------
class Killed(BaseException):
    """A simulated kill: nothing after the raise point runs (and no cleanup of the temporary file)."""


@pytest.fixture(scope="module")
def reference(stories, tmp_path_factory):
    return compute_stats(stories, TINY, tmp_path_factory.mktemp("ref"), **OPTS)


@pytest.mark.parametrize("point", ["temp", "synced", "renamed"])
def test_a_kill_between_checkpoint_writes_then_resume_equals_an_uninterrupted_run(stories, reference, tmp_path,
                                                                                  monkeypatch, point):
    calls = {"n": 0}

    def kill(name):
        if name == point:
            calls["n"] += 1
            if calls["n"] == 3:       # the third checkpoint, after batch 3
                raise Killed

    folder = tmp_path / point
    monkeypatch.setattr(checkpoint, "_point", kill)
    with pytest.raises(Killed):
        compute_stats(stories, TINY, folder, checkpoint_tokens=0, **OPTS)
    monkeypatch.setattr(checkpoint, "_point", lambda name: None)
    if point in ("temp", "synced"):
        assert list(folder.glob(".*.tmp"))                    # the torn write's temporary file is still there
        assert checkpoint.load(folder)[1]["batches"] == 2      # the previous checkpoint stands
    else:
        assert checkpoint.load(folder)[1]["batches"] == 3
    seen = []
    monkeypatch.setattr(compute_mod, "_after_batch", seen.append)
    resumed = compute_stats(stories, TINY, folder, checkpoint_tokens=0, **OPTS)
    assert seen[0] == (3 if point != "renamed" else 4)        # finished batches are not folded twice
    same(resumed, reference)
    assert resumed.info["tokens"] == reference.info["tokens"] == 2048
    assert not checkpoint.exists(folder) and not list(folder.glob(".*.tmp"))


@pytest.mark.parametrize("point", ["windows", "arrays", "manifest"])
def test_a_kill_between_the_result_writes_then_rerun_equals_an_uninterrupted_run(stories, reference, tmp_path,
                                                                                 monkeypatch, point):
    def kill(name):
        if name == point:
            raise Killed

    folder = tmp_path / point
    monkeypatch.setattr(compute_mod, "_after_write", kill)
    with pytest.raises(Killed):
        compute_stats(stories, TINY, folder, checkpoint_tokens=1024, **OPTS)
    monkeypatch.setattr(compute_mod, "_after_write", lambda name: None)
    assert checkpoint.exists(folder)
    same(compute_stats(stories, TINY, folder, checkpoint_tokens=1024, **OPTS), reference)


def test_a_damaged_checkpoint_is_refused_with_a_sentence(stories, tmp_path, monkeypatch):
    folder = tmp_path / "bad"

    def stop(batch_no):
        if batch_no == 2:
            raise Killed

    monkeypatch.setattr(compute_mod, "_after_batch", stop)
    with pytest.raises(Killed):
        compute_stats(stories, TINY, folder, checkpoint_tokens=0, **OPTS)
    monkeypatch.setattr(compute_mod, "_after_batch", lambda b: None)
    path = checkpoint.path_in(folder)
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[-100] ^= 0x01                                      # one bit of the state
    path.write_bytes(bytes(flipped))
    with pytest.raises(NeuronscopeError, match="damaged .*checksum.*--restart"):
        compute_stats(stories, TINY, folder, **OPTS)
    path.write_bytes(good[: len(good) // 2])                   # torn
    with pytest.raises(NeuronscopeError, match="damaged .*unreadable.*--restart"):
        compute_stats(stories, TINY, folder, **OPTS)
    path.unlink()
    (folder / ".stats-partial").mkdir()                        # the old two-file format
    with pytest.raises(NeuronscopeError, match="old two-file format"):
        compute_stats(stories, TINY, folder, **OPTS)
    done = compute_stats(stories, TINY, folder, restart=True, **OPTS)
    assert done.tokens == 2048 and not (folder / ".stats-partial").exists()


# ---- a real SIGINT --------------------------------------------------------------------------------------------
def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-c", "from neuronscope.cli import main; main()", *args]


def test_sigint_keeps_the_work_and_resume_equals_an_uninterrupted_run(stories, tmp_path):
    folder = tmp_path / "sigint"
    args = ["stats", str(SHARED / "models" / "stories260k"), "--corpus", str(TINY), "--atlas", str(folder),
            "--tokens", "16000", "--window", "32", "--batch", "2", "--exemplars", str(E)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(_cli(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    os.set_blocking(proc.stderr.fileno(), False)
    err = b""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:     # wait until the loop has folded a few batches
        time.sleep(0.2)
        err += proc.stderr.read() or b""
        if b"stats:" in err and b"k/16.0k" in err.split(b"stats:")[-1]:
            break
    assert proc.poll() is None, "the run ended before it could be interrupted: " + err.decode()[-500:]
    proc.send_signal(signal.SIGINT)
    out, rest = proc.communicate(timeout=300)
    err = (err + rest).decode()
    assert proc.returncode == 130, err[-1000:]
    assert "Run the same command again to resume" in err and "SIGINT" in err
    saved = checkpoint.load(folder)[1]
    assert 0 < saved["tokens"] < 16000
    second = subprocess.run(_cli(args), capture_output=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr.decode()[-1000:]
    assert f"resuming from {saved['tokens']:,} tokens" in second.stderr.decode()
    resumed = __import__("neuronscope.stats", fromlist=["NeuronStats"]).NeuronStats.open(folder)
    full = compute_stats(stories, TINY, tmp_path / "full", tokens=16000, window=32, batch=2, n_exemplars=E,
                         progress=False)
    same(resumed, full)


# ---- the memory estimate --------------------------------------------------------------------------------------
def test_the_planned_memory_is_within_25_percent_of_the_measured_peak(smollm, tmp_path):
    """A real run on SmolLM2-135M in its own process: the printed plan against its measured peak RSS."""
    folder = tmp_path / "smol"
    gguf = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    # the CLI restarts the process's peak-memory mark after the model's load, so the recorded peak is the run's own
    # whether or not this load de-quantised the GGUF first
    run = subprocess.run(_cli(["stats", str(gguf), "--corpus", str(SHARED / "corpora" / "wikitext-2-raw"
                                                                   / "wiki.valid.raw"),
                               "--atlas", str(folder), "--tokens", "3072"]),
                         capture_output=True, timeout=900,
                         # one torch thread, as every test worker runs (conftest): the plan counts no per-thread buffers
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr.decode()[-1000:]
    assert "plan: K = 1 extremes" in run.stderr.decode()
    info = json.loads((folder / "manifest.json").read_text())["stats"]
    planned, measured = info["plan"]["ram_bytes"], info["peak_rss_bytes"]
    assert abs(planned - measured) <= 0.25 * measured, (planned, measured)
    added = sum(p.stat().st_size for p in folder.iterdir() if p.name not in ("manifest.json", ".lock"))
    assert abs(info["plan"]["atlas_bytes"] - added) <= 0.25 * added, (info["plan"]["atlas_bytes"], added)


def test_the_recorded_peak_is_the_process_own_not_its_parent(tmp_path):
    """Linux carries a parent's resident size over fork+exec into the child's ru_maxrss: a `stats` run started from
    a 2.5 GB test worker once recorded 2.5 GB. `peak_rss` must give the child's own peak."""
    big = bytearray(600 << 20)
    big[::4096] = b"x" * len(range(0, len(big), 4096))          # touch every page: 600 MB resident in this process
    code = "from neuronscope.stats.compute import peak_rss; print(peak_rss())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    child = int(out.stdout)
    assert 0 < child < 400 << 20, child
    del big
