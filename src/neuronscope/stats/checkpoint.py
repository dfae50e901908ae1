"""Crash-consistent checkpoints of a statistics run: one file, written in one atomic step, with a checksum.

The checkpoint is `.stats-checkpoint.safetensors` in the atlas folder: the running state's tensors, and in the
safetensors metadata the run's settings and progress (JSON) and a SHA-256 of all of it. It is written to a temporary
file in the same folder, flushed to disk, and renamed over the previous checkpoint, so at any moment the folder
holds either the old checkpoint or the new one, never a mix (the two-file design before it could pair a new state
with an old progress record and count a batch twice). A checkpoint that does not check out (torn by a full disk or a
copy, or edited) is refused with a sentence, never used. Temporary files a killed run left behind are removed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import NeuronscopeError

NAME = ".stats-checkpoint.safetensors"
LEGACY = ".stats-partial"            # the old two-file checkpoint folder (state.safetensors + state.json)
FORMAT = "neuronscope-stats-checkpoint/2"


def path_in(folder: Path) -> Path:
    return Path(folder) / NAME


def _point(name: str) -> None:
    """Called between the writes of a checkpoint ('temp', 'synced', 'renamed'): a seam for crash tests."""


def _digest(tensors: dict[str, torch.Tensor], progress_json: str) -> str:
    h = hashlib.sha256()
    h.update(FORMAT.encode())
    h.update(progress_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)     # a memoryview: no copy of the state
    return h.hexdigest()


def _stale_temps(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob(f".{NAME}.*.tmp"))


def exists(folder: Path) -> bool:
    return path_in(folder).is_file() or (Path(folder) / LEGACY).exists()


def discard(folder: Path) -> None:
    """Remove the checkpoint (and a legacy checkpoint folder, and stale temporary files)."""
    import shutil
    path_in(folder).unlink(missing_ok=True)
    shutil.rmtree(Path(folder) / LEGACY, ignore_errors=True)
    for p in _stale_temps(folder):
        p.unlink(missing_ok=True)


def save(folder: Path, tensors: dict[str, torch.Tensor], progress: dict[str, Any]) -> Path:
    """Write the checkpoint atomically: temp file, fsync, rename over the old one, fsync the folder."""
    from safetensors.torch import save_file
    folder = Path(folder)
    for p in _stale_temps(folder):
        p.unlink(missing_ok=True)
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    text = json.dumps(progress, sort_keys=True, default=str)
    meta = {"format": FORMAT, "progress": text, "sha256": _digest(clean, text)}
    final = path_in(folder)
    tmp = folder / f".{NAME}.{os.getpid()}.tmp"
    save_file(clean, str(tmp), metadata=meta)
    _point("temp")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    _point("synced")
    os.replace(tmp, final)
    _point("renamed")
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:                 # some file systems cannot sync a folder; the rename is still atomic
        pass
    return final


def load(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, progress) of a checkpoint that checks out, None when there is none; a damaged or old-format
    checkpoint raises a NeuronscopeError that names --restart."""
    folder = Path(folder)
    for p in _stale_temps(folder):          # a run killed while writing: the previous checkpoint stands
        p.unlink(missing_ok=True)
    if (folder / LEGACY).exists():
        raise NeuronscopeError(f"'{folder}' holds a checkpoint in the old two-file format ({LEGACY}/), which cannot "
                               "be trusted (a kill between its two writes counts a batch twice); pass --restart "
                               "(restart=True) to discard it and start over.")
    path = path_in(folder)
    if not path.is_file():
        return None
    bad = (f"The checkpoint '{path}' is damaged ({{why}}), so it cannot be resumed; pass --restart (restart=True) "
           "to discard it and start over.")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:        # safetensors raises several types for a torn or foreign file
        raise NeuronscopeError(bad.format(why=f"unreadable: {str(exc).splitlines()[0][:80]}")) from None
    if meta.get("format") != FORMAT or "progress" not in meta or "sha256" not in meta:
        raise NeuronscopeError(bad.format(why="not a neuronscope statistics checkpoint"))
    if _digest(tensors, meta["progress"]) != meta["sha256"]:
        raise NeuronscopeError(bad.format(why="its checksum does not match its content"))
    return tensors, json.loads(meta["progress"])
