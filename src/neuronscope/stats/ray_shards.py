"""Run a statistics job's shards as tasks on an existing Ray cluster, then merge them exactly (`merge_shards`).

Each task loads the model itself (from the same path, GGUF or hub id), computes one shard (windows w with
w % n == i) in a private temporary folder and returns that folder's files; the driver writes them under
`ATLAS/.shards/i/` and merges. So the workers need the corpus files and the model at the same paths (or a hub id
they can fetch), but no shared output storage. Ray itself is an optional dependency (`pip install ray`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .. import store
from ..errors import NeuronscopeError
from .corpus import CorpusArg, check_corpus
from .merge import merge_shards
from .results import NeuronStats

if TYPE_CHECKING:
    from ..subject import Subject

SHARDS_DIR = ".shards"
FILES = ("manifest.json", "stats.safetensors", "stats_extremes.safetensors", "atlas.sqlite")


def _shard_task(source: str | None, gguf_file: str | None, dtype: str, device: str | None, corpus: list[str],
                shard: tuple[int, int], options: dict[str, Any]) -> dict[str, bytes]:
    """Body of one Ray task: load the model, compute one shard, return its result files."""
    from ..subject import Subject
    from .compute import compute_stats
    subject = Subject.load(source, gguf_file=gguf_file, dtype=dtype, device=device)
    tmp = Path(tempfile.mkdtemp(prefix=f"neuronscope-shard{shard[0]}-"))
    try:
        compute_stats(subject, corpus, tmp, shard=shard, progress=False, **options)
        return {name: (tmp / name).read_bytes() for name in FILES if (tmp / name).is_file()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_on_ray(address: str | None, model: str | os.PathLike[str] | Subject | None, corpus: CorpusArg,
               atlas_dir: str | os.PathLike[str], *, shards: int = 2, gguf_file: str | None = None,
               dtype: str = "float32", device: str | None = None, num_cpus: float = 1,
               **options: Any) -> NeuronStats:
    """Compute statistics as `shards` Ray tasks and merge them into `atlas_dir`.

    address: the Ray cluster ("auto", "ray://host:10001", ...); None uses the Ray already initialised in this
    process. model: a model path, GGUF file or hub id (or a Subject loaded from one). options: compute_stats
    keywords (tokens, window, batch, k, n_exemplars, chat, levels, corpus_format).
    """
    try:
        import ray
    except ImportError:
        raise NeuronscopeError("--ray needs the ray package: pip install 'ray[default]'.") from None
    if not isinstance(shards, int) or shards < 1:
        raise NeuronscopeError(f"The number of shards must be at least 1, got {shards!r}.")
    paths = [str(p.resolve()) for p in check_corpus(corpus)]
    source, gguf_file = _model_source(model, gguf_file)
    if not ray.is_initialized():
        if address is None:
            raise NeuronscopeError("No Ray cluster: give its address (--ray auto, --ray ray://HOST:10001).")
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        except Exception as exc:  # ray raises ConnectionError, RuntimeError...
            raise NeuronscopeError(f"Could not connect to the Ray cluster at '{address}': {exc}") from None
    task = ray.remote(num_cpus=num_cpus)(_shard_task)
    refs = [task.remote(source, gguf_file, dtype, device, paths, (i, shards), options) for i in range(shards)]
    results = ray.get(refs)
    out = Path(atlas_dir)
    dirs = []
    for i, files in enumerate(results):
        d = out / SHARDS_DIR / str(i)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        for name, data in files.items():
            store.write_bytes(d / name, data)
        dirs.append(d)
    return merge_shards(dirs, out)


def _model_source(model: str | os.PathLike[str] | Subject | None,
                  gguf_file: str | None) -> tuple[str | None, str | None]:
    """The model as the workers load it (an absolute path where it is a local one, else the hub id) and its GGUF
    file; a Subject stands for the files it was loaded from."""
    if model is None:
        return None, gguf_file
    if isinstance(model, (str, os.PathLike)):
        return (str(Path(model).resolve()) if os.path.exists(model) else str(model)), gguf_file
    src = model.source
    if src is None:
        raise NeuronscopeError("A model built in memory cannot be sent to Ray workers; pass its path instead.")
    return (str(Path(src.location).resolve()) if src.is_local else src.location), gguf_file or src.gguf_file


def shard_dirs(atlas_dir: str | os.PathLike[str]) -> Sequence[Path]:
    """The shard folders a Ray run left under an atlas folder."""
    base = Path(atlas_dir) / SHARDS_DIR
    return sorted((p for p in base.iterdir() if p.is_dir()), key=lambda p: int(p.name)) if base.is_dir() else []
