"""AtlasFolder: the one module that knows an atlas folder's layout, opens it, checks it, and guards what is in it.

One folder per model (DESIGN.md section 3). Everything neuronscope keeps there is named here:

    manifest.json                 one section per capability: format, model, versions, atlas, stats, descriptions
    atlas_<site>.safetensors      the decoded top-k per neuron of one site (atlas build)
    .atlas-parts/layer_NNN.safetensors   per-layer parts of an unfinished atlas build (removed when it completes)
    stats.safetensors, stats_extremes.safetensors, .stats-checkpoint.safetensors   corpus statistics
    neuron_emb.safetensors        embeddings of the neuron descriptions
    window_emb.safetensors        sentence embeddings of the stored corpus windows, topic terms and token keys
    output_effects.safetensors    each described neuron's causal effect on the next token (output descriptions)
    compare.json, agreement.png   the summary and plot of `atlas compare -o` (in the folder given, not replaced
                                  when an earlier comparison did not write them)
    atlas.sqlite                  tables vocab, stats_windows, descriptions (and what each capability adds)
    .lock                         the folder lock for read-modify-write of the manifest

Rules it enforces:
- a damaged file (truncated or garbled .safetensors, atlas.sqlite or manifest.json) is one sentence naming the file
  and what to do (`NeuronscopeError`), never a library traceback;
- `AtlasFolder.claim` (every writer calls it first) refuses a non-empty folder that is not a neuronscope atlas, and
  an atlas of another model unless told to replace it; so a writer never deletes or rewrites a user's files, and
  deletes only files it names here;
- readers never run the model: `neuronscope.parts.open_parts` (above this module: the folder imports no reader)
  opens the optional parts (`.atlas`, `.stats`, `.descriptions`) from the files alone, and says in one sentence per
  part why a part is missing or unusable.

Format versions: `FORMAT_VERSION` is written to the manifest's "format" section. Folders written before that
section existed are version 1 (the same layout) and get the section on their next write; a folder of a newer
version is refused with the version it needs.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import store
from ..errors import NeuronscopeError

if TYPE_CHECKING:
    from ..subject import Subject

FORMAT_NAME = "neuronscope-atlas"
FORMAT_VERSION = 1

MANIFEST = store.MANIFEST                       # "manifest.json"
DB = store.DB                                   # "atlas.sqlite"
LOCK = ".lock"
PARTS_DIR = ".atlas-parts"
STATS_FILE = "stats.safetensors"
EXTREMES_FILE = "stats_extremes.safetensors"
STATS_CHECKPOINT = ".stats-checkpoint.safetensors"
EMBEDDINGS_FILE = "neuron_emb.safetensors"
WINDOW_EMB_FILE = "window_emb.safetensors"
EFFECTS_FILE = "output_effects.safetensors"
COMPARE_FILE = "compare.json"
COMPARE_PLOT = "agreement.png"
VOCAB_TABLE = "vocab"
WINDOWS_TABLE = "stats_windows"
DESCRIPTIONS_TABLE = "descriptions"
SECTIONS = ("format", "model", "versions", "atlas", "stats", "descriptions")


def site_file(folder: str | os.PathLike[str], site: str) -> Path:
    """The file of one atlas site: atlas_<site>.safetensors."""
    return Path(folder) / f"atlas_{site}.safetensors"


def part_file(folder: str | os.PathLike[str], layer: int) -> Path:
    """The part an unfinished atlas build keeps for one layer."""
    return Path(folder) / PARTS_DIR / f"layer_{layer:03d}.safetensors"


def own_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Every file neuronscope may write in `folder` that exists now (what a writer may replace or delete)."""
    f = Path(folder)
    names = [MANIFEST, DB, DB + "-wal", DB + "-shm", LOCK, STATS_FILE, EXTREMES_FILE, STATS_CHECKPOINT,
             EMBEDDINGS_FILE, WINDOW_EMB_FILE, EFFECTS_FILE, COMPARE_FILE, COMPARE_PLOT]
    out = [f / n for n in names if (f / n).exists()]
    out += sorted(f.glob("atlas_*.safetensors")) + sorted((f / PARTS_DIR).glob("layer_*.safetensors"))
    return out


# ---- the model's identity: one home for the manifest's "model" section and the fingerprint check ----------------
def model_section(subject: Subject) -> dict[str, Any]:
    """What the manifest records about the model a folder belongs to (`path`: the absolute path of a local
    model, so a later command run elsewhere finds it)."""
    section: dict[str, Any] = {
        "name": subject.name, "fingerprint": subject.fingerprint, "family": subject.family,
        "n_layers": subject.n_layers, "n_neurons": subject.n_neurons, "hidden_size": subject.hidden_size,
        "vocab_size": subject.vocab_size, "tied": subject.tied}
    src = subject.source
    if src is not None and src.is_local:
        section["path"] = str((Path(src.location) / src.gguf_file if src.gguf_file else Path(src.location))
                              .expanduser().resolve())
    return section


