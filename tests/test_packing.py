"""Packed forwards (server/packing.py): several sequences' steps, each over its own KV cache and with its own
interventions, in one forward give each sequence what its own forward gives (logits, captures, keys and values,
gradients), on the real stories260k and on tiny random models of every family; `FairLock.run` packs the steps of
threads that wait at the same time, and their answers equal one-by-one greedy decoding."""
from __future__ import annotations

import threading

import pytest
import torch

from neuronscope.interventions import AddToResidual, Capture, Clamp, ResidualFunction
from neuronscope.server.decoding import FairLock, decode
from neuronscope.server.packing import Step, new_cache, packs, plain_cache, run_one, run_packed
from tests.tiny import FAMILIES, tiny_subject


def _edits(subject, g):
    ivs = [Clamp(1, [5, 17], positions=list(range(3, 11)), value=4.0),
           Clamp(0, [1, 2], positions="generated", value=-3.0)]
    if subject.has_mid_site:
        ivs.append(AddToResidual(layers=[1], vector=torch.randn(subject.hidden_size, generator=g), site="resid.mid",
                                 scale=3.0))
    return ivs


def _steps(subject, pasts, news, ivss, capture=True):
    """One Step per sequence: its cache filled with its past (one forward of its own), its new tokens after it."""
    out = []
    for past, new, ivs in zip(pasts, news, ivss):
        c = new_cache(subject)
        P = past.numel() + 2
        if past.numel():
            run_one(subject, Step(c, past, ivs, prompt_len=P, logits="none"))
        out.append(Step(c, new, ivs, prompt_len=P, capture=Capture() if capture else None, logits="all"))
    return out


def _check_packed_equals_separate(subject, tol=1e-4):
    g = torch.Generator().manual_seed(3)
    V = int(subject.model.get_output_embeddings().weight.shape[0])
    pasts = [torch.randint(0, V, (n,), generator=g) for n in (12, 0, 9, 5)]
    news = [torch.randint(0, V, (n,), generator=g) for n in (1, 6, 4, 1)]
    ivss = [_edits(subject, g), [], _edits(subject, g)[1:], []]
    solo = [run_one(subject, st) for st in _steps(subject, pasts, news, ivss)]
    packed = _steps(subject, pasts, news, ivss)
    run_packed(subject, packed)
    for a, b in zip(solo, packed):
        torch.testing.assert_close(b.out, a.out, rtol=tol, atol=tol)
        torch.testing.assert_close(b.captured.activations, a.captured.activations, rtol=tol, atol=tol)
        assert b.cache.get_seq_length() == a.cache.get_seq_length()
        for x, y in zip(a.cache.layers, b.cache.layers):
            torch.testing.assert_close(y.keys, x.keys, rtol=tol, atol=tol)
            torch.testing.assert_close(y.values, x.values, rtol=tol, atol=tol)
    # the edits matter: without them sequence 0 (and 2) would give other logits, so each kept its own edits only
    bare = [run_one(subject, st) for st in _steps(subject, pasts, news, [[], [], [], []])]
    assert not torch.allclose(bare[0].out, solo[0].out, atol=1e-3)
    torch.testing.assert_close(bare[1].out, packed[1].out, rtol=tol, atol=tol)


def test_packed_steps_equal_separate_forwards_on_stories(stories):
    assert packs(stories)
    _check_packed_equals_separate(stories)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_packs_exactly_or_not_at_all(family):
    subject = tiny_subject(family)
    ok = packs(subject)
    if not plain_cache(new_cache(subject)):
        assert not ok  # sliding-window layers: a 4D mask over whole pasts would be wrong
        return
    assert ok, family
    _check_packed_equals_separate(subject)


