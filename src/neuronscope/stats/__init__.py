"""Corpus statistics of every neuron: count, mean, variance, exact extreme quantiles and exemplars (issue 5).

    stats = compute_stats(subject, ["wiki.valid.raw", "stories.txt"], "atlas/", tokens=200_000)
    stats.quantile(1 - 1e-5)            # [layers, neurons]
    stats.normalise(acts)               # signed: |x| > 1 means beyond the 1e-5 quantile (levels.py)
    stats.level_info.get(1e-5).mark     # '' or why the corpus does not resolve the level
    stats.exemplars(12, 345, "pos")     # windows where the neuron fires most (`Exemplar` records)

Shards (`shard="i/n"`) merge exactly with `merge_shards`; `run_on_ray` runs them as Ray tasks.
"""
from __future__ import annotations

from typing import Any

from .compute import compute_stats
from .merge import merge_shards
from .levels import FIRE, LEVELS, Level, Levels, normalise, tail_rank
from .quantiles import quantiles_from_extremes
from .results import Exemplar, NeuronStats

__all__ = ["compute_stats", "merge_shards", "NeuronStats", "Exemplar", "LEVELS", "FIRE", "Level", "Levels", "normalise",
           "quantiles_from_extremes", "tail_rank", "run_on_ray"]


def run_on_ray(*args: Any, **kwargs: Any) -> NeuronStats:
    """Run the shards of a statistics job as tasks on a Ray cluster and merge them (see ray_shards.py)."""
    from .ray_shards import run_on_ray as _run
    return _run(*args, **kwargs)
