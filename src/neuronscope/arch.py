"""ArchSpec: where each supported model family keeps its layers, MLP neurons, residual stream, final norm and LM head.

Every capability in neuronscope reaches into a model only through an ArchSpec, so adding a family is one entry here.
Module paths are dotted attribute paths relative to the decoder layer (per-layer parts) or to the whole
`*ForCausalLM` model (global parts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from .errors import NeuronscopeError


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    layers: str                 # list of decoder layers, from the CausalLM root
    final_norm: str             # from the root
    lm_head: str                # from the root
    embed: str                  # token embedding, from the root
    base: str                   # the base model (the part that takes input ids and a cache), from the root
    down: str                   # per layer: the module whose INPUT holds the neuron activations (the neuron site)
    up: str                     # per layer: the read projection (up_proj, or fc_in for ungated MLPs)
    gate: str | None = None     # per layer: gate projection, None when ungated or fused
    fused_gate_up: str | None = None  # per layer: one projection holding [gate; up] rows (Phi-3)
    mlp_in_norm: str | None = None    # per layer: the norm whose input is the mid-block residual (after attention)
    mlp_out: str | None = None        # per layer: the module whose output is added to the residual after the MLP
    conv1d: bool = False        # GPT-2 stores projections as Conv1D, weight [in, out]
    norm_gain_offset: float = 0.0     # Gemma's RMSNorm multiplies by (1 + weight)
    gated: bool = True

    # ---- resolution helpers -------------------------------------------------------------------------
    def get(self, root: nn.Module, path: str) -> nn.Module:
        """Resolve a dotted path; 'a|b' tries alternatives in order (names that changed across versions)."""
        if "|" in path:
            for alt in path.split("|"):
                try:
                    return self.get(root, alt)
                except AttributeError:
                    continue
            raise AttributeError(f"none of {path} found")
        obj: Any = root
        for part in path.split("."):
            obj = getattr(obj, part)
        return cast(nn.Module, obj)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return cast(nn.ModuleList, self.get(model, self.layers))

    def layer_part(self, model: nn.Module, layer: int, path: str) -> nn.Module:
        return self.get(self.decoder_layers(model)[layer], path)

    def has_mid(self, model: nn.Module) -> bool:
        """Whether the block has a residual point between attention and MLP (not so for parallel blocks)."""
        if self.mlp_in_norm is None:
            return False
        return not getattr(model.config, "use_parallel_residual", False)

    # ---- weights as [neurons, hidden] -------------------------------------------------------------------
    def _weight(self, module: nn.Module) -> torch.Tensor:
        return _weight(module)

    def read_vectors(self, model: nn.Module, layer: int) -> dict[str, torch.Tensor]:
        """The vectors each neuron reads from the residual stream, as [n_neurons, hidden] tensors.

        Keys: "up" always; "gate" for gated MLPs.
        """
        if self.fused_gate_up:
            w = _weight(self.layer_part(model, layer, self.fused_gate_up))
            n = w.shape[0] // 2
            return {"up": w[n:], "gate": w[:n]}
        up = _weight(self.layer_part(model, layer, self.up))
        out = {"up": up.T if self.conv1d else up}
        if self.gate:
            out["gate"] = _weight(self.layer_part(model, layer, self.gate))
        return out

    def write_vectors(self, model: nn.Module, layer: int) -> torch.Tensor:
        """Column i of the down projection (what neuron i adds to the residual), as [n_neurons, hidden]."""
        w = _weight(self.layer_part(model, layer, self.down))
        return w if self.conv1d else w.T

    def final_norm_gain(self, model: nn.Module) -> torch.Tensor:
        """The final norm's per-dimension gain g, as applied to the normalised stream (Gemma: 1 + weight)."""
        norm = self.get(model, self.final_norm)
        w = getattr(norm, "weight", None)
        if not isinstance(w, torch.Tensor):
            hidden = int(self.unembedding(model).shape[1])
            return torch.ones(hidden)
        return w.detach().float() + self.norm_gain_offset

    def unembedding(self, model: nn.Module) -> torch.Tensor:
        """W_U as [vocab, hidden]."""
        return _weight(self.get(model, self.lm_head))

    def is_tied(self, model: nn.Module) -> bool:
        return bool(self.unembedding(model).data_ptr() == _weight(self.get(model, self.embed)).data_ptr())


