"""store.py: atomic writes leave files with the mode a plain write would give, and nothing half-written."""
from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

from neuronscope import store


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def plain_mode(folder: Path, mask: int) -> int:
    """What `open(path, "w")` gives a new file under `mask`, measured (not computed)."""
    ref = folder / "plain-reference"
    with umask(mask):
        with open(ref, "w") as f:
            f.write("x")
    m = mode(ref)
    ref.unlink()
    return m


WRITERS = {
    "write_text": lambda p: store.write_text(p, "hello"),
    "write_bytes": lambda p: store.write_bytes(p, b"\x00\x01"),
    "write_json": lambda p: store.write_json(p, {"a": 1}),
    "save_tensors": lambda p: store.save_tensors(p, {"x": torch.arange(3)}),
    "update_manifest": lambda p: store.update_manifest(p.parent, "section", {"v": 1}),
}


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_new_files_get_the_mode_of_a_plain_write(tmp_path: Path, mask: int, writer: str) -> None:
    path = tmp_path / ("manifest.json" if writer == "update_manifest" else "out.file")
    want = plain_mode(tmp_path, mask)
    assert want == 0o666 & ~mask
    with umask(mask):
        WRITERS[writer](path)
    assert mode(path) == want, f"{writer} under umask {mask:04o}: {mode(path):04o}, a plain write gives {want:04o}"


def test_the_umask_is_read_without_changing_it(tmp_path: Path) -> None:
    with umask(0o037):
        assert store.current_umask() == 0o037
        assert store.current_umask() == 0o037  # reading it did not reset it
        store.write_text(tmp_path / "a.txt", "a")
    assert mode(tmp_path / "a.txt") == 0o640


@pytest.mark.parametrize("existing", [0o600, 0o644, 0o664, 0o400])
def test_a_replaced_file_keeps_its_mode(tmp_path: Path, existing: int) -> None:
    """`open(path, "w")` on an existing file keeps its mode; so does an atomic replace (even a read-only one: the
    folder, not the file, decides whether it may be replaced)."""
    path = tmp_path / "kept.json"
    path.write_text("{}")
    path.chmod(existing)
    with umask(0o022):
        store.write_json(path, {"b": 2})
    assert mode(path) == existing
    assert store.read_json(path) == {"b": 2}


def test_an_error_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    store.write_text(path, "old")
    with pytest.raises(RuntimeError):
        with store.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]


def test_plain_write_mode_names_the_existing_mode_or_the_umask(tmp_path: Path) -> None:
    with umask(0o027):
        assert store.plain_write_mode(tmp_path / "missing") == 0o640
        (tmp_path / "there").write_text("x")
        (tmp_path / "there").chmod(0o604)
        assert store.plain_write_mode(tmp_path / "there") == 0o604
