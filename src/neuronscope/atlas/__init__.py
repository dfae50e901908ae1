"""The neuron atlas: every MLP neuron's read and write vectors decoded through the LM head (Geva et al. 2022,
Davies 2025), kept in an atlas folder; open it without the model, look neurons up, search by concept, compare two
models.

    from neuronscope.atlas import build_atlas, Atlas
    atlas = build_atlas(subject, "atlas-smollm")          # or Atlas.open("atlas-smollm")
    atlas.neuron(20, 1234)["down.pos"][:5]
    atlas.search("dog")[:10]
"""
from .atlas import Atlas
from .build import ALL_SITES, build_atlas
from .compare import compare_atlases
from .decode import Decoded, decode, naive_decode

SITES = ALL_SITES

__all__ = ["Atlas", "build_atlas", "compare_atlases", "decode", "naive_decode", "Decoded", "SITES", "ALL_SITES"]
