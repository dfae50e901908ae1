"""Library calls leave global state alone: the torch RNG, the thread count and the caller's tokenizer."""
import copy

import torch

from neuronscope.atlas.decode import decode
from neuronscope.subject import Subject
from tiny import tiny_model


def test_seeded_sampling_leaves_the_global_rng_alone(stories):
    ids = stories.encode("Once upon a time")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = stories.generate_ids(ids, max_new_tokens=8, temperature=1.0, seed=5)
    assert torch.equal(torch.rand(3), expected)                       # the caller's RNG stream is untouched
    b = stories.generate_ids(ids, max_new_tokens=8, temperature=1.0, seed=5)
    assert torch.equal(a, b)                                          # and the seed still fixes the sample


def test_from_model_does_not_change_the_callers_tokenizer(stories_tokenizer):
    tok = copy.deepcopy(stories_tokenizer)
    tok.pad_token = None
    assert tok.pad_token_id is None
    s = Subject.from_model(tiny_model("llama", vocab_size=512), tok)
    assert tok.pad_token_id is None                                   # left as the caller gave it
    assert s.pad_token_id == tok.eos_token_id                         # batching still has a pad id
    s.generate_ids(torch.tensor([[1, 5, 9]]), max_new_tokens=2)
    assert tok.pad_token_id is None


def test_decode_restores_the_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        W = torch.randn(3000, 16)
        decode(torch.randn(600, 16), W, k=5, chunk=100)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_cpu_statistics_fold_leaves_the_thread_count_alone():
    """numba's OpenMP layer sets the calling thread's OpenMP thread count when its parallel fold runs, which torch
    reads as its own: a Monitor built after `compute_stats` in the same process then took one model call at a time."""
    from neuronscope.stats.extremes import LayerExtremes
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ex = LayerExtremes(64, k=8, n_exemplars=2)
        ex.add(torch.randn(100, 64), torch.arange(100))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
