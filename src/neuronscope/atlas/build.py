"""Building an atlas: decode every neuron's read and write vectors of every layer, resumable per layer.

Each finished layer is saved to `.atlas-parts/layer_NNN.safetensors` (atomically) before the next one starts, so an
interrupted build resumes at the first missing layer. When all layers are done the per-site arrays are written as
`atlas_<site>.safetensors`, the vocabulary goes to atlas.sqlite, and the manifest's "atlas" section is marked
complete last: a reader never sees a half-written atlas. The folder's layout and its guard against writing into a
user's folder are `folder.AtlasFolder`'s; this module only decodes.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .. import store
from ..errors import NeuronscopeError
from ..interrupt import StopRequest
from ..refs import format_index_set
from .atlas import Atlas
from .decode import decode, shuffled_unembedding
from .folder import FORMAT_VERSION, AtlasFolder, model_section, part_file, site_file
from .vocab import write_vocab

if TYPE_CHECKING:
    from tqdm.auto import tqdm

    from ..subject import Subject

ALL_SITES = ("up", "gate", "down.pos", "down.neg")
__all__ = ["build_atlas", "ALL_SITES", "model_section", "site_file", "FORMAT_VERSION"]


def build_atlas(subject: Subject, out_dir: str | os.PathLike[str], *, top_k: int = 20, apply_norm: bool = True,
                sites: Sequence[str] | None = None, chunk: int | None = None, progress: bool = True,
                method: str = "auto", vocab_block: int = 1024, overwrite: bool = False, device: str | None = None,
                approx_dtype: torch.dtype | str | None = None, layers: str | Sequence[int] | None = None) -> Atlas:
    """Decode every neuron of `subject` through its LM head and save the atlas in `out_dir`; returns the `Atlas`.

    sites: any of "up", "gate" (gated MLPs), "down.pos", "down.neg" (default: all the model has). top_k tokens are
    kept per neuron and site. apply_norm: multiply by the final norm's gain before the LM head (recorded in the
    manifest). chunk: neurons decoded per GEMM (bounds memory; default 256 on a CPU, 2048 on a GPU). device: where
    to decode (default: the model's; "cuda" uses a TF32 first pass with an exact float32 re-score, see decode.py).
    layers: decode only these layers ("0-3,8" or a list; default all); the others are absent from the atlas.
    An interrupted build resumes at the first missing layer; a folder holding a complete atlas built with other
    options needs `overwrite=True`. A non-empty folder that is not a neuronscope atlas is refused (nothing in it is
    changed), and only neuronscope's own files are ever replaced or deleted.
    """
    sites = _check_sites(subject, sites)
    todo_layers = subject.parse_layers(layers)
    if not isinstance(top_k, int) or top_k < 1 or top_k > subject.vocab_size:
        raise NeuronscopeError(f"top_k must be an integer between 1 and {subject.vocab_size}, got {top_k!r}.")
    if chunk is None:
        chunk = 2048 if (torch.device(device) if device else subject.device).type == "cuda" else 256
    if not isinstance(chunk, int) or chunk < 1:
        raise NeuronscopeError(f"chunk must be at least 1, got {chunk}.")
    af = AtlasFolder.open(out_dir, create=True)
    af.migrate()                                           # an unfinished build of an older version resumes
    folder = af.path
    options: dict[str, Any] = {"top_k": top_k, "apply_norm": bool(apply_norm), "sites": list(sites),
                               "format": FORMAT_VERSION}
    if len(todo_layers) != subject.n_layers:
        options["layers"] = todo_layers
    manifest = af.manifest
    old = af.section("atlas")
    same = old.get("options") == options and af.fingerprint == subject.fingerprint
    if old.get("status") == "complete":
        if same and not overwrite:
            return Atlas.open(folder)
        if not overwrite:
            raise NeuronscopeError(
                f"'{folder}' already holds an atlas of {manifest.get('model', {}).get('name')} built with other "
                "options or another model; pass overwrite=True (--overwrite) or choose another folder.")
    af.claim(subject, replace_other_model=overwrite)       # refuses a user's folder; writes format + model
    if not same or overwrite:
        af.remove_parts()
    af.update("versions", {**af.section("versions"), **_versions()})
    af.update("atlas", {"status": "building", "options": options})

    dev = torch.device(device) if device else subject.device
    spec, hf = subject.spec, subject.model
    with torch.no_grad():
        W_U = spec.unembedding(hf).detach().to(dev)
        gain = spec.final_norm_gain(hf).detach().float().to(dev) if apply_norm else None
        if dev.type == "cuda" or method in ("twopass", "plain"):
            W, perm = W_U.float().contiguous(), None
        else:
            W, perm = shuffled_unembedding(W_U)
    L = subject.n_layers
    todo = [l for l in todo_layers if not part_file(folder, l).is_file()]
    bar = _bar(progress, len(todo) * len(sites), f"atlas {subject.name}")
    start = time.perf_counter()
    with StopRequest("atlas build") as stop:   # Ctrl-C: finish the current layer, save it, then stop
        for j, l in enumerate(todo):
            tensors = _decode_layer(subject, l, sites, W, perm, gain, top_k=top_k, chunk=chunk, method=method,
                                    vocab_block=vocab_block, device=dev, approx_dtype=approx_dtype, bar=bar)
            store.save_tensors(part_file(folder, l), tensors)
            if stop and j + 1 < len(todo):
                if bar is not None:
                    bar.close()
                left = len(todo) - j - 1
                raise stop.interrupted(f"atlas build stopped after layer {l}: {left} layer(s) are left and the "
                                       f"finished ones are saved in '{folder}'; run the same command again to "
                                       "resume.")
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - start
    _finish(folder, subject, sites, todo_layers, top_k)
    write_vocab(folder, subject)
    af.update("atlas", {
        "status": "complete", "options": options, "sites": list(sites), "top_k": top_k,
        "layers": todo_layers if len(todo_layers) != L else None,
        "layers_text": format_index_set(todo_layers),
        "apply_norm": bool(apply_norm), "n_layers": L, "n_neurons": subject.n_neurons,
        "down_neg": "decode of the negated write vector: logits and probabilities of -v (tokens it suppresses)",
        "build_seconds_last_run": round(elapsed, 3), "method": method, "device": str(dev),
        "files": {s: site_file(folder, s).name for s in sites},
    })
    af.remove_parts()
    return Atlas.open(folder)


def _check_sites(subject: Subject, sites: str | Sequence[str] | None) -> tuple[str, ...]:
    have = ALL_SITES if subject.spec.gated else tuple(s for s in ALL_SITES if s != "gate")
    if sites is None:
        return have
    if isinstance(sites, str):
        sites = [s.strip() for s in sites.split(",") if s.strip()]
    out = []
    for s in sites:
        if s == "down":
            out += ["down.pos", "down.neg"]
        elif s not in ALL_SITES:
            raise NeuronscopeError(f"Unknown atlas site '{s}'; use {', '.join(ALL_SITES)}.")
        elif s not in have:
            raise NeuronscopeError(f"The site '{s}' does not exist here: {subject.family} MLPs are not gated.")
        else:
            out.append(s)
    if not out:
        raise NeuronscopeError("No atlas sites given; use up, gate, down.pos, down.neg.")
    return tuple(s for s in ALL_SITES if s in out)


def _decode_layer(subject: Subject, layer: int, sites: Sequence[str], W: torch.Tensor, perm: torch.Tensor | None,
                  gain: torch.Tensor | None, *, top_k: int, chunk: int, method: str, vocab_block: int,
                  device: torch.device, approx_dtype: torch.dtype | str | None,
                  bar: tqdm[Any] | None) -> dict[str, torch.Tensor]:
    """All requested sites of one layer as {f"{site}.ids"/".logits"/".probs"/".lse": tensor}."""
    spec, hf = subject.spec, subject.model
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        reads = spec.read_vectors(hf, layer) if ("up" in sites or "gate" in sites) else {}
        jobs: list[tuple[str, torch.Tensor, tuple[str, ...]]] = [
            (s, reads[s], ("pos",)) for s in ("up", "gate") if s in sites]
        down_sides = tuple(side for side in ("pos", "neg") if f"down.{side}" in sites)
        if down_sides:
            jobs.append(("down", spec.write_vectors(hf, layer), down_sides))
        for name, vec, sides in jobs:
            v = vec.detach().to(device).float()
            if gain is not None:
                v = v * gain
            res = decode(v, W, k=top_k, sides=sides, method=method, chunk=chunk, vocab_block=vocab_block,
                         permutation=perm, approx_dtype=approx_dtype)
            for side, d in res.items():
                site = name if name != "down" else f"down.{side}"
                out[f"{site}.ids"] = d.ids.to(torch.int32).cpu()
                out[f"{site}.logits"] = d.logits.float().cpu()
                out[f"{site}.probs"] = d.probs.float().cpu()
                out[f"{site}.lse"] = d.lse.float().cpu()
                if bar is not None:
                    bar.update(1)
    return out


def _finish(folder: Path, subject: Subject, sites: Sequence[str], layers: list[int], top_k: int) -> None:
    """Stack the per-layer parts into one file per site: ids/logits/probs [L, N, k], lse [L, N]. Layers that were
    not built (`--layers`) hold id -1 and zeros."""
    parts = {l: store.load_tensors(part_file(folder, l)) for l in layers}
    first = parts[layers[0]]
    for s in sites:
        def layer(l: int, f: str, s: str = s) -> torch.Tensor:
            if l in parts:
                return parts[l][f"{s}.{f}"]
            like = first[f"{s}.{f}"]
            return torch.full_like(like, -1) if f == "ids" else torch.zeros_like(like)
        t = {f: torch.stack([layer(l, f) for l in range(subject.n_layers)]) for f in ("ids", "logits", "probs", "lse")}
        t["ids"] = t["ids"].long()
        store.save_tensors(site_file(folder, s), t, metadata={"site": s, "top_k": str(top_k),
                                                               "fingerprint": subject.fingerprint})


def _versions() -> dict[str, str]:
    import transformers
    from importlib.metadata import PackageNotFoundError, version
    try:
        ns = version("neuronscope")
    except PackageNotFoundError:
        ns = "dev"
    return {"neuronscope": ns, "torch": torch.__version__, "transformers": transformers.__version__}


def _bar(progress: bool, total: int, desc: str) -> tqdm[Any] | None:
    if not progress or total == 0:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="site")
