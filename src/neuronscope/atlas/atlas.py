"""`Atlas`: a finished atlas folder, read without the model: each neuron's decoded tokens per site, and lookups."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .. import store
from ..errors import NeuronscopeError
from ..refs import check_neuron, format_index_set
from .folder import AtlasFolder, site_file
from .records import DecodedToken, NeuronHit
from .vocab import normalise, read_vocab

if TYPE_CHECKING:
    from ..subject import Subject



class Atlas:
    """A built atlas. `Atlas.open(folder)`; arrays load lazily, one file per site."""

    def __init__(self, folder: Path, manifest: dict[str, Any], vocab: list[str]):
        self.folder = Path(folder)
        self.manifest = manifest
        a = manifest["atlas"]
        m = manifest.get("model", {})
        self.n_layers: int = int(a["n_layers"])
        self.n_neurons: int = int(a["n_neurons"])
        self.sites: list[str] = list(a["sites"])
        self.top_k: int = int(a["top_k"])
        self.apply_norm: bool = bool(a["apply_norm"])
        self.model_name: str = m.get("name", "?")
        self.fingerprint: str | None = m.get("fingerprint")
        self.vocab = vocab
        built = a.get("layers")
        self.layers: list[int] = [int(x) for x in built] if built is not None else list(range(self.n_layers))
        self._arrays: dict[str, dict[str, torch.Tensor]] = {}
        self._by_normalised: dict[str, list[int]] | None = None     # search's normalise(token) -> ids, once

    # ---- opening ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> Atlas:
        """Open a finished atlas; a missing, incomplete or damaged part is one sentence saying what to do."""
        return cls.from_folder(AtlasFolder.open(folder))

    @classmethod
    def from_folder(cls, af: AtlasFolder) -> "Atlas":
        folder, manifest = af.path, af.manifest
        a = af.section("atlas")
        if not a:
            raise NeuronscopeError(f"'{folder}' holds no atlas (no 'atlas' section in manifest.json); build one "
                                   "with `neuronscope atlas build`.")
        if a.get("status") != "complete":
            raise NeuronscopeError(f"The atlas in '{folder}' is incomplete (its build was interrupted); run the "
                                   "same `neuronscope atlas build` again to resume it.")
        missing = [s for s in a.get("sites", []) if not site_file(folder, s).is_file()]
        if missing:
            raise NeuronscopeError(f"The atlas in '{folder}' is missing its {', '.join(missing)} file(s); "
                                   "rebuild it with --overwrite.")
        for s in a.get("sites", []):
            af.check_file(site_file(folder, s).name, "rebuild the atlas with `neuronscope atlas build --overwrite`")
        af.check_db("rebuild the atlas with `neuronscope atlas build --overwrite` (it rewrites the vocabulary)")
        vocab = read_vocab(folder)
        if vocab is None:
            raise NeuronscopeError(f"The atlas in '{folder}' has no vocabulary table in atlas.sqlite; rebuild it "
                                   "with --overwrite.")
        return cls(folder, manifest, vocab)

    def __repr__(self) -> str:
        return (f"Atlas({str(self.folder)!r}, model={self.model_name!r}, layers={self.n_layers}, "
                f"neurons={self.n_neurons}, sites={self.sites}, top_k={self.top_k})")

    # ---- arrays -------------------------------------------------------------------------------------------
    def _site(self, site: str) -> dict[str, torch.Tensor]:
        if site not in self.sites:
            raise NeuronscopeError(f"This atlas has no site '{site}'; it has {', '.join(self.sites)}.")
        if site not in self._arrays:
            path = site_file(self.folder, site)
            try:
                self._arrays[site] = store.load_tensors(path)
            except Exception as exc:  # noqa: BLE001 - changed on disk since it was opened: one sentence
                raise NeuronscopeError(f"The atlas file '{path}' cannot be read ({str(exc).splitlines()[0]}); "
                                       "rebuild the atlas with `neuronscope atlas build --overwrite`.") from None
        return self._arrays[site]

    def top_ids(self, site: str) -> torch.Tensor:
        """Token ids [L, N, k] (int64), best first."""
        return self._site(site)["ids"]

    def top_logits(self, site: str) -> torch.Tensor:
        """Logits [L, N, k] of those tokens (for down.neg: logits of the negated write vector)."""
        return self._site(site)["logits"]

    def top_probs(self, site: str) -> torch.Tensor:
        """Softmax probabilities [L, N, k] over the whole vocabulary."""
        return self._site(site)["probs"]

    def lse(self, site: str) -> torch.Tensor:
        """The log-sum-exp of each neuron's logits over the vocabulary [L, N]."""
        return self._site(site)["lse"]

    # ---- one neuron -----------------------------------------------------------------------------------------
    def check(self, layer: int, neuron: int) -> None:
        check_neuron(layer, neuron, self.n_layers, self.n_neurons, where="this atlas")
        if len(self.layers) != self.n_layers and layer not in self.layers:
            raise NeuronscopeError(f"Layer {layer} is not in this atlas: it was built for layers "
                                   f"{format_index_set(self.layers)}; build that layer with --layers.")

    def token(self, i: int) -> str:
        return self.vocab[i] if 0 <= i < len(self.vocab) else f"<{i}>"

    def neuron(self, layer: int, i: int) -> dict[str, list[DecodedToken]]:
        """{site: [DecodedToken(token, id, logit, prob), ...]} for neuron i of `layer`, best first."""
        self.check(layer, i)
        out: dict[str, list[DecodedToken]] = {}
        for s in self.sites:
            ids = self.top_ids(s)[layer, i].tolist()
            lg = self.top_logits(s)[layer, i].tolist()
            pr = self.top_probs(s)[layer, i].tolist()
            out[s] = [DecodedToken(self.token(t), t, a, p) for t, a, p in zip(ids, lg, pr)]
        return out

    def top_tokens(self, layer: int, i: int, site: str = "down.pos", k: int = 5) -> list[str]:
        self.check(layer, i)
        return [self.token(t) for t in self.top_ids(site)[layer, i, :k].tolist()]

    # ---- lookups --------------------------------------------------------------------------------------------
    def token_ids(self, token: str) -> list[int]:
        """Vocabulary ids whose text is exactly `token`; failing that, those equal after normalisation
        (space markers stripped, lower case)."""
        exact = [i for i, t in enumerate(self.vocab) if t == token]
        if exact:
            return exact
        n = normalise(token)
        return [i for i, t in enumerate(self.vocab) if n and normalise(t) == n]

    def top_neurons_for(self, token: str, site: str | None = None, k: int = 50) -> list[NeuronHit]:
        """The neurons whose decoded top-k holds `token`, by that token's probability (highest first).

        Returns `NeuronHit`s (score = the token's probability)."""
        if not isinstance(token, str) or not token:
            raise NeuronscopeError("Give a token to look up.")
        ids = self.token_ids(token)
        if not ids:
            raise NeuronscopeError(f"No token '{token}' in this atlas's vocabulary.")
        sites = [site] if site else self.sites
        found = []
        idt = torch.tensor(ids)
        for s in sites:
            hit = torch.isin(self.top_ids(s), idt)                     # [L, N, k]
            score = (self.top_probs(s) * hit).sum(-1)                 # [L, N]
            for l, n in hit.any(-1).nonzero().tolist():
                found.append((float(score[l, n]), l, n, s))
        found.sort(key=lambda x: -x[0])
        return [self._row(l, n, s, sc) for sc, l, n, s in found[:k]]

    def search(self, query: str, k: int = 50, sites: str | Sequence[str] | None = None,
               subject: Subject | None = None) -> list[NeuronHit]:
        """Neurons for a concept (one or more words), best first: see `neuronscope.atlas.search.search`."""
        from .search import search
        return search(self, query, k=k, sites=sites, subject=subject)

    def _row(self, layer: int, neuron: int, site: str, score: float, n_tokens: int = 5) -> NeuronHit:
        return NeuronHit(layer, neuron, site, score, self.top_tokens(layer, neuron, site, n_tokens))
