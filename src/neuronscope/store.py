"""Atomic file writes and the atlas folder's SQLite database, shared by every module that writes results.

A result file is written to a temporary name in the same folder and renamed into place, so a reader never sees a
half-written file and an interrupted job leaves the previous version intact. The file gets the mode a plain
`open(path, "w")` would give it: a new file 0o666 less the process's umask, a replaced file the mode it had (the
temporary file alone would be 0o600, whatever the user's umask says).
"""
from __future__ import annotations

import json
import os
import sqlite3
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux: /proc/self/status), else by
    setting and restoring it (a moment in which another thread's new file would get mode 0o777 & ~0o022)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_write_mode(path: str | os.PathLike[str]) -> int:
    """The permission bits `open(path, "w")` would leave `path` with: its own if it exists, else 0o666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically (with the mode a plain write
    would give, see `plain_write_mode`), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, plain_write_mode(path))
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically (fsynced before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` as UTF-8 to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON with sorted keys to `path` atomically (unknown types as their str)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON document in `path`."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically (contiguous CPU copies)."""
    from safetensors.torch import save_file
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata a safetensors file was saved with (`save_tensors(..., metadata)`), {} when none."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta: dict[str, str] = f.metadata() or {}
    return meta


def load_tensors(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on `device`."""
    from safetensors.torch import load_file
    tensors: dict[str, torch.Tensor] = load_file(str(path), device=device)
    return tensors


def connect(db_path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open (creating) a SQLite database with settings fit for one writer and many readers (WAL, busy timeout)."""
    Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(db_path), timeout=30, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    return con


# ---- the atlas folder's manifest.json: one section per capability ---------------------------------------------
MANIFEST = "manifest.json"
DB = "atlas.sqlite"


@contextmanager
def folder_lock(folder: str | os.PathLike[str]) -> Iterator[None]:
    """An exclusive lock on a results folder (a `.lock` file), for read-modify-write of shared files."""
    import fcntl
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The folder's manifest.json as a dict ({} when there is none yet)."""
    path = Path(folder) / MANIFEST
    return read_json(path) if path.is_file() else {}


def update_manifest(folder: str | os.PathLike[str], section: str, value: Any) -> dict[str, Any]:
    """Replace one top-level section of manifest.json atomically, under the folder lock; returns the manifest."""
    with folder_lock(folder):
        manifest = read_manifest(folder)
        manifest[section] = value
        write_json(Path(folder) / MANIFEST, manifest)
        return manifest


def open_db(folder: str | os.PathLike[str]) -> sqlite3.Connection:
    """The folder's atlas.sqlite (created if missing). Each capability creates its own tables in it."""
    return connect(Path(folder) / DB)