def _describe(path: Path) -> str:
    return f"'{path}'"


# ---- checking files ---------------------------------------------------------------------------------------------
def check_safetensors(path: Path, remedy: str) -> None:
    """Raise one sentence when `path` is not a complete safetensors file (truncated, garbled)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except FileNotFoundError:
        raise NeuronscopeError(f"The file {_describe(path)} is missing; {remedy}.") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damage
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NeuronscopeError(f"The file {_describe(path)} is damaged (truncated or not a safetensors file: "
                               f"{first}); {remedy}.") from None


def check_sqlite(path: Path, remedy: str) -> None:
    """Raise one sentence when `path` is not a sound SQLite database (garbled, truncated)."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise NeuronscopeError(f"The database {_describe(path)} cannot be opened ({exc}); {remedy}.") from None
    try:
        row = con.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            raise NeuronscopeError(f"The database {_describe(path)} is damaged ({row[0] if row else 'no answer'}); "
                                   f"{remedy}.")
    except sqlite3.DatabaseError as exc:
        raise NeuronscopeError(f"The database {_describe(path)} is damaged ({exc}); {remedy}.") from None
    finally:
        con.close()


def read_manifest(folder: Path) -> dict[str, Any]:
    """The folder's manifest ({} when there is none), or one sentence when it is not a JSON object."""
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = store.read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise NeuronscopeError(f"The manifest {_describe(path)} is damaged (not valid JSON: {exc}); restore it "
                               "from a backup or rebuild the atlas in a new folder.") from None
    if not isinstance(data, dict):
        raise NeuronscopeError(f"The manifest {_describe(path)} is damaged (not a JSON object); restore it from a "
                               "backup or rebuild the atlas in a new folder.")
    return data


def is_ours(manifest: dict[str, Any]) -> bool:
    """Whether a manifest was written by neuronscope: a "format" section, or (version 1 folders, written before it
    existed) a "model" section with a weights fingerprint."""
    fmt = manifest.get("format")
    if isinstance(fmt, dict) and fmt.get("name") == FORMAT_NAME:
        return True
    model = manifest.get("model")
    return isinstance(model, dict) and "fingerprint" in model


