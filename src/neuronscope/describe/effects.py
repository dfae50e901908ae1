"""Output effects: what a neuron makes the model say, measured causally through every later layer.

For neuron (l, i) and polarity p, on each neutral prompt (`PROMPTS`, plain text, so base and instruct models alike),
the activation at the prompt's last position is set to the neuron's firing level (`firing_level`: its
`LEVEL_RANK`-th strongest exemplar activation of that sign over the corpus: raised for pos, lowered for neg) and the
next-token log-probabilities are compared with the unedited run: effect = log p(edited) - log p(clean), per token
of the vocabulary, through all later layers (not the direct LM-head decode of the write vector). Rows of one batch
are different neurons (per-row `Clamp` edits); each prompt's prefix runs once and its KV cache is repeated over the
rows, so a neuron costs one token's forward per prompt.

The prompts are split: the description is written from the mean effect over the first `n_train` prompts (the tokens
it raises most, `says`, and lowers most, `less`: up to K_SAYS each, those whose change is at least half the first
one's), and scored on the others (`output_score`): the share of the
described tokens that are among the `top_held(V)` most raised tokens of the held-out mean effect (TOP_HELD = 50, or
1% of a vocabulary smaller than 5,000; chance: that count / the vocabulary size, 0.1% for SmolLM2). The held-out
effect size (`effect`: mean raise of the described tokens, in nats) says how much it matters. The same score applies
to any list of tokens, e.g. the write vector's decode (`promotes`), so the two can be compared on the same prompts.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import NeuronscopeError
from ..refs import POLARITIES
from ..subject import call_args

Key = tuple[int, int, str]
PROMPTS = (
    # train (what the description is written from)
    "The", "I think that", "Here is what happened next:", "She opened the door and",
    # held out (what it is scored on)
    "In the morning,", "This is a list of", "He said that the", "Once upon a time",
)
N_TRAIN = 4
LEVEL_RANK = 10
TOP_HELD = 50
K_SAYS = 5
STAND_OUT = 0.5


@dataclass
class Effect:
    """One neuron polarity's measured output effect, its description's tokens and their held-out score."""
    value: float                    # the activation it was set to
    says: list[int]                 # token ids it raises most (train prompts; one per key), strongest first
    says_delta: list[float]         # their mean raise (train), nats
    less: list[int]                 # token ids it lowers most (train)
    less_delta: list[float]
    score: float                    # output_score of `says` on the held-out prompts
    effect: float                   # mean held-out raise of `says`, nats
    compare_score: float | None = None     # the same for the `compare` tokens given (e.g. the decode's promotes)
    compare_effect: float | None = None


def top_held(vocab_size: int) -> int:
    """How many of the most raised held-out tokens an output description's tokens are checked against."""
    return max(1, min(TOP_HELD, vocab_size // 100))


def _with_cache(kw: str, cache: Any) -> dict[str, Any]:
    """Forward arguments continuing a KV cache (the caller passes a copy: the prompt's own cache is reused), or none
    for no cache."""
    return {} if cache is None else {kw: cache, "use_cache": True}


def firing_level(stats: Any, l: int, n: int, p: str, rank: int = LEVEL_RANK) -> float | None:
    """The activation a neuron is set to: its `rank`-th strongest exemplar value of the polarity's sign (or the
    weakest stored one when fewer), None when it never fires with that sign."""
    vals = stats._a[f"ex_{p}_value"][l, n]
    idx = stats._a[f"ex_{p}_index"][l, n]
    valid = (idx >= 0).nonzero().squeeze(1)
    if len(valid) == 0:
        return None
    v = float(vals[valid[min(rank, len(valid)) - 1]])
    if (p == "pos" and v <= 0) or (p == "neg" and v >= 0):
        return None
    return v


def measure_effects(subject: Any, stats: Any, keys: Sequence[Key], *, key_of: Sequence[int] | None = None,
                    compare: dict[Key, list[int]] | None = None, prompts: Sequence[str] = PROMPTS,
                    n_train: int = N_TRAIN, batch: int = 256, progress: bool = False) -> dict[Key, Effect]:
    """The output effect of each (layer, neuron, polarity) in `keys` (those that never fire with their sign are
    left out), with its description's tokens and their held-out score. key_of[token id]: a key code per token
    (-1: a token a description may not name; tokens of one key are named once); default every token its own key.
    compare: other token lists to score on the same held-out prompts (e.g. the decode's promotes)."""
    if not 0 < n_train < len(prompts):
        raise NeuronscopeError(f"Output effects need train and held-out prompts: {len(prompts)} prompts, "
                               f"n_train {n_train}.")
    todo = _firing(stats, keys)
    kw, _ = call_args(subject)
    prepared = _prepare(subject, prompts, kw)
    V = prepared[0].base.shape[0]
    keys_t = torch.arange(V) if key_of is None else torch.tensor(list(key_of)[:V] + [-1] * (V - len(key_of)))
    allowed = keys_t >= 0
    kl = keys_t.tolist()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), unit="neuron", desc="output effects", dynamic_ncols=True)
    result: dict[Key, Effect] = {}
    with torch.no_grad():
        for s in range(0, len(todo), batch):
            part = todo[s:s + batch]
            train, held = _mean_effects(subject, kw, part, prepared, n_train)
            result.update(_effects(part, train, held, allowed, kl, compare))
            if bar is not None:
                bar.update(len(part))
    if bar is not None:
        bar.close()
    return result


