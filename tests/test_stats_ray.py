"""Statistics shards as tasks on a local Ray cluster (started and shut down by the test) equal a single run."""
from __future__ import annotations

import pytest
import torch

from conftest import STORIES

ray = pytest.importorskip("ray")


def test_ray_shards_equal_single_run(stories, tmp_path):
    from neuronscope.stats import compute_stats, run_on_ray
    text = " ".join(f"Tom saw {n} red balls and a big dog in the park. Mom said it was a good day."
                    for n in ("two", "three", "four", "five", "six", "seven", "eight", "nine") * 6)
    corpus = tmp_path / "c.txt"
    corpus.write_text(text)
    opts = dict(window=32, k=100, n_exemplars=6)
    single = compute_stats(stories, corpus, tmp_path / "single", progress=False, **opts)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        merged = run_on_ray(None, str(STORIES), corpus, tmp_path / "ray", shards=2, **opts)
    finally:
        ray.shutdown()
    assert merged.info["n_shards"] == 2 and merged.info["all_shards"]
    for name in ("quantiles", "ex_pos_value", "ex_pos_index", "ex_neg_value", "ex_neg_index", "count"):
        assert torch.equal(merged._a[name], single._a[name]), name
    assert merged.exemplars(3, 9, "pos", n=3) == single.exemplars(3, 9, "pos", n=3)