def test_a_step_that_keeps_its_graph_gets_its_own_gradient_in_a_pack(stories):
    g = torch.Generator().manual_seed(5)
    V = stories.config.vocab_size
    pasts = [torch.randint(0, V, (n,), generator=g) for n in (10, 7)]
    news = [torch.randint(0, V, (n,), generator=g) for n in (5, 1)]

    def grads(pack: bool):
        steps = _steps(stories, pasts, news, [[], []], capture=False)
        steps[0].capture, steps[0].grad, steps[0].logits = Capture(grad=True), True, "last"
        if pack:
            run_packed(stories, steps)
        else:
            for st in steps:
                run_one(stories, st)
        p = torch.softmax(steps[0].out[-1], -1)[7]
        leaves = steps[0].captured.leaves()
        got = torch.autograd.grad(p, leaves)
        assert not steps[1].out.requires_grad and not steps[1].cache.layers[0].keys.requires_grad
        return torch.stack(got), steps[1].out

    (g1, o1), (g2, o2) = grads(False), grads(True)
    assert float(g1.abs().max()) > 0
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(o2, o1, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("slots", [1, 2, 4])
def test_concurrent_answers_share_forwards_and_equal_one_by_one_decoding(stories, slots):
    """One slot: the threads' steps run in packed forwards; four: each thread runs its own forwards at once, its
    hooks scoped to its thread (the clamp of answer 1 reaches no other answer); two: both at once."""
    lock = FairLock(slots=slots)
    prompts = [stories.encode(t)[0].tolist() for t in ("Once upon a time", "The little dog", "Tom and Sue went",
                                                       "One day, a bird")]
    edits = [[], [Clamp(2, [3, 9], positions="generated", value=2.0)], [], []]
    want = [decode(stories, p, interventions=e, lock=FairLock(), max_new_tokens=30, temperature=0.0, seed=None,
                   eos=set(), on_token=lambda t: None) for p, e in zip(prompts, edits)]
    assert want[1] != decode(stories, prompts[1], interventions=[], lock=FairLock(), max_new_tokens=30,
                             temperature=0.0, seed=None, eos=set(), on_token=lambda t: None)
    got: list = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def go(i):
        start.wait()
        got[i] = decode(stories, prompts[i], interventions=edits[i], lock=lock, max_new_tokens=30, temperature=0.0,
                        seed=None, eos=set(), on_token=lambda t: None, chunk=2, idle_chunk=2)
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    if slots == 1:
        assert lock.packed > 0  # the threads' steps ran in shared forwards
    assert lock.step_s is not None


def test_a_failing_step_fails_alone(stories):
    """A step whose intervention raises in the forward gets its error; the step packed with it still gets its
    result (the pack falls back to one forward each)."""
    class Boom(RuntimeError):
        pass

    def boom(layer, x, ctx):
        raise Boom("bad")
    lock = FairLock(slots=1)
    V = stories.config.vocab_size
    ids = torch.randint(0, V, (8,))
    ok = Step(new_cache(stories), ids, prompt_len=8)
    bad = Step(new_cache(stories), ids, [ResidualFunction(layers=[1], site="resid.post", fn=boom)], prompt_len=8)
    lock.acquire()  # hold the lock so that both steps queue, then let them run as one pack
    errors: list = []

    def run(st):
        try:
            lock.run(stories, st)
        except Boom as e:
            errors.append(e)
    threads = [threading.Thread(target=run, args=(st,)) for st in (ok, bad)]
    for t in threads:
        t.start()
    while len(lock._queue) < 2:
        threading.Event().wait(0.005)
    lock.release()
    for t in threads:
        t.join()
    assert len(errors) == 1 and bad.out is None
    ref = run_one(stories, Step(new_cache(stories), ids, prompt_len=8))
    torch.testing.assert_close(ok.out, ref.out)


def test_fair_lock_rejects_a_bad_stall_budget():
    from neuronscope.errors import NeuronscopeError
    for bad in (0, -1, float("nan"), float("inf"), True, "1"):
        with pytest.raises(NeuronscopeError, match="stall_steps"):
            FairLock(stall_steps=bad)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(NeuronscopeError, match="slots"):
            FairLock(slots=bad)


def test_interventions_act_only_on_their_own_thread(stories):
    """A context opened in one thread leaves another thread's forward, run at the same time, untouched."""
    from neuronscope.interventions import intervene
    ids = stories.encode("Once upon a time there was a girl")
    with torch.no_grad():
        ref = stories.model(input_ids=ids).logits
    inside, outside = threading.Event(), threading.Event()
    got = {}

    def other():
        inside.wait()
        with torch.no_grad():
            got["logits"] = stories.model(input_ids=ids).logits
        outside.set()
    t = threading.Thread(target=other)
    t.start()
    with intervene(stories, Clamp(1, list(range(20)), value=5.0), Capture()) as bound, torch.no_grad():
        inside.set()
        outside.wait()
        mine = stories.model(input_ids=ids).logits
    t.join()
    torch.testing.assert_close(got["logits"], ref)
    assert not torch.allclose(mine, ref, atol=1e-3)
    assert bound[1].activations.shape[2] == ids.shape[1]  # one forward captured: its own