def _firing(stats: Any, keys: Sequence[Key]) -> list[tuple[Key, float]]:
    """(key, firing level) of the keys whose neuron fires with their sign (a polarity other than pos/neg is an
    error)."""
    todo: list[tuple[Key, float]] = []
    for key in keys:
        l, n, p = key
        if p not in POLARITIES:
            raise NeuronscopeError(f"Polarity must be pos or neg, got {p!r}.")
        v = firing_level(stats, l, n, p)
        if v is not None:
            todo.append((key, v))
    return todo


@dataclass
class _Prompt:
    """One prompt run once without edits: its last token [1, 1], the KV cache of the tokens before it (None for a
    one-token prompt) and the clean next-token log-probabilities [V]."""
    last: torch.Tensor
    cache: Any
    base: torch.Tensor


def _prepare(subject: Any, prompts: Sequence[str], kw: str) -> list[_Prompt]:
    dev = subject.device
    prepared = []
    with torch.no_grad():
        for text in prompts:
            ids = subject.encode(text).to(dev)
            if ids.shape[1] < 1:
                raise NeuronscopeError(f"The output-effect prompt {text!r} encodes to no token.")
            cache = None
            if ids.shape[1] > 1:
                out = subject.model(input_ids=ids[:, :-1], use_cache=True)
                cache = out["cache"] if "cache" in out else out.past_key_values
            clean = subject.model(input_ids=ids[:, -1:], **_with_cache(kw, copy.deepcopy(cache)))
            base = torch.log_softmax(clean.logits[0, -1].float(), -1).cpu()
            prepared.append(_Prompt(ids[:, -1:], cache, base))
    return prepared


def _mean_effects(subject: Any, kw: str, part: list[tuple[Key, float]], prepared: list[_Prompt], n_train: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean effect [B, V] of setting each row's neuron to its firing level (one neuron per row) over the train
    prompts and over the held-out prompts."""
    from ..interventions import Clamp, intervene
    B = len(part)
    V = prepared[0].base.shape[0]
    edits = [Clamp(layer=l, neurons=[n], value=v, rows=[r]) for r, ((l, n, _), v) in enumerate(part)]
    train = torch.zeros(B, V)
    held = torch.zeros(B, V)
    for j, pr in enumerate(prepared):
        c = None
        if pr.cache is not None:
            c = copy.deepcopy(pr.cache)
            c.batch_repeat_interleave(B)
        with intervene(subject, *edits):
            logits = subject.model(input_ids=pr.last.expand(B, 1), **_with_cache(kw, c)).logits
        delta = torch.log_softmax(logits[:, -1].float(), -1).cpu() - pr.base
        if j < n_train:
            train += delta
        else:
            held += delta
    train /= n_train
    held /= len(prepared) - n_train
    return train, held


def _effects(part: list[tuple[Key, float]], train: torch.Tensor, held: torch.Tensor, allowed: torch.Tensor,
             kl: list[int], compare: dict[Key, list[int]] | None) -> dict[Key, Effect]:
    """Each row's description (the tokens its train effect raises and lowers most, one per key; `allowed` [V]: the
    tokens a description may name, `kl`: each token's key code) and their held-out score, and the held-out score of
    its `compare` tokens."""
    V = train.shape[1]
    masked = train.masked_fill(~allowed, 0.0)
    up = masked.topk(K_SAYS * 4, dim=1)
    down = (-masked).topk(K_SAYS * 4, dim=1)
    htop = held.topk(top_held(V), dim=1).indices
    out: dict[Key, Effect] = {}
    for r, (key, v) in enumerate(part):
        says, sd = _one_per_key(up.indices[r].tolist(), up.values[r].tolist(), kl)
        less, ld = _one_per_key(down.indices[r].tolist(), (-down.values[r]).tolist(), kl)
        top = set(htop[r].tolist())
        sc, ef = _held_score(says, top, held[r])
        e = Effect(v, says, sd, less, ld, sc, ef)
        if compare is not None and key in compare:
            e.compare_score, e.compare_effect = _held_score(compare[key], top, held[r])
        out[key] = e
    return out


def _one_per_key(ids: list[int], vals: list[float], key_of: list[int]) -> tuple[list[int], list[float]]:
    """The first K_SAYS ids of distinct allowed keys (with their values), in order, keeping only those that stand
    out: a change of the right sign of at least STAND_OUT times the first one's."""
    seen: set[int] = set()
    out_i: list[int] = []
    out_v: list[float] = []
    for i, v in zip(ids, vals):
        k = key_of[i]
        if k < 0 or k in seen:
            continue
        if abs(v) <= 0 or (out_v and abs(v) < STAND_OUT * abs(out_v[0])):
            break
        seen.add(k)
        out_i.append(i)
        out_v.append(round(float(v), 4))
        if len(out_i) >= K_SAYS:
            break
    return out_i, out_v


def _held_score(token_ids: Sequence[int], top: set[int], held: torch.Tensor) -> tuple[float, float]:
    """(output score, effect) of promoted token ids against a held-out mean effect [V]: the share of them among
    its top_held(V) most raised tokens (`top`), and their mean held-out raise in nats (0, 0 for none)."""
    ids = [int(i) for i in token_ids if 0 <= int(i) < held.shape[0]]
    if not ids:
        return 0.0, 0.0
    return sum(i in top for i in ids) / len(ids), round(float(held[torch.tensor(ids)].mean()), 4)