def _weight(module: nn.Module) -> torch.Tensor:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise AttributeError(f"{type(module).__name__} has no weight tensor")
    return w


def _llama_like(family: str, *model_types: str, **kw: Any) -> ArchSpec:
    defaults: dict[str, Any] = dict(
        layers="model.layers", final_norm="model.norm", lm_head="lm_head", embed="model.embed_tokens",
        base="model", down="mlp.down_proj", up="mlp.up_proj", gate="mlp.gate_proj",
        mlp_in_norm="post_attention_layernorm", mlp_out="mlp",
    )
    defaults.update(kw)
    return ArchSpec(family=family, model_types=model_types, **defaults)


SPECS: tuple[ArchSpec, ...] = (
    _llama_like("llama", "llama"),
    _llama_like("mistral", "mistral"),
    _llama_like("qwen2", "qwen2"),
    _llama_like("qwen3", "qwen3"),
    _llama_like("gemma", "gemma", norm_gain_offset=1.0),
    _llama_like("gemma2", "gemma2", norm_gain_offset=1.0,
                mlp_in_norm="pre_feedforward_layernorm", mlp_out="post_feedforward_layernorm"),
    _llama_like("gemma3", "gemma3_text", "gemma3", norm_gain_offset=1.0,
                mlp_in_norm="pre_feedforward_layernorm", mlp_out="post_feedforward_layernorm"),
    _llama_like("phi3", "phi3", gate=None, up="mlp.gate_up_proj", fused_gate_up="mlp.gate_up_proj"),
    ArchSpec(family="gpt2", model_types=("gpt2",), layers="transformer.h", final_norm="transformer.ln_f",
             lm_head="lm_head", embed="transformer.wte", base="transformer", down="mlp.c_proj", up="mlp.c_fc",
             mlp_in_norm="ln_2", mlp_out="mlp", conv1d=True, gated=False),
    ArchSpec(family="gpt_neox", model_types=("gpt_neox",), layers="gpt_neox.layers",
             final_norm="gpt_neox.final_layer_norm", lm_head="lm_head|embed_out", embed="gpt_neox.embed_in",
             base="gpt_neox", down="mlp.dense_4h_to_h", up="mlp.dense_h_to_4h",
             mlp_in_norm="post_attention_layernorm", mlp_out="mlp", gated=False),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for s in SPECS for t in s.model_types)


def spec_for_model_type(model_type: str) -> ArchSpec:
    for spec in SPECS:
        if model_type in spec.model_types:
            return spec
    raise NeuronscopeError(
        f"Model type '{model_type}' is not supported; neuronscope supports "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}."
    )


def spec_for(model: nn.Module) -> ArchSpec:
    """The ArchSpec of a loaded `*ForCausalLM` model, checked against the model's actual modules."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None) or type(model).__name__
    spec = spec_for_model_type(model_type)
    try:
        layers = spec.decoder_layers(model)
        spec.get(model, spec.lm_head)
        spec.get(model, spec.final_norm)
        spec.layer_part(model, 0, spec.down)
    except (AttributeError, IndexError) as exc:
        raise NeuronscopeError(
            f"{type(model).__name__} (model type '{model_type}') does not have the layout neuronscope expects "
            f"for the {spec.family} family ({exc}); load it with AutoModelForCausalLM."
        ) from None
    if len(layers) == 0:
        raise NeuronscopeError(f"{type(model).__name__} has no decoder layers.")
    return spec