class AtlasFolder:
    """One atlas folder: its manifest (read once), the model it belongs to, and checked access to its parts."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest

    # ---- opening ----------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = False) -> AtlasFolder:
        """Open a folder (create=True: it may not exist yet). A damaged manifest is one sentence."""
        folder = Path(path).expanduser()
        if folder.exists() and not folder.is_dir():
            raise NeuronscopeError(f"'{folder}' exists and is not a folder.")
        if not folder.is_dir() and not create:
            raise NeuronscopeError(f"No atlas folder at '{folder}'; build one with `neuronscope atlas build`.")
        manifest = read_manifest(folder) if folder.is_dir() else {}
        version = (manifest.get("format") or {}).get("version", 1) if isinstance(manifest.get("format"), dict) else 1
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise NeuronscopeError(f"The atlas folder '{folder}' has format version {version}; this neuronscope "
                                   f"reads up to version {FORMAT_VERSION}: upgrade neuronscope.")
        return cls(folder, manifest)

    def reload(self) -> AtlasFolder:
        self.manifest = read_manifest(self.path) if self.path.is_dir() else {}
        return self

    def __repr__(self) -> str:
        return f"AtlasFolder({str(self.path)!r}, model={self.model_name!r})"

    # ---- what it holds ----------------------------------------------------------------------------------------
    @property
    def model(self) -> dict[str, Any]:
        m = self.manifest.get("model")
        return m if isinstance(m, dict) else {}

    @property
    def model_name(self) -> str:
        return str(self.model.get("name", "?"))

    @property
    def fingerprint(self) -> str | None:
        fp = self.model.get("fingerprint")
        return str(fp) if fp else None

    def section(self, name: str) -> dict[str, Any]:
        s = self.manifest.get(name)
        return s if isinstance(s, dict) else {}

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def db_path(self) -> Path:
        return self.path / DB

    def model_path(self) -> Path | None:
        """The model the manifest names, as a path that exists: its recorded absolute path, else its name (a
        relative name is resolved against the atlas folder, then the working directory); None when neither is on
        disk (a hub id, or a model that moved)."""
        cands: list[Path] = []
        if self.model.get("path"):
            cands.append(Path(str(self.model["path"])).expanduser())
        name = self.model.get("name")
        if name and name != "?":
            p = Path(str(name)).expanduser()
            cands += [p] if p.is_absolute() else [self.path / p, p]
        for cand in cands:
            if cand.exists():
                return cand
        return None

    def check_model(self, subject: Subject) -> None:
        """One sentence when the folder belongs to other weights than `subject`'s."""
        fp = self.fingerprint
        if fp and fp != subject.fingerprint:
            raise NeuronscopeError(f"The atlas folder '{self.path}' was made for other weights ({self.model_name}, "
                                   f"fingerprint {fp}; this model has {subject.fingerprint}); use a folder made for "
                                   "this model.")

    # ---- validation -------------------------------------------------------------------------------------------
    def check_file(self, name: str, remedy: str) -> Path:
        """Check one safetensors file of the folder; returns its path."""
        path = self.path / name
        check_safetensors(path, remedy)
        return path

    def check_db(self, remedy: str = "delete it and rebuild what used it (atlas build --overwrite, stats, describe)"
                 ) -> Path:
        path = self.db_path
        if not path.is_file():
            raise NeuronscopeError(f"The database '{path}' is missing; {remedy}.")
        check_sqlite(path, remedy)
        return path

    # ---- guarding writes --------------------------------------------------------------------------------------
    def claim(self, subject: Subject, *, replace_other_model: bool = False) -> None:
        """Make the folder this model's before writing into it; refuse to touch a user's folder.

        A missing or empty folder is created; a folder holding files but no neuronscope manifest is refused (its
        files are the user's); an atlas of another model is refused unless replace_other_model (and then only
        neuronscope's own files are replaced). Writes the "format" and "model" sections."""
        p = self.path
        if p.is_dir() and any(p.iterdir()) and not is_ours(self.manifest):
            what = "an unrelated manifest.json" if (p / MANIFEST).is_file() else "files that neuronscope did not write"
            raise NeuronscopeError(f"'{p}' is not empty and is not a neuronscope atlas folder (it holds {what}); "
                                   "choose a new or empty folder: nothing in it was changed.")
        fp = self.fingerprint
        if fp and fp != subject.fingerprint and not replace_other_model:
            raise NeuronscopeError(f"'{p}' belongs to another model ({self.model_name}); choose another folder or "
                                   "pass overwrite=True (--overwrite) to replace its atlas files.")
        p.mkdir(parents=True, exist_ok=True)
        if fp != subject.fingerprint or "format" not in self.manifest:
            with store.folder_lock(p):
                man = read_manifest(p)
                man["format"] = {"name": FORMAT_NAME, "version": FORMAT_VERSION}
                man["model"] = model_section(subject)
                store.write_json(p / MANIFEST, man)
                self.manifest = man

    def update(self, section: str, value: Any) -> dict[str, Any]:
        """Replace one manifest section atomically under the folder lock."""
        self.manifest = store.update_manifest(self.path, section, value)
        return self.manifest

    def migrate(self) -> list[str]:
        """Bring a folder written by an older neuronscope up to this layout; returns what was moved.

        Builds before the "format" section kept their per-layer parts in `parts/`: when the manifest says such a
        build is unfinished, its `parts/layer_NNN.safetensors` files move to `.atlas-parts/` (nothing else in
        `parts/` is touched, and the folder is removed only when that leaves it empty)."""
        old = self.path / "parts"
        if self.section("atlas").get("status") != "building" or "format" in self.manifest or not old.is_dir():
            return []
        moved = []
        for f in sorted(old.glob("layer_[0-9][0-9][0-9].safetensors")):
            dest = self.path / PARTS_DIR / f.name
            dest.parent.mkdir(exist_ok=True)
            os.replace(f, dest)
            moved.append(f.name)
        try:
            old.rmdir()
        except OSError:
            pass
        return moved

    def remove_parts(self) -> None:
        """Delete the build parts this module names (only those), and their folder when it is then empty."""
        for f in sorted((self.path / PARTS_DIR).glob("layer_*.safetensors")):
            f.unlink(missing_ok=True)
        try:
            (self.path / PARTS_DIR).rmdir()
        except OSError:  # missing, or holds something we did not write: leave it
            pass


__all__ = ["AtlasFolder", "FORMAT_VERSION", "FORMAT_NAME", "MANIFEST", "DB", "PARTS_DIR", "STATS_FILE",
           "EXTREMES_FILE", "STATS_CHECKPOINT", "EMBEDDINGS_FILE", "WINDOW_EMB_FILE",
           "EFFECTS_FILE", "COMPARE_FILE", "COMPARE_PLOT", "VOCAB_TABLE",
           "WINDOWS_TABLE",
           "DESCRIPTIONS_TABLE", "site_file", "part_file", "own_files", "model_section", "check_safetensors",
           "check_sqlite", "read_manifest", "is_ours"]
