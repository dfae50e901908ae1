"""Interventions are immutable specs: per-row edits in one batch equal separate runs, one spec serves two subjects
and two threads, and Capture(grad=True) honours its neurons/rows/dtype/to_cpu options."""
import dataclasses
import threading

import pytest
import torch

from neuronscope.errors import NeuronscopeError
from neuronscope.interventions import (Ablate, AddToResidual, Capture, Clamp, ResidualFunction, Scale, intervene)
from tiny import tiny_subject

PROMPT = "Once upon a time, there was a little dog named Max. He"


def _row_specs(s):
    """One different intervention set per row (row 3 gets none), as a dose sweep or concurrent sessions would."""
    v = torch.randn(s.hidden_size, generator=torch.Generator().manual_seed(0))
    return [
        [Clamp(layer=2, neurons=[5, 6], value=6.0)],
        [Scale(layer=1, neurons=[3, 4, 9], factor=-2.0, positions="generated"), Ablate(layer=4, neurons=[7])],
        [AddToResidual(layers=[3], vector=v, site="resid.mid", scale=3.0)],
        [],
    ]


def _with_rows(per_row):
    return [dataclasses.replace(iv, rows=[r]) for r, ivs in enumerate(per_row) for iv in ivs]


def test_per_row_forward_equals_separate_runs(stories):
    ids = stories.encode(PROMPT)
    per_row = _row_specs(stories)
    batch = ids.repeat(len(per_row), 1)
    with intervene(stories, *_with_rows(per_row), Capture(layers=[2, 4])) as bound:
        logits = stories.logits(batch)
    cap = bound[-1]
    for r, ivs in enumerate(per_row):
        with intervene(stories, *ivs, Capture(layers=[2, 4])) as alone:
            ref = stories.logits(ids)
        torch.testing.assert_close(logits[r:r + 1], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cap.activations[:, r:r + 1], alone[-1].activations, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[0], logits[3])  # the rows really differ


def test_per_row_generate_with_kv_cache_equals_separate_runs(stories):
    ids = stories.encode("Once upon a time")
    per_row = _row_specs(stories)
    with intervene(stories, *_with_rows(per_row)):
        together = stories.generate_ids(ids.repeat(len(per_row), 1), max_new_tokens=16)
    texts = set()
    for r, ivs in enumerate(per_row):
        with intervene(stories, *ivs):
            alone = stories.generate_ids(ids, max_new_tokens=16)
        assert torch.equal(together[r], alone[0]), r
        texts.add(stories.decode(alone[0]))
    assert len(texts) > 1


def test_residual_function_rows(stories):
    ids = stories.encode(PROMPT).repeat(2, 1)
    fn = ResidualFunction([1], "resid.post", lambda layer, x, ctx: x * 0.5, rows=[1])
    with intervene(stories, fn):
        got = stories.logits(ids)
    torch.testing.assert_close(got[0], stories.logits(ids[:1])[0])
    with intervene(stories, ResidualFunction([1], "resid.post", lambda layer, x, ctx: x * 0.5)):
        torch.testing.assert_close(got[1], stories.logits(ids[:1])[0])


@pytest.mark.parametrize("rows", [[-1], "0", [], True])
def test_bad_rows_are_refused(stories, rows):
    with pytest.raises(NeuronscopeError, match="[Rr]ows"):
        with intervene(stories, Clamp(layer=0, neurons=[1], value=1.0, rows=rows)):
            pass


def test_row_past_the_batch_is_one_sentence(stories):
    with pytest.raises(NeuronscopeError, match="batch has 1 row"):
        with intervene(stories, Clamp(layer=0, neurons=[1], value=1.0, rows=[2])):
            stories.logits(stories.encode(PROMPT))


