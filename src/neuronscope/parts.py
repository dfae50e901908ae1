"""Opening an atlas folder's optional parts: the decodes (`Atlas`), the corpus statistics (`NeuronStats`) and the
descriptions (`Descriptions`), each checked for damage first, each missing or unusable one reported in one sentence.

It sits above `atlas/`, `stats/` and `describe/` (the folder module, at the bottom, knows the layout and imports no
reader), so the readers and the folder form no import circle.

    af = AtlasFolder.open("atlas-smollm")
    parts = open_parts(af)          # parts.atlas / parts.stats / parts.descriptions (None where absent), parts.notes
    stats = open_stats(af)          # or one part, with its clear error
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .atlas.atlas import Atlas
from .atlas.folder import EMBEDDINGS_FILE, AtlasFolder
from .describe.describe import Descriptions
from .errors import NeuronscopeError
from .stats.results import NeuronStats


@dataclass
class Parts:
    """The optional parts of an opened folder; None where absent or unusable (the reason is in `notes`)."""
    atlas: Atlas | None = None
    stats: NeuronStats | None = None
    descriptions: Descriptions | None = None
    notes: list[str] = field(default_factory=list)


def open_atlas(af: AtlasFolder) -> Atlas:
    """The atlas decodes of the folder (a clear error when there are none)."""
    return Atlas.from_folder(af)


def open_stats(af: AtlasFolder) -> NeuronStats:
    """The corpus statistics of the folder, its files checked first (a clear error when absent or damaged)."""
    return NeuronStats.from_folder(af)


def open_descriptions(af: AtlasFolder, embedder: Any = None) -> Descriptions:
    """The stored descriptions of the folder, its database and index checked first."""
    if af.section("descriptions") and af.db_path.is_file():
        af.check_db("run `neuronscope describe` again in a new folder")
    if (af.path / EMBEDDINGS_FILE).exists():
        af.check_file(EMBEDDINGS_FILE, "delete it and run `neuronscope describe` again to rebuild the index")
    return Descriptions.open(af.path) if embedder is None else Descriptions.open(af.path, embedder=embedder)


def open_parts(af: AtlasFolder, *, atlas: bool = True, stats: bool = True, descriptions: bool = True,
               embedder: Any = None) -> Parts:
    """Open every optional part that exists; each missing or damaged one is None with one note saying why."""
    parts = Parts()
    if atlas:
        parts.atlas = _try(lambda: open_atlas(af), parts.notes,
                           "No atlas decodes in '{f}' ({e}): decodes are computed from the weights on the fly.",
                           af.path)
    if stats:
        parts.stats = _try(lambda: open_stats(af), parts.notes,
                           "No corpus statistics in '{f}' ({e}): activations are shown raw, not normalised, and "
                           "strengthen steering is off; run `neuronscope stats` to add them.", af.path)
    if descriptions:
        parts.descriptions = _try(lambda: open_descriptions(af, embedder), parts.notes,
                                  "No neuron descriptions in '{f}' ({e}); run `neuronscope describe` to add them.",
                                  af.path)
    return parts


def _try(fn: Callable[[], Any], notes: list[str], note: str, folder: Path) -> Any:
    try:
        return fn()
    except (NeuronscopeError, OSError, KeyError, ValueError, json.JSONDecodeError, sqlite3.DatabaseError) as exc:
        notes.append(note.format(f=folder, e=str(exc).rstrip(".")))
        return None
