"""The Injectable Realignment Model: a small MLP that reads the residual stream at one site and adds its output
into the residual stream of chosen layers, through the intervention core's hooks (the LLM itself is never edited).

    irm = IRM.for_subject(subject, inject_layers="0-29")
    with irm.attached(subject):          # hooks on; every forward and every generate step goes through the IRM
        subject.generate("Hello", max_new_tokens=20)
    # outside the block there are no hooks at all: the frozen model's logits are bit-identical

Per forward call, the IRM reads the residual at (read_layer, read_site) for all positions of that call, computes
out [B, T, n_inject, H] once, and adds out[..., j, :] at injected layer j (read first, then add, when the read layer
is itself injected). "resid.mid" adds after the attention add, before the MLP (the paper's injection point);
"resid.post" adds at the block's output.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import NeuronscopeError
from ..interventions import ResidualFunction, StepContext, intervene

if TYPE_CHECKING:
    from ..subject import Subject

OutputHook = Callable[[torch.Tensor, StepContext], None]

SITE_ORDER = {"resid.mid": 0, "resid.post": 1}
WEIGHTS = "irm.safetensors"
CONFIG = "irm.json"


@dataclass
class IRMConfig:
    """Shape of an IRM and the model it belongs to (saved next to its weights as JSON)."""
    hidden_size: int
    inject_layers: list[int]
    read_layer: int = 0
    read_site: str = "resid.mid"
    inject_site: str = "resid.mid"
    width: int = 256
    depth: int = 1              # hidden layers of the MLP (ReLU after each)
    input_norm: bool = True     # parameter-free RMS normalisation of what it reads (stable across models)
    model_name: str = ""
    model_fingerprint: str = ""
    model_family: str = ""
    n_layers: int = 0

    def validate(self) -> "IRMConfig":
        if self.width < 1 or self.depth < 0:
            raise NeuronscopeError(
                f"IRM width must be >= 1 and depth >= 0, got width {self.width}, depth {self.depth}.")
        for s in (self.read_site, self.inject_site):
            if s not in SITE_ORDER:
                raise NeuronscopeError(f"Unknown IRM site '{s}'; use resid.mid or resid.post.")
        if not self.inject_layers:
            raise NeuronscopeError("The IRM needs at least one injected layer.")
        self.inject_layers = sorted(set(int(l) for l in self.inject_layers))
        read_at = (self.read_layer, SITE_ORDER[self.read_site])
        first = (self.inject_layers[0], SITE_ORDER[self.inject_site])
        if first < read_at:
            raise NeuronscopeError(
                f"The IRM reads layer {self.read_layer} ({self.read_site}) but would inject earlier, at layer "
                f"{self.inject_layers[0]} ({self.inject_site}); inject at or after the read site.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IRMConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known).validate()


class IRM(nn.Module):
    """MLP: [.., H] -> (RMS-normalise) -> depth x (Linear(width), ReLU) -> Linear(n_inject * H) -> [.., n_inject, H].

    The last layer starts at zero, so a fresh IRM leaves the model's outputs unchanged.
    """

    def __init__(self, config: IRMConfig):
        super().__init__()
        self.config = config.validate()
        h, w = config.hidden_size, config.width
        dims = [h] + [w] * config.depth
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        out = nn.Linear(dims[-1], len(config.inject_layers) * h)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        layers.append(out)
        self.net = nn.Sequential(*layers)

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def for_subject(cls, subject: Subject, inject_layers: str | Sequence[int] | None = "all", *, read_layer: int = 0,
                    read_site: str = "resid.mid", inject_site: str = "resid.mid", width: int = 256, depth: int = 1,
                    input_norm: bool = True, seed: int | None = 0) -> "IRM":
        """An IRM shaped for `subject` (layer sets like '0-7', '3,7,11', 'all')."""
        layers = subject.parse_layers(inject_layers)
        subject.check_layer(read_layer)
        if "resid.mid" in (read_site, inject_site) and not subject.has_mid_site:
            raise NeuronscopeError(f"The {subject.family} model has parallel blocks: use resid.post for the IRM.")
        cfg = IRMConfig(hidden_size=subject.hidden_size, inject_layers=layers, read_layer=read_layer,
                        read_site=read_site, inject_site=inject_site, width=width, depth=depth,
                        input_norm=input_norm, model_name=subject.name, model_fingerprint=subject.fingerprint,
                        model_family=subject.family, n_layers=subject.n_layers)
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return cls(cfg)
        return cls(cfg)

    @property
    def n_inject(self) -> int:
        return len(self.config.inject_layers)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual [B, T, H] -> injected vectors [B, T, n_inject, H] (in the IRM's dtype)."""
        p = next(self.parameters())
        x = x.to(p.dtype)
        if self.config.input_norm:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        y: torch.Tensor = self.net(x)
        return y.view(*x.shape[:-1], self.n_inject, self.config.hidden_size)

    # ---- hooks -----------------------------------------------------------------------------------------------
    def check_subject(self, subject: Subject, strict: bool = False) -> None:
        """Refuse a model of another shape (or, strict, other weights) than the IRM was made for."""
        c = self.config
        if subject.hidden_size != c.hidden_size or (c.n_layers and subject.n_layers != c.n_layers):
            raise NeuronscopeError(
                f"This IRM was made for a model with hidden size {c.hidden_size} and {c.n_layers} layers; "
                f"'{subject.name}' has {subject.hidden_size} and {subject.n_layers}.")
        if strict and c.model_fingerprint and subject.fingerprint != c.model_fingerprint:
            raise NeuronscopeError(
                f"This IRM was trained on '{c.model_name}' (weights {c.model_fingerprint}); '{subject.name}' has "
                f"different weights ({subject.fingerprint}).")

    def interventions(self, subject: Subject, on_output: OutputHook | None = None,
                      scale: float = 1.0) -> list[ResidualFunction]:
        """The two residual functions (read, then inject) that put this IRM into `subject`'s forward passes.

        on_output(out [B, T, n_inject, H], ctx) is called with each call's output (analysis records it).
        """
        self.check_subject(subject)
        c = self.config
        state: dict[str, torch.Tensor | None] = {"out": None}
        slot = {l: j for j, l in enumerate(c.inject_layers)}

        def read(layer: int, x: torch.Tensor, ctx: StepContext) -> None:
            out = self(x)
            if scale != 1.0:
                out = out * scale
            state["out"] = out
            if on_output is not None:
                on_output(out, ctx)
            return None

        def inject(layer: int, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
            out = state["out"]
            if out is None or out.shape[:2] != x.shape[:2]:
                raise NeuronscopeError("The IRM's injection ran before its read; this forward pass skipped a layer.")
            return x + out[:, :, slot[layer], :].to(x.dtype)

        return [ResidualFunction([c.read_layer], c.read_site, read),
                ResidualFunction(c.inject_layers, c.inject_site, inject)]

    @contextmanager
    def attached(self, subject: Subject, on_output: OutputHook | None = None, scale: float = 1.0) -> Iterator["IRM"]:
        """Hooks on for the block (forward and generate); none at all afterwards."""
        self.to(subject.device)
        with intervene(subject, *self.interventions(subject, on_output=on_output, scale=scale)):
            yield self

    # ---- files -----------------------------------------------------------------------------------------------
    def save(self, folder: str | Path, name: str = WEIGHTS) -> None:
        """Weights (safetensors, with the config in its metadata) and irm.json, atomically."""
        from ..store import save_tensors, write_json
        folder = Path(folder)
        meta = {"irm_config": json.dumps(self.config.to_dict())}
        save_tensors(folder / name, self.state_dict(), metadata=meta)
        write_json(folder / CONFIG, self.config.to_dict())

    @classmethod
    def load(cls, path: str | Path, name: str = WEIGHTS, device: str | torch.device = "cpu") -> "IRM":
        """Load from a run folder (or a .safetensors file whose metadata holds the config)."""
        from safetensors import safe_open
        from ..store import load_tensors
        path = Path(path)
        file = path / name if path.is_dir() else path
        if not file.is_file():
            raise NeuronscopeError(f"No IRM weights at '{file}'; give a run folder made by `neuronscope irm train`.")
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
            cfg = IRMConfig.from_dict(json.loads(meta["irm_config"]))
            irm = cls(cfg)
            irm.load_state_dict(load_tensors(file))
        except NeuronscopeError:
            raise
        except Exception as exc:  # a corrupt or foreign file
            raise NeuronscopeError(f"Cannot read the IRM at '{file}': {exc}") from None
        return irm.to(device)


__all__ = ["IRM", "IRMConfig", "WEIGHTS", "CONFIG", "OutputHook"]