def test_specs_are_immutable_and_bind_leaves_them_alone(stories):
    spec = Clamp(layer=1, neurons=3, value=2.0, positions=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.value = 3.0  # type: ignore[misc]
    with intervene(stories, spec) as (bound,):
        stories.logits(stories.encode(PROMPT))
    assert (spec.neurons, spec.positions) == (3, 5)          # the user's fields are as given
    assert (bound.neurons, bound.positions) == ([3], [5])    # the checked forms live on the bound object
    assert bound.spec is spec
    cap = Capture()
    with intervene(stories, cap) as (b,):
        pass
    assert cap.layers is None and b.layers == list(range(stories.n_layers))


def test_one_spec_two_subjects():
    """The same Capture and Clamp bound to two models of different shapes give each its own results."""
    a, b = tiny_subject("llama", seed=1), tiny_subject("qwen2", seed=2, num_hidden_layers=2)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    cap, clamp = Capture(), Clamp(layer=1, neurons=[2], value=3.0)
    with intervene(a, clamp, cap) as (_, ca), intervene(b, clamp, cap) as (_, cb):
        a.logits(ids)
        b.logits(ids)
    assert ca.activations.shape[0] == 3 and cb.activations.shape[0] == 2
    assert torch.all(ca.activations[1, 0, :, 2] == 3.0) and torch.all(cb.activations[1, 0, :, 2] == 3.0)
    with intervene(a, cap) as (alone,):
        a.logits(ids)
    assert not torch.equal(alone.activations, ca.activations)  # the clamp changed a's later layer


def test_one_spec_two_threads():
    """Two threads run the same specs on two subjects at once; each gets exactly its own single-thread result."""
    subjects = [tiny_subject("llama", seed=3), tiny_subject("llama", seed=4)]
    ids = torch.tensor([[1, 5, 9, 3, 7, 11, 2]])
    specs = (Clamp(layer=0, neurons=[1, 2], value=-1.5), Capture(layers=[1, 2]))
    refs = []
    for s in subjects:
        with intervene(s, *specs) as bound:
            s.logits(ids)
        refs.append(bound[-1].activations.clone())
    out: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(20):
            with intervene(subjects[i], *specs) as bound:
                subjects[i].logits(ids)
            out[i].append(bound[-1].activations)
            assert torch.equal(specs[1].activations, bound[-1].activations)  # the spec reads this thread's run

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        assert len(out[i]) == 20 and all(torch.equal(x, refs[i]) for x in out[i])
    assert not torch.equal(refs[0], refs[1])


def test_grad_capture_honours_neurons_rows_dtype_and_cpu(stories):
    ids = stories.encode(PROMPT).repeat(2, 1)
    full, part = Capture(layers=[1, 3], grad=True), Capture(layers=[1, 3], grad=True, neurons=[4, 9, 2], rows=[1],
                                                              dtype=torch.float64, to_cpu=True)
    with intervene(stories, full, part) as (f, p):
        logits = stories.model(input_ids=ids).logits
        logits[:, -1].softmax(-1)[:, 42].sum().backward()
    g, gp = f.grads(), p.grads()
    assert gp.shape == (2, 1, ids.shape[1], 3) and gp.dtype == torch.float64 and gp.device.type == "cpu"
    torch.testing.assert_close(gp, g[:, 1:2][..., [4, 9, 2]].double())
    torch.testing.assert_close(p.activations, f.activations[:, 1:2][..., [4, 9, 2]].double())
    with pytest.raises(NeuronscopeError, match="grad=True"):
        with intervene(stories, Capture()) as (c,):
            stories.logits(ids)
        c.grads()


def test_the_last_binding_table_does_not_keep_dropped_specs_alive(stories):
    import gc
    import weakref
    ids = stories.encode(PROMPT)
    refs = []
    for _ in range(3):
        cap = Capture()
        with intervene(stories, cap) as (bound,):
            stories.logits(ids)
        refs.append((weakref.ref(cap), weakref.ref(bound)))
        del cap, bound
    gc.collect()
    assert all(r() is None and b() is None for r, b in refs)
