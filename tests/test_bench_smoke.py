"""Smoke test of bench/capture.py's own functions on stories260k (no peer library needed; they live in .venv-bench)."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from conftest import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_capture", REPO / "bench" / "capture.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_capture"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def one_thread():
    """Like the benchmark itself: one torch thread (two run several times slower on a machine shared with others)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_interleaved_timing_calls_each_variant_every_round(bench):
    calls = {"a": 0, "b": 0}

    def bump(k):
        calls[k] += 1
    times = bench.time_interleaved({"a": lambda: bump("a"), "b": lambda: bump("b")}, repeats=4, warmup=2)
    assert calls == {"a": 6, "b": 6}
    assert len(times["a"]) == len(times["b"]) == 4


def test_short_measurements_get_more_rounds(bench):
    times = bench.time_interleaved({"a": lambda: None, "b": lambda: None}, repeats=3, min_seconds=5.0,
                                   max_repeats=40)
    assert len(times["a"]) == len(times["b"]) == 40    # a no-op round is far shorter than 5 s / 40


def test_summarize_ratios(bench):
    out = bench.summarize({"plain": [1.0, 2.0, 3.0], "x": [2.0, 2.0, 9.0]}, "plain")
    assert out["plain"]["ratio"] == 1.0
    assert out["x"]["median_ms"] == pytest.approx(2000.0)
    assert out["x"]["ratio"] == pytest.approx(1.0)           # median 2 / median 2
    assert out["x"]["paired_ratio"] == pytest.approx(2.0)    # median of 2, 1, 3


def test_check_same_tells_equal_from_different(bench):
    a = torch.randn(2, 5, 7)
    assert bench.check_same(a.clone(), a)["same"]
    b = a.clone()
    b[0, 0, 0] += 1.0
    assert not bench.check_same(b, a)["same"]
    assert not bench.check_same(a[:, :4], a)["same"]


def test_our_capture_is_the_down_proj_input(bench, stories, one_thread):
    ids = bench.make_inputs(stories, 2, 12)
    assert ids.shape == (2, 12)
    seen = {}
    layer = 3
    mod = stories.model.model.layers[layer].mlp.down_proj
    h = mod.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach().clone()))
    try:
        with torch.inference_mode():
            got = bench.Ours(stories).capture(ids)
    finally:
        h.remove()
    assert len(got) == stories.n_layers
    assert torch.equal(got[layer], seen["x"])
    assert bench.capture_bytes(got) == 4 * 2 * 12 * stories.n_layers * stories.n_neurons


def test_forward_row_without_peers(bench, stories, one_thread):
    with torch.inference_mode():
        row = bench.bench_forward(stories, {}, (1, 16), repeats=2)
    assert row["shape"] == "1x16" and set(row["results"]) == {"plain", "neuronscope", "neuronscope[open]"}
    assert row["bytes_per_token_neuron"]["neuronscope"] == 4.0
    assert row["results"]["neuronscope"]["ratio"] > 0
    assert not stories.model.model.layers[0].mlp.down_proj._forward_pre_hooks    # the open context was closed


def test_generate_row_makes_exactly_n_tokens_and_the_clamp_bites(bench, stories, one_thread):
    with torch.inference_mode():
        row = bench.bench_generate(stories, {}, prompt_len=16, new_tokens=6, repeats=1)
    assert row["checks"]["ours_tokens"] == 6
    assert row["checks"]["clamp_changes_output"] is True
    assert {"plain", "neuronscope", "neuronscope[generated]"} == set(row["results"])


def test_a_peer_that_fails_is_skipped_with_a_reason(bench, stories, monkeypatch):
    class Broken:
        def __init__(self, subject):
            raise ImportError("No module named 'nothere'")
    monkeypatch.setitem(bench.PEER_CLASSES, "nnsight", Broken)
    notes = []
    peers = bench.load_peers(stories, ["nnsight"], log=notes.append)
    assert peers == {}
    assert notes and "nnsight" in notes[0] and "nothere" in notes[0]


def test_bad_options_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--shapes", "1by16"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeats", "0"])
    args = bench.parse_args(["--shapes", "2x8", "--gen-prompts", "8"])
    assert args.shapes == [(2, 8)] and args.gen_prompts == [8]
