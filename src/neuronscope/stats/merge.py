"""`merge_shards`: combine the results of shard runs into the answer one run over all their windows gives.

Extremes merge exactly (concatenate the top-K of each shard and take the top-K again; exemplar keys break ties by
token index), so values, quantiles and exemplars are bit-for-bit those of a single run; count, mean and variance
merge with Chan's formula (equal to a single run up to float64 rounding).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

from .. import store
from ..errors import NeuronscopeError
from .results import NeuronStats, copy_windows, exemplar_windows, load_layers, write_arrays

SAME = ("fingerprint", "corpus", "corpus_format", "window", "tokens_limit", "k", "n_exemplars", "chat", "n_layers",
        "n_neurons", "format", "levels")


def merge_shards(shard_dirs: Sequence[str | os.PathLike[str]], out_atlas_dir: str | os.PathLike[str],
                 keep_extremes: bool = False) -> NeuronStats:
    """Merge finished shard folders (runs with shard='i/n', same settings, distinct i) into `out_atlas_dir`.

    keep_extremes: also store the merged extremes (to merge the result again later)."""
    dirs = [Path(d) for d in shard_dirs]
    if not dirs:
        raise NeuronscopeError("No shard folders given to merge.")
    secs = _sections(dirs)
    first = secs[0]
    parts = _parts(secs)
    t0 = time.perf_counter()
    merged = load_layers(dirs[0])
    for d in dirs[1:]:
        for st, other in zip(merged, load_layers(d)):
            st.merge(other)
    out = Path(out_atlas_dir)
    out.mkdir(parents=True, exist_ok=True)
    man_model = store.read_manifest(dirs[0]).get("model")
    out_model = store.read_manifest(out).get("model")
    if out_model and man_model and out_model.get("fingerprint") != man_model.get("fingerprint"):
        raise NeuronscopeError(f"The atlas '{out}' belongs to another model ({out_model.get('name')}).")
    need = exemplar_windows(merged, first["window"])
    copy_windows(dirs, out, need)
    extra = write_arrays(out, merged, first, keep_extremes=keep_extremes)
    if man_model and not out_model:
        store.update_manifest(out, "model", man_model)
    n_shards = parts[0][1] if parts else 1
    section = {k: first.get(k) for k in SAME + ("model", "batch", "levels", "quantile_definition", "files")}
    section.update({
        "complete": True, "shard": None, "merged_from": [str(d) for d in dirs],
        "shards": sorted(i for i, _ in parts) if parts else None, "n_shards": n_shards,
        "all_shards": parts is None or len(dirs) == n_shards,
        "tokens": merged[0].count, "windows": sum(s.get("windows", 0) for s in secs),
        "seconds": round(sum(s.get("seconds", 0.0) for s in secs), 3), "merge_seconds":
            round(time.perf_counter() - t0, 3), **extra, "keep_extremes": keep_extremes,
        "files": ["stats.safetensors"] + (["stats_extremes.safetensors"] if keep_extremes else []),
    })
    store.update_manifest(out, "stats", section)
    return NeuronStats.open(out)


def _sections(dirs: list[Path]) -> list[dict[str, Any]]:
    """The manifest "stats" sections of finished shards, refused unless they share the settings in SAME."""
    secs = []
    for d in dirs:
        sec = store.read_manifest(d).get("stats") if d.is_dir() else None
        if not sec or not sec.get("complete"):
            raise NeuronscopeError(f"'{d}' holds no finished statistics shard; finish that shard first.")
        secs.append(sec)
    for d, sec in zip(dirs[1:], secs[1:]):
        for key in SAME:
            if sec.get(key) != secs[0].get(key):
                raise NeuronscopeError(f"Shard '{d}' differs from '{dirs[0]}' in '{key}'; only shards of the same "
                                       "run can be merged.")
    return secs


def _parts(secs: list[dict[str, Any]]) -> list[tuple[int, int]] | None:
    """Each shard's (i, n), checked to be distinct parts of one split; None for a full run (given alone)."""
    shards = [(int(s["shard"][0]), int(s["shard"][1])) if s.get("shard") else None for s in secs]
    parts = [s for s in shards if s is not None]
    if len(parts) < len(shards):
        if len(secs) > 1:
            raise NeuronscopeError("Only runs made with a shard (i/n) can be merged; a full run has no other part.")
        return None
    if len({n for _, n in parts}) != 1:
        raise NeuronscopeError("The shards come from splits into different numbers of parts.")
    ids = [i for i, _ in parts]
    if len(set(ids)) != len(ids):
        raise NeuronscopeError(f"Shard {sorted(i for i in ids if ids.count(i) > 1)[0]} is given twice.")
    return parts
