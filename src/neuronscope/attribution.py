"""Attribution: which neurons caused a token, by |activation x gradient of its probability|, in one backward.

    result = attribute(subject, ids, target_position=12)      # why did token 12 come out?
    result.rows()[:5]  # [AttributionRow(layer, position, neuron, activation, gradient, score), ...]

The token at `target_position` s is predicted by the logits at s - 1, so only the prefix ids[:, :s] is run (later
tokens cannot matter in a causal model). p = softmax(logits[s - 1])[y] with y = ids[s] (or `target_token`; for
s == T, one past the end, y defaults to the model's argmax). Every neuron activation of every layer is a leaf of the
autograd graph through a zero "probe" added to it (a + 0, the probe requiring grad), so a single backward of p
gives the TOTAL derivative dp/da of every neuron, through all later layers; the weights stay frozen. (Capture(grad=
True) would detach each layer's activations, which cuts the paths through later neurons.)
Score of neuron (l, i) at position t = |a * dp/da| (DESIGN.md section 2); the top `top` scores are returned.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import NeuronscopeError
from .interventions import BoundCapture, Capture, Intervention, intervene

if TYPE_CHECKING:
    from .subject import Subject


@dataclass
class AttributionRow:
    """One neuron at one position behind the token: its activation a, the gradient dp/da and the score |a * dp/da|."""
    layer: int
    position: int
    neuron: int
    activation: float
    gradient: float
    score: float


@dataclass
class Attribution:
    """The top neurons behind one predicted token, sorted by score (highest first); tensors are 1-D, on the CPU."""
    target_position: int
    target_token: int
    probability: float
    layer: torch.Tensor
    position: torch.Tensor
    neuron: torch.Tensor
    activation: torch.Tensor
    gradient: torch.Tensor
    score: torch.Tensor

    def __len__(self) -> int:
        return int(self.score.numel())

    def rows(self) -> list[AttributionRow]:
        """One row per (layer, position, neuron), highest score first, as Python numbers."""
        cols = [self.layer.tolist(), self.position.tolist(), self.neuron.tolist(), self.activation.tolist(),
                self.gradient.tolist(), self.score.tolist()]
        return [AttributionRow(*row) for row in zip(*cols)]


def _last_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the last position only (the LM head on one position, not on all of them)."""
    try:
        out: torch.Tensor = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]
    except TypeError:  # a model class without logits_to_keep
        out = model(input_ids=ids, use_cache=False).logits[0, -1]
    return out


def attribute(subject: Subject, input_ids: torch.Tensor, target_position: int, target_token: int | None = None,
              top: int = 1000, *, interventions: tuple[Intervention, ...] = ()) -> Attribution:
    """Top `top` neurons (all layers, all positions before the target) by |a * d p(target) / d a|.

    input_ids: [1, T] (or [T]). target_position: s in 1..T (the position of the token to explain).
    interventions: extra edits active during the forward (e.g. the steering that produced the token).
    """
    ids = torch.as_tensor(input_ids)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise NeuronscopeError(f"Attribution takes one sequence of token ids [1, T], got shape {list(ids.shape)}.")
    T = int(ids.shape[1])
    if isinstance(target_position, bool) or not isinstance(target_position, int):
        raise NeuronscopeError(f"The target position must be an integer, got {target_position!r}.")
    if not 1 <= target_position <= T:
        raise NeuronscopeError(
            f"Target position {target_position} is out of range: explain a token at positions 1 to {T - 1} "
            f"(or {T}, the next token); position 0 has no prediction before it.")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise NeuronscopeError(f"top must be a positive integer, got {top!r}.")
    if target_token is None and target_position < T:
        target_token = int(ids[0, target_position])
    if target_token is not None and not 0 <= int(target_token) < subject.vocab_size:
        raise NeuronscopeError(f"Target token {target_token} is out of range: the vocabulary has "
                               f"{subject.vocab_size} tokens.")

    prefix = ids[:, :target_position].to(subject.device)
    # all layers; zero probes give total derivatives (see interventions.Capture)
    with intervene(subject, *interventions, Capture(grad=True)) as bound, torch.enable_grad():
        probe = bound[-1]
        assert isinstance(probe, BoundCapture)
        logits = _last_logits(subject.model, prefix)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        probs = torch.softmax(logits, dim=-1)
        if target_token is None:
            target_token = int(probs.argmax())
        p = probs[int(target_token)]
        leaves = probe.leaves()  # one forward: one leaf per layer
        grads = torch.autograd.grad(p, leaves, allow_unused=True)
    acts = probe.activations[:, 0]                                                      # [L, T', N]
    grad = torch.stack([torch.zeros_like(a[0]) if g is None else g[0] for a, g in zip(leaves, grads)])
    return top_scores(acts, grad, list(probe.layers), target_position, int(target_token), float(p.detach()), top)


def top_scores(acts: torch.Tensor, grad: torch.Tensor, layers: list[int], target_position: int, target_token: int,
               probability: float, top: int) -> Attribution:
    """The `top` largest |activation x gradient| of acts and grad [L, T', N] (layer l of the stack is `layers[l]`),
    as an Attribution (also the Monitor's chunked attribution's last step)."""
    score = (acts * grad).abs()
    L, Tp, N = score.shape
    k = min(top, score.numel())
    vals, flat = torch.topk(score.reshape(-1), k)
    layer_idx = torch.as_tensor(layers, dtype=torch.long)[flat // (Tp * N)]
    return Attribution(
        target_position=target_position, target_token=target_token, probability=probability,
        layer=layer_idx.cpu(), position=((flat // N) % Tp).cpu(), neuron=(flat % N).cpu(),
        activation=acts.reshape(-1)[flat].cpu(), gradient=grad.reshape(-1)[flat].cpu(), score=vals.detach().cpu())


__all__ = ["attribute", "top_scores", "Attribution"]
